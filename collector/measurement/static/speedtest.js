// The browser speed test (collector/measurement/page.py states the method) and its
// result page. Same-origin requests only: LibreSpeed's "empty" and "garbage", bbprobe's
// upload sink, and the result's POST; no third party is asked anything.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const now = () => performance.now() / 1000;
  const DASH = "—";
  // Speeds in Mbit/s and delays in ms with two decimals, as the agent prints them.
  const mbit = (bps) => (bps == null || !isFinite(bps) ? DASH : (bps / 1e6).toFixed(2));
  const msec = (ms) => (ms == null || !isFinite(ms) ? DASH : ms.toFixed(2));
  const mbytes = (n) => (n == null ? "" : (n / 1e6).toFixed(1) + " MB moved");
  // How often the live figure is redrawn, and over how long a span its rate is taken.
  const TICK_S = 0.2, LIVE_SPAN_S = 1.0;

  function show(id, text) { $(id).textContent = text; }

  function localTime() {
    // The result page states the time in UTC; the reader's own clock beside it.
    const when = $("when");
    if (!when) return;
    const moment = new Date(when.getAttribute("datetime"));
    if (isNaN(moment)) return;
    when.textContent += " (" + moment.toLocaleString() + " your time)";
  }

  if (document.body.dataset.page === "result") {
    localTime();
    return;
  }
  if (document.body.dataset.page !== "test") return;

  const q = new URLSearchParams(location.search);
  const number = (name, fallback) => {
    const v = parseFloat(q.get(name));
    return isFinite(v) && v >= 0 ? v : fallback;
  };
  const WARMUP = number("warmup_s", 2), WINDOW = number("window_s", 8) || 8;
  const STREAMS = Math.max(1, Math.min(32, Math.round(number("streams", 4)) || 4));
  const PINGS = 10;
  const settings = {streams: STREAMS, warmup_s: WARMUP, window_s: WINDOW,
                    total_s: Math.round(2 * (WARMUP + WINDOW) + 1)};
  document.querySelectorAll("[data-setting]").forEach((el) => {
    el.textContent = String(settings[el.dataset.setting]);
  });

  // The live view: a phase name, one big figure and the phase's progress, redrawn
  // every TICK_S from what the phase has counted so far.
  function live(phase, figure, unit, done) {
    show("phase", phase);
    show("live", figure);
    show("live-unit", unit);
    $("progress").value = Math.max(0, Math.min(1, done));
  }

  function activate(card) {
    document.querySelectorAll(".figure").forEach((el) => el.classList.remove("active"));
    if (card) $(card).classList.add("active");
  }

  // A running byte count's recent rate: snapshots [t, bytes] taken at every tick, the
  // rate over the last LIVE_SPAN_S of them.
  function rateMeter() {
    const snaps = [];
    return function (total) {
      const t = now();
      snaps.push([t, total]);
      while (snaps.length > 2 && snaps[1][0] <= t - LIVE_SPAN_S) snaps.shift();
      const [t0, b0] = snaps[0];
      return t > t0 ? (total - b0) * 8 / (t - t0) : null;
    };
  }

  function ticker(fn) {
    const id = setInterval(fn, TICK_S * 1000);
    return () => clearInterval(id);
  }

  async function ping() {
    const rtts = [];
    activate("card-ping");
    live("Ping", DASH, "ms", 0);
    for (let i = 0; i < PINGS; i++) {
      const t = performance.now();
      await fetch("empty?r=" + Math.random(), {cache: "no-store"});
      const rtt = performance.now() - t;
      if (i > 0) rtts.push(rtt);
      live(i === 0 ? "Ping · opening the connection" : "Ping " + i + " of " + (PINGS - 1),
           msec(rtt), "ms", (i + 1) / PINGS);
    }
    let jitter = 0;
    for (let i = 1; i < rtts.length; i++) jitter += Math.abs(rtts[i] - rtts[i - 1]);
    return {rtts_ms: rtts, rtt_min_ms: Math.min(...rtts),
            rtt_mean_ms: rtts.reduce((a, b) => a + b, 0) / rtts.length,
            jitter_ms: jitter / (rtts.length - 1)};
  }

  function bytesAt(samples, t) {
    // Cumulative bytes at time t, interpolated between the samples either side (they
    // are in time order), so the window has exact edges however sparse the events.
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
    // samples: [t, cumulative bytes] over all streams; rate over [t0 + WARMUP, the end
    // of the window] (not the tail after it, when streams finish one by one).
    if (!samples.length) return null;
    const start = t0 + WARMUP;
    const end = Math.min(t0 + WARMUP + WINDOW, samples[samples.length - 1][0]);
    return end > start ? (bytesAt(samples, end) - bytesAt(samples, start)) * 8 / (end - start)
                       : null;
  }

  function phaseLabel(name, t0) {
    return now() - t0 < WARMUP ? name + " · warming up" : name + " · measuring";
  }

  async function download() {
    const t0 = now(), stop = t0 + WARMUP + WINDOW, samples = [];
    let total = 0;
    activate("card-download");
    const meter = rateMeter();
    live("Download", DASH, "Mbit/s", 0);
    const stopTicks = ticker(() => live(phaseLabel("Download", t0), mbit(meter(total)),
                                        "Mbit/s", (now() - t0) / (stop - t0)));
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
    try {
      await Promise.all(Array.from({length: STREAMS}, stream));
    } finally {
      stopTicks();
    }
    return {download_bps: windowRate(samples, t0), download_bytes: total};
  }

  function serverWindowRate(reports) {
    // reports: the upload sink's answers, each {t0_monotonic_s, samples: [[t, bytes]]}
    // on the server's clock; rate over [first start + WARMUP, + WINDOW] of the bytes the
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
    // Counted where the bytes arrive (bbprobe's upload sink reports its own samples),
    // as the agent's uploads are: what a browser has "sent" includes what is still
    // queued in its socket. The live figure can only use the browser's own count.
    const t0 = now(), stop = t0 + WARMUP + WINDOW, reports = [];
    const blob = new Blob(Array.from({length: 16},
                                     () => crypto.getRandomValues(new Uint8Array(65536))));
    let sent = 0, failures = 0;
    activate("card-upload");
    const meter = rateMeter();
    live("Upload", DASH, "Mbit/s", 0);
    const stopTicks = ticker(() => live(phaseLabel("Upload", t0), mbit(meter(sent)),
                                        "Mbit/s", (now() - t0) / (stop - t0)));
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
    try {
      await Promise.all(Array.from({length: STREAMS}, stream));
    } finally {
      stopTicks();
    }
    return {upload_bps: serverWindowRate(reports.filter((r) => r && r.samples)),
            upload_bytes: sent};
  }

  function shareResult(saved) {
    const url = new URL(saved.url, location.href).href;
    $("share-url").value = url;
    $("share-link").href = url;
    $("share").hidden = false;
  }

  async function copyLink() {
    const input = $("share-url");
    try {
      await navigator.clipboard.writeText(input.value);
      show("copy", "Copied");
    } catch (e) {
      // No clipboard access (plain HTTP is not a secure context): select it for Ctrl-C.
      input.focus(); input.select();
    }
  }

  async function run() {
    const button = $("start");
    button.disabled = true;
    $("share").hidden = true;
    document.body.dataset.state = "running";
    for (const id of ["ping", "jitter", "download", "upload"]) show(id, DASH);
    const result = {method: {streams: STREAMS, warmup_s: WARMUP, window_s: WINDOW,
                             ping_count: PINGS - 1, upload_counted_at: "server"},
                    user_agent: navigator.userAgent};
    try {
      show("status", "Testing…");
      Object.assign(result, await ping());
      show("ping", msec(result.rtt_min_ms)); show("jitter", msec(result.jitter_ms));
      Object.assign(result, await download());
      show("download", mbit(result.download_bps));
      show("download-bytes", mbytes(result.download_bytes));
      Object.assign(result, await upload());
      show("upload", mbit(result.upload_bps));
      show("upload-bytes", mbytes(result.upload_bytes));
      activate(null);
      live("Done", mbit(result.download_bps), "Mbit/s down", 1);
      if (document.body.dataset.record === "off") {
        show("status", "Done. This measurement server keeps no results: this page is " +
                       "the only record.");
        document.body.dataset.state = "done";
        return;
      }
      const resp = await fetch("api/v1/browser-results", {method: "POST",
        headers: {"Content-Type": "application/json"}, body: JSON.stringify(result)});
      const saved = await resp.json();
      if (resp.ok && saved.url) {
        shareResult(saved);
        show("status", "Done.");
        document.body.dataset.state = "done";
      } else {
        show("status", "Done, but not saved: " + (saved.error || resp.status));
        document.body.dataset.state = "failed";
      }
    } catch (e) {
      activate(null);
      show("phase", "Failed");
      show("status", "The test failed: " + e);
      document.body.dataset.state = "failed";
    } finally {
      button.disabled = false;
      button.textContent = "Test again";
    }
  }

  $("start").addEventListener("click", run);
  $("copy").addEventListener("click", copyLink);
  if (q.get("autostart") === "1") run();
})();
