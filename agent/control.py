"""Following the collector's instruction (LMAP's instruction: a controller tells each
measurement agent what to measure and when not to), the I/O edge: fetch it with
If-None-Match at the start of every session, keep the last good one in
``state_dir/instruction.json``, so a probe that is offline keeps measuring the way it was
told, and apply it between the local file and the command line.

Nothing here raises for a collector that is away, old (404: a collector that gives no
instructions) or wrong: the probe measures under the last instruction it holds, and the
health report says what went wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.client import CollectorClient
from agent.config import AgentConfig
from agent.errors import ConfigError, DeliveryError
from agent.instruction import Instruction, InstructionError, parse_document
from agent.tickets import Offer, offer_of

# One GET: never let it hold a session back longer than this.
FETCH_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Fetched:
    instruction: Instruction | None
    source: Literal["collector", "cache", "none"]
    # Why the collector's instruction could not be had or used (None: all fine).
    error: str | None = None
    # The measurement ticket that came with it (agent/tickets.py).
    offer: Offer = field(default_factory=Offer)


class InstructionCache:
    """The last instruction received, with its ETag (temp + rename)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / "instruction.json"

    def load(self) -> tuple[str | None, Instruction] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data.get("etag"), parse_document(data["document"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def save(self, etag: str | None, document: Mapping[str, Any]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # A temp file of its own: the daemon, a `run` and check-config may write at
            # once, and a torn file would lose the suppressions of an offline probe.
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".instruction.")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump({"etag": etag, "document": document}, fh)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError:
            pass  # the instruction still applies to this session; a full disk must not stop us


async def fetch(client: CollectorClient | None, state_dir: str) -> Fetched:
    """The instruction to run under: the collector's, else the cached one."""
    cache = InstructionCache(state_dir)
    held = cache.load()
    kept = held[1] if held is not None else None
    fallback: Literal["cache", "none"] = "cache" if kept is not None else "none"
    if client is None:
        return Fetched(kept, fallback)
    try:
        async with asyncio.timeout(FETCH_TIMEOUT_S):
            got, header = await client.instruction_and_ticket(
                held[0] if held is not None else None)
    except TimeoutError:
        return Fetched(kept, fallback, "the collector did not send the instruction in "
                                       f"{FETCH_TIMEOUT_S:g} s")
    except DeliveryError as exc:
        if exc.status == 404:
            # A collector that gives no instructions predates tickets too.
            return Fetched(kept, fallback, offer=Offer(answered=True))
        return Fetched(kept, fallback, f"instruction not fetched: {exc}")
    offer = offer_of(header)
    if got is None:
        return Fetched(kept, "collector", offer=offer)  # 304: the one held is current
    etag, document = got
    try:
        instruction = parse_document(document)
    except (ValueError, InstructionError) as exc:
        return Fetched(kept, fallback, f"the collector's instruction was refused: {exc}",
                       offer)
    cache.save(etag, document)
    return Fetched(instruction, "collector", offer=offer)


@dataclass(frozen=True, slots=True)
class Applied:
    cfg: AgentConfig
    version: str | None
    error: str | None
    instruction: Instruction | None
    # The measurement ticket the fetch brought, whatever became of the instruction: the
    # next session's.
    offer: Offer = field(default_factory=Offer)


def apply(fetched: Fetched, load: Callable[[Mapping[str, Any] | None], AgentConfig]
          ) -> Applied:
    """The config to run under: ``load(central settings)``; when the settings do not
    hold together with the local file and the command line, the local config alone,
    and the reason (the probe measures anyway: a bad instruction must not stop a
    fleet)."""
    inst, offer = fetched.instruction, fetched.offer
    if inst is None:
        return Applied(load(None), None, fetched.error, None, offer)
    if inst.settings_error is not None:
        return Applied(load(None), None, f"instruction {inst.version} not applied: "
                       f"{inst.settings_error}", inst, offer)
    try:
        return Applied(load(inst.settings), inst.version, fetched.error, inst, offer)
    except ConfigError as exc:
        return Applied(load(None), None,
                       f"instruction {inst.version} not applied: {exc}", inst, offer)
