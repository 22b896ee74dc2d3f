"""Evidence bundles across issue 28 (95 % intervals on certificates): a bundle signed by
the previous release (no ``ci95``, no ``min_samples``) still verifies, a bundle made
with a configured ``[reports] min_samples`` records it and verifies, and the intervals
of a new bundle are recomputed like every other figure (collector/evidence/verify.py
``_as_made``, payload.py ``Inputs.min_samples``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import evidence, jose
from collector import keys
from collector.evidence import bundle
from collector.evidence import payload as P
from collector.evidence.verify import VerifyReport, verify_bundle
from collector.fleet.probes import register_probe
from tests.collector.test_evidence_bundle import CONTRACT, _collector_key, _store
from tests.collector.test_evidence_verify import sessions

ROOT = Path(__file__).resolve().parents[2]
# The last commit before issue 28 (its certificates have no intervals).
PREVIOUS_RELEASE = "2c902f5"


def _signed_line(store: Any) -> None:
    """Probe p1, its key bound, five sessions signed and chained (no downgrade)."""
    register_probe(store, "p1", CONTRACT)
    probe_key = Ed25519PrivateKey.generate()
    store.bind_probe_key("p1", jose.kid_of(probe_key.public_key()),
                         json.dumps(jose.jwk_of(probe_key.public_key())), "tofu",
                         "2026-11-20T00:00:00.000000Z", "192.0.2.1")
    prev = None
    for result in sessions(5, probe="p1"):
        prev = _store(store, result, probe_key, prev)


def _bundle(store: Any, key: keys.SigningKey, **kw: Any) -> dict[str, bytes]:
    from collector.compliance import targets

    return bundle.certificate_members(store, key, "p1", None, None, "96in24h",
                                      "Europe/Rome", None, targets.load(""), **kw)


def _doc(members: dict[str, bytes]) -> dict[str, Any]:
    jws = json.loads(members["certificate.json"])
    return json.loads(jose.b64url_decode(jws["payload"], "payload", 10**8))


def _resigned(members: dict[str, bytes], key: keys.SigningKey,
              change: Callable[[dict[str, Any]], None]) -> dict[str, bytes]:
    """The bundle with its payload changed and signed again by the collector's own key:
    a collector of another release, or one that cheats."""
    doc = _doc(members)
    change(doc)
    return {**members, "certificate.json": P.dumps(jose.sign_flattened(
        key.private, P.dumps(doc), {"typ": evidence.CERTIFICATE_TYP}))}


def _verify(tmp_path: Path, members: dict[str, bytes], name: str) -> VerifyReport:
    return verify_bundle(bundle.write_members(members, tmp_path / name))


def _as_previous_release(doc: dict[str, Any]) -> None:
    """The payload as the release before issue 28 wrote it: format version 1, no
    interval fields."""
    doc["format_version"] = 1
    del doc["inputs"]["min_samples"]
    del doc["certificate"]["min_samples"]
    for check in doc["certificate"]["checks"]:
        del check["ci95"]


def test_a_bundle_signed_before_intervals_existed_still_verifies(store: Any,
                                                                 tmp_path: Path) -> None:
    _signed_line(store)
    key = _collector_key()
    members = _bundle(store, key)
    assert _verify(tmp_path, members, "new").ok
    old = _resigned(members, key, _as_previous_release)
    report = _verify(tmp_path, old, "old")
    assert report.ok, report.first_failure
    assert "every figure recomputed" in report.checks[-1].detail
    # Every field the older certificate does carry is still recomputed and compared.

    def edited(doc: dict[str, Any]) -> None:
        _as_previous_release(doc)
        doc["certificate"]["checks"][0]["samples"] += 1

    report = _verify(tmp_path, _resigned(members, key, edited), "old-edited")
    assert not report.ok
    assert report.first_failure is not None
    assert report.first_failure.startswith("certificate figures: certificate.checks[0]"
                                           ".samples")


def test_a_bundle_made_with_a_configured_min_samples_verifies(store: Any,
                                                              tmp_path: Path) -> None:
    _signed_line(store)
    key = _collector_key()
    members = _bundle(store, key, min_samples=500)
    doc = _doc(members)
    assert doc["inputs"]["min_samples"] == 500
    assert doc["certificate"]["min_samples"] == 500
    report = _verify(tmp_path, members, "b500")
    assert report.ok, report.first_failure
    # The recorded rule is what the verifier recomputes with: without it (the default,
    # 30), the signed certificate's rule no longer agrees.

    def unrecorded(doc: dict[str, Any]) -> None:
        del doc["inputs"]["min_samples"]

    report = _verify(tmp_path, _resigned(members, key, unrecorded), "unrecorded")
    assert report.first_failure == ("certificate figures: certificate.min_samples: the "
                                    "bundle says 500, the samples give 30")


def test_a_bad_min_samples_input_fails_the_form(store: Any, tmp_path: Path) -> None:
    _signed_line(store)
    key = _collector_key()
    members = _bundle(store, key)

    def zero(doc: dict[str, Any]) -> None:
        doc["inputs"]["min_samples"] = 0

    report = _verify(tmp_path, _resigned(members, key, zero), "zero")
    assert report.first_failure is not None
    assert report.first_failure.startswith("certificate form: payload.inputs.min_samples")


def test_format_versions_a_reader_knows(store: Any, tmp_path: Path) -> None:
    """New bundles are version 2 (a previous release's verifier then says which version
    it lacks); a version 1 bundle carrying the version 2 field, or an unknown version,
    fails the form."""
    _signed_line(store)
    key = _collector_key()
    members = _bundle(store, key)
    assert _doc(members)["format_version"] == 2

    def v1_with_rule(doc: dict[str, Any]) -> None:
        doc["format_version"] = 1

    report = _verify(tmp_path, _resigned(members, key, v1_with_rule), "v1rule")
    assert report.first_failure == ("certificate form: payload.inputs.min_samples: not "
                                    "part of format version 1")

    def v3(doc: dict[str, Any]) -> None:
        doc["format_version"] = 3

    report = _verify(tmp_path, _resigned(members, key, v3), "v3")
    assert report.first_failure is not None
    assert "knows versions 1, 2 only, not 3" in report.first_failure


def test_a_tampered_or_dropped_interval_fails(store: Any, tmp_path: Path) -> None:
    _signed_line(store)
    key = _collector_key()
    members = _bundle(store, key)
    ci95 = _doc(members)["certificate"]["checks"][0]["ci95"]
    assert set(ci95) == {"low", "high", "method", "samples", "enough_data"}

    def narrower(doc: dict[str, Any]) -> None:
        doc["certificate"]["checks"][0]["ci95"]["samples"] += 1

    report = _verify(tmp_path, _resigned(members, key, narrower), "narrower")
    assert report.first_failure is not None
    assert report.first_failure.startswith(
        "certificate figures: certificate.checks[0].ci95.samples: the bundle says")

    def enough(doc: dict[str, Any]) -> None:
        doc["certificate"]["checks"][0]["ci95"]["enough_data"] = True

    assert not ci95["enough_data"]  # five sessions: fewer than 30 samples
    report = _verify(tmp_path, _resigned(members, key, enough), "enough")
    assert report.first_failure == ("certificate figures: certificate.checks[0].ci95."
                                     "enough_data: the bundle says True, the samples "
                                     "give False")

    # A certificate of this release (it has min_samples) is compared whole: an
    # interval removed from one check is not taken for an older document.
    def dropped(doc: dict[str, Any]) -> None:
        del doc["certificate"]["checks"][1]["ci95"]

    report = _verify(tmp_path, _resigned(members, key, dropped), "dropped")
    assert report.first_failure == ("certificate figures: certificate.checks[1].ci95: "
                                    "only the recomputation has it")


def test_a_bundle_made_by_the_previous_release_verifies(tmp_path: Path) -> None:
    """The previous release's own code (git archive of PREVIOUS_RELEASE) makes a bundle
    from a real SQLite store in a subprocess; this release verifies it."""
    git = shutil.which("git")
    if git is None or subprocess.run(
            [git, "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"],
            capture_output=True, check=False).returncode != 0:
        pytest.skip(f"needs git and commit {PREVIOUS_RELEASE} (a checkout with history)")
    src = tmp_path / "previous"
    src.mkdir()
    archive = subprocess.run([git, "-C", str(ROOT), "archive", PREVIOUS_RELEASE, "agent",
                              "collector", "tests", ":(exclude)tests/ndt7js"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    script = tmp_path / "make.py"
    script.write_text(MAKE_PREVIOUS)
    out = tmp_path / "bundle"
    env = {**os.environ, "PYTHONPATH": str(src)}
    made = subprocess.run([sys.executable, str(script), str(out)], cwd=src, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stderr
    said = json.loads(made.stdout)
    assert said["collector"] == str(src / "collector" / "__init__.py")  # the old code
    certificate = _doc({"certificate.json": (out / "certificate.json").read_bytes()})
    assert "min_samples" not in certificate["certificate"]
    assert "ci95" not in certificate["certificate"]["checks"][0]
    report = verify_bundle(out, [said["kid"]])
    assert report.ok, report.first_failure
    assert report.anchored


# Run with the previous release's tree first on PYTHONPATH: its store, its bundle.py,
# its test helpers (whose signatures are that release's).
MAKE_PREVIOUS = '''
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import collector
from agent import jose
from collector.config import StorageConfig
from collector.evidence import bundle
from collector.fleet.probes import register_probe
from collector.storage.sql.backends import open_store
from tests.collector.test_evidence_bundle import CONTRACT, _collector_key, _members, _store
from tests.collector.test_evidence_verify import sessions

out = Path(sys.argv[1])
store = open_store(StorageConfig(path=str(out.parent / "previous.sqlite3")))
try:
    register_probe(store, "p1", CONTRACT)
    probe_key = Ed25519PrivateKey.generate()
    store.bind_probe_key("p1", jose.kid_of(probe_key.public_key()),
                         json.dumps(jose.jwk_of(probe_key.public_key())), "tofu",
                         "2026-11-20T00:00:00.000000Z", "192.0.2.1")
    prev = None
    for result in sessions(5, probe="p1"):
        prev = _store(store, result, probe_key, prev)
    key = _collector_key()
    members = _members(store, key)
finally:
    store.close()
bundle.write_members(members, out)
print(json.dumps({"collector": collector.__file__, "kid": key.kid}))
'''
