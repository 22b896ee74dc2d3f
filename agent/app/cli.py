"""bbprobe command line. Thin: flags -> config -> agent.app.runner (one session) or
agent.app.daemon (campaigns) -> printed output.

Progress goes to stderr, so ``--json`` leaves exactly one JSON document on stdout.
``AgentError`` is caught once here: one line on stderr, exit code by kind (errors.py).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path

import click

from agent import __version__, config, exitcodes, family, report
from agent.app import flags, runner
from agent.app import status as state
from agent.clierrors import error_boundary
from agent.errors import AgentError, ConfigError
from agent.schema import SessionResult, to_dict
from agent.spec import CAMPAIGN_RULES, DEFAULT_CAMPAIGN_RULE
from agent.spool import Spool

handle_errors = error_boundary("bbprobe", (AgentError,), lambda exc: (str(exc), exc.exit_code))


def _warn(message: str) -> None:
    click.echo(f"bbprobe: {message}", err=True)


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


def _measured(results: list[SessionResult]) -> int:
    """The exit code of a measuring command (agent/exitcodes.py), each test that
    measured nothing said on stderr (stdout keeps the report or the one JSON document)."""
    for line in exitcodes.failures(results):
        _warn(f"no measurement: {line}")
    return exitcodes.for_sessions(results)


def _emit(results: list[SessionResult], as_json: bool) -> None:
    """The session's result; a dual-stack session's two (IPv4, then IPv6): with --json
    as one array, so stdout still holds exactly one JSON document."""
    if as_json:
        docs = [to_dict(r) for r in results]
        click.echo(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    else:
        for result in results:
            click.echo(report.format_session(result), nl=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]},
             epilog=exitcodes.table())
@click.version_option(__version__, prog_name="bbprobe")
@flags.shared_options
@click.pass_context
def main(ctx: click.Context) -> None:
    """bbprobe: measure a broadband line (ping, loss, download, upload) the AGCOM way."""
    ctx.ensure_object(dict)


@main.command()
@flags.shared_options
@click.option("--json", "as_json", is_flag=True, help="Print the result document as JSON.")
@click.option("--no-push", is_flag=True, help="Do not send the result to the collector.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
@click.option("--evidence", "evidence_dir", metavar="DIR",
              help="After the run, write a session evidence bundle into DIR (new or "
                   "empty): the results as this probe's key signed them, checkable with "
                   "`bbprobe verify DIR` or openssl alone (DIR/VERIFY.txt).")
@click.pass_context
@handle_errors
def run(ctx: click.Context, as_json: bool, no_push: bool, quiet: bool,
        evidence_dir: str | None) -> None:
    """Run one full session (ping train, download, upload) and push the result."""
    from agent.app import evidence_cmd

    source = flags.source(ctx)
    cfg = source.load()
    out_dir = evidence_cmd.check_out_dir(evidence_dir, cfg.probe_id, not no_push) \
        if evidence_dir else None
    pipeline = runner.Runner(source, None if no_push else runner.push_client(cfg), _warn)
    progress = _progress(quiet)

    async def main_async() -> int:
        from agent import liveview

        probe_id, applied = await pipeline.prepare(cfg, progress)
        with liveview.shown(liveview.wanted(as_json=as_json, quiet=quiet)) as view:
            say = _progress(quiet, view.say)
            measured = await pipeline.measure(applied, probe_id, offer=applied.offer,
                                              say=say, ticket_warn=say,
                                              observe=view.observe)
        _emit(measured.shown, as_json)
        for line in exitcodes.failures(measured.results):
            _warn(f"no measurement: {line}")
        code = await pipeline.conclude(measured, applied, cfg, probe_id, progress)
        if out_dir is not None:
            try:
                evidence_cmd.write_run_bundle(out_dir, cfg.state_dir, measured.signed,
                                              measured.shown, measured.spool is not None,
                                              _warn, source.environ)
                progress(f"evidence bundle written to {out_dir} (check it with `bbprobe "
                         f"verify {out_dir}`)")
            except evidence_cmd.EvidenceError as exc:
                _warn(str(exc))
                code = exitcodes.worst((code, exitcodes.ExitCode.ERROR))
        return code

    sys.exit(runner.stoppable(main_async, _warn))


@main.command()
@flags.shared_options
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
@click.pass_context
@handle_errors
def push(ctx: click.Context, quiet: bool) -> None:
    """Deliver the spooled results to the collector without measuring (after a visit
    with no connection). Exit 0 when none is left, 3 when some wait for the next try."""
    source = flags.source(ctx)
    cfg = source.load()
    pipeline = runner.Runner(source, runner.push_client(cfg), _warn)
    sys.exit(runner.stoppable(lambda: pipeline.push(cfg, _progress(quiet)), _warn))


@main.command()
@flags.shared_options
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
    from agent.probes import session

    cfg = flags.load(ctx, **{"server.ping_target": host, "ping.enabled": True, "ping.count": count,
                        "ping.interval_s": interval, "ping.payload_bytes": size,
                        "ping.timeout_s": timeout})
    results = asyncio.run(session.run_all(cfg, cfg.probe_id or "local", _progress(quiet),
                                          tests=frozenset({"ping"})))
    pings = [r.ping for r in results if r.ping is not None]
    unsent = [p for p in pings if p.status == "failed" and p.summary.packets_sent == 0]
    if as_json or len(unsent) < len(pings):
        _emit(results, as_json)  # with --json the failure is recorded in the document
    # As ping(8): a reply, however few, is a measurement; none is not (the host checks
    # are shown, but judge a line's evidence, which a diagnostic ping is not).
    failed = [p for p in pings if exitcodes.ping_failed(p)]
    for p in failed:
        _warn(p.error if p in unsent and p.error else
              f"no echo reply from {p.target}: {p.summary.packets_sent} sent, 0 received")
    sys.exit(exitcodes.ExitCode.FAILED if failed else exitcodes.ExitCode.OK)


@main.command()
@flags.shared_options
@click.option("--direction", type=click.Choice(["both", "download", "upload"]), default="both",
              show_default=True, help="Which transfers to run (both: download, then upload).")
@click.option("--duration", "-t", type=click.FloatRange(min=1.0, max=600.0), metavar="SECONDS",
              help="Seconds each transfer is measured after its warm-up, as iperf3's -t "
                   "(download.window_s and upload.window_s).")
@click.option("--json", "as_json", is_flag=True, help="Print the result document as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
@click.pass_context
@handle_errors
def speed(ctx: click.Context, direction: str, duration: float | None, as_json: bool,
          quiet: bool) -> None:
    """Measure download and/or upload throughput against the server (not pushed)."""
    from agent import liveview
    from agent.probes import session

    cfg = flags.load(ctx, **{"download.window_s": duration, "upload.window_s": duration})
    config.measurement_server(cfg)  # fail early with a clear message
    tests = frozenset({"download", "upload"} if direction == "both" else {direction})
    with liveview.shown(liveview.wanted(as_json=as_json, quiet=quiet)) as view:
        results = asyncio.run(session.run_all(cfg, cfg.probe_id or "local",
                                              _progress(quiet, view.say), tests=tests,
                                              observe=view.observe))
    _emit(results, as_json)
    sys.exit(_measured(results))


@main.command()
@flags.shared_options
@click.option("--direction", type=click.Choice(["both", "download", "upload"]), default="both",
              show_default=True, help="Which subtests to run (both: download, then upload).")
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

    cfg = flags.load(ctx)
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
        sys.exit(exitcodes.ExitCode.FAILED)


@main.command("check-config")
@flags.shared_options
@click.pass_context
@handle_errors
def check_config(ctx: click.Context) -> None:
    """Validate the configuration and print what a session would do, under the
    collector's instruction (fetched now, else the one last kept)."""
    source = flags.source(ctx)
    local = source.load()
    token = config.read_token(local)
    client = runner.client_for(local, token, min(local.collector.timeout_s, 10)) \
        if local.collector.url and (token or local.collector.client_cert) else None
    applied = asyncio.run(runner.Runner(source, client, _warn).instructed(local))
    click.echo(state.describe(applied, token, flags.token_source(ctx, local)))


