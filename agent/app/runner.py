"""One measurement session end to end, for ``bbprobe run`` and the daemon alike: the
config (the local file under the collector's instruction, under the command line), the
probe's name, the measurement, the spool, the delivery and the health report.

The order is the spool's contract (shared/reference/reliability.md A1-A9): each result is
spooled as its session ends, before anything is sent, so a stop or a crash at any later
step loses nothing. Nothing here prints: lines meant for a person go to the ``warn``
callable the command hands in (the CLI writes them on stderr), as msak's client reports
through an emitter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import config, control, exitcodes, health, live, probekey, report
from agent.client import CollectorClient
from agent.config import AgentConfig
from agent.delivery import DeliveryReport, deliver
from agent.errors import ConfigError, DeliveryError
from agent.exitcodes import ExitCode
from agent.probes import session
from agent.schema import HealthReport, SessionResult, to_dict
from agent.spool import Spool
from agent.tickets import Offer, TicketSource

Lines = Callable[[str], None]

# One health report POST: never let it hold the next session (or a run's exit) longer.
HEALTH_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where a session's config comes from: built-in defaults < profile < the local file
    < the collector's central instruction < the command line (a technician on site
    decides). ``data`` is the file as read: the daemon reads it at start and again only
    on SIGHUP (``reread``), so a half-edited file changes nothing before then; None: the
    file is read at every ``load``."""

    path: str | None
    environ: Mapping[str, str]
    overrides: Mapping[str, Any] = field(default_factory=dict)  # {"section.key": value}
    data: Mapping[str, Any] | None = None

    def load(self, central: Mapping[str, Any] | None = None) -> AgentConfig:
        """The config under ``central`` (the instruction's settings); ConfigError."""
        return config.load(self.path, self.environ, self.overrides, central=central,
                           data=self.data)

    def reread(self) -> ConfigSource:
        """This source with the file as it is now (ConfigError when it cannot be read)."""
        return dataclasses.replace(
            self, data=config.read_toml(Path(self.path)) if self.path else {})


def client_for(cfg: AgentConfig, token: str, timeout_s: float) -> CollectorClient:
    c = cfg.collector
    return CollectorClient(c.url, token, timeout_s, ca_file=c.ca_file,
                           client_cert=c.client_cert, client_key=c.client_key,
                           compression=cfg.delivery.compression)


def push_client(cfg: AgentConfig) -> CollectorClient:
    """The client a ``run`` pushes with; ConfigError naming what is missing."""
    if not cfg.collector.url:
        raise ConfigError("no collector to push to: set collector.url or --collector, "
                          "or pass --no-push")
    token = config.read_token(cfg)
    if not token and not cfg.collector.client_cert:
        raise ConfigError("no token: set collector.token, token_file or token_credential, "
                          "or --token (bbprobe-collector probe add NAME prints one), or a "
                          "client certificate (collector.client_cert)")
    return client_for(cfg, token, cfg.collector.timeout_s)


def daemon_client(cfg: AgentConfig) -> CollectorClient:
    """The client the daemon delivers with (at start and at each reload); ConfigError."""
    token = config.read_token(cfg)
    if not cfg.collector.url or not (token or cfg.collector.client_cert):
        raise ConfigError("the daemon needs collector.url and a token (or a client "
                          "certificate)")
    return client_for(cfg, token, cfg.collector.timeout_s)


@dataclass(slots=True)
class Measured:
    """One slot's results: as measured, and as shown (numbered by the spool: what is
    shown is what is sent), and the spool that holds them (None: not pushed)."""

    results: list[SessionResult]
    shown: list[SessionResult]
    spool: Spool | None
    # The JWS of each result the spool signed, in order (what `run --evidence` bundles).
    signed: list[dict[str, str]] = field(default_factory=list)


