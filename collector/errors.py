"""Collector exceptions.

    CollectorError            root; the CLI maps it to a message and exit code 1
    +-- ConfigError           invalid configuration or targets file (exit 2)
    +-- InputError            an input file (e.g. a samples CSV) has bad rows (exit 2)
    +-- StoreError            the database cannot be opened, migrated or written
    +-- ApiError              an HTTP request is refused; ``status`` is the 4xx to answer,
                              ``field`` names the offending field or parameter
"""

from __future__ import annotations


class CollectorError(Exception):
    exit_code = 1


class ConfigError(CollectorError):
    exit_code = 2


class InputError(CollectorError):
    exit_code = 2


class StoreError(CollectorError):
    pass


class ApiError(CollectorError):
    def __init__(self, status: int, message: str, field: str | None = None,
                 retry_after: str | None = None, challenge: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.retry_after = retry_after
        self.challenge = challenge  # 401 that a browser should answer with a login