@main.command()
@flags.shared_options
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--no-check", is_flag=True, help="Do not contact the collector.")
@click.pass_context
@handle_errors
def status(ctx: click.Context, as_json: bool, no_check: bool) -> None:
    """Spool backlog, gap records, results the collector refused (dead-letter), delivery
    counters, and whether the collector answers for this probe's token."""
    cfg = flags.load(ctx)
    now = state.read(cfg, flags.token_source(ctx, cfg))
    if cfg.collector.url and not no_check:
        client = runner.client_for(cfg, config.read_token(cfg),
                                   min(cfg.collector.timeout_s, 10))
        now.doc["collector"] = asyncio.run(state.ask_collector(cfg.collector.url, client))
    click.echo(json.dumps(now.doc, indent=2) if as_json else state.text(now))


@main.group("dead-letter")
@flags.shared_options
def dead_letter() -> None:
    """Results set aside instead of delivered: refused by the collector for good, or
    damaged in the spool. List them with the reason, send them again, or delete them."""


@dead_letter.command("list")
@flags.shared_options
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.pass_context
@handle_errors
def dead_letter_list(ctx: click.Context, as_json: bool) -> None:
    """Each dead-lettered result (or gap record) with its id and reason."""
    cfg = flags.load(ctx)
    spool = Spool(cfg.state_dir, cfg.delivery)
    rows = state.dead_letters(spool)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo(f"dead-letter: empty ({spool.dead_dir})")
    else:
        click.echo("\n".join(f"{r['kind']} {r['id']}: {r['reason']}" for r in rows))


