"""HTTP download throughput: N parallel GETs of incompressible data, counted at the client.

Duration mode asks the server for ``warmup + window + margin`` seconds of data and stops
reading at ``warmup + window``; the rate is computed over [warmup, common end] (RMBT-style
aggregation, ``agent.stats.window_throughput``). File mode fetches ``file_size_bytes``
split over the streams; the rate is size / time (131/06 test files).
"""

from __future__ import annotations

import asyncio
import socket

from agent import live, spec
from agent.probes import wire
from agent.probes.transfer import (
    Access,
    Ran,
    StreamState,
    file_shares,
    run_attempt,
    run_test,
)
from agent.schema import TransferAttempt, TransferMethod

# The server keeps sending a little longer than we read, so the window never ends early
# because of the server.
SERVER_MARGIN_S = 2.0


async def run(base_url: str, method: TransferMethod, test_index: int,
              observe: live.Observer = live.ignore, af: int = socket.AF_UNSPEC,
              on_connect: wire.OnConnect | None = None, *,
              access: Access | None = None) -> list[TransferAttempt]:
    """One download test (with retries); ``observe`` gets the live view's events.
    Connections use address family ``af`` only, each reported to ``on_connect``
    (agent/probes/wire.py). ``access``: the session's ticket (sent with every request)
    and its allowance for refusals (transfer.run_test). Liveness: attempts x (timeout_s
    + 1 s pause), plus what refusals add within ``access``'s allowance."""
    shares = file_shares(method)

    async def stream(index: int, state: StreamState, t0: float, t_stop: float | None) -> None:
        loop = asyncio.get_running_loop()
        interval = method.sample_interval_s
        if shares is not None:
            query = f"?bytes={shares[index]}"
        else:
            query = f"?duration_s={method.warmup_s + method.window_s + SERVER_MARGIN_S:g}"

        def on_head(status: int) -> None:
            state.http_status = status
            state.record(loop.time() - t0, interval, force=True)

        def on_body(nbytes: int) -> None:
            state.total += nbytes
            state.record(loop.time() - t0, interval)

        await wire.download(base_url, spec.DOWNLOAD_PATH + query, on_head, on_body, t_stop,
                            af, on_connect, headers=access.headers() if access else None)
        state.record(loop.time() - t0, interval, force=True)

    async def attempt(test: int, number: int) -> Ran:
        return await run_attempt("download", method, test, number, stream, observe=observe,
                                 stream_cap=access.stream_cap() if access else None)

    return await run_test(attempt, method, test_index, access=access)
