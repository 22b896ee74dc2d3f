"""HTTP download throughput: N parallel GETs of incompressible data, counted at the client.

Duration mode asks the server for ``warmup + window + margin`` seconds of data and stops
reading at ``warmup + window``; the rate is computed over [warmup, common end] (RMBT-style
aggregation, ``agent.stats.window_throughput``). File mode fetches ``file_size_bytes``
split over the streams; the rate is size / time (131/06 test files).
"""

from __future__ import annotations

import asyncio

import aiohttp

from agent import spec
from agent.probes.transfer import (
    StreamFailure,
    StreamState,
    file_shares,
    run_attempt,
    run_test,
)
from agent.schema import TransferAttempt, TransferMethod

# The server keeps sending a little longer than we read, so the window never ends early
# because of the server.
SERVER_MARGIN_S = 2.0


async def run(base_url: str, method: TransferMethod, test_index: int) -> list[TransferAttempt]:
    """One download test (with retries). Liveness: attempts x (timeout_s + 1 s pause)."""
    url = base_url.rstrip("/") + spec.DOWNLOAD_PATH
    shares = file_shares(method)

    async def stream(
        session: aiohttp.ClientSession,
        index: int,
        state: StreamState,
        t0: float,
        t_stop: float | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        interval = method.sample_interval_s
        if shares is not None:
            params = {"bytes": str(shares[index])}
        else:
            params = {"duration_s": f"{method.warmup_s + method.window_s + SERVER_MARGIN_S:g}"}
        async with session.get(url, params=params) as resp:
            state.http_status = resp.status
            if resp.status != 200:
                raise StreamFailure("http_status", f"HTTP {resp.status} from {url}", resp.status)
            state.record(loop.time() - t0, interval, force=True)
            try:
                async with asyncio.timeout_at(t_stop):
                    async for chunk in resp.content.iter_any():
                        state.total += len(chunk)
                        state.record(loop.time() - t0, interval)
            except TimeoutError:
                if t_stop is None or loop.time() < t_stop:
                    raise  # pragma: no cover - only t_stop can fire this scope
            state.record(loop.time() - t0, interval, force=True)

    async def attempt(test: int, number: int) -> TransferAttempt:
        return await run_attempt("download", method, test, number, stream)

    return await run_test(attempt, method, test_index)