def _act_on_dead_letters(ctx: click.Context, ids: tuple[str, ...], every: bool, verb: str,
                         act: Callable[[Spool, Path], object], failed: str, done: str) -> None:
    cfg = flags.load(ctx)
    spool = Spool(cfg.state_dir, cfg.delivery)
    chosen = state.chosen_dead_letters(spool, ids, every, verb)
    for path in chosen:
        try:
            act(spool, path)
        except OSError as exc:
            raise AgentError(f"{failed} {path}: {exc.strerror or exc}") from None
    click.echo(f"{len(chosen)} {done}")


@dead_letter.command("retry")
@flags.shared_options
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
@flags.shared_options
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every dead-lettered result.")
@click.pass_context
@handle_errors
def dead_letter_drop(ctx: click.Context, ids: tuple[str, ...], every: bool) -> None:
    """Delete results from dead-letter for good."""
    _act_on_dead_letters(ctx, ids, every, "drop", Spool.drop_dead_letter, "cannot delete",
                         "deleted")


@main.command()
@flags.shared_options
@click.option("--json", "as_json", is_flag=True, help="Print the observations as JSON.")
@click.pass_context
@handle_errors
def check(ctx: click.Context, as_json: bool) -> None:
    """Run the host checks alone, and ask the measurement server whether it answers:
    what a measurement now would be flagged for, and what to do about it (exit 0 when
    all pass and the server answers, 5 when a check fails, 6 when the server does not
    answer)."""
    from dataclasses import asdict
    from urllib.parse import urlsplit

    from agent import checks
    from agent.client import server_answers
    from agent.probes.session import _thresholds

    cfg = flags.load(ctx)
    server = config.measurement_server(cfg)
    host = urlsplit(server).hostname or "127.0.0.1"
    context = checks.observe_host(host, 0.5, cfg.checks.scan_lan, [config.ping_target(cfg)])
    reasons = checks.assess(context, _thresholds(cfg))
    problem = asyncio.run(server_answers(server))
    if as_json:
        click.echo(json.dumps({"context": asdict(context),
                               "invalid_reasons": [asdict(r) for r in reasons],
                               "server": {"url": server, "answers": problem is None,
                                          "error": problem}}, indent=2))
    else:
        click.echo(state.host_text(host, context, reasons))
        click.echo(f"Server {server}: answers." if problem is None else
                   f"Server {server} does NOT answer ({problem}): a measurement now "
                   "would fail.")
    sys.exit(exitcodes.worst((
        exitcodes.ExitCode.FAILED if problem else exitcodes.ExitCode.OK,
        exitcodes.ExitCode.INVALID if reasons else exitcodes.ExitCode.OK)))


@main.command()
@flags.shared_options
@click.option("--rule", type=click.Choice(list(CAMPAIGN_RULES)),
              help="Sessions per hourly band: 4 (one per quarter) or 1 (campaign.rule, "
                   f"default {DEFAULT_CAMPAIGN_RULE}).")
@click.option("--timezone", help="Local time of the hourly bands (campaign.timezone, "
                                 "default Europe/Rome).")
@click.option("--window-days", type=click.IntRange(1, 30),
              help="Days a campaign may take to fill every band, retries included "
                   "(campaign.window_days, default 3).")
@click.option("--first-now", is_flag=True,
              help="Measure at once at start, as the campaign's first slot (counted in "
                   "its band like any other), to see a new install deliver at once; "
                   "when the campaign allows no session now (a suppression window, a "
                   "session already in this quarter hour, the band already filled) it "
                   "says why and takes the next free slot.")
@click.option("--report-every", "report_every_s", type=click.FloatRange(1, 86_400),
              default=3600.0, show_default=True,
              help="Seconds between health reports while idle (one is also sent after "
                   "every delivery).")
