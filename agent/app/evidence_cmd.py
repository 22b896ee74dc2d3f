"""The agent's side of evidence bundles (issue 27): ``bbprobe run --evidence DIR`` and
``bbprobe verify PATH``.

``run --evidence DIR`` writes, after the run, a *session* bundle issued by the probe's own
key (collector/evidence/bundle.py ``write_session_bundle``): the run's results as the
probe signed them, for a technician to hand over without a collector in between. A run
that spooled its results hands over the JWS the spool wrote (chained like every other
result of its identity); a ``--no-push`` run spools nothing, so its results are signed
here, chained within the run only and without a session_seq (nothing counts them).

``verify PATH`` checks a bundle (directory or .zip) with
collector/evidence/verify.py ``verify_bundle``: one line per check, exit 0 when all
pass and the issuer's key is anchored by --trust, 3 when all pass but it is not, 1 on
the first failed check (named), 2 when PATH is not there or --trust is unusable. A bundle is
hostile input: whatever goes wrong is one line, never a traceback.

The collector package is imported only inside these commands: a probe that never makes
or checks a bundle does not load it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent import canonical, evidence, probekey
from agent.errors import AgentError, ConfigError
from agent.exitcodes import ExitCode
from agent.schema import SessionResult

Lines = Callable[[str], None]


class EvidenceError(AgentError):
    """The bundle could not be written (exit 1, after the run's own outcome)."""


def check_out_dir(path: str, probe_id: str, pushed: bool) -> Path:
    """Where a run's bundle goes, checked before measuring (a usage error costs no
    session): a directory not there yet (its parent must be), or an empty one. A run
    that asks no collector (``--no-push``) must be told the probe's name: a bundle's
    sessions name their probe, and a name added after signing would break them."""
    if not pushed and not probe_id:
        raise ConfigError("--evidence with --no-push needs the probe's name: set "
                          "probe_id or --probe-id")
    out = Path(path)
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--evidence {path}: exists and is not a directory")
        if any(out.iterdir()):
            raise ConfigError(f"--evidence {path}: the directory is not empty (a bundle "
                              "is written into an empty or new one)")
    elif not out.parent.is_dir():
        raise ConfigError(f"--evidence {path}: {out.parent} is not a directory")
    return out


def signed_now(private_key: Any, results: Sequence[SessionResult]) -> list[dict[str, str]]:
    """Results no spool signed (``--no-push``), signed now and chained within the run
    (the first names nothing). Pure but for the signature."""
    out: list[dict[str, str]] = []
    prev: str | None = None
    for result in results:
        payload = canonical.canonical(result)
        out.append(evidence.sign_result(private_key, payload, prev))
        prev = canonical.sha256_hex(payload)
    return out


def write_run_bundle(out_dir: Path, state_dir: str, spooled: Sequence[dict[str, str]],
                     shown: Sequence[SessionResult], pushed: bool, warn: Lines,
                     environ: Any = os.environ) -> Path:
    """The run's session bundle in ``out_dir``: the spool's JWS of each result (``pushed``),
    else each result signed now. EvidenceError saying why none could be written."""
    try:
        key = probekey.load(state_dir, environ)
    except probekey.ProbeKeyError as exc:
        raise EvidenceError(f"no evidence bundle: {exc}") from None
    assert key is not None
    if pushed:
        jws_list = list(spooled)
        if len(jws_list) < len(shown):
            warn(f"evidence: {len(shown) - len(jws_list)} of the run's {len(shown)} "
                 "result(s) could not be signed and are not in the bundle")
    else:
        jws_list = signed_now(key.private, shown)
    if not jws_list:
        raise EvidenceError("no evidence bundle: the run has no signed result")
    if any(not result.probe_id for result in shown):
        # What was signed names no probe, and a bundle must: the name is not added now,
        # which would break the signature.
        raise EvidenceError("no evidence bundle: the result was measured before the "
                            "collector named the probe (set probe_id, or --probe-id)")
    try:
        from collector.evidence.bundle import write_session_bundle
    except ImportError as exc:
        raise EvidenceError(f"no evidence bundle: the collector package that writes it "
                            f"is not installed ({exc})") from None
    try:
        write_session_bundle(out_dir, key, jws_list)
    except (OSError, ValueError) as exc:
        raise EvidenceError(f"no evidence bundle in {out_dir}: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
    return out_dir


def verify(path: str, trust: Sequence[str], echo: Lines, warn: Lines,
           as_json: bool = False) -> int:
    """Check the bundle at ``path`` and say each check (``trust``: issuer kids or key
    files, as ``bbprobe-collector verify --trust``); the exit code
    (collector/evidence/verify.py ``exit_code``): 0 all pass and the issuer is anchored,
    3 all pass but it is not, 1 a check failed (named), 2 no such path or an unusable
    --trust.
    What is printed may hold text the bundle's author wrote: made safe for a terminal."""
    if not os.path.lexists(path):
        warn(f"verify: {path}: no such file or directory")
        return ExitCode.USAGE
    try:
        from collector import safetext
        from collector.cli.verify import trusted_kids
        from collector.evidence.verify import exit_code, report_lines, verify_bundle
    except ImportError as exc:
        warn(f"verify: the collector package that checks bundles is not installed ({exc})")
        return ExitCode.ERROR
    try:
        trusted = trusted_kids(trust, path)
    except ValueError as exc:
        warn(f"verify: {str(exc).splitlines()[0]}")
        return ExitCode.USAGE
    try:
        report = verify_bundle(path, trusted)
    except Exception as exc:
        # A hostile bundle is one line, never a traceback, whatever the checker missed.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warn(safetext.text_block(f"verify: {path}: cannot be checked: {first}"))
        return ExitCode.ERROR
    if as_json:
        echo(safetext.dumps({
            "ok": report.ok, "anchored": report.anchored, "issuer": report.issuer,
            "exit_code": exit_code(report), "first_failure": report.first_failure,
            "warnings": list(report.warnings),
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail}
                       for c in report.checks]}))
    else:
        for line in report_lines(report):
            echo(safetext.text_block(line))
    return exit_code(report)
