"""bbprobe command line. Thin: flags -> config -> session/delivery -> printed output.

Progress goes to stderr, so ``--json`` leaves exactly one JSON document on stdout.
``AgentError`` is caught once here: one line on stderr, exit code by kind (errors.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click
from aiohttp import web

from agent import __version__, config, control, family, health, report
from agent import metrics as agent_metrics
from agent.delivery import CollectorClient, DeliveryReport, deliver
from agent.errors import AgentError, ConfigError, DeliveryError
from agent.identity import Backlog, Identity, identity_for
from agent.schema import HealthReport, SessionResult, to_dict
from agent.spool import Spool, file_id
from agent.tickets import TicketSource

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AgentError as exc:
            click.echo(f"bbprobe: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


def _parse_set(items: tuple[str, ...]) -> dict[str, Any]:
    """``--set section.key=value``; the value is read as TOML, else taken as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def _load(ctx: click.Context, central: Mapping[str, Any] | None = None,
          data: Mapping[str, Any] | None = None, /, **overrides: Any) -> config.AgentConfig:
    """The config: defaults < profile < local file (or ``data``, the file as read
    before) < ``central`` (the collector's instruction, issue 15) < the command line."""
    given = ctx.ensure_object(dict)
    merged = _parse_set(tuple(given.get("set", ())))
    flags = {"collector.url": given.get("collector"), "probe_id": given.get("probe_id"),
             "server.url": given.get("server"),
             "server.address_family": _family_flag(given.get("ipv4"), given.get("ipv6"))}
    if given.get("server") is not None:
        # --server names the one server: candidates, local or central, give way to it.
        flags["server.candidates"] = []
    if given.get("token") is not None:
        flags.update({"collector.token": given["token"], "collector.token_file": "",
                      "collector.token_credential": ""})
    merged.update({k: v for k, v in {**flags, **overrides}.items() if v is not None})
    return config.load(given.get("config_path"), os.environ, merged, central=central,
                       data=data)


def _family_flag(ipv4: bool | None, ipv6: bool | None) -> str | None:
    """server.address_family from -4/-6: one of them pins the family; both together
    ask for a dual-stack session (one result per family); neither leaves the config's."""
    if ipv4 and ipv6:
        return "both"
    return "ipv4" if ipv4 else "ipv6" if ipv6 else None


def _file_data(ctx: click.Context) -> dict[str, Any]:
    """The config file as it is now (the daemon keeps it between reloads)."""
    path = ctx.ensure_object(dict).get("config_path")
    return config.read_toml(Path(path)) if path else {}


async def _instructed(ctx: click.Context, cfg: config.AgentConfig,
                      client: CollectorClient | None, data: Mapping[str, Any] | None = None,
                      **overrides: Any) -> control.Applied:
    """The config this session runs under, with the collector's instruction applied
    (fetched now; else the last one kept in state_dir)."""
    fetched = await control.fetch(client, cfg.state_dir)
    return control.apply(fetched, lambda central: _load(ctx, central, data, **overrides))


async def _send_health(client: CollectorClient, report: HealthReport) -> str | None:
    """POST the health report (best effort: a failure is returned, never raised)."""
    try:
        async with asyncio.timeout(15):
            await client.report_health(json.dumps(to_dict(report)).encode())
    except (DeliveryError, TimeoutError) as exc:
        return str(exc) or "timed out"
    return None


def _health_report(spool: Spool, **fields: Any) -> HealthReport | None:
    """``health.build``, or None when the state could not be read (a report must
    never cost a session)."""
    try:
        return health.build(spool, **fields)
    except (OSError, ValueError) as exc:
        click.echo(f"bbprobe: no health report: {exc}", err=True)
        return None


def _publish(cfg: config.AgentConfig, gauges: agent_metrics.AgentMetrics) -> None:
    """The daemon's metrics textfile, if configured, after the session is spooled (a
    failure is one line: metrics are never worth a session). Only the daemon writes it:
    a one-shot ``run`` beside it would replace the campaign's figures with its own."""
    if not cfg.metrics.textfile:
        return
    try:
        agent_metrics.write_textfile(cfg.metrics.textfile, gauges)
    except OSError as exc:
        click.echo(f"bbprobe: metrics.textfile: cannot write {cfg.metrics.textfile}: "
                   f"{exc.strerror or exc}", err=True)
    except Exception as exc:  # a bug in the metrics: reported, the daemon goes on
        click.echo(f"bbprobe: metrics: {type(exc).__name__}: {exc}", err=True)


async def _serve_metrics(listen: str, gauges: agent_metrics.AgentMetrics
                         ) -> web.AppRunner | None:
    """GET /metrics on ``listen`` (metrics.listen), from the daemon's live state."""
    if not listen:
        return None

    made: dict[str, Any] = {"at": -1.0, "body": b""}

    async def handler(request: web.Request) -> web.Response:
        # Made at most once a second: a flood of requests must not take the CPU a
        # transfer in progress needs.
        now = time.monotonic()
        if now - made["at"] >= 1.0:
            made.update(at=now, body=agent_metrics.exposition(gauges))
        response = web.Response(body=made["body"])
        response.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
        return response

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
                           keepalive_timeout=10.0)
    await runner.setup()
    host, port = config.split_listen(listen)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"metrics.listen: cannot listen on {listen}: "
                          f"{exc.strerror or exc}") from None
    return runner


def _progress(quiet: bool, say: Callable[[str], None] | None = None
              ) -> Callable[[str], None]:
    """Progress lines on stderr; through ``say`` while a live line is drawn (liveview)."""
    def emit(message: str) -> None:
        if quiet:
            return
        if say is not None:
            say(f"· {message}")
        else:
            click.echo(f"· {message}", err=True)

    return emit


