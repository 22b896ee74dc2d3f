"""Crash-test driver: an agent that produces results as fast as it can (no measuring: the
session documents come from tests.factories) and delivers them with the real spool and
the real delivery code, until it is killed.

    python -m tests.crash_agent STATE_DIR COLLECTOR_URL TOKEN [--once]

Result ids are uuid5(seq), seq counting up from the last one logged in STATE_DIR/log:
a result spooled but not yet logged when the kill came is made again with the same id
and content, so the verifier knows exactly which ids must reach the collector.
``--once`` delivers the backlog and exits (the final, unkilled run).
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.client import CollectorClient
from agent.config import DeliveryConfig
from agent.delivery import deliver
from agent.schema import format_utc
from agent.spool import Spool
from tests.factories import session

NAMESPACE = uuid.UUID("6f1d7a52-3c1e-4a8e-9d0b-2b7c1f0e5a11")


def result_id(seq: int) -> str:
    return str(uuid.uuid5(NAMESPACE, str(seq)))


def last_logged(log: Path) -> int:
    try:
        lines = log.read_text().split()
    except FileNotFoundError:
        return 0
    return int(lines[-1]) if lines else 0


async def main(state: Path, url: str, token: str, once: bool) -> int:
    cfg = DeliveryConfig(retry_min_s=0.05, retry_max_s=0.2, max_wait_s=5 if once else 0.5,
                         batch_results=4, max_requests_per_s=1000)
    spool = Spool(state, cfg)
    client = CollectorClient(url, token, 5)
    log = state / "log"
    seq = last_logged(log)
    # Start times: a fixed recent base (kept in the state dir) + seq seconds, so a result
    # made again after a kill is identical, and none is old enough for the age cap.
    base_file = state / "base"
    if not base_file.exists():
        base_file.write_text(format_utc(datetime.now(UTC) - timedelta(days=1)))
    base = datetime.fromisoformat(base_file.read_text().strip())
    while not once:
        seq += 1
        started = format_utc(base + timedelta(seconds=seq))
        spool.put(session("crash-probe", started_at=started, result_id=result_id(seq)))
        with log.open("a") as fh:  # only now is the result known to be spooled
            fh.write(f"{seq}\n")
            fh.flush()
            os.fsync(fh.fileno())
        await deliver(spool, client, cfg)
    report = await deliver(spool, client, cfg)
    print(f"delivered {len(report.delivered)}, pending {report.pending}, "
          f"dead-lettered {len(report.dead_lettered)}, error {report.error}")
    return 0 if report.pending == 0 and not report.dead_lettered else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3],
                              "--once" in sys.argv[4:])))
