"""Line certification, 244/08/CSP style (methodology.md §1.4-1.6): does one customer's
line meet its contract? Pure: results and contract in, certificate out.

- Campaign: measurements spread over the 24 hourly bands of local time. Rule "96in24h"
  (Ne.Me.Sys since about 2019): 4 sessions in every band; rule "24in72h" (2010-2012): 1
  per band. A session counts for its band by the agent's own rule (agent/schedule.py
  ``fills_band``: valid, a successful download, a successful upload and a ping train
  that sent packets, not started inside a suppression window), so the certificate's
  band table and the daemon's campaign count the same sessions the same way.
- Suppression windows (LMAP's suppression) over the line: their time is no campaign
  time. A session that started inside one (by hand, or by an agent that did not know the
  window) is listed, named with the window, and neither fills its band nor adds a
  sample. Every sentence the certificate prints about a window is derived from the
  sessions listed (``Suppressed.sessions_inside``, ``bands_short``), never assumed.
- Verdict against the contract (probe line metadata): "banda minima" (5th percentile of
  per-test speed) below the guaranteed minimum in either direction, "ritardo massimo"
  (95th percentile of delay) above the maximum, or loss above the maximum: a breach. Any
  one breach qualifies (AGCOM, Relazione annuale 2012). A campaign with any band short is
  "incomplete": never a verdict. Sessions the agent flagged invalid are listed but
  neither fill a band nor contribute a sample.
- The contract in force: each session is judged by the version of the line's contract
  in force when it started (collector/lines.py ``contract_at``), never by the figures of
  the day the certificate is made; the certificate names the version(s). A campaign over
  which the judged figures changed gets no verdict: a percentile over sessions measured
  under different minimums is judged against neither (certify each part).
- Delay here is the 95th percentile of the ICMP round trip by default, as Ne.Me.Sys
  stores and certifies it; ``delay_basis="rtt_half"`` judges the one-way estimate
  instead. (The Allegato 2 report, collector/compliance/evaluate.py, judges the
  operator's generic targets on the mean delay: another statistic, said on both pages.)
- Attempts the measurement server refused (for capacity, HTTP 429 or a bbprobe server's
  503, or its refusal of the ticket; facts.is_refusal) are not the line's: no sample, no
  failure.
  Each session lists how many it had, and the certificate counts them per server.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from agent import stats
from agent.schedule import band_of, bands_filled, fills_band
from agent.schema import parse_utc
from agent.spec import CAMPAIGN_RULES, DEFAULT_CAMPAIGN_RULE, CampaignRule
from collector.compliance.facts import SessionFacts
from collector.compliance.uncertainty import (
    DEFAULT_MIN_SAMPLES,
    Interval,
    jitter_interval,
    percentile_interval,
    percentile_interval_ranks,
    wilson_interval,
)
from collector.lines import JUDGED_FIELDS, ContractVersion, LineMetadata, contract_for

CertVerdict = Literal["breach", "no_breach", "incomplete"]


@dataclass(frozen=True, slots=True)
class Check:
    id: str
    name: str
    unit: str
    comparison: str  # the comparison that means breach
    threshold: float | None  # None: not in the contract, not judged
    observed: float | None
    samples: int
    breach: bool | None
    # Shown for information, never judged (no documented rule: jitter, the normally
    # available and maximum speeds).
    informational: bool = False
    # The 95 % confidence interval of ``observed`` (uncertainty.py): shown beside it,
    # "not enough data" under the minimum-sample rule; it never changes ``breach``.
    interval: Interval | None = None


@dataclass(frozen=True, slots=True)
class SessionLine:
    """One session as listed on the certificate."""

    result_id: str
    started_at: str
    band: int
    counted: bool
    download_kbps: tuple[float | None, ...]
    upload_kbps: tuple[float | None, ...]
    rtts_ms: tuple[float | None, ...]
    valid: bool = True
    invalid_codes: tuple[str, ...] = ()
    # Attempts the measurement server refused in this session (not in the speeds).
    refused_attempts: int = 0
    # The reason of the suppression window the session started inside (not counted, no
    # sample), or None.
    suppressed_by: str | None = None
    # The version of the line's contract in force when the session started (None: the
    # line has no contract history, judged by ``Certificate.line``).
    contract_version: int | None = None


@dataclass(frozen=True, slots=True)
class Suppressed:
    """A suppression window (collector/fleet/rules.py ``Window``) over the campaign, with
    what the sessions say of it: those that started inside it (listed, not counted) and
    which of the bands it covers are still short of the rule."""

    starts_at: str
    ends_at: str
    reason: str
    bands: tuple[int, ...]  # local hour bands the window covers
    sessions_inside: tuple[str, ...] = ()  # result ids of sessions started inside it
    bands_short: tuple[int, ...] = ()  # of ``bands``, those short of the rule's count


@dataclass(frozen=True, slots=True)
class Certificate:
    probe_id: str
    line: LineMetadata
    rule: CampaignRule
    timezone: str
    delay_basis: str
    first: str | None
    last: str | None
    band_counts: tuple[int, ...]  # sessions counted per local hour band 0..23
    complete: bool
    checks: tuple[Check, ...]
    sessions: tuple[SessionLine, ...]
    verdict: CertVerdict
    suppressions: tuple[Suppressed, ...] = ()
    # The IP version certified, when the line was measured over both (dual stack: each
    # family is a campaign of its own); None: a single family or unknown.
    family: str | None = None
    # Attempts the measurement server refused over the campaign, (server, attempts)
    # sorted by server, of every session listed: none of them in a check.
    refused_by_server: tuple[tuple[str, int], ...] = ()
    # The versions of the line's contract in force over the sessions listed, oldest first
    # (empty: no history given); ``line`` is the one judged, ``contract_version`` its
    # number. ``contract_changed``: the judged figures (JUDGED_FIELDS) differ between
    # them, so no verdict is given (docs/analyst.md "Contract history").
    contracts: tuple[ContractVersion, ...] = ()
    contract_version: int | None = None
    contract_changed: bool = False
    # The minimum-sample rule the checks' intervals were marked by (uncertainty.py).
    min_samples: int = DEFAULT_MIN_SAMPLES

    @property
    def bands_filled(self) -> int:
        """Bands with the rule's count: the figure the agent reports (bands filled)."""
        return bands_filled(self.band_counts, self.rule.per_band)

    @property
    def sessions_counted(self) -> int:
        return sum(self.band_counts)

    @property
    def sessions_required(self) -> int:
        """Sessions still missing for a complete campaign (no band's surplus counts
        for another band)."""
        return sum(max(0, self.rule.per_band - n) for n in self.band_counts)


