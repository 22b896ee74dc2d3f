"""What the probe says of itself: ``bbprobe status`` (the spool and whose results wait in
it, gap records, dead letters, delivery counters, the campaign, the instruction held,
whether the collector answers) as a JSON document and as text, the dead letters
``bbprobe dead-letter`` acts on, ``bbprobe check-config``'s account of what a session
would do, and ``bbprobe check``'s account of the host. The state is read from
state_dir; the text is made from what was read (printing stays in agent/app/cli.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from agent import config, control, report, units
from agent.app.daemon import CampaignStore
from agent.client import CollectorClient
from agent.errors import ConfigError, DeliveryError
from agent.identity import Backlog, Identity, identity_for
from agent.schedule import Campaign
from agent.schema import HostContext, InvalidReason
from agent.spec import CAMPAIGN_RULES
from agent.spool import Spool, file_id


def reason(path: Path) -> str:
    """Why a dead-lettered file was set aside, as recorded beside it."""
    try:
        return path.with_suffix(".reason.txt").read_text(encoding="utf-8").strip()
    except OSError:
        return "(no reason recorded)"


def identity(cfg: config.AgentConfig) -> Identity | None:
    """Whom a run with this config would deliver as; None without a collector or when
    the token or the client certificate cannot be read (status still shows the spool)."""
    if not cfg.collector.url:
        return None
    try:
        return identity_for(cfg.collector.url, config.read_token(cfg),
                            cfg.collector.client_cert)
    except ConfigError:
        return None


def _this_token(b: Backlog, mine: Identity | None) -> bool:
    return b.identity is not None and mine is not None and \
        b.identity.token_fingerprint == mine.token_fingerprint


def _backlog_json(b: Backlog, mine: Identity | None) -> dict[str, Any]:
    return {"collector_url": b.identity.collector_url if b.identity else None,
            "token_fingerprint": b.identity.token_fingerprint if b.identity else None,
            "probe_id": b.probe_id, "results": b.results, "bytes": b.size_bytes,
            "gaps": b.gaps, "this_token": _this_token(b, mine)}


def _backlog_line(b: Backlog, mine: Identity | None) -> str:
    """One owner's share of the spool, and what sends it (agent.identity.claim)."""
    what = f"{b.results} result(s)" + (f" and {b.gaps} gap record(s)" if b.gaps else "")
    who = f"probe {b.probe_id}" if b.probe_id else "a probe not named yet"
    if b.identity is None and not b.probe_id:
        return (f"{what} from an older bbprobe, with no probe name and no identity: not "
                "sent, since whose they are cannot be told (dropped, with a gap record, "
                "after delivery.max_age_days)")
    if b.identity is None:
        return (f"{what} from an older bbprobe for probe {b.probe_id}: sent by a run "
                f"whose collector names its token {b.probe_id}")
    at = f"{who} at {b.identity.collector_url}"
    if _this_token(b, mine):
        return f"{what} for {at} (this token): sent by the next run or session"
    return f"{what} waiting for {at}, sent when a run uses that identity"


def dead_letters(spool: Spool) -> list[dict[str, str]]:
    """Each dead-lettered result or gap record: id, kind, reason and file."""
    return [{"id": file_id(p), "kind": "gap" if spool.is_gap(p) else "result",
             "reason": reason(p), "file": str(p)} for p in spool.dead_letters()]


def chosen_dead_letters(spool: Spool, ids: tuple[str, ...], every: bool,
                        verb: str) -> list[Path]:
    """The dead-letter files named by ``ids`` (or all of them); ConfigError, before any
    is touched, naming the ids that are not there."""
    if every == bool(ids):
        raise ConfigError(f"dead-letter {verb}: give result ids or --all (bbprobe "
                          "dead-letter list shows them)")
    present = {file_id(p): p for p in spool.dead_letters()}
    if every:
        return list(present.values())
    unknown = [i for i in dict.fromkeys(ids) if i not in present]
    if unknown:
        raise ConfigError(f"dead-letter {verb}: no dead-lettered result "
                          f"{', '.join(unknown)} in {spool.dead_dir}")
    return [present[i] for i in dict.fromkeys(ids)]


async def ask_collector(url: str, client: CollectorClient) -> dict[str, Any]:
    """Whether the collector at ``url`` (as configured) answers for this token, and as
    which probe."""
    try:
        return {"url": url, "reachable": True, "probe_id": await client.whoami()}
    except DeliveryError as exc:
        return {"url": url, "reachable": False, "error": str(exc)}


@dataclass(frozen=True, slots=True)
class Status:
    cfg: config.AgentConfig
    doc: dict[str, Any]  # what ``--json`` prints
    spool_dir: Path
    owners: list[Backlog]
    mine: Identity | None
    campaign: Campaign | None
    token_from: str = ""  # agent.app.flags.token_source


