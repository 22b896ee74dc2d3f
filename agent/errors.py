"""Agent exceptions.

    AgentError                 root: the CLI catches it once and maps it to a message and exit code
    +-- ConfigError            the configuration file or a flag is invalid (exit 2)
    +-- ProbeSetupError        a probe cannot start at all (e.g. no ICMP permission); the
    |                          session records it as a failed test, ``bbprobe ping`` reports it
    +-- DeliveryError          the collector did not accept a result; ``retryable`` tells
                               whether the spool should try again later (exit 3)

A failed measurement is *data* (a result with ``status="failed"``), never one of these.
"""

from __future__ import annotations


class AgentError(Exception):
    exit_code = 1


class ConfigError(AgentError):
    exit_code = 2


class ProbeSetupError(AgentError):
    exit_code = 4


class DeliveryError(AgentError):
    exit_code = 3

    def __init__(self, message: str, *, retryable: bool, status: int | None = None,
                 retry_after_s: float | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after_s = retry_after_s
        # The collector's reply named a field of the document: the document is at fault,
        # not the request (a proxy's 400 names none).
        self.field = field
