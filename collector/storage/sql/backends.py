"""Which backend a ``[storage]`` section opens: the factory beside the implementations it
chooses among, so the seam (collector/storage/store.py) imports none of them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from agent import credentials
from collector.config import StorageConfig, default_database
from collector.errors import ConfigError
from collector.storage.store import Store


def postgres_password(cfg: StorageConfig, environ: Mapping[str, str]) -> str | None:
    """The PostgreSQL password: under systemd ($CREDENTIALS_DIRECTORY) the credential named
    by storage.password_credential; otherwise None, and libpq finds it as psql would
    ($PGPASSWORD, ~/.pgpass, a service file), so root's shell needs no credential."""
    if cfg.password_credential and environ.get("CREDENTIALS_DIRECTORY"):
        try:
            return credentials.read(cfg.password_credential, environ,
                                    "storage.password_credential")
        except credentials.CredentialError as exc:
            raise ConfigError(str(exc)) from None
    return None


def open_store(cfg: StorageConfig, *, outbox: bool = False,
               environ: Mapping[str, str] = os.environ, read_only: bool = False) -> Store:
    """Open (creating or migrating) the configured store. Only the backend opened is
    imported: an SQLite collector never loads psycopg and libpq. ``read_only``: for
    analysts' reads, the replica storage.read_url when one is set (never migrated, and
    refusing writes); without one, the store itself (SQLite: without the full-file check
at open)."""
    if cfg.backend == "postgresql":
        from collector.storage.sql.postgres import PostgresStore

        replica = read_only and bool(cfg.read_url)
        return PostgresStore(cfg.read_url if replica else cfg.url, outbox=outbox,
                             password=postgres_password(cfg, environ),
                             pool_size=cfg.pool_size, read_only=replica)
    from collector.storage.sql.sqlite import SqliteStore

    # A read-only open skips the full-file integrity check (sqlite.py says why).
    return SqliteStore(Path(cfg.path or default_database(environ)), outbox=outbox,
                       integrity_check=not read_only)