def read(cfg: config.AgentConfig, token_from: str = "") -> Status:
    """The probe's state as state_dir holds it (``collector`` still None); ``token_from``
    says where the token came from (agent.app.flags.token_source)."""
    spool = Spool(cfg.state_dir, cfg.delivery)
    entries = spool.entries()
    dead = [{"id": file_id(p), "file": str(p), "reason": reason(p)}
            for p in spool.dead_letters()]
    mine = identity(cfg)
    owners = spool.backlog()
    doc: dict[str, Any] = {
        "state_dir": cfg.state_dir,
        "spool": {"results": len(entries), "bytes": sum(e.size for e in entries),
                  "oldest_started_at": entries[0].started_at.isoformat() if entries else None,
                  "limit_bytes": cfg.delivery.spool_max_bytes,
                  "by_identity": [_backlog_json(b, mine) for b in owners]},
        "gaps_waiting": len(spool.gaps()),
        "dead_letter": dead,
        "counters": spool.stats(),
        "collector": None,
        "token_source": token_from or None,
        "campaign": None,
    }
    campaign = CampaignStore(cfg.state_dir).load()
    if campaign is not None:
        doc["campaign"] = {**campaign.to_json(), "complete": campaign.complete,
                           "needed": campaign.needed}
    held = control.InstructionCache(cfg.state_dir).load()
    doc["instruction"] = None if held is None else {
        "version": held[1].version, "settings": held[1].settings,
        "suppressions": len(held[1].suppressions)}
    return Status(cfg, doc, spool.dir, owners, mine, campaign, token_from)


def _when(stamp: str | None) -> str:
    return report.when(stamp) if stamp else "never"


def text(status: Status) -> str:
    """``bbprobe status`` for a person."""
    doc, cfg, campaign = status.doc, status.cfg, status.campaign
    spooled = doc["spool"]
    lines = [f"spool: {spooled['results']} result(s) waiting ({spooled['bytes'] / 1024:.1f} "
             f"KiB of {cfg.delivery.spool_max_bytes / 1024**2:.0f} MiB)"
             + (f", oldest started {_when(spooled['oldest_started_at'])}"
                if spooled["results"] else "")
             + f" in {status.spool_dir}"]
    if any(not row["this_token"] for row in spooled["by_identity"]):
        # Another probe's or collector's results share the spool: whose, and when they go.
        lines += [f"  {_backlog_line(b, status.mine)}" for b in status.owners]
    counters = doc["counters"]
    dead = doc["dead_letter"]
    lines.append(f"gaps: {doc['gaps_waiting']} gap record(s) waiting to be sent; "
                 f"{counters.get('dropped_total', 0)} result(s) dropped in total")
    lines.append(f"dead-letter: {len(dead)} result(s) set aside, refused or damaged "
                 "(bbprobe dead-letter list|retry|drop)" + (":" if dead else ""))
    lines += [f"  {d['file']}: {d['reason']}" for d in dead]
    lines.append(f"delivered: {counters.get('delivered_total', 0)} in total; last attempt "
                 f"{_when(counters.get('last_attempt_at'))}, last success "
                 f"{_when(counters.get('last_success_at'))}"
                 + (f"; last error: {counters['last_error']}"
                    if counters.get("last_error") else ""))
    recent = counters.get("last_results") or []
    if recent:
        lines.append("last results:")
    for r in recent:
        why = ", ".join(r.get("invalid_codes") or ())
        lines.append(f"  {report.when(r['started_at'])}  down "
                     f"{units.mbit(r.get('download_bps'))} / up "
                     f"{units.mbit(r.get('upload_bps'))} Mbit/s, RTT "
                     f"{units.latency(r.get('rtt_mean_ms'))}"
                     + ("" if r.get("valid", True) else
                        f"  INVALID{f' ({why})' if why else ''}"))
    if campaign is not None:
        per = CAMPAIGN_RULES[campaign.rule].per_band
        state = "complete" if campaign.complete else \
            f"{sum(campaign.counted)}/{24 * per} sessions"
        began = campaign.started_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
        lines.append(f"campaign: rule {campaign.rule} started {began} UTC, {state}; bands "
                     f"({campaign.timezone}, counted/attempted):")
        cells = [f"{h:02d}h {campaign.counted[h]}/{campaign.attempted[h]}"
                 f"{'' if campaign.counted[h] >= per else ' !'}" for h in range(24)]
        lines += ["  " + "  ".join(cells[i:i + 8]) for i in range(0, 24, 8)]
    held = doc["instruction"]
    if held is None or not (held["settings"] or held["suppressions"]):
        # The collector sends every probe an instruction, most of them empty.
        lines.append("instruction: none in force (this file and the command line decide)")
    else:
        said = report.instruction_line(held["settings"], held["version"]) or \
            "the collector's instruction sets no key"
        lines.append(f"instruction: {said}; {held['suppressions']} suppression window(s) "
                     "(last received; bbprobe check-config shows them)")
    if status.token_from:
        lines.append(f"token: from {status.token_from}")
    elif cfg.collector.client_cert:
        lines.append(f"token: none; the client certificate {cfg.collector.client_cert} "
                     "names the probe")
    elif cfg.collector.url:
        lines.append("token: not set (collector.token_file, BBPROBE_TOKEN or --token)")
    coll = doc["collector"]
    if coll is None:
        lines.append("collector: not checked" if cfg.collector.url else
                     "collector: none configured")
    elif coll["reachable"]:
        lines.append(f"collector: {coll['url']} answers, as probe {coll['probe_id']}")
    else:
        lines.append(f"collector: {coll['url']} unreachable or refusing: {coll['error']}")
    return "\n".join(units.fit(lines))


