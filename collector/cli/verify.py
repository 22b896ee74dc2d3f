"""``bbprobe-collector verify PATH``: check an evidence bundle offline (a directory or a
.zip; collector/evidence/verify.py). One line per check, then the outcome; exit 0 when
every check passed and the issuer's key is anchored by --trust, 3 when every check
passed but it is not (a bundle re-signed throughout by a forger's key gets that far),
1 when one failed (named), 2 on usage (no such path, a --trust value that names no key,
a trust file inside the bundle). Never a traceback, whatever the bundle holds."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import click

from agent import jose
from collector.cli.common import echo
from collector.evidence.archive import MAX_MEMBER_BYTES, loads_bounded
from collector.evidence.verify import Anchor, exit_code, report_lines, verify_bundle


@click.command("verify")
@click.argument("path", type=click.Path(dir_okay=True, file_okay=True))
@click.option("--trust", "trust", multiple=True, metavar="KID|FILE",
              help="An issuer key to trust: its kid, or a file (outside the bundle) with "
                   "its PEM, its JWK, or the collector's JWK Set (/.well-known/"
                   "bbprobe-keys.json: its own key anchors certificates, its probes' keys "
                   "their session bundles). Repeatable. Without it the bundle is checked "
                   "for consistency only: exit 3, not 0.")
def verify(path: str, trust: tuple[str, ...]) -> None:
    """Verify an evidence bundle: signatures, keys, the chain, the Merkle root, and the
    certificate recomputed from the raw samples. Exit 0 verified and the issuer anchored
    by --trust; 3 every check passed but the issuer is not anchored; 1 a check failed;
    2 usage."""
    if not os.path.lexists(path):
        echo(f"bbprobe-collector: verify: {path}: no such file or directory", err=True)
        raise SystemExit(2)
    try:
        trusted = trusted_kids(trust, path)
    except ValueError as exc:
        echo(f"bbprobe-collector: verify: {str(exc).splitlines()[0]}", err=True)
        raise SystemExit(2) from None
    try:
        report = verify_bundle(path, trusted)
    except Exception as exc:
        # verify_bundle answers every fault of a bundle with a report; should one still
        # escape it, the command says it in one line (the issue: never a traceback).
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        echo(f"bbprobe-collector: verify: {path}: cannot be checked: {first}", err=True)
        raise SystemExit(1) from None
    for line in report_lines(report):
        echo(line)
    raise SystemExit(exit_code(report))


def trusted_kids(values: Sequence[str], bundle: str | None = None) -> list[Anchor]:
    """Anchors from --trust values: a kid, a PEM or a single JWK as the user says (any
    role), or a JWK Set (the collector's /.well-known/bbprobe-keys.json) whose entries
    count for the role the set marks (bbprobe.holder: "collector" or "probe"; an
    unmarked entry anchors nothing). A file inside the bundle's directory is refused:
    the bundle cannot vouch for itself. ValueError naming the value."""
    out: list[Anchor] = []
    inside = os.path.realpath(bundle) if bundle and os.path.isdir(bundle) else None
    for value in values:
        if len(value) == 43 and all(c.isalnum() or c in "-_" for c in value):
            out.append(Anchor(value))
            continue
        if inside is not None and os.path.commonpath(
                [inside, os.path.realpath(value)]) == inside:
            raise ValueError(f"--trust {value}: a file inside the bundle, which cannot "
                             "vouch for its own issuer; give the collector's published "
                             "key (GET /.well-known/bbprobe-keys.json) or its kid")
        try:
            with open(value, "rb") as handle:
                data = handle.read(MAX_MEMBER_BYTES)
        except OSError as exc:
            raise ValueError(f"--trust {value}: not a key id, and {exc.strerror}") from None
        if b"-----BEGIN" in data:
            out.append(Anchor(jose.kid_of(jose.public_key_of_pem(
                data.decode("ascii", "replace")))))
            continue
        doc = loads_bounded(data, value)
        if isinstance(doc, dict) and "keys" not in doc:
            out.append(Anchor(jose.thumbprint(doc)))  # one JWK: as the user says
            continue
        jwks = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(jwks, list):
            raise ValueError(f"--trust {value}: not a JWK Set, a JWK or a PEM")
        # A collector's JWK Set lists its own key and every probe's
        # (collector/fleet/probe_keys.py jwk_set): each anchors its holder's role only,
        # so a probe's key never anchors a certificate.
        out += [Anchor(jose.thumbprint(jwk), holder) for jwk in jwks
                if isinstance(jwk, dict)
                and (holder := _holder(jwk)) in ("collector", "probe")]
    return out


def _holder(jwk: Mapping[str, Any]) -> str | None:
    about = jwk.get("bbprobe")
    return str(about.get("holder")) if isinstance(about, dict) else None


COMMANDS = (verify,)
