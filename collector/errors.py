"""Collector exceptions.

    CollectorError            root; the CLI maps it to a message and exit code 1
    +-- ConfigError           invalid configuration or targets file (exit 2)
    +-- InputError            an input file (e.g. a samples CSV) has bad rows (exit 2)
    +-- StoreError            the database cannot be opened, migrated, read or written;
    |   |                     the web edge answers 503 (retry later), the CLI exits 1
    |   +-- AlreadyExists     a probe or token of that name exists
    |   +-- StoreUnavailable  the database is away for now: a restart or a failover, a
    |   |                     lock held past the busy timeout, no pooled connection free
    |   +-- StoreFault        the engine refused a statement or its file is damaged:
    |       |                 retrying cannot help (the web edge: a 500, traceback logged)
    |       +-- Unstorable    a value the engine cannot hold (a NUL in text, a number out
    |                         of its type's range): the caller's input (422)
    +-- DomainError           the service layer refuses a request; ``field`` names the
    |   |                     offending parameter. The web edge (web/replies.py) maps each
    |   |                     kind to a status, the CLI to a message (exit 2)
    |   +-- BadParameter      malformed (400)
    |   +-- NotFound          no such thing (404)
    |   +-- Unacceptable      well-formed but refused, such as a bad probe name (422)
    +-- ApiError              an HTTP request is refused at the web edge; ``status`` is the
    |                         4xx to answer, ``field`` names the offending field, ``code``
    |                         (when set) is a machine-readable reason (a refused ticket's)
    |   Raised and caught inside a measurement server, which answers with an ApiError:
    +-- TicketRefused         a presented ticket is not accepted; ``code`` says why, sent
    |                         back to the probe (collector/tickets.py)
    +-- Refusal               the ticket ledger refuses a transfer: an allowance used up,
    |                         too many at once (collector/measurement/ledger.py)
    +-- BodyError             an upload body is malformed, over the limit or cut short
        +-- AllowanceUsed     the upload's ticket has no bytes left (both in
                              collector/measurement/http.py)
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


class StoreUnavailable(StoreError):
    pass


class StoreFault(StoreError):
    pass


class Unstorable(StoreFault):
    pass


class DomainError(CollectorError):
    exit_code = 2

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class AlreadyExists(StoreError, DomainError):
    exit_code = 1

    def __init__(self, message: str, field: str | None = None) -> None:
        DomainError.__init__(self, message, field)


class BadParameter(DomainError):
    pass


class NotFound(DomainError):
    pass


class Unacceptable(DomainError):
    exit_code = 1


class ApiError(CollectorError):
    def __init__(self, status: int, message: str, field: str | None = None,
                 retry_after: str | None = None, challenge: bool = False,
                 code: str | None = None, headers: dict[str, str] | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.retry_after = retry_after
        self.challenge = challenge  # 401 that a browser should answer with a login
        self.code = code
        self.headers = headers or {}
        self.close = close  # the connection closes after the reply (a body left unread)
