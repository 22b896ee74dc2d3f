"""``bbprobe key rotate``: replace the probe's signing key by a new one, introduced to
the collector by a rotation statement signed with the old key (agent/keydocs.py); the
key files and what a crash at each step leaves are agent/probekey.py's (``next_key``,
``commit_rotation``).

Interface for the click command (agent/app/cli.py)::

    def rotate(cfg: AgentConfig, warn: Callable[[str], None], *,
               environ: Mapping[str, str] = os.environ) -> dict[str, Any]
        # synchronous (runs its own event loop); returns
        # {"old_kid", "new_kid", "status": "rotated" | "known", "path", "pem"}
        # raises AgentError (ConfigError / ProbeKeyError / DeliveryError), one line.

    def format_rotated(done: Mapping[str, Any]) -> str   # the text the command prints
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent import jose, keydocs, probekey
from agent.client import CollectorClient
from agent.config import AgentConfig
from agent.errors import DeliveryError
from agent.schema import utc_now


def rotate(cfg: AgentConfig, warn: Callable[[str], None], *,
           environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Rotate the probe's key through the configured collector (see ``rotate_with``)."""
    from agent.app import runner  # the client as `push` builds it (ConfigError if none)

    client = runner.push_client(cfg)
    return asyncio.run(rotate_with(client, cfg.state_dir, warn, environ=environ))


async def rotate_with(client: CollectorClient, state_dir: str | os.PathLike[str],
                      warn: Callable[[str], None], *,
                      environ: Mapping[str, str] = os.environ,
                      clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Make (or take up again) the next key, send the rotation statement signed by the
    current key with the new key's proof of possession, and only once the collector
    accepted it (201 rotated, or 200: accepted before a crash) make the new key the key
    (agent/probekey.py explains the crash cases). Raises ProbeKeyError or DeliveryError,
    one line saying the key is unchanged and the new one waits."""
    key = probekey.load(state_dir, environ, create=False)
    if key is None:
        raise probekey.ProbeKeyError(
            f"no signing key to rotate in {state_dir} (`bbprobe key show` makes one)")
    if key.from_credential:
        raise probekey.ProbeKeyError(
            f"the signing key is the systemd credential {probekey.CREDENTIAL!r} "
            f"({key.path}): a credential is replaced where it is kept, not by `bbprobe key "
            "rotate`; pin the new key with `bbprobe-collector probe key set NAME FILE`")
    new = probekey.next_key(state_dir)
    new_jwk = jose.jwk_of(new.public_key())
    new_kid = jose.thumbprint(new_jwk)
    statement = keydocs.rotation(key.private, new.public_key(), utc_now())
    proof = keydocs.enrolment_proof(new, utc_now())
    waiting = (f"key not rotated: still {key.kid}; the new key {new_kid} waits in "
               f"{os.path.join(state_dir, probekey.NEXT_KEY_FILE)} and is offered again "
               "by the next `bbprobe key rotate`")
    try:
        status, kid = await client.enrol_key(new_jwk, proof, statement)
    except DeliveryError as exc:
        raise DeliveryError(f"{waiting}: {exc}", retryable=exc.retryable,
                            status=exc.status, field=exc.field) from None
    if status == 404:
        raise DeliveryError(f"{waiting}: the collector takes no keys (HTTP 404: an older "
                            "collector)", retryable=False, status=404)
    if status == 409:
        raise DeliveryError(f"{waiting}: the collector holds key {kid} for this probe, "
                            f"not {key.kid} (`bbprobe-collector probe key list NAME`)",
                            retryable=False, status=409)
    if status not in (200, 201):
        raise DeliveryError(f"{waiting}: the collector answered HTTP {status}",
                            retryable=True, status=status)
    if kid is not None and kid != new_kid:
        warn(f"the collector bound the new key under kid {kid}, not {new_kid}")
    probekey.commit_rotation(state_dir, key.kid, new_kid, statement)
    try:
        probekey.remember(client, state_dir, new_kid, clock())
    except OSError as exc:
        warn(f"cannot remember the new key's enrolment (sent again next time): "
             f"{exc.strerror or exc}")
    return {"old_kid": key.kid, "new_kid": new_kid,
            "status": "rotated" if status == 201 else "known",
            "path": str(probekey.key_path(state_dir)),
            "pem": jose.pem_of(new.public_key())}


def format_rotated(done: Mapping[str, Any]) -> str:
    """What ``bbprobe key rotate`` prints."""
    how = "the collector accepted the rotation" if done["status"] == "rotated" else \
        "the collector had accepted it already"
    return (f"key rotated: {done['old_kid']} -> {done['new_kid']} ({how}; the old key "
            f"stays bound as past there, so what it signed stays verifiable)\n"
            f"private key: {done['path']}\n\n{done['pem']}")