Window = tuple[str, str, str]  # (starts_at, ends_at, reason), UTC text


def window_of(started_at: str, windows: Sequence[Window]) -> Window | None:
    """The first window [starts_at, ends_at) that ``started_at`` falls in, or None
    (compared as instants, whatever the text's precision)."""
    moment = parse_utc(started_at)
    for window in windows:
        if parse_utc(window[0]) <= moment < parse_utc(window[1]):
            return window
    return None


def families(results: Sequence[SessionFacts]) -> list[str]:
    """The IP versions a line is certified in, one campaign each: both, when any of its
    sessions was half of a dual-stack slot (the agent measured every slot once over
    each); none otherwise (one campaign, whatever family each session took: under
    "any" the host may change its preference)."""
    return ["ipv4", "ipv6"] if any(r.dual_stack for r in results) else []


def covered_bands(starts_at: str, ends_at: str, timezone: str) -> tuple[int, ...]:
    """The local hour bands [starts_at, ends_at) touches (pure)."""
    zone = ZoneInfo(timezone)
    moment, end = parse_utc(starts_at), parse_utc(ends_at)
    bands: set[int] = set()
    while moment < end and len(bands) < 24:
        local = moment.astimezone(zone)
        bands.add(local.hour)
        moment = (local.replace(minute=0, second=0, microsecond=0)
                  + timedelta(hours=1)).astimezone(UTC)
    return tuple(sorted(bands))


