"""The export's rows from what the store holds (pure): a session's facts, its stored row
and its decoded body (without stream samples) -> one sessions row, its attempts rows and
its pings rows (columns.py), and the open-data form of any of them (``published``).

The figures a report is computed from are taken from the compliance facts, never
recomputed from the body: ``attempts.ok``/``kbps`` are the transfer facts' values and the
idle train's ``rtt_ms`` are the facts' RTTs, so percentiles, moments and ratios an
analyst recomputes from the files are the report's to the last digit. The body adds what
the facts do not keep (times, HTTP status, addresses...); a body that cannot be read
leaves those null and the facts' columns stand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson

from collector.compliance.facts import SessionFacts, is_refusal, server_key
from collector.export import opendata
from collector.export.columns import TABLES
from collector.lines import LineMetadata
from collector.storage.model import StoredResult

Row = dict[str, Any]
LIST_SEPARATOR = "; "
# The ping trains of a result, as the pings table names them.
TRAINS = (("ping", "idle"), ("ping_download", "download"), ("ping_upload", "upload"))


def decode_body(stored: StoredResult | None) -> dict[str, Any] | None:
    """A stored body as a JSON object, or None (no row, or not readable JSON)."""
    if stored is None:
        return None
    try:
        doc = orjson.loads(stored.body)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def line_cell(line: LineMetadata | None, band: int) -> opendata.Cell:
    """A session's k-anonymity cell: its line's metadata ("" when unset) and hour band."""
    if line is None:
        return "", "", "", "", band
    return (line.operator or "", line.offer or "", line.region or "",
            line.technology or "", band)


def session_row(facts: SessionFacts, stored: StoredResult | None,
                body: Mapping[str, Any] | None, line: LineMetadata | None,
                band: int) -> Row:
    """The sessions row of one stored session (``band``: its local hour band)."""
    doc = body or {}
    context = _dict(doc.get("context"))
    ping = _dict(doc.get("ping"))
    addresses = context.get("addresses")
    counts = {"download": [0, 0], "upload": [0, 0]}
    for t in facts.transfers:
        c = counts.setdefault(t.direction, [0, 0])
        c[0] += 1
        c[1] += not t.ok
    server = _dict(doc.get("server")).get("url")
    return {
        "session_id": facts.result_id, "probe_id": facts.probe_id,
        "operator": line.operator if line else None, "offer": line.offer if line else None,
        "region": line.region if line else None,
        "technology": line.technology if line else None,
        "family": facts.address_family, "dual_stack": facts.dual_stack,
        "started_at": facts.started_at,
        "ended_at": stored.ended_at if stored else None,
        "received_at": stored.received_at if stored else None,
        "hour_band": band, "valid": facts.valid,
        "invalid_codes": LIST_SEPARATOR.join(facts.invalid_codes),
        "pings_sent": facts.pings_sent, "pings_lost": facts.pings_lost,
        "rtt_n": facts.rtt.n, "rtt_mean_ms": facts.rtt.mean, "rtt_m2_ms2": facts.rtt.m2,
        "jitter_sum_ns": facts.jitter_sum_ns, "jitter_pairs": facts.jitter_pairs,
        "download_attempts": counts["download"][0], "download_failed": counts["download"][1],
        "upload_attempts": counts["upload"][0], "upload_failed": counts["upload"][1],
        "refused_attempts": facts.refused_attempts, "refused_server": facts.refused_server,
        "session_seq": doc.get("session_seq"), "schema_version": doc.get("schema_version"),
        "agent_version": doc.get("agent_version"),
        "server_origin": server_key(server) if isinstance(server, str) and server else None,
        "ping_target_address": ping.get("address"),
        "client_addresses": LIST_SEPARATOR.join(str(a) for a in addresses)
        if isinstance(addresses, list) else None,
        "clock_skew_s": stored.clock_skew_s if stored else None,
    }


def attempt_rows(facts: SessionFacts, body: Mapping[str, Any] | None) -> list[Row]:
    """One row per transfer attempt: the body's attempts in order, the refused ones
    marked, the others matched in order with the transfer facts (which leave refusals
    out, facts.of_result) for ``ok`` and ``kbps``. Without a body that matches, the facts
    alone (the attempt's own columns null)."""
    base = {"session_id": facts.result_id, "probe_id": facts.probe_id, "valid": facts.valid}
    delivered = [t for t in (body or {}).get("transfers", ()) if isinstance(t, dict)]
    refused = [is_refusal(str(t.get("status")), t.get("failure_reason"),
                          t.get("http_status"), t.get("error")) for t in delivered]
    if body is None or refused.count(False) != len(facts.transfers):
        return [{**base, "attempt_index": i, "direction": t.direction, "refused": False,
                 "ok": t.ok, "kbps": t.kbps, "started_at": None}
                for i, t in enumerate(facts.transfers)]
    out: list[Row] = []
    kept = iter(facts.transfers)
    for i, (t, was_refused) in enumerate(zip(delivered, refused, strict=True)):
        fact = None if was_refused else next(kept)
        out.append({
            **base, "started_at": t.get("started_at"), "attempt_index": i,
            "direction": fact.direction if fact else t.get("direction"),
            "test_index": t.get("test_index"), "attempt": t.get("attempt"),
            "refused": was_refused, "ok": fact.ok if fact else False,
            "kbps": fact.kbps if fact else None,
            "failure_reason": t.get("failure_reason"), "http_status": t.get("http_status"),
            "error": t.get("error"), "duration_s": t.get("duration_s"),
            "streams": t.get("streams"), "bytes_total": t.get("bytes_total"),
            "window_bytes": t.get("window_bytes"), "window_s": t.get("window_s"),
            "measured_at": t.get("measured_at")})
    return out


def ping_rows(facts: SessionFacts, body: Mapping[str, Any] | None) -> list[Row]:
    """One row per ICMP echo of each train; the idle train's RTTs are the facts' (what
    every delay, loss and jitter figure uses), with the body's sequence numbers, send
    offsets and errors when its samples line up with them."""
    base = {"session_id": facts.result_id, "probe_id": facts.probe_id, "valid": facts.valid}
    doc = body or {}
    out: list[Row] = []
    for key, train in TRAINS:
        samples = [s for s in _dict(doc.get(key)).get("samples", ()) if isinstance(s, dict)]
        if train == "idle":
            if len(samples) != len(facts.rtts_ms):
                samples = [{} for _ in facts.rtts_ms]
            rtts: Sequence[Any] = facts.rtts_ms
        else:
            rtts = [s.get("rtt_ms") for s in samples]
        out += [{**base, "train": train, "ping_index": i, "seq": s.get("seq"),
                 "sent_offset_s": s.get("sent_offset_s"), "rtt_ms": rtt,
                 "error": s.get("error")}
                for i, (s, rtt) in enumerate(zip(samples, rtts, strict=True))]
    return out


def _origin(origin: str) -> str:
    """A server's origin for open data: as it is when its host is a name (a public
    measurement server); an address as host truncated to its network
    ("http://198.18.0.0/24:8080"); "" when unreadable."""
    try:
        parts = urlsplit(origin)
        host, port = parts.hostname, parts.port
    except ValueError:
        return ""
    if not parts.scheme or not host:
        return ""
    net = opendata.truncate_address(host)
    if not net:
        return origin
    return f"{parts.scheme}://{net}" + (f":{port}" if port is not None else "")


class Publisher:
    """Open-data mode's treatment of rows (columns.py ``Column.open_data``): pseudonyms
    for probes and sessions, addresses and times truncated, free text dropped."""

    __slots__ = ("_actions", "_pseudonyms")

    def __init__(self, pseudonyms: opendata.Pseudonymiser) -> None:
        self._pseudonyms = pseudonyms
        self._actions = {table: [(c.name, c.open_data) for c in columns
                                 if c.open_data != "keep"]
                         for table, columns in TABLES.items()}

    def probe(self, name: str) -> str:
        """A probe's pseudonym (the order open data writes probes in)."""
        return self._pseudonyms.probe(name)

    def published(self, table: str, row: Row) -> Row:
        """``row`` of ``table`` as open data may publish it (a new dict)."""
        out = dict(row)
        for name, action in self._actions[table]:
            value = out.get(name)
            if value is None or value == "":
                continue
            if action == "probe":
                out[name] = self._pseudonyms.probe(value)
            elif action == "session":
                out[name] = self._pseudonyms.session(value)
            elif action == "minute":
                out[name] = opendata.to_minute(value)
            elif action == "address":
                out[name] = opendata.truncate_address(value) or None
            elif action == "origin":
                out[name] = _origin(value)
            elif action == "addresses":
                out[name] = LIST_SEPARATOR.join(
                    t for a in value.split(LIST_SEPARATOR)
                    if (t := opendata.truncate_address(a)))
            else:  # "drop"
                out[name] = None
        return out
