"""Agent exceptions.

    AgentError                 root: the CLI catches it once and maps it to a message and exit code
    +-- ConfigError            the configuration file or a flag is invalid (exit 2)
    +-- ProbeSetupError        a probe cannot start at all (e.g. no ICMP permission); the
    |                          session records it as a failed test, ``bbprobe ping`` reports it
    |                          (exit 6, agent/exitcodes.py)
    +-- DeliveryError          the collector did not accept a result; ``retryable`` tells
    |                          whether the spool should try again later (exit 3)
    |   Raised and caught below the CLI, each where it is defined:
    +-- SchemaError            a document does not match the result schema; ``path`` names
    |                          the field (agent/decoding.py; also a ValueError)
    +-- CredentialError        a systemd credential is missing or unreadable; its reader
    |                          says so as its own ConfigError (agent/credentials.py)
    +-- InstructionError       a central instruction holds a key or value it may not; ``key``
    |                          names it (agent/instruction.py; also a ValueError)
    +-- TicketError            a measurement ticket's claims are malformed: the session
    |                          measures without it (agent/ticket.py; also a ValueError)
    +-- WireError              a transfer's HTTP exchange failed: could not connect, a
    |                          status, a broken connection (agent/probes/wire.py)
    +-- StreamFailure          one stream of a transfer failed, with the reason its attempt
                               records (agent/probes/transfer.py, with the private _Refused
                               that ends the attempt of a refused stream)

A failed measurement is *data* (a result with ``status="failed"``): WireError and
StreamFailure are turned into it inside the probe, and never leave a session.
"""

from __future__ import annotations

from agent.exitcodes import ExitCode


class AgentError(Exception):
    exit_code: int = ExitCode.ERROR


class ConfigError(AgentError):
    exit_code = ExitCode.USAGE


class ProbeSetupError(AgentError):
    # Caught where a probe starts (a failed test); a command that meets it, failed.
    exit_code = ExitCode.FAILED


class DeliveryError(AgentError):
    exit_code = ExitCode.NOT_DELIVERED

    def __init__(self, message: str, *, retryable: bool, status: int | None = None,
                 retry_after_s: float | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after_s = retry_after_s
        # The collector's reply named a field of the document: the document is at fault,
        # not the request (a proxy's 400 names none).
        self.field = field