def _emit(results: list[SessionResult], as_json: bool) -> None:
    """The session's result; a dual-stack session's two (IPv4, then IPv6): with --json
    as one array, so stdout still holds exactly one JSON document."""
    if as_json:
        docs = [to_dict(r) for r in results]
        click.echo(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    else:
        for result in results:
            click.echo(report.format_session(result), nl=False)


async def _probe_id(cfg: config.AgentConfig, client: CollectorClient | None) -> str | None:
    """The configured id; else the name the collector gives this token now (asked at
    every session, so a daemon started while the collector was away, or whose token has
    moved, does not keep an old answer); else None. Never a guess such as the host name:
    a result sent under a wrong name is refused (403) and set aside for good. A result
    measured while this is None is spooled unnamed and named when delivered."""
    if cfg.probe_id:
        return cfg.probe_id
    if client is None:
        return None
    try:
        return await client.whoami()
    except DeliveryError as exc:
        if not exc.retryable:
            raise DeliveryError(f"the collector refused the token: {exc}",
                                retryable=False) from None
        return None


def _report_dead_lettered(outcome: DeliveryReport) -> None:
    for path, reason in outcome.dead_lettered:
        click.echo(f"bbprobe: a result was set aside ({reason}); kept in {path} (see "
                   "bbprobe dead-letter list)", err=True)


def _report_waiting(outcome: DeliveryReport, spool: Spool) -> None:
    """One line for the results spooled for another token (issue 23): kept, not sent."""
    if outcome.waiting:
        click.echo(f"bbprobe: {outcome.waiting} spooled result(s) measured for another probe "
                   f"or collector wait in the spool, not sent with this token; they are "
                   f"sent when a run uses their identity (bbprobe status lists them; "
                   f"{spool.dir})", err=True)


def _client(cfg: config.AgentConfig, token: str, timeout_s: float) -> CollectorClient:
    c = cfg.collector
    return CollectorClient(c.url, token, timeout_s, ca_file=c.ca_file,
                           client_cert=c.client_cert, client_key=c.client_key,
                           compression=cfg.delivery.compression)


def _run_stoppable(main_async: Callable[[], Awaitable[int]]) -> int:
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
            click.echo(f"bbprobe: stopped by {signal.Signals(stopped[0]).name}; results not "
                       "yet acknowledged stay in the spool", err=True)
            return 128 + stopped[0]

    return asyncio.run(wrapper())


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Collect a shared option into ctx.obj, whether given before or after the command."""
    if value is None or value == ():
        return value
    obj = ctx.ensure_object(dict)
    from_env = ctx.get_parameter_source(str(param.name)) is click.core.ParameterSource.ENVIRONMENT
    if from_env and str(param.name) in obj:
        return value  # an explicit flag before the command wins over the environment
    if param.name == "set_":
        obj.setdefault("set", []).extend(value)
    else:
        obj[str(param.name)] = value
    return value


_SHARED = (
    click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
                 envvar="BBPROBE_CONFIG", expose_value=False, callback=_remember,
                 help="Agent TOML config (default: built-in defaults)."),
    click.option("--collector", expose_value=False, callback=_remember,
                 help="Collector base URL (overrides collector.url)."),
    click.option("--token", expose_value=False, callback=_remember,
                 help="Probe bearer token (overrides collector.token)."),
    click.option("--probe-id", expose_value=False, callback=_remember,
                 help="Probe identity (default: asked from the collector)."),
    click.option("--server", expose_value=False, callback=_remember,
                 help="Measurement server URL (default: the collector)."),
    click.option("-4", "--ipv4", "ipv4", is_flag=True, default=None, expose_value=False,
                 callback=_remember,
                 help="IPv4 only: resolve and connect over IPv4 (server.address_family)."),
    click.option("-6", "--ipv6", "ipv6", is_flag=True, default=None, expose_value=False,
                 callback=_remember,
                 help="IPv6 only; with -4 too: dual stack, one session over each, each "
                      "its own result."),
    click.option("--set", "set_", multiple=True, metavar="KEY=VALUE", expose_value=False,
                 callback=_remember,
                 help="Override any config key, e.g. --set ping.count=20 (repeatable)."),
)


def shared_options(fn: F) -> F:
    """The connection/config options, accepted before or after the command name."""
    for option in reversed(_SHARED):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bbprobe")
@shared_options
@click.pass_context
def main(ctx: click.Context) -> None:
    """bbprobe: measure a broadband line (ping, loss, download, upload) the AGCOM way."""
    ctx.ensure_object(dict)


@main.command()
@shared_options
@click.option("--json", "as_json", is_flag=True, help="Print the result document as JSON.")
@click.option("--no-push", is_flag=True, help="Do not send the result to the collector.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
@click.pass_context
@handle_errors
def run(ctx: click.Context, as_json: bool, no_push: bool, quiet: bool) -> None:
    """Run one full session (ping train, download, upload) and push the result."""
    cfg = _load(ctx)
    push = not no_push
    client: CollectorClient | None = None
    if push:
        if not cfg.collector.url:
            raise ConfigError("no collector to push to: set collector.url or --collector, "
                              "or pass --no-push")
        token = config.read_token(cfg)
        if not token and not cfg.collector.client_cert:
            raise ConfigError("no token: set collector.token, token_file or "
                              "token_credential, or --token "
                              "(bbprobe-collector probe add NAME prints one), or a "
                              "client certificate (collector.client_cert)")
        client = _client(cfg, token, cfg.collector.timeout_s)
    progress = _progress(quiet)

    async def main_async() -> int:
        from datetime import UTC, datetime

        from agent import liveview, session

        probe_id = await _probe_id(cfg, client)
        if probe_id is None and client is not None:
            progress("the collector does not answer yet: the result is named when it is "
                     "delivered")
        applied = await _instructed(ctx, cfg, client)
        if applied.error:
            click.echo(f"bbprobe: {applied.error}", err=True)
        if applied.version:
            progress(f"central instruction {applied.version}")
        window = applied.instruction.suppression_at(datetime.now(UTC)) \
            if applied.instruction is not None else None
        if window is not None:
            # A one-shot run is a person's decision: warn, and measure (issue 15).
            click.echo(f"bbprobe: warning: this probe is suppressed until "
                       f"{window.ends_at.isoformat()} ({window.reason}); measuring anyway",
                       err=True)
        # Each result is spooled for this collector and token, and only they send it.
        spool = Spool(cfg.state_dir, cfg.delivery, client.identity) \
            if client is not None else None
        shown: list[SessionResult] = []

        def keep(result: SessionResult) -> None:
            """Spool each result as its session ends (a stop during the second session
            of a dual-stack run keeps the first)."""
            if spool is None:
                shown.append(result)
                return
            before = spool.last_put
            if spool.put(result) is None:
                click.echo(f"bbprobe: the disk is full; result {result.result_id} could not "
                           f"be spooled and is reported to the collector as a gap", err=True)
            # What is shown is what is sent: numbered by the spool (session_seq); a
            # result the disk refused is shown as measured.
            put = spool.last_put
            shown.append(put if put is not None and put is not before else result)

        with liveview.shown(liveview.wanted(as_json=as_json, quiet=quiet)) as view:
            say = _progress(quiet, view.say)
            results = await session.run_all(
                applied.cfg, probe_id or "", say, instruction_version=applied.version,
                observe=view.observe, on_result=keep,
                tickets=TicketSource(client, applied.offer, warn=say))
        _emit(shown, as_json)
        if client is None or spool is None:
            return 0
        outcome = await deliver(spool, client, cfg.delivery, probe_id=probe_id)
        _report_dead_lettered(outcome)
        _report_waiting(outcome, spool)
        report_ = _health_report(spool, mode="run", campaign=None,
                                 instruction_version=applied.version,
                                 instruction_error=applied.error)
        if report_ is not None:
            await _send_health(client, report_)
        if all(r.result_id in outcome.delivered for r in results):
            earlier = len(outcome.delivered) - len(results)
            progress(f"result {', '.join(r.result_id for r in results)} delivered to "
                     f"{cfg.collector.url}"
                     + (f" with {earlier} spooled earlier" if earlier > 0 else ""))
            return 0
        if outcome.error:
            click.echo(f"bbprobe: result kept in {spool.dir} for the next run "
                       f"({outcome.pending} pending): {outcome.error}", err=True)
        return DeliveryError.exit_code

    sys.exit(_run_stoppable(main_async))


@main.command()
@shared_options
@click.argument("host")
@click.option("--count", "-n", type=int, help="Echo requests to send (ping.count).")
@click.option("--interval", "-i", type=float, help="Seconds between requests.")
@click.option("--size", "-s", type=int, help="ICMP payload bytes.")
@click.option("--timeout", "-W", type=float, help="Seconds to wait for each reply.")
@click.option("--json", "as_json", is_flag=True, help="Print the result document as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
@click.pass_context
@handle_errors
def ping(ctx: click.Context, host: str, count: int | None, interval: float | None,
         size: int | None, timeout: float | None, as_json: bool, quiet: bool) -> None:
    """Ping HOST with a timed train and report RTT statistics and loss (not pushed)."""
    from agent import session

    cfg = _load(ctx, **{"server.ping_target": host, "ping.enabled": True, "ping.count": count,
                        "ping.interval_s": interval, "ping.payload_bytes": size,
                        "ping.timeout_s": timeout})
    results = asyncio.run(session.run_all(cfg, cfg.probe_id or "local", _progress(quiet),
                                          tests=frozenset({"ping"})))
    pings = [r.ping for r in results if r.ping is not None]
    failed = [p for p in pings if p.status == "failed" and p.summary.packets_sent == 0]
    if as_json or len(failed) < len(pings):
        _emit(results, as_json)  # with --json the failure is recorded in the document
    if failed:
        raise AgentError("; ".join(p.error or "ping failed" for p in failed))


@main.command()
@shared_options
@click.option("--direction", type=click.Choice(["both", "download", "upload"]), default="both")
@click.option("--json", "as_json", is_flag=True, help="Print the result document as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
@click.pass_context
@handle_errors
def speed(ctx: click.Context, direction: str, as_json: bool, quiet: bool) -> None:
    """Measure download and/or upload throughput against the server (not pushed)."""
    from agent import liveview, session

    cfg = _load(ctx)
    config.measurement_server(cfg)  # fail early with a clear message
    tests = frozenset({"download", "upload"} if direction == "both" else {direction})
    with liveview.shown(liveview.wanted(as_json=as_json, quiet=quiet)) as view:
        results = asyncio.run(session.run_all(cfg, cfg.probe_id or "local",
                                              _progress(quiet, view.say), tests=tests,
                                              observe=view.observe))
    _emit(results, as_json)


@main.command()
@shared_options
@click.option("--direction", type=click.Choice(["both", "download", "upload"]), default="both")
@click.option("--ca-file", type=click.Path(dir_okay=False, exists=True),
              help="CA bundle to verify a wss:// server with (default: the system's).")
@click.option("--insecure", is_flag=True,
              help="Do not verify the wss:// server's certificate (a lab's self-signed one).")
@click.option("--json", "as_json", is_flag=True, help="Print the subtests as JSON.")
@click.pass_context
@handle_errors
def ndt7(ctx: click.Context, direction: str, ca_file: str | None, insecure: bool,
         as_json: bool) -> None:
    """Run M-Lab's ndt7 test (download then upload, 10 s each) against an ndt7 server:
    the measurement server (--server, a bbprobe collector) or any ndt-server. Exit 6 when
    a subtest failed."""
    import ssl

    from agent import liveview
    from agent.probes import ndt7 as ndt7_probe

    cfg = _load(ctx)
    server = config.measurement_server(cfg)
    context: ssl.SSLContext | bool = True
    if insecure:
        context = False
    elif ca_file:
        context = ssl.create_default_context(cafile=ca_file)
    tests = ("download", "upload") if direction == "both" else (direction,)
    with liveview.shown(liveview.wanted(as_json=as_json)) as view:
        results = asyncio.run(ndt7_probe.run(server, tests, ssl_context=context,
                                             observe=view.observe,
                                             requested=cfg.server.address_family))
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            over = f" over {family.label(r.address_family)}" if r.address_family else ""
            if not r.ok:
                click.echo(f"{r.test:8s} FAILED{over}: {r.error}")
                continue
            rate = f"{r.throughput_bps / 1e6:9.2f} Mbit/s" if r.throughput_bps else "   n/a"
            rtt = f"min RTT {r.min_rtt_ms:.2f} ms" if r.min_rtt_ms is not None else ""
            retrans = (f", retransmitted {100 * r.retrans_ratio:.2f} %"
                       if r.retrans_ratio is not None else "")
            click.echo(f"{r.test:8s} {rate}  ({r.method}; {r.client_elapsed_s:.1f} s) "
                       f"{rtt}{retrans}{over}")
    if not all(r.ok for r in results):
        sys.exit(6)


@main.command("check-config")
@shared_options
@click.pass_context
@handle_errors
def check_config(ctx: click.Context) -> None:
    """Validate the configuration and print what a session would do, under the
    collector's instruction (fetched now, else the one last kept)."""
    local = _load(ctx)
    token = config.read_token(local)
    source = config.token_source(local)
    client = _client(local, token, min(local.collector.timeout_s, 10)) \
        if local.collector.url and (token or local.collector.client_cert) else None
    applied = asyncio.run(_instructed(ctx, local, client))
    cfg = applied.cfg
    m = config.method(cfg)
    lines = [
        "config OK",
        f"  collector: {cfg.collector.url or '(none: results are not pushed)'}; "
        f"token: {f'set, from {source}' if token else 'not set'}",
        f"  state dir: {cfg.state_dir}",
    ]
    inst = applied.instruction
    if inst is None:
        lines.append("  instruction: none (this file and the command line decide)")
    else:
        state = "applied" if applied.version else "NOT applied"
        lines.append(f"  instruction: {inst.version}, {state}; {len(inst.settings)} "
                     f"key(s), under the command line's --set")
        lines += [f"    {k} = {json.dumps(v)}" for k, v in sorted(inst.settings.items())]
        lines += [f"    suppressed {w.starts_at.isoformat()} .. {w.ends_at.isoformat()}: "
                  f"{w.reason}" for w in inst.suppressions]
    if applied.error:
        lines.append(f"  instruction problem: {applied.error}")
    if cfg.server.candidates:
        lines.append(f"  measurement server candidates: {', '.join(cfg.server.candidates)} "
                     f"(the lowest median RTT of {cfg.server.select_pings} pings is used)")
    if cfg.server.url or cfg.collector.url:
        lines.append(f"  measurement server: {config.measurement_server(cfg)}; "
                     f"ping target: {config.ping_target(cfg)}")
    if m.ping is not None:
        lines.append(f"  ping: {m.ping.count} x {m.ping.payload_bytes} B, "
                     f"{m.ping.interval_s:g} s apart, timeout {m.ping.timeout_s:g} s")
    for name, t in (("download", m.download), ("upload", m.upload)):
        lines.append(f"  {name}: {t.tests} test(s), {report.describe_method(t)}, "
                     f"up to {t.attempts} attempts of {t.timeout_s:g} s")
    click.echo("\n".join(lines))


@main.command()
@shared_options
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--no-check", is_flag=True, help="Do not contact the collector.")
@click.pass_context
@handle_errors
def status(ctx: click.Context, as_json: bool, no_check: bool) -> None:
    """Spool backlog, gap records, results the collector refused (dead-letter), delivery
    counters, and whether the collector answers for this probe's token."""
    cfg = _load(ctx)
    spool = Spool(cfg.state_dir, cfg.delivery)
    entries = spool.entries()
    dead = [{"id": file_id(p), "file": str(p), "reason": _reason(p)}
            for p in spool.dead_letters()]
    mine = _identity(cfg)
    owners = spool.backlog()
    doc: dict[str, Any] = {
        "state_dir": cfg.state_dir,
        "spool": {"results": len(entries), "bytes": sum(e.size for e in entries),
                  "oldest_started_at": entries[0].started_at.isoformat() if entries else None,
                  "limit_bytes": cfg.delivery.spool_max_bytes,
                  "by_identity": [_backlog_json(b, mine) for b in owners]},
        "gaps_waiting": len(spool.gaps()),
        "dead_letter": dead,
        "counters": spool.stats(),
        "collector": None,
        "campaign": None,
    }
    from datetime import UTC

    from agent.daemon import CampaignStore
    from agent.schedule import RULES

    campaign = CampaignStore(cfg.state_dir).load()
    if campaign is not None:
        doc["campaign"] = {**campaign.to_json(), "complete": campaign.complete,
                           "needed": campaign.needed}
    held = control.InstructionCache(cfg.state_dir).load()
    doc["instruction"] = None if held is None else {
        "version": held[1].version, "settings": held[1].settings,
        "suppressions": len(held[1].suppressions)}
    if cfg.collector.url and not no_check:
        token = config.read_token(cfg)
        client = _client(cfg, token, min(cfg.collector.timeout_s, 10))
        try:
            doc["collector"] = {"url": cfg.collector.url, "reachable": True,
                                "probe_id": asyncio.run(client.whoami())}
        except DeliveryError as exc:
            doc["collector"] = {"url": cfg.collector.url, "reachable": False,
                                "error": str(exc)}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    spooled = doc["spool"]
    lines = [f"spool: {spooled['results']} result(s) waiting ({spooled['bytes'] / 1024:.1f} "
             f"KiB of {cfg.delivery.spool_max_bytes / 1024**2:.0f} MiB)"
             + (f", oldest started {spooled['oldest_started_at']}" if entries else "")
             + f" in {spool.dir}"]
    if any(not row["this_token"] for row in doc["spool"]["by_identity"]):
        # Another probe's or collector's results share the spool (issue 23): whose, and
        # when they go.
        lines += [f"  {_backlog_line(b, mine)}" for b in owners]
    counters = doc["counters"]
    lines.append(f"gaps: {doc['gaps_waiting']} gap record(s) waiting to be sent; "
                 f"{counters.get('dropped_total', 0)} result(s) dropped in total")
    lines.append(f"dead-letter: {len(dead)} result(s) set aside, refused by the collector "
                 "or damaged (bbprobe dead-letter list|retry|drop)" + (":" if dead else ""))
    lines += [f"  {d['file']}: {d['reason']}" for d in dead]
    lines.append(f"delivered: {counters.get('delivered_total', 0)} in total; last attempt "
                 f"{counters.get('last_attempt_at') or 'never'}, last success "
                 f"{counters.get('last_success_at') or 'never'}"
                 + (f"; last error: {counters['last_error']}"
                    if counters.get("last_error") else ""))
    recent = counters.get("last_results") or []
    if recent:
        lines.append("last results:")
    for r in recent:
        def rate(v: float | None) -> str:
            return "—" if v is None else f"{v / 1e6:.1f}"
        rtt = "—" if r.get("rtt_mean_ms") is None else f"{r['rtt_mean_ms']:.1f} ms"
        lines.append(f"  {r['started_at']}  down {rate(r.get('download_bps'))} / up "
                     f"{rate(r.get('upload_bps'))} Mbit/s, RTT {rtt}"
                     + ("" if r.get("valid", True) else "  INVALID"))
    if campaign is not None:
        per = RULES[campaign.rule].per_band
        state = "complete" if campaign.complete else \
            f"{sum(campaign.counted)}/{24 * per} sessions"
        began = campaign.started_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
        lines.append(f"campaign: rule {campaign.rule} started {began} UTC, {state}; bands "
                     f"({campaign.timezone}, counted/attempted):")
        cells = [f"{h:02d}h {campaign.counted[h]}/{campaign.attempted[h]}"
                 f"{'' if campaign.counted[h] >= per else ' !'}" for h in range(24)]
        lines += ["  " + "  ".join(cells[i:i + 8]) for i in range(0, 24, 8)]
    held_doc = doc["instruction"]
    lines.append("instruction: none received (this file decides)" if held_doc is None else
                 f"instruction: {held_doc['version']} (last received; "
                 f"{len(held_doc['settings'])} key(s), {held_doc['suppressions']} "
                 "suppression window(s); bbprobe check-config shows them)")
    coll = doc["collector"]
    if coll is None:
        lines.append("collector: not checked" if cfg.collector.url else
                     "collector: none configured")
    elif coll["reachable"]:
        lines.append(f"collector: {coll['url']} answers, as probe {coll['probe_id']}")
    else:
        lines.append(f"collector: {coll['url']} unreachable or refusing: {coll['error']}")
    click.echo("\n".join(lines))


def _identity(cfg: config.AgentConfig) -> Identity | None:
    """Whom a run with this config would deliver as; None without a collector or when
    the token or the client certificate cannot be read (status still shows the spool)."""
    if not cfg.collector.url:
        return None
    try:
        return identity_for(cfg.collector.url, config.read_token(cfg),
                            cfg.collector.client_cert)
    except ConfigError:
        return None


def _backlog_json(b: Backlog, mine: Identity | None) -> dict[str, Any]:
    return {"collector_url": b.identity.collector_url if b.identity else None,
            "token_fingerprint": b.identity.token_fingerprint if b.identity else None,
            "probe_id": b.probe_id, "results": b.results, "bytes": b.size_bytes,
            "gaps": b.gaps, "this_token": _this_token(b, mine)}


def _this_token(b: Backlog, mine: Identity | None) -> bool:
    return b.identity is not None and mine is not None and \
        b.identity.token_fingerprint == mine.token_fingerprint


def _backlog_line(b: Backlog, mine: Identity | None) -> str:
    """One owner's share of the spool, and what sends it (agent.identity.claim)."""
    what = f"{b.results} result(s)" + (f" and {b.gaps} gap record(s)" if b.gaps else "")
    who = f"probe {b.probe_id}" if b.probe_id else "a probe not named yet"
    if b.identity is None and not b.probe_id:
        return (f"{what} from an older bbprobe, with no probe name and no identity: not "
                "sent, since whose they are cannot be told (dropped, with a gap record, "
                "after delivery.max_age_days)")
    if b.identity is None:
        return (f"{what} from an older bbprobe for probe {b.probe_id}: sent by a run "
                f"whose collector names its token {b.probe_id}")
    at = f"{who} at {b.identity.collector_url}"
    if _this_token(b, mine):
        return f"{what} for {at} (this token): sent by the next run or session"
    return f"{what} waiting for {at}, sent when a run uses that identity"


def _reason(path: Path) -> str:
    try:
        return path.with_suffix(".reason.txt").read_text(encoding="utf-8").strip()
    except OSError:
        return "(no reason recorded)"


@main.group("dead-letter")
@shared_options
def dead_letter() -> None:
    """Results set aside instead of delivered: refused by the collector for good, or
    damaged in the spool. List them with the reason, send them again, or delete them."""


@dead_letter.command("list")
@shared_options
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.pass_context
@handle_errors
def dead_letter_list(ctx: click.Context, as_json: bool) -> None:
    """Each dead-lettered result (or gap record) with its id and reason."""
    cfg = _load(ctx)
    spool = Spool(cfg.state_dir, cfg.delivery)
    rows = [{"id": file_id(p), "kind": "gap" if spool.is_gap(p) else "result",
             "reason": _reason(p), "file": str(p)} for p in spool.dead_letters()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo(f"dead-letter: empty ({spool.dead_dir})")
    else:
        click.echo("\n".join(f"{r['kind']} {r['id']}: {r['reason']}" for r in rows))


def _chosen_dead_letters(spool: Spool, ids: tuple[str, ...], every: bool,
                         verb: str) -> list[Path]:
    """The dead-letter files named by ``ids`` (or all of them); ConfigError, before any
    is touched, naming the ids that are not there."""
    if every == bool(ids):
        raise ConfigError(f"dead-letter {verb}: give result ids or --all (bbprobe "
                          "dead-letter list shows them)")
    present = {file_id(p): p for p in spool.dead_letters()}
    if every:
        return list(present.values())
    unknown = [i for i in dict.fromkeys(ids) if i not in present]
    if unknown:
        raise ConfigError(f"dead-letter {verb}: no dead-lettered result "
                          f"{', '.join(unknown)} in {spool.dead_dir}")
    return [present[i] for i in dict.fromkeys(ids)]


def _act_on_dead_letters(ctx: click.Context, ids: tuple[str, ...], every: bool, verb: str,
                         act: Callable[[Spool, Path], object], failed: str, done: str) -> None:
    cfg = _load(ctx)
    spool = Spool(cfg.state_dir, cfg.delivery)
    chosen = _chosen_dead_letters(spool, ids, every, verb)
    for path in chosen:
        try:
            act(spool, path)
        except OSError as exc:
            raise AgentError(f"{failed} {path}: {exc.strerror or exc}") from None
    click.echo(f"{len(chosen)} {done}")


@dead_letter.command("retry")
@shared_options
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every dead-lettered result.")
@click.pass_context
@handle_errors
def dead_letter_retry(ctx: click.Context, ids: tuple[str, ...], every: bool) -> None:
    """Move results back to the spool; the next run or session sends them again."""
    _act_on_dead_letters(ctx, ids, every, "retry", Spool.retry_dead_letter,
                         "cannot move back to the spool:",
                         "moved back to the spool; the next run or session sends them")


@dead_letter.command("drop")
@shared_options
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every dead-lettered result.")
@click.pass_context
@handle_errors
def dead_letter_drop(ctx: click.Context, ids: tuple[str, ...], every: bool) -> None:
    """Delete results from dead-letter for good."""
    _act_on_dead_letters(ctx, ids, every, "drop", Spool.drop_dead_letter, "cannot delete",
                         "deleted")


ADVICE = {
    "cpu_busy": "close other programs (updates, backups, browsers) and try again",
    "memory_busy": "close other programs to free memory",
    "memory_low": "use a device with at least 128 MiB of memory",
    "wifi": "connect the probe to the router with a cable and turn Wi-Fi off",
    "link_speed": "use a port and cable that link at the contract's speed (Gigabit)",
    "cross_traffic": "stop other devices and downloads on this line during the test",
    "lan_hosts": "switch off or unplug the other devices on the LAN (TV boxes, PCs, "
                 "phones on Wi-Fi) during the test",
}


@main.command()
@shared_options
@click.option("--json", "as_json", is_flag=True, help="Print the observations as JSON.")
@click.pass_context
@handle_errors
def check(ctx: click.Context, as_json: bool) -> None:
    """Run the host checks alone: what a measurement now would be flagged for, and what
    to do about it (exit 0 when all pass, 5 when any fails)."""
    from dataclasses import asdict
    from urllib.parse import urlsplit

    from agent import checks
    from agent.session import _thresholds

    cfg = _load(ctx)
    host = urlsplit(config.measurement_server(cfg)).hostname or "127.0.0.1"
    context = checks.observe_host(host, 0.5, cfg.checks.scan_lan, [config.ping_target(cfg)])
    reasons = checks.assess(context, _thresholds(cfg))
    if as_json:
        click.echo(json.dumps({"context": asdict(context),
                               "invalid_reasons": [asdict(r) for r in reasons]}, indent=2))
    else:
        speed = f"{context.link_speed_mbps} Mbit/s" if context.link_speed_mbps else \
            "speed unknown"
        lines = [
            f"route to {host}: interface {context.interface or '?'} ({speed}, MTU "
            f"{context.mtu or '?'}{', wireless' if context.wireless else ''}"
            f"{', loopback' if context.loopback else ''}), address "
            f"{', '.join(context.addresses) or '?'}, gateway {context.gateway or '?'}",
            f"CPU {context.cpu_percent:.0f} % busy; memory "
            f"{(context.memory_used_ratio or 0):.0%} used of "
            f"{(context.memory_total_bytes or 0) / 1024**3:.1f} GiB; {context.os}",
            f"LAN: {context.lan_scan}"
            + (f": {context.lan_hosts} other host(s) besides the gateway"
               if context.lan_hosts is not None else ""),
        ]
        if reasons:
            lines.append("A measurement now would be flagged INVALID:")
            lines += [f"  - {r.detail}: {ADVICE.get(r.code, 'see the README')}"
                      for r in reasons]
        else:
            lines.append("All host checks pass. (Cross traffic is checked during the "
                         "transfers themselves.)")
        click.echo("\n".join(lines))
    if reasons:
        sys.exit(5)


@main.command()
@shared_options
@click.option("--rule", type=click.Choice(["96in24h", "24in72h"]),
              help="Sessions per hourly band: 4 (one per quarter) or 1 (campaign.rule, "
                   "default 96in24h).")
@click.option("--timezone", help="Local time of the hourly bands (campaign.timezone, "
                                 "default Europe/Rome).")
@click.option("--window-days", type=click.IntRange(1, 30),
              help="Days a campaign may take to fill every band, retries included "
                   "(campaign.window_days, default 3).")
@click.option("--first-now", is_flag=True,
              help="Also measure once at start, outside the campaign (its bands neither "
                   "filled nor planned around), to see a new install deliver at once.")
@click.option("--report-every", "report_every_s", type=click.FloatRange(1, 86_400),
              default=3600.0, show_default=True,
              help="Seconds between health reports while idle (one is also sent after "
                   "every delivery).")
@click.option("--time-scale", type=click.FloatRange(1, 100_000), default=1.0, hidden=True,
              help="Lab and test use only: the campaign's clock runs this many times "
                   "faster than real time (a quarter hour lasts 900/K s); measurements "
                   "and timestamps stay real.")
@click.pass_context
@handle_errors
def daemon(ctx: click.Context, rule: str | None, timezone: str | None,
           window_days: int | None, first_now: bool, report_every_s: float,
           time_scale: float) -> None:
    """Measure continuously in 24-hour campaigns (the systemd service): every hourly band
    filled, failed or invalid sessions retried in their band. Before each session the
    collector's instruction is fetched and applied, and no session starts inside a
    suppression window. SIGHUP reloads the config, SIGTERM stops cleanly (sd_notify
    READY/RELOADING/STOPPING/WATCHDOG)."""
    import dataclasses
    from datetime import UTC, datetime

    from agent import daemon as d
    from agent import session

    flags: dict[str, Any] = {"campaign.rule": rule, "campaign.timezone": timezone,
                             "campaign.window_days": window_days}
    # The file as read at start (and at each reload): every session's config is built
    # from it and the instruction, so a half-edited file changes nothing before SIGHUP.
    data = _file_data(ctx)
    state: dict[str, Any] = {"cfg": _load(ctx, None, data, **flags), "data": data,
                             "version": None, "error": None, "instruction": None}

    def make_client(cfg: config.AgentConfig) -> CollectorClient:
        token = config.read_token(cfg)
        if not cfg.collector.url or not (token or cfg.collector.client_cert):
            raise ConfigError("the daemon needs collector.url and a token (or a client "
                              "certificate)")
        return _client(cfg, token, cfg.collector.timeout_s)

    state["client"] = make_client(state["cfg"])

    def on_reload() -> None:
        d.notify("RELOADING=1")
        try:
            data = _file_data(ctx)
            fresh = _load(ctx, None, data, **flags)
            state["client"] = make_client(fresh)
            state.update(cfg=fresh, data=data)
            click.echo("bbprobe: configuration reloaded", err=True)
        except AgentError as exc:
            click.echo(f"bbprobe: reload refused, keeping the old configuration: {exc}",
                       err=True)
        d.notify("READY=1")

    # The campaign's clock: real time, or (labs, tests) K times faster from the start.
    origin = datetime.now(UTC)

    def virtual(moment: datetime) -> datetime:
        return origin + (moment - origin) * time_scale

    def real(moment: datetime) -> datetime:
        return origin + (moment - origin) / time_scale

    def clock() -> datetime:
        return virtual(datetime.now(UTC))

    async def wait(at: datetime, control_: d.Control) -> None:
        await d.real_wait(real(at), control_)

    async def main_async() -> int:
        control_ = d.Control()
        d.install_signals(control_)
        store = d.CampaignStore(state["cfg"].state_dir)
        # Asked here only to refuse a bad token at start and to say who we are; each
        # session asks again (the collector may be away now and back later).
        probe_id = await _probe_id(state["cfg"], state["client"])
        last_error: dict[str, str | None] = {"instruction": None}
        waiting = {"results": 0}  # another identity's, said once each time it changes
        gauges = agent_metrics.AgentMetrics(__version__, probe_id or "", sessions={})

        async def plan() -> d.Plan:
            """Fetch the instruction (If-None-Match: cheap when unchanged) and rebuild
            the config under it: the next session runs with what it says."""
            base: config.AgentConfig = state["cfg"]
            applied = await _instructed(ctx, base, state["client"], state["data"], **flags)
            if applied.error and applied.error != last_error["instruction"]:
                click.echo(f"bbprobe: {applied.error}", err=True)
            if applied.version != state["version"] and applied.version:
                click.echo(f"bbprobe: running under central instruction "
                           f"{applied.version}", err=True)
            last_error["instruction"] = applied.error
            state.update(session_cfg=applied.cfg, version=applied.version,
                         error=applied.error, instruction=applied.instruction,
                         offer=applied.offer)
            c = applied.cfg.campaign
            windows = tuple((virtual(w.starts_at), virtual(w.ends_at))
                            for w in applied.instruction.suppressions) \
                if applied.instruction is not None else ()
            return d.Plan(c.rule, c.timezone, c.window_days, windows)

        async def report(campaign: Any, until: datetime | None,
                         next_at: datetime | None) -> None:
            cfg: config.AgentConfig = state["cfg"]
            spool = Spool(cfg.state_dir, cfg.delivery, state["client"].identity)
            report_ = _health_report(
                spool, mode="daemon", campaign=campaign or store.load(),
                instruction_version=state["version"], instruction_error=state["error"],
                suppressed_until=real(until) if until else None,
                next_session_at=real(next_at) if next_at else None)
            if report_ is not None:
                gauges.report = report_
                _publish(state["cfg"], gauges)
                await _send_health(state["client"], report_)

        async def one_session() -> tuple[datetime, bool]:
            cfg: config.AgentConfig = state.get("session_cfg") or state["cfg"]
            client: CollectorClient = state["client"]
            try:
                named = await _probe_id(cfg, client)
            except DeliveryError as exc:
                # Refused mid-campaign: still measure; the results wait in the spool.
                click.echo(f"bbprobe: {exc}", err=True)
                named = None
            spool = Spool(cfg.state_dir, cfg.delivery, client.identity)

            def keep(result: SessionResult) -> None:
                spool.put(result)  # as each session ends: a SIGTERM keeps what was done
                gauges.session(result)

            # The ticket that came with the last instruction fetch, once (one a session).
            tickets = TicketSource(client, state.pop("offer", None),
                                   warn=lambda m: click.echo(f"bbprobe: {m}", err=True))
            # Dual stack ("both"): two results for this one slot, IPv4 then IPv6.
            results = await session.run_all(cfg, named or "", _progress(True),
                                            instruction_version=state["version"],
                                            on_result=keep, tickets=tickets)
            _publish(state["cfg"], gauges)
            outcome = await deliver(
                spool, client, dataclasses.replace(
                    cfg.delivery, max_wait_s=min(cfg.delivery.max_wait_s, 30)),
                probe_id=named)
            _report_dead_lettered(outcome)
            if outcome.waiting != waiting["results"]:
                waiting["results"] = outcome.waiting
                _report_waiting(outcome, spool)
            # The health report follows in run_campaigns, once the session is recorded.
            # The slot counts once in its band, when every family asked for counts.
            return clock(), d.slot_counts(results)

        async def measure() -> tuple[datetime, bool]:
            work = asyncio.ensure_future(one_session())
            stopping = asyncio.ensure_future(control_.stop.wait())
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not work.done():
                work.cancel()  # SIGTERM mid-session: unacknowledged results stay spooled
                await asyncio.gather(work, return_exceptions=True)
                raise asyncio.CancelledError
            if (error := work.exception()) is not None and not isinstance(error, AgentError):
                # A bug or an environment the session did not foresee must cost one
                # session (not counted in its band, so it is retried), not the daemon.
                import traceback

                where = traceback.extract_tb(error.__traceback__)[-1]
                click.echo(f"bbprobe: session failed: {type(error).__name__}: {error} "
                           f"({where.filename}:{where.lineno})", err=True)
                return clock(), False
            return work.result()

        interval = d.watchdog_interval()
        dog = asyncio.ensure_future(d.watchdog(interval, control_)) if interval else None
        # The metrics listener is bound from the file as read at start (a reload does
        # not move it): a port that cannot be bound stops the start, named.
        metrics_site = await _serve_metrics(state["cfg"].metrics.listen, gauges)
        d.notify("READY=1")
        who = f"as probe {probe_id}" if probe_id else \
            "(probe name not known yet: the collector does not answer; asked at each session)"
        click.echo(f"bbprobe: daemon running {who}, rule {state['cfg'].campaign.rule}",
                   err=True)
        try:
            if first_now:
                await plan()
                await measure()
                await report(None, None, None)
            await d.run_campaigns(control_, store, measure, clock=clock, wait=wait,
                                  on_reload=on_reload, plan=plan, report=report,
                                  on_error=lambda m: click.echo(f"bbprobe: {m}", err=True),
                                  report_every_s=report_every_s * time_scale)
        except asyncio.CancelledError:
            pass
        finally:
            d.notify("STOPPING=1")
            control_.stop.set()
            if dog is not None:
                await asyncio.gather(dog, return_exceptions=True)
            if metrics_site is not None:
                await metrics_site.cleanup()
        click.echo("bbprobe: daemon stopped; unacknowledged results stay in the spool",
                   err=True)
        return 0

    sys.exit(asyncio.run(main_async()))


@main.command()
@click.argument("name", required=False)
@handle_errors
def files(name: str | None) -> None:
    """List the files shipped with bbprobe (example configs, targets tables, units, the
    Grafana dashboard), or print one: `bbprobe files agent.example.toml > agent.toml`."""
    from agent import share

    try:
        click.echo(share.show(name), nl=False)
    except LookupError as exc:
        raise ConfigError(str(exc)) from None
