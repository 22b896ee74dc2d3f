"""Each probe's public keys as ingest checks signatures with them: a snapshot of the
store's ``probe_keys(name)``, parsed once, kept at most MAX_AGE_S per probe.

A probe delivers a batch of signed results at a time, often several requests in a row
after an outage: one read of its keys serves them all. A key bound, replaced or revoked
in this process (the enrolment route, an admin's CLI command run in-process in tests)
calls ``invalidate(probe)``, and the next delivery reads the keys again at once; a change
made by another process (the CLI beside ``serve``, another worker of ``serve --workers``)
is seen within MAX_AGE_S. Thread-safe: snapshots are read on the database threads,
``invalidate`` may be called from any thread.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import jose
from collector.storage.model import ProbeKey
from collector.storage.store import ProbeKeyStore

# How long a snapshot serves: a revocation made by another process (the CLI) takes
# effect within this, the bound.
MAX_AGE_S = 5.0
# Snapshots kept at most (a fleet's probes delivering within MAX_AGE_S of each other):
# beyond it the oldest are dropped, so memory stays bounded whatever the fleet.
MAX_ENTRIES = 4096

_lock = threading.Lock()
# Bumped by every invalidate(): a snapshot read under an older generation is not used.
# One counter per probe, and one for all (invalidate(None)).
_all_generation = 0
_generations: dict[str, int] = {}


def invalidate(probe: str | None = None) -> None:
    """Drop every process-local snapshot of ``probe``'s keys (None: of every probe):
    call it after binding, replacing or revoking a key."""
    global _all_generation
    with _lock:
        if probe is None:
            _all_generation += 1
        else:
            _generations[probe] = _generations.get(probe, 0) + 1


def generation(probe: str) -> tuple[int, int]:
    """The invalidation generation of ``probe``'s keys (changes at each invalidate)."""
    with _lock:
        return _all_generation, _generations.get(probe, 0)


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    """A probe's key history as read at one moment: every key ever bound to it (current,
    past, revoked), and the public key of each that parses."""

    probe: str
    keys: tuple[ProbeKey, ...]
    public: dict[str, Ed25519PublicKey] = field(default_factory=dict)

    @classmethod
    def of(cls, probe: str, keys: Sequence[ProbeKey]) -> KeySnapshot:
        public: dict[str, Ed25519PublicKey] = {}
        for key in keys:
            # A stored key that does not parse verifies nothing (signed.judge).
            with contextlib.suppress(jose.JoseError, ValueError):
                public[key.kid] = jose.public_key_of_jwk(_loads(key.jwk))
        return cls(probe, tuple(keys), public)

    def key(self, kid: str) -> ProbeKey | None:
        """This probe's binding of ``kid``, if it has one."""
        return next((k for k in self.keys if k.kid == kid), None)

    def current(self) -> ProbeKey | None:
        """The key bound now (neither replaced nor revoked), if any."""
        return next((k for k in self.keys if k.status == "current"), None)


def _loads(text: str) -> dict[str, str]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JWK")
    return value


@dataclass(slots=True)
class _Entry:
    snapshot: KeySnapshot
    read_at: float
    generation: tuple[int, int]


class KeyRing:
    """One collector's snapshots (one per application: tests run several collectors,
    each with its own store, in one process)."""

    def __init__(self, max_age_s: float = MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic,
                 max_entries: int = MAX_ENTRIES) -> None:
        self._max_age_s = max_age_s
        self._clock = clock
        self._max_entries = max_entries
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def cached(self, probe: str) -> KeySnapshot | None:
        """``probe``'s snapshot if one is fresh (younger than max_age_s and not
        invalidated since it was read), else None: no store access."""
        with self._lock:
            entry = self._entries.get(probe)
        if entry is None:
            return None
        if self._clock() - entry.read_at >= self._max_age_s or \
                entry.generation != generation(probe):
            return None
        return entry.snapshot

    def snapshot(self, store: ProbeKeyStore, probe: str) -> KeySnapshot:
        """``probe``'s snapshot, read from ``store`` unless a fresh one is held. Runs
        on a database thread."""
        fresh = self.cached(probe)
        if fresh is not None:
            return fresh
        # The generation is taken before the read: a change committed while it runs
        # invalidates what it read.
        seen, read_at = generation(probe), self._clock()
        snap = KeySnapshot.of(probe, store.probe_keys(probe))
        with self._lock:
            self._entries.pop(probe, None)
            while len(self._entries) >= self._max_entries:
                del self._entries[next(iter(self._entries))]  # the oldest read
            self._entries[probe] = _Entry(snap, read_at, seen)
        return snap