@click.option("--time-scale", type=click.FloatRange(1, 100_000), default=1.0, hidden=True,
              help="Lab and test use only: the campaign's clock runs this many times "
                   "faster than real time (a quarter hour lasts 900/K s); measurements "
                   "and timestamps stay real.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="What the log says (log_level, default info: one line per slot, "
                   "delivery and instruction changes; warning: problems only).")
@click.pass_context
@handle_errors
def daemon(ctx: click.Context, rule: str | None, timezone: str | None,
           window_days: int | None, first_now: bool, report_every_s: float,
           time_scale: float, log_level: str | None) -> None:
    """Measure continuously in 24-hour campaigns (the systemd service): every hourly band
    filled, failed or invalid sessions retried in their band. Before each session the
    collector's instruction is fetched and applied, and no session starts inside a
    suppression window. SIGHUP reloads the config, SIGTERM stops cleanly (sd_notify
    READY/RELOADING/STOPPING/WATCHDOG)."""
    from agent import logline
    from agent.app.daemon import Daemon

    # The file as read at start (and at each reload): every session's config is built
    # from it and the instruction, so a half-edited file changes nothing before SIGHUP.
    source = flags.source(ctx, **{"campaign.rule": rule, "campaign.timezone": timezone,
                             "campaign.window_days": window_days,
                             "log_level": log_level}).reread()
    cfg = source.load()
    # Python logging to stderr: journald's own format under systemd (agent/logline.py).
    warn = logline.configure(cfg.log_level).warning
    service = Daemon(runner.Runner(source, runner.daemon_client(cfg), warn), cfg, warn,
                     time_scale=time_scale)
    sys.exit(asyncio.run(service.run(first_now=first_now, report_every_s=report_every_s)))


@main.group("key")
@flags.shared_options
def key() -> None:
    """The probe's own Ed25519 signing key (its results' evidence): show its public half,
    or rotate it."""


@key.command("show")
@flags.shared_options
@click.option("--json", "as_json", is_flag=True, help="Print the key as JSON.")
@click.option("--pem", "pem_only", is_flag=True,
              help="Print only the PEM public key (a file for `bbprobe-collector probe "
                   "add --key`).")
@click.pass_context
@handle_errors
def key_show(ctx: click.Context, as_json: bool, pem_only: bool) -> None:
    """The public key as PEM and as a JWK (RFC 8037), its RFC 7638 thumbprint (the kid of
    what it signs), and where the private key is: the systemd credential
    probe-signing-key, else STATE_DIR/probe-signing-key.pem, made now if there is none."""
    from agent import probekey

    cfg = flags.load(ctx)
    found = probekey.load(cfg.state_dir)
    assert found is not None
    doc = probekey.describe(found)
    if found.generated:
        _warn(f"no signing key yet: made one in {found.path}")
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif pem_only:
        click.echo(doc["pem"], nl=False)
    else:
        click.echo(f"kid (RFC 7638 thumbprint): {doc['kid']}\n"
                   f"private key: {doc['source']}\n"
                   f"JWK: {json.dumps(doc['jwk'])}\n\n{doc['pem']}", nl=False)


@key.command("rotate")
@flags.shared_options
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@click.pass_context
@handle_errors
def key_rotate(ctx: click.Context, as_json: bool) -> None:
    """Replace the probe's signing key by a new one: the old key signs the new one's
    introduction, which the collector binds (the old key stays valid for what it
    signed before)."""
    from agent.app import key_cmd

    cfg = flags.load(ctx)
    done = key_cmd.rotate(cfg, _warn)
    text = json.dumps(done, indent=2) if as_json else key_cmd.format_rotated(done)
    click.echo(text, nl=not text.endswith("\n"))


@main.command()
@click.argument("path")
@click.option("--trust", "trust", multiple=True, metavar="KID|FILE",
              help="An issuer key to trust: its kid, or a file (never one inside the "
                   "bundle) with its PEM, its JWK or the collector's JWK Set "
                   "(/.well-known/bbprobe-keys.json: only the entry it marks as the "
                   "collector's anchors a certificate). Repeatable. Without it a bundle "
                   "that passes every check exits 3: consistent, issuer not anchored.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def verify(path: str, trust: tuple[str, ...], as_json: bool) -> None:
    """Check an evidence bundle (a directory or a .zip) offline: every signature, the
    keys, the chain of sessions, the Merkle root, and the certificate recomputed from
    the signed raw samples. One line per check; exit 0 when all pass and the issuer's
    key is anchored (--trust), 3 when all pass but it is not, 1 when one fails (named),
    2 when PATH is not there or a --trust is unusable."""
    from agent.app import evidence_cmd

    sys.exit(evidence_cmd.verify(path, trust, click.echo, _warn, as_json))


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
