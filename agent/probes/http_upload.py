"""HTTP upload throughput: N parallel POSTs of incompressible data, counted at the server.

The rate is taken from the receiver (BEREC/SamKnows practice, methodology.md §3.2-3.3):
the collector's upload sink answers each POST with an ``UploadReport`` of (t, bytes)
samples on its own monotonic clock. The streams' reports are put on one time line (the
earliest request arrival is t = 0) and aggregated like downloads. Client-side counts are
kept only for failed attempts, where no report exists.
"""

from __future__ import annotations

import asyncio
import json
import socket

from agent import live, spec
from agent.decoding import SchemaError, decode
from agent.probes import wire
from agent.probes.transfer import (
    Access,
    Ran,
    SampleList,
    StreamFailure,
    StreamState,
    client_side,
    file_shares,
    run_attempt,
    run_test,
)
from agent.schema import TransferAttempt, TransferMethod, UploadReport

# The sink stops reading after this long, so a runaway client cannot hold it forever.
SERVER_MARGIN_S = 5.0


def on_server_timeline(
    states: list[StreamState], reports: dict[int, UploadReport]
) -> tuple[list[SampleList], int, str]:
    """Rebase every stream's server samples to the earliest request arrival (pure)."""
    if len(reports) != len(states):
        return client_side(states)
    origin = min(r.t0_monotonic_s for r in reports.values())
    streams = [
        # To the microsecond, as the download's samples (transfer.StreamState.record).
        [(round(reports[i].t0_monotonic_s - origin + t, 6), b) for t, b in reports[i].samples]
        for i in range(len(states))
    ]
    return streams, sum(r.bytes_received for r in reports.values()), "server"


async def run(base_url: str, method: TransferMethod, test_index: int,
              observe: live.Observer = live.ignore, af: int = socket.AF_UNSPEC,
              on_connect: wire.OnConnect | None = None, *,
              access: Access | None = None) -> list[TransferAttempt]:
    """One upload test (with retries): the arguments and the liveness bound are
    http_download.run's; the rate is the sink's count (on_server_timeline)."""
    shares = file_shares(method)

    async def attempt(test: int, number: int) -> Ran:
        reports: dict[int, UploadReport] = {}

        async def stream(index: int, state: StreamState, t0: float,
                         t_stop: float | None) -> None:
            loop = asyncio.get_running_loop()
            interval = method.sample_interval_s
            size = shares[index] if shares is not None else None
            query = f"?sample_interval_s={min(max(interval, 0.01), 1.0):g}"
            if size is not None:
                query += f"&bytes={size}"
            else:
                query += f"&duration_s={method.warmup_s + method.window_s + SERVER_MARGIN_S:g}"

            def on_sent(nbytes: int) -> None:
                state.total += nbytes
                state.record(loop.time() - t0, interval)

            state.record(loop.time() - t0, interval, force=True)
            head, body = await wire.upload(base_url, spec.UPLOAD_PATH + query, size, on_sent,
                                           t_stop, loop.time, af, on_connect,
                                           headers=access.headers() if access else None)
            state.http_status = head.status
            state.record(loop.time() - t0, interval, force=True)
            try:
                reports[index] = decode(UploadReport, json.loads(body))
            except (ValueError, SchemaError) as exc:
                raise StreamFailure(
                    "server_report", f"upload sink sent no valid report: {exc}"
                ) from None

        def finalize(states: list[StreamState]) -> tuple[list[SampleList], int, str]:
            return on_server_timeline(states, reports)

        return await run_attempt("upload", method, test, number, stream, finalize, observe,
                                 access.stream_cap() if access else None)

    return await run_test(attempt, method, test_index, access=access)