def describe(applied: control.Applied, token: str, source: str) -> str:
    """``bbprobe check-config``: what a session would do under ``applied`` (the config
    with the instruction in force), and with which token (read from ``source``)."""
    cfg = applied.cfg
    m = config.method(cfg)
    lines = [
        "config OK",
        f"  collector: {cfg.collector.url or '(none: results are not pushed)'}",
        f"  token: {f'set, from {source}' if token else 'not set'}",
        f"  state dir: {cfg.state_dir}",
    ]
    inst = applied.instruction
    if inst is None or not (inst.settings or inst.suppressions or inst.settings_error):
        # Every probe receives an instruction; an empty one changes nothing.
        lines.append("  instruction: none in force (this file and the command line decide)")
    else:
        state = "applied" if applied.version else "NOT applied"
        lines.append(f"  instruction: {inst.version}, {state}; {len(inst.settings)} "
                     f"key(s), under the command line's --set")
        lines += [f"    {k} = {json.dumps(v)}" for k, v in sorted(inst.settings.items())]
        lines += [f"    suppressed {w.starts_at.isoformat()} .. {w.ends_at.isoformat()}: "
                  f"{w.reason}" for w in inst.suppressions]
    if applied.error:
        lines.append(f"  instruction problem: {applied.error}")
    if cfg.server.candidates:
        lines.append(f"  measurement server candidates: {', '.join(cfg.server.candidates)} "
                     f"(the lowest median RTT of {cfg.server.select_pings} pings is used)")
    if cfg.server.url or cfg.collector.url:
        lines.append(f"  measurement server: {config.measurement_server(cfg)}; "
                     f"ping target: {config.ping_target(cfg)}")
    if m.ping is not None:
        lines.append(f"  ping: {m.ping.count} x {m.ping.payload_bytes} B, "
                     f"{m.ping.interval_s:g} s apart, timeout {m.ping.timeout_s:g} s")
    for name, t in (("download", m.download), ("upload", m.upload)):
        lines.append(f"  {name}: {t.tests} test(s), {report.describe_method(t)}, "
                     f"up to {t.attempts} attempt{'' if t.attempts == 1 else 's'} of "
                     f"{t.timeout_s:g} s")
    return "\n".join(units.fit(lines))


# What to do about each host check that would flag a measurement invalid.
ADVICE = {
    "cpu_busy": "close other programs (updates, backups, browsers) and try again",
    "memory_busy": "close other programs to free memory",
    "memory_low": "use a device with at least 128 MiB of memory",
    "wifi": "connect the probe to the router with a cable and turn Wi-Fi off",
    "link_speed": "use a port and cable that link at the contract's speed (Gigabit)",
    "cross_traffic": "stop other devices and downloads on this line during the test",
    "lan_hosts": "switch off or unplug the other devices on the LAN (TV boxes, PCs, "
                 "phones on Wi-Fi) during the test",
}


def host_text(host: str, context: HostContext, reasons: Sequence[InvalidReason]) -> str:
    """``bbprobe check``: the host's route to ``host``, its load and LAN, and what a
    measurement now would be flagged for, with what to do about it."""
    speed = f"{context.link_speed_mbps} Mbit/s" if context.link_speed_mbps else \
        "speed unknown"
    lines = [
        f"route to {host}: interface {context.interface or '?'} ({speed}, MTU "
        f"{context.mtu or '?'}{', wireless' if context.wireless else ''}"
        f"{', loopback' if context.loopback else ''}), address "
        f"{', '.join(context.addresses) or '?'}, gateway {context.gateway or '?'}",
        f"CPU {context.cpu_percent:.0f} % busy; memory "
        f"{(context.memory_used_ratio or 0):.0%} used of "
        f"{(context.memory_total_bytes or 0) / 1024**3:.1f} GiB; {context.os}",
        f"LAN: {context.lan_scan}"
        + (f": {context.lan_hosts} other host(s) besides the gateway"
           if context.lan_hosts is not None else ""),
    ]
    if reasons:
        lines.append("A measurement now would be flagged INVALID:")
        lines += [f"  - {r.detail}: {ADVICE.get(r.code, 'see docs/technician.md')}"
                  for r in reasons]
    else:
        lines.append("All host checks pass. (Cross traffic is checked during the "
                     "transfers themselves.)")
    return "\n".join(units.fit(lines))