class Runner:
    """The pipeline for one collector and token (``client``; None: measure only)."""

    def __init__(self, source: ConfigSource, client: CollectorClient | None,
                 warn: Lines) -> None:
        self.source = source
        self.client = client
        self.warn = warn
        self._unsigned_said: str | None = None  # why results go unsigned, said once

    async def probe_id(self, cfg: AgentConfig) -> str | None:
        """The configured id; else the name the collector gives this token now (asked at
        every session, so a daemon started while the collector was away, or whose token
        has moved, does not keep an old answer); else None. Never a guess such as the
        host name: a result sent under a wrong name is refused (403) and set aside for
        good. A result measured while this is None is spooled unnamed and named when
        delivered. A token the collector refuses is a DeliveryError."""
        if cfg.probe_id:
            return cfg.probe_id
        if self.client is None:
            return None
        try:
            return await self.client.whoami()
        except DeliveryError as exc:
            if not exc.retryable:
                raise DeliveryError(f"the collector refused the token: {exc}",
                                    retryable=False) from None
            return None

    async def prepare(self, cfg: AgentConfig, progress: Lines
                      ) -> tuple[str | None, control.Applied]:
        """A one-shot run's name and instruction, each said: (probe id, the config under
        the instruction). Suppressed or not, a run measures: it is a person's decision
        (a suppression window holds the daemon's schedule, not a technician on site)."""
        probe_id = await self.probe_id(cfg)
        if probe_id is None and self.client is not None:
            progress("the collector does not answer yet: the result is named when it is "
                     "delivered")
        applied = await self.instructed(cfg)
        if applied.error:
            self.warn(applied.error)
        if applied.version and applied.instruction is not None:
            # Said only when it changes something (most probes hold an empty one).
            said = report.instruction_line(applied.instruction.settings, applied.version,
                                           self.source.overrides)
            if said:
                progress(said)
        window = applied.instruction.suppression_at(datetime.now(UTC)) \
            if applied.instruction is not None else None
        if window is not None:
            self.warn(f"warning: this probe is suppressed until {window.ends_at.isoformat()} "
                      f"({window.reason}); measuring anyway")
        return probe_id, applied

    async def instructed(self, cfg: AgentConfig) -> control.Applied:
        """The config this session runs under, with the collector's instruction applied
        (fetched now; else the last one kept in state_dir)."""
        fetched = await control.fetch(self.client, cfg.state_dir)
        return control.apply(fetched, self.source.load)

    def spool(self, cfg: AgentConfig, *, signing: bool = False) -> Spool | None:
        """Where this client's results wait: each is spooled for this collector and
        token, and only they send it. ``signing``: what it writes is signed with the
        probe's key (agent/probekey.py), or unsigned when there is no usable key."""
        if self.client is None:
            return None
        key = self.signing_key(cfg) if signing else None
        return Spool(cfg.state_dir, cfg.delivery, self.client.identity, key)

    def signing_key(self, cfg: AgentConfig) -> Ed25519PrivateKey | None:
        """The probe's private key, made at first need; None when it cannot be read or
        made (said once: the results are spooled unsigned, never lost)."""
        try:
            found = probekey.load(cfg.state_dir, self.source.environ)
        except ConfigError as exc:
            self.unsigned(f"results are spooled unsigned: {exc}")
            return None
        return found.private if found is not None else None

    def unsigned(self, why: str) -> None:
        """Say why results go unsigned, once for each reason (not at every session)."""
        if why != self._unsigned_said:
            self._unsigned_said = why
            self.warn(why)

    async def measure(self, applied: control.Applied, probe_id: str | None, *,
                      offer: Offer | None, say: Lines | None = None,
                      ticket_warn: Lines | None = None,
                      observe: live.Observer = live.ignore,
                      on_result: Callable[[SessionResult], None] | None = None) -> Measured:
        """The slot's session(s) under ``applied``, each result spooled as its session
        ends (a stop during the second session of a dual-stack slot keeps the first).
        ``offer``: the ticket the instruction fetch brought, used once."""
        spool = self.spool(applied.cfg, signing=True)
        shown: list[SessionResult] = []
        signed: list[dict[str, str]] = []

        def keep(result: SessionResult) -> None:
            if spool is not None:
                before = spool.last_put
                if spool.put(result) is None:
                    self.warn(f"the disk is full; result {result.result_id} could not be "
                              f"spooled and is reported to the collector as a gap")
                if spool.unsigned_reason is not None:
                    self.unsigned(spool.unsigned_reason)
                put = spool.last_put
                if spool.last_jws is not None and put is not before:
                    signed.append(spool.last_jws)
                # Numbered by the spool (session_seq); one the disk refused, as measured.
                result = put if put is not None and put is not before else result
            shown.append(result)
            if on_result is not None:
                on_result(result)

        results = await session.run_all(
            applied.cfg, probe_id or "", say or _quiet,
            instruction_version=applied.version, observe=observe, on_result=keep,
            tickets=TicketSource(self.client, offer, warn=ticket_warn))
        return Measured(results, shown, spool, signed)

    async def deliver(self, spool: Spool, cfg: AgentConfig, probe_id: str | None, *,
                      max_wait_s: float | None = None, say: Lines | None = None
                      ) -> DeliveryReport:
        """Everything this token has spooled, oldest first (agent/delivery.py); each
        result set aside is said. ``max_wait_s`` caps the retrying (the daemon's: the
        next slot must not wait on a collector that is away); ``say`` is told what each
        wait is for (a person at a terminal)."""
        assert self.client is not None  # a spool is made only with a client
        # The probe's public key first, once per collector and token (agent/probekey.py).
        await probekey.enrol(self.client, cfg.state_dir, self.warn)
        delivery = cfg.delivery if max_wait_s is None else dataclasses.replace(
            cfg.delivery, max_wait_s=min(cfg.delivery.max_wait_s, max_wait_s))
        outcome = await deliver(spool, self.client, delivery, probe_id=probe_id, say=say)
        for path, reason in outcome.dead_lettered:
            self.warn(f"a result was set aside ({reason}); kept in {path} (see bbprobe "
                      "dead-letter list)")
        return outcome

    def say_waiting(self, outcome: DeliveryReport, spool: Spool) -> None:
        """One line for the results spooled for another token: kept, not sent (a token
        delivers only its own, agent/identity.py)."""
        if outcome.waiting:
            self.warn(f"{outcome.waiting} spooled result(s) measured for another probe or "
                      f"collector wait in the spool, not sent with this token; they are "
                      f"sent when a run uses their identity (bbprobe status lists them; "
                      f"{spool.dir})")

    def health(self, spool: Spool, **fields: Any) -> HealthReport | None:
        """``health.build``, or None when the state could not be read (a report must
        never cost a session)."""
        try:
            return health.build(spool, **fields)
        except (OSError, ValueError) as exc:
            self.warn(f"no health report: {exc}")
            return None

    async def send_health(self, report: HealthReport) -> str | None:
        """POST the health report (best effort: a failure is returned, never raised)."""
        if self.client is None:
            return None
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                await self.client.report_health(json.dumps(to_dict(report)).encode())
        except (DeliveryError, TimeoutError) as exc:
            return str(exc) or "timed out"
        return None


    async def push(self, cfg: AgentConfig, progress: Lines) -> int:
        """Deliver what this token has spooled, measuring nothing (a technician back
        online after a visit without a connection; a probe whose collector was away).
        The exit code: OK when nothing of this token's is left in the spool, else
        NOT_DELIVERED (what is left is kept for the next run or push)."""
        spool = self.spool(cfg)
        assert spool is not None  # push always has a client
        outcome = await self.deliver(spool, cfg, await self.probe_id(cfg), say=progress)
        self.say_waiting(outcome, spool)
        progress(f"{len(outcome.delivered)} result(s) and {outcome.gaps_sent} gap "
                 f"record(s) delivered to {cfg.collector.url}")
        if outcome.pending:
            self.warn(f"{outcome.pending} result(s) kept in {spool.dir} for the next run "
                      f"or push" + (f": {outcome.error}" if outcome.error else ""))
            return ExitCode.NOT_DELIVERED
        return ExitCode.OK

    async def conclude(self, measured: Measured, applied: control.Applied, cfg: AgentConfig,
                       probe_id: str | None, progress: Lines) -> int:
        """A one-shot run after its results were shown: deliver, report health, and the
        exit code: the measurement's (agent/exitcodes.py: FAILED, INVALID) or, when it
        was measured and valid, the delivery's (OK: delivered, or not pushed;
        NOT_DELIVERED: kept in the spool for the next run or push)."""
        measured_code = exitcodes.for_sessions(measured.results)
        spool = measured.spool
        if spool is None:
            return measured_code
        outcome = await self.deliver(spool, cfg, probe_id, say=progress)
        self.say_waiting(outcome, spool)
        report = self.health(spool, mode="run", campaign=None,
                             instruction_version=applied.version,
                             instruction_error=applied.error)
        if report is not None:
            await self.send_health(report)
        results = measured.results
        if all(r.result_id in outcome.delivered for r in results):
            earlier = len(outcome.delivered) - len(results)
            progress(f"result {', '.join(r.result_id for r in results)} delivered to "
                     f"{cfg.collector.url}"
                     + (f" with {earlier} spooled earlier" if earlier > 0 else ""))
            return measured_code
        if outcome.error:
            self.warn(f"result kept in {spool.dir} for the next run or bbprobe push "
                      f"({outcome.pending} pending): {outcome.error}")
        return exitcodes.worst((measured_code, ExitCode.NOT_DELIVERED))


def stoppable(main_async: Callable[[], Awaitable[int]], warn: Lines) -> int:
    """Run until done or until SIGTERM/SIGINT: a signal cancels the work at once (the
    spool keeps every result not yet acknowledged) and the exit code is 128 + signal."""
    async def wrapper() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        stopped: list[int] = []

        def stop(signum: int) -> None:
            stopped.append(signum)
            task.cancel()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop, signum)
        try:
            return await main_async()
        except asyncio.CancelledError:
            if not stopped:
                raise
            warn(f"stopped by {signal.Signals(stopped[0]).name}; results not yet "
                 "acknowledged stay in the spool")
            return 128 + stopped[0]

    return asyncio.run(wrapper())


def _quiet(message: str) -> None:
    return None
