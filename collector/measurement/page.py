"""The browser speed test the collector serves at ``/speedtest`` (one page, no external
resources): ping and download over the LibreSpeed protocol (collector/librespeed.py),
upload to bbprobe's receiver-counting sink.

Method (stated on the page and recorded with each result):
- ping: 10 HTTP GETs of ``empty``, the first discarded (connection set-up); min, mean
  and jitter (mean absolute difference of consecutive RTTs);
- download: ``streams`` parallel GETs of ``garbage``, re-issued until the end; bytes read
  counted as they arrive; rate = bytes in the window after ``warmup_s`` / ``window_s``,
  the cumulative count interpolated at both edges (the tail after the window, while
  streams finish one by one, is not counted);
- upload: ``streams`` parallel XHR POSTs of a random 1 MiB body to bbprobe's upload sink
  (``/measure/v1/upload``), which answers with its own receive samples; rate = bytes the
  server received in the window (on the server's clock), as the agent's uploads are
  measured: a browser's own "sent" count includes what is still queued in its socket.
The result goes to ``POST /api/v1/browser-results``: kept apart from probe results, never
in compliance.
"""

from __future__ import annotations

from html import escape

from collector import __version__

_SCRIPT = r"""
const q = new URLSearchParams(location.search);
const WARMUP = parseFloat(q.get("warmup_s") || "2"), WINDOW = parseFloat(q.get("window_s") || "8");
const STREAMS = parseInt(q.get("streams") || "4", 10);
const $ = (id) => document.getElementById(id);
const now = () => performance.now() / 1000;
function show(id, text) { $(id).textContent = text; }

async function ping() {
  const rtts = [];
  for (let i = 0; i < 10; i++) {
    const t = performance.now();
    await fetch("empty?r=" + Math.random(), {cache: "no-store"});
    rtts.push(performance.now() - t);
  }
  rtts.shift();
  let jitter = 0;
  for (let i = 1; i < rtts.length; i++) jitter += Math.abs(rtts[i] - rtts[i - 1]);
  return {rtts_ms: rtts, rtt_min_ms: Math.min(...rtts),
          rtt_mean_ms: rtts.reduce((a, b) => a + b, 0) / rtts.length,
          jitter_ms: jitter / (rtts.length - 1)};
}

function bytesAt(samples, t) {
  // Cumulative bytes at time t, interpolated between the samples either side (they are
  // in time order), so the window has exact edges however sparse the progress events.
  let before = [samples.length ? samples[0][0] : t, 0];
  for (const [ts, b] of samples) {
    if (ts > t) {
      const f = ts > before[0] ? (t - before[0]) / (ts - before[0]) : 1;
      return before[1] + Math.max(0, Math.min(1, f)) * (b - before[1]);
    }
    before = [ts, b];
  }
  return before[1];
}

function windowRate(samples, t0) {
  // samples: [t, cumulative bytes] over all streams; rate over [t0 + WARMUP, the end of
  // the window] (not the tail after it, when streams finish one by one).
  if (!samples.length) return null;
  const start = t0 + WARMUP, end = Math.min(t0 + WARMUP + WINDOW, samples[samples.length - 1][0]);
  return end > start ? (bytesAt(samples, end) - bytesAt(samples, start)) * 8 / (end - start)
                     : null;
}

async function download() {
  const t0 = now(), stop = t0 + WARMUP + WINDOW, samples = [];
  let total = 0;
  async function stream() {
    while (now() < stop) {
      const controller = new AbortController();
      const resp = await fetch("garbage?ckSize=25&r=" + Math.random(),
                               {cache: "no-store", signal: controller.signal});
      const reader = resp.body.getReader();
      try {
        while (true) {
          const {done, value} = await reader.read();
          if (done) break;
          total += value.length; samples.push([now(), total]);
          if (now() >= stop) { controller.abort(); break; }
        }
      } catch (e) { if (now() < stop) throw e; }
    }
  }
  await Promise.all(Array.from({length: STREAMS}, stream));
  return {download_bps: windowRate(samples, t0), download_bytes: total};
}

function serverWindowRate(reports) {
  // reports: the upload sink's answers, each {t0_monotonic_s, samples: [[t, bytes]]} on
  // the server's clock; rate over [first start + WARMUP, + WINDOW] of the bytes the
  // server received, summed over every request.
  if (!reports.length) return null;
  const first = Math.min(...reports.map((r) => r.t0_monotonic_s));
  const a = first + WARMUP, b = a + WINDOW;
  let bytes = 0, end = a;
  for (const r of reports) {
    const s = r.samples.map(([t, n]) => [r.t0_monotonic_s + t, n]);
    bytes += bytesAt(s, b) - bytesAt(s, a);
    end = Math.max(end, s[s.length - 1][0]);
  }
  const span = Math.min(b, end) - a;
  return span > 0 ? bytes * 8 / span : null;
}

async function upload() {
  // Counted where the bytes arrive (bbprobe's upload sink reports its own samples), as
  // the agent's uploads are: what a browser has "sent" includes what is still queued in
  // its socket, which on a slow line is a few per cent of a 10 s window.
  const t0 = now(), stop = t0 + WARMUP + WINDOW, reports = [];
  const blob = new Blob([crypto.getRandomValues(new Uint8Array(65536))].concat(
    Array.from({length: 15}, () => crypto.getRandomValues(new Uint8Array(65536)))));
  let sent = 0, failures = 0;
  function stream() {
    return new Promise((resolve) => {
      function one() {
        if (now() >= stop || failures > 20) return resolve();
        const xhr = new XMLHttpRequest();
        let last = 0;
        xhr.upload.onprogress = (e) => { sent += e.loaded - last; last = e.loaded; };
        xhr.onload = () => {
          try { reports.push(JSON.parse(xhr.responseText)); } catch (e) { failures++; }
          if (xhr.status !== 200) failures++;
          one();
        };
        xhr.onerror = () => { failures++; one(); };
        xhr.open("POST", "measure/v1/upload?sample_interval_s=0.05");
        xhr.setRequestHeader("Content-Type", "application/octet-stream");
        xhr.send(blob);
      }
      one();
    });
  }
  await Promise.all(Array.from({length: STREAMS}, stream));
  return {upload_bps: serverWindowRate(reports.filter((r) => r && r.samples)),
          upload_bytes: sent};
}

async function run() {
  document.body.dataset.state = "running";
  const result = {method: {streams: STREAMS, warmup_s: WARMUP, window_s: WINDOW,
                           ping_count: 9, upload_counted_at: "server"},
                  user_agent: navigator.userAgent};
  try {
    show("status", "ping…"); Object.assign(result, await ping());
    show("ping", result.rtt_min_ms.toFixed(1) + " ms (jitter " +
         result.jitter_ms.toFixed(1) + " ms)");
    show("status", "download…"); Object.assign(result, await download());
    show("download", (result.download_bps / 1e6).toFixed(2) + " Mbit/s");
    show("status", "upload…"); Object.assign(result, await upload());
    show("upload", (result.upload_bps / 1e6).toFixed(2) + " Mbit/s");
    if (document.body.dataset.record === "off") {
      show("status", "done (this measurement server keeps no results)");
      document.body.dataset.state = "done";
      return;
    }
    const resp = await fetch("api/v1/browser-results", {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify(result)});
    const saved = await resp.json();
    show("status", resp.ok ? "done; result " + saved.id + " recorded"
                           : "not recorded: " + saved.error);
    document.body.dataset.state = resp.ok ? "done" : "failed";
  } catch (e) {
    show("status", "failed: " + e); document.body.dataset.state = "failed";
  }
}
document.getElementById("start").addEventListener("click", run);
if (q.get("autostart") === "1") run();
"""


def page(record: bool = True) -> str:
    """The page; ``record=False`` on a measurement-only server (no database): the page
    measures and shows the result, and says it was not recorded."""
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        "<title>bbprobe speed test</title><style>body{font:16px system-ui,sans-serif;"
        "max-width:40em;margin:2em auto;padding:0 1em}dd{font-size:1.6em;margin:0 0 .6em}"
        "button{font-size:1.2em;padding:.4em 1.2em}</style></head>"
        "<body data-state=idle data-record=" + ("on" if record else "off") + ">"
        "<h1>Speed test</h1><p>Measures this browser's connection to this server: ping "
        "(9 HTTP round trips after a first one), then download and upload with parallel "
        "streams after a warm-up (uploads counted by this server as they arrive). A "
        "browser result says how this device and its network "
        "did; it is kept apart from the measurements of the operator's probes.</p>"
        "<button id=start>Start</button><dl><dt>Ping</dt><dd id=ping>—</dd>"
        "<dt>Download</dt><dd id=download>—</dd><dt>Upload</dt><dd id=upload>—</dd></dl>"
        f"<p id=status>ready</p><footer>bbprobe-collector {escape(__version__)}</footer>"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