def certify(probe_id: str, line: LineMetadata, results: Sequence[SessionFacts],
            rule: CampaignRule = CAMPAIGN_RULES[DEFAULT_CAMPAIGN_RULE],
            timezone: str = "Europe/Rome",
            delay_basis: Literal["rtt", "rtt_half"] = "rtt",
            suppressed: Sequence[Window] = (),
            family: str | None = None,
            contracts: Sequence[ContractVersion] = (),
            min_samples: int = DEFAULT_MIN_SAMPLES) -> Certificate:
    """``suppressed``: (starts_at, ends_at, reason) of the suppression windows over the
    period: sessions started inside one are listed and not counted, and each window is
    shown with the bands it covers and the sessions inside it. ``contracts``: the line's
    contract history; each session is then judged by the version in force when it
    started (``versions_of``), and ``line`` is used only when there is none.
    ``min_samples``: the minimum-sample rule of every check's interval."""
    counts = [0] * 24
    listed: list[SessionLine] = []
    down: list[float] = []
    up: list[float] = []
    delays: list[float] = []
    sent = lost = jitter_pairs = 0
    jitter_ns = 0
    scale = 0.5 if delay_basis == "rtt_half" else 1.0
    refused: dict[str, int] = {}
    ordered = sorted(results, key=lambda r: parse_utc(r.started_at))
    versions = versions_of(ordered, contracts)
    used = _used(contracts, versions.values())
    changed = len({tuple(getattr(v.line, f) for f in JUDGED_FIELDS) for v in used}) > 1
    if used:
        # The version in force at the campaign's last session (if the judged figures
        # differ between the versions, none is judged: ``changed``).
        line = used[-1].line
    inside: dict[Window, list[str]] = {}
    for r in ordered:
        band = band_of(parse_utc(r.started_at), timezone)
        window = window_of(r.started_at, suppressed)
        why = window[2] if window is not None else None
        if window is not None:
            inside.setdefault(window, []).append(r.result_id)
        if r.refused_attempts:
            server = r.refused_server or ""
            refused[server] = refused.get(server, 0) + r.refused_attempts
        if not r.valid:
            # Not evidence about the line: listed, never counted, its band still to fill.
            listed.append(SessionLine(r.result_id, r.started_at, band, False,
                                      r.speeds("download"), r.speeds("upload"), r.rtts_ms,
                                      False, r.invalid_codes, r.refused_attempts, why,
                                      versions.get(r.result_id)))
            continue
        rtts = r.rtts_ms
        if window is not None:
            # No campaign time: listed, never counted, no sample (as the daemon, which
            # starts no session there).
            listed.append(SessionLine(r.result_id, r.started_at, band, False,
                                      r.speeds("download"), r.speeds("upload"), rtts,
                                      refused_attempts=r.refused_attempts,
                                      suppressed_by=why,
                                      contract_version=versions.get(r.result_id)))
            continue
        counted = fills_band(r.valid, (t.direction for t in r.transfers if t.ok),
                             r.pings_sent)
        if counted:
            counts[band] += 1
        listed.append(SessionLine(r.result_id, r.started_at, band, counted,
                                  r.speeds("download"), r.speeds("upload"), rtts,
                                  refused_attempts=r.refused_attempts,
                                  contract_version=versions.get(r.result_id)))
        down += [v for v in r.speeds("download") if v is not None]
        up += [v for v in r.speeds("upload") if v is not None]
        for rtt in rtts:
            sent += 1
            if rtt is None:
                lost += 1
            else:
                delays.append(rtt * scale)
        jitter_ns += r.jitter_sum_ns
        jitter_pairs += r.jitter_pairs
    complete = all(c >= rule.per_band for c in counts)
    down.sort()
    up.sort()
    delays.sort()

    def pct(values: list[float], p: float) -> float | None:
        return stats.percentile(values, p, presorted=True)

    def pct_interval(values: list[float], p: float) -> Interval:
        """Distribution-free, from the order statistics of the sorted list."""
        ranks = percentile_interval_ranks(len(values), p) or ()
        return percentile_interval({r: values[r] for r in ranks}, len(values), p,
                                   min_samples)

    def check(id_: str, name: str, unit: str, comparison: str, threshold: float | None,
              observed: float | None, samples: int, informational: bool = False,
              interval: Interval | None = None) -> Check:
        if changed and not informational:
            # The contract changed during the campaign: one percentile over sessions
            # measured under different figures is judged against neither.
            threshold = None
        if threshold is None or observed is None:
            breach = None
        else:
            breach = observed < threshold if comparison == "<" else observed > threshold
        return Check(id_, name, unit, comparison, threshold, observed, samples, breach,
                     informational, interval)

    jitter = jitter_ns / jitter_pairs / 1e6 if jitter_pairs else None
    checks = (
        check("download_p5_kbps", "Banda minima in download (percentile 5%)", "kbit/s", "<",
              line.download_min_kbps, pct(down, 5), len(down),
              interval=pct_interval(down, 5)),
        check("upload_p5_kbps", "Banda minima in upload (percentile 5%)", "kbit/s", "<",
              line.upload_min_kbps, pct(up, 5), len(up), interval=pct_interval(up, 5)),
        check("delay_p95_ms", "Ritardo massimo: percentile 95% "
              + ("del tempo di andata e ritorno (RTT)" if delay_basis == "rtt"
                 else "del ritardo di sola andata (RTT / 2)"), "ms", ">",
              line.max_delay_ms, pct(delays, 95), len(delays),
              interval=pct_interval(delays, 95)),
        check("loss_ratio", "Tasso di perdita dei pacchetti", "ratio", ">",
              line.max_loss_ratio, stats.loss_ratio(sent, sent - lost), sent,
              interval=wilson_interval(lost, sent, min_samples)),
        # Informational (threshold None: never a breach). Delibera 156/23/CONS publishes
        # jitter, and offers declare a normally available and a maximum speed beside the
        # minimum; our sources document no rule that judges a line against these two,
        # so the certificate shows what was observed against them and judges the
        # minimum only (the 244/08 rule, p5).
        check("jitter_mean_ms", "Jitter (differenza media tra RTT consecutivi)", "ms", ">",
              None, jitter, jitter_pairs, informational=True,
              # Jitter is of the round trip: its spread bound is the RTT's, unscaled.
              interval=jitter_interval(jitter, jitter_pairs,
                                       stats.Moments.of(delays).scaled(1 / scale),
                                       min_samples)),
        *(check(f"{d}_normal_share", f"Quota di test a velocità normalmente disponibile "
                f"in {word} (>= {normal:g} kbit/s)", "ratio", ">=", None,
                sum(v >= normal for v in values) / len(values) if values else None,
                len(values), informational=True,
                interval=wilson_interval(sum(v >= normal for v in values), len(values),
                                         min_samples))
          for d, word, values, normal in (("download", "download", down,
                                           line.download_normal_kbps),
                                          ("upload", "upload", up, line.upload_normal_kbps))
          if normal is not None),
        *(check(f"{d}_p95_kbps", f"Banda massima in {d} (percentile 95%) contro la "
                f"velocità massima dichiarata ({nominal:g} kbit/s)", "kbit/s", "<", None,
                pct(values, 95), len(values), informational=True,
                interval=pct_interval(values, 95))
          for d, values, nominal in (("download", down, line.download_nominal_kbps),
                                     ("upload", up, line.upload_nominal_kbps))
          if nominal is not None),
    )
    if not complete or changed:
        verdict: CertVerdict = "incomplete"
    elif any(c.breach for c in checks if not c.informational):
        verdict = "breach"
    else:
        verdict = "no_breach"
    return Certificate(
        probe_id=probe_id, line=line, rule=rule, timezone=timezone, delay_basis=delay_basis,
        first=ordered[0].started_at if ordered else None,
        last=ordered[-1].started_at if ordered else None,
        band_counts=tuple(counts), complete=complete, checks=checks,
        sessions=tuple(listed), verdict=verdict,
        suppressions=tuple(_window(w, timezone, tuple(inside.get(w, ())), counts,
                                   rule.per_band) for w in suppressed),
        family=family,
        refused_by_server=tuple(sorted(refused.items())),
        contracts=tuple(used), contract_version=used[-1].version if used else None,
        contract_changed=changed, min_samples=min_samples,
    )


def versions_of(results: Sequence[SessionFacts],
                contracts: Sequence[ContractVersion]) -> dict[str, int]:
    """Each session's contract version (result id -> version): the one in force when it
    started; a session from before the first version (a probe's clock set back, a copied
    history) by the one in force at the history's first instant (lines.contract_for).
    Empty without a history."""
    if not contracts:
        return {}
    out = {}
    for r in results:
        found = contract_for(contracts, r.started_at)
        if found is not None:
            out[r.result_id] = found[0]
    return out


def _used(contracts: Sequence[ContractVersion],
          numbers: Iterable[int]) -> list[ContractVersion]:
    """The versions of ``contracts`` numbered in ``numbers``, oldest first."""
    wanted = set(numbers)
    return sorted((v for v in contracts if v.version in wanted), key=lambda v: v.version)


def _window(window: Window, timezone: str, sessions: tuple[str, ...],
            counts: Sequence[int], per_band: int) -> Suppressed:
    starts_at, ends_at, reason = window
    bands = covered_bands(starts_at, ends_at, timezone)
    return Suppressed(starts_at, ends_at, reason, bands, sessions,
                      tuple(b for b in bands if counts[b] < per_band))
