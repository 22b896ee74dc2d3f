"""The result schema: round trip, and strict rejection naming the field."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from agent.decoding import SchemaError, parse_result
from agent.schema import SCHEMA_VERSION, to_dict
from tests.factories import session, session_dict


def test_round_trip_is_lossless() -> None:
    """to_dict -> JSON -> parse_result gives back an equal object."""
    original = session(rtts=[10.0, None, 12.5])
    again = parse_result(json.loads(json.dumps(to_dict(original))))
    assert again == original


def test_units_are_in_field_names() -> None:
    """Every numeric summary field names its unit (or is a ratio)."""
    for key in session_dict()["summary"]:
        assert key.endswith(("_bps", "_ms", "_ratio")), key


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        node: Any = doc
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node[part]
        last = parts[-1]
        if value is _DELETE:
            del node[last]
        elif last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return mutate


_DELETE = object()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set("result_id", "not-a-uuid"), "result_id: must be a UUID, got 'not-a-uuid'"),
        (_set("probe_id", "bad id!"),
         "probe_id: must be 1-64 characters of letters, digits, '.', '_', '-', got 'bad id!'"),
        (_set("started_at", "yesterday"),
         "started_at: must be an ISO 8601 timestamp with a UTC offset, got 'yesterday'"),
        (_set("started_at", "2026-11-21T10:00:00"),
         "started_at: must be an ISO 8601 timestamp with a UTC offset, "
         "got '2026-11-21T10:00:00'"),
        (_set("ping.samples.1.rtt_ms", -1), "ping.samples[1].rtt_ms: must be >= 0, got -1"),
        (_set("ping.samples.0.rtt_ms", "fast"),
         "ping.samples[0].rtt_ms: expected a number or null, got a string"),
        (_set("summary.loss_ratio", 1.5), "summary.loss_ratio: must be <= 1, got 1.5"),
        (_set("transfers.0.status", "maybe"),
         "transfers[0].status: must be one of 'ok', 'failed', got 'maybe'"),
        (_set("transfers.0.streams", True), "transfers[0].streams: expected an integer, "
         "got a boolean"),
        (_set("summary.download_bps", _DELETE), "summary.download_bps: missing required field"),
        (_set("summary.extra_bps", 1), "summary.extra_bps: unknown field"),
        (_set("transfers", {}), "transfers: expected an array, got an object"),
        (_set("transfers.0.stream_samples.0.0", [1.0]),
         "transfers[0].stream_samples[0][0]: expected an array of 2 items, got 1"),
        (_set("transfers.0.stream_samples.0.1", [1.5, 2.5]),
         "transfers[0].stream_samples[0][1][1]: expected an integer, got a number"),
        (_set("transfers.0.stream_samples.0.1", [True, 2]),
         "transfers[0].stream_samples[0][1][0]: expected a number, got a boolean"),
        (_set("method.download.mode", "forever"),
         "method.download.mode: must be one of 'duration', 'file', got 'forever'"),
        (_set("ended_at", "2026-11-21T09:00:00Z"), "ended_at: is earlier than started_at"),
        (_set("started_at", "0001-01-01T00:00:00+14:00"),
         "started_at: must be an ISO 8601 timestamp with a UTC offset, got "
         "'0001-01-01T00:00:00+14:00'"),
        (_set("schema_version", SCHEMA_VERSION + 1),
         f"schema_version: version {SCHEMA_VERSION + 1} is newer than this collector supports "
         f"({SCHEMA_VERSION}); upgrade the collector"),
        (_set("schema_version", "1"), "schema_version: missing or not an integer"),
        (_set("schema_version", 0), "schema_version: must be >= 1, got 0"),
    ],
)
def test_bad_documents_name_the_field(
    mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    """Each broken document is refused with a message that names the offending field."""
    doc = copy.deepcopy(session_dict())
    mutate(doc)
    with pytest.raises(SchemaError) as info:
        parse_result(doc)
    assert str(info.value) == message


def test_non_object_rejected() -> None:
    """A JSON array is not a result."""
    with pytest.raises(SchemaError, match="expected a JSON object, got an array"):
        parse_result([])


def test_nan_rejected() -> None:
    """Non-finite numbers never enter the store."""
    doc = session_dict()
    doc["duration_s"] = float("nan")
    with pytest.raises(SchemaError, match="duration_s: must be a finite number"):
        parse_result(doc)


def test_version_1_documents_still_accepted() -> None:
    """A v1 result (no latency-under-load fields) is read with those fields null."""
    doc = session_dict()
    doc["schema_version"] = 1
    for key in ("ping_download", "ping_upload"):
        doc.pop(key)
    for key in ("rtt_download_mean_ms", "rtt_upload_mean_ms"):
        doc["summary"].pop(key)
    doc["method"]["ping"].pop("loaded_interval_s")
    result = parse_result(doc)
    assert result.ping_download is None
    assert result.summary.rtt_download_mean_ms is None


@pytest.mark.parametrize(
    ("validity", "message"),
    [
        ({"valid": True, "reasons": [{"code": "wifi", "detail": "x"}]},
         "validity.reasons: an invalid session needs at least one reason, a valid one none"),
        ({"valid": False, "reasons": []},
         "validity.reasons: an invalid session needs at least one reason, a valid one none"),
        ({"valid": False, "reasons": [{"code": "Wi-Fi", "detail": "x"}]},
         "validity.reasons[0].code: must be 1-40 lowercase letters, digits or '_', starting "
         "with a letter, got 'Wi-Fi'"),
    ],
)
def test_validity_is_consistent(validity: dict[str, Any], message: str) -> None:
    """Invalid means at least one reason with a well-formed code; valid means none."""
    doc = session_dict()
    doc["validity"] = validity
    with pytest.raises(SchemaError) as caught:
        parse_result(doc)
    assert str(caught.value) == message


def test_invalid_session_round_trips() -> None:
    """A session flagged invalid survives JSON both ways with its reason codes in order."""
    original = session(invalid=["wifi", "cpu_busy"])
    again = parse_result(json.loads(json.dumps(to_dict(original))))
    assert again == original and not again.valid
    assert [r.code for r in again.validity.reasons] == ["wifi", "cpu_busy"]  # type: ignore[union-attr]


def test_clock_state_from_the_kernel_reply() -> None:
    """adjtimex: TIME_ERROR or STA_UNSYNC -> not synchronised (no error bound); otherwise
    synchronised with maxerror in ms."""
    from agent import clock

    assert clock.interpret(0, 0, 1500) == clock.ClockState(True, 1.5, "adjtimex")
    assert clock.interpret(5, 0, 1500).synchronized is False
    assert clock.interpret(0, clock.STA_UNSYNC, 1500) == clock.ClockState(False, None,
                                                                        "adjtimex")
    state = clock.read()  # this machine's, whatever it is: a well-formed record
    assert state.source in ("adjtimex", "unknown")
    assert (state.synchronized is None) == (state.source == "unknown")
