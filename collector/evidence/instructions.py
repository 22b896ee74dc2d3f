"""VERIFY.txt, the page in every evidence bundle that says how to check it (pure).

Two ways: ``bbprobe verify DIR`` checks everything; OpenSSL 3 alone (with a POSIX shell,
sed and tr) checks any one signature. A JWS signs the ASCII text
BASE64URL(protected) '.' BASE64URL(payload) (RFC 7515 §5.1) with Ed25519 (RFC 8032,
EdDSA of RFC 8037), which ``openssl pkeyutl -verify -rawin`` checks over the raw bytes
(Ed25519 hashes inside: no digest is given). The script between the SCRIPT lines is
run as written by the tests (tests/collector/test_evidence_bundle.py,
tests/collector/test_evidence_verify.py), so what the page says works; it writes its
work files into a ``mktemp -d`` directory, never into the bundle (which may be
read-only, and must not gain members a verifier would then refuse).

Everything a bundle holds can be re-signed by whoever made it: step 0 says to compare
the issuer's key with the one its issuer publishes, and to pass it to ``bbprobe verify
--trust`` (without it the command exits 3, "consistent, but not anchored", never 0).
"""

from __future__ import annotations

import textwrap

from collector.evidence import payload as P

SCRIPT_BEGIN = "----- SCRIPT -----"
SCRIPT_END = "----- END SCRIPT -----"


def script(jws_file: str, kid: str) -> str:
    """The OpenSSL check of one JWS file of the bundle, run in the bundle's directory."""
    return f"""F={jws_file}
K=keys/{kid}.pem
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
field() {{ sed -E 's/.*"'"$1"'":"([^"]*)".*/\\1/' "$F"; }}
unb64url() {{
  s=$(tr '_-' '/+'); while [ $(( ${{#s}} % 4 )) -ne 0 ]; do s="$s="; done
  printf '%s' "$s" | openssl base64 -d -A
}}
printf '%s.%s' "$(field protected)" "$(field payload)" > "$T/input.bin"
field signature | unb64url > "$T/sig.bin"
openssl pkeyutl -verify -pubin -inkey "$K" -rawin -in "$T/input.bin" -sigfile "$T/sig.bin"
field payload | unb64url > "$T/payload.json"
openssl dgst -sha256 "$T/payload.json\""""


def verify_text(p: P.Payload, example: tuple[str, str | None] | None) -> str:
    """The page for payload ``p``; ``example``: a signed session (result id, kid) to show
    the check on, if there is one."""
    what = (f"the certificate of line (probe) {p.probe}" if p.kind == "certificate"
            else f"{len(p.sessions)} session(s) of probe {p.probe or '(not yet named)'}, "
                 "signed by the probe itself")
    issuer = ("the collector's evidence key (also published by the collector at "
              "/.well-known/bbprobe-keys.json)" if p.issuer.role == "collector"
              else "the probe's own key")
    published = ("the collector's published key: GET /.well-known/bbprobe-keys.json on "
                 "the collector (its entry marked \"holder\": \"collector\"), or the "
                 "thumbprint on its certificate page" if p.issuer.role == "collector"
                 else "the probe's key as its owner knows it (`bbprobe key show` on the "
                 "probe)")
    trust_file = ("the collector's JWK Set file as fetched from it (its own entry anchors "
                  "a certificate)" if p.issuer.role == "collector"
                  else "the probe's public key file (PEM or JWK) as its owner gives it")
    key_text = textwrap.fill(
        f"KEY: the key id you compared in step 0, or {trust_file}; never a file of this "
        "bundle (anyone could have made it).", 88, initial_indent="   ",
        subsequent_indent="   ", break_long_words=False, break_on_hyphens=False)
    step0 = textwrap.fill(
        f"Whoever made this bundle could have signed all of it, keys included, with keys "
        f"of their own: first compare the issuer's key id {p.issuer.kid} with {published}. "
        "Only that comparison ties the bundle to its issuer; pass the key you compared "
        "to the check below (--trust).", 88, initial_indent="   ",
        subsequent_indent="   ", break_long_words=False, break_on_hyphens=False)
    session = ""
    if example is not None and example[1] is not None:
        result_id, kid = example[0], example[1]
        session = (
            "\n   The same for a session, here the first signed one:\n\n"
            f"{SCRIPT_BEGIN}\n{script(f'sessions/{result_id}.json', kid)}\n{SCRIPT_END}\n\n"
            + textwrap.fill("The SHA-256 printed last must be the one certificate.json "
                            "lists for the session (sessions[].sha256): the payload is the "
                            "session's result exactly as the probe signed it.", 88,
                            initial_indent="   ", subsequent_indent="   ") + "\n")
    intro = textwrap.fill(f"This is evidence from bbprobe {p.software_version}: {what}, "
                          f"issued {p.issued_at}.", 88, break_long_words=False,
                          break_on_hyphens=False)
    described = ("what is certified, of which sessions (each by result id and SHA-256, "
                 "and their Merkle root, RFC 9162), with every input the certificate was "
                 "computed from" if p.kind == "certificate" else
                 "the sessions (each by result id and SHA-256, and their Merkle root, RFC "
                 "9162) with the figures the probe reports for each")
    member = textwrap.fill(f"a JWS (RFC 7515, flattened JSON serialization) signed by "
                           f"{issuer}, key {p.issuer.kid}: {described}", 88,
                           initial_indent=" " * 27, subsequent_indent=" " * 27,
                           break_long_words=False, break_on_hyphens=False).lstrip()
    return f"""How to check this evidence bundle
==================================

{intro}

Members
  certificate.json         {member}
  sessions/RESULT_ID.json  each session exactly as its probe signed it (a JWS), or its
                           plain JSON when the probe did not sign it
  keys/KID.pem             every public key named (Ed25519, SubjectPublicKeyInfo)
  keys/KID.rotation.json   the rotation (a JWS by the previous key) that introduced a key
  keys.json                the same keys as a JWK Set (RFC 7517)
  gaps/GAP_ID.json         a gap record (sessions the probe dropped), as the probe signed
                           it (a JWS), or its plain JSON when it did not
  boundary/RESULT_ID.json  the probe's session just before and just after those listed
                           (when stored): they seal the chain's ends

0. The issuer's key

{step0}

1. Everything, with bbprobe installed

     bbprobe verify --trust KEY DIR  (or: bbprobe-collector verify ...; DIR may be the zip)

{key_text}

   checks, in order: certificate.json's form and its issuer's signature; each session's
   signature by a key bound to its probe when it was measured (a key revoked before
   that fails; revoked after, a warning), that its SHA-256 is the one listed and its
   result id its file name; each key rotation; the probe's hash chain over the sessions
   and the boundary sessions (a hole that no gap record signed by the probe explains
   fails; one a recorded deletion explains is a warning naming it); the Merkle root;
   then it recomputes the certificate from the sessions' own measurements and the
   inputs listed, and names the first field that differs. One line per check; exit
   status 0 when every check passes and the issuer's key is the one given with
   --trust, 3 when every check passes but no --trust anchors the issuer ("consistent,
   but not anchored"), 1 when a check fails.

2. Any one signature, with OpenSSL 3 alone

   In the bundle's directory, with a POSIX shell (sh), sed and tr, run (it writes only
   into a temporary directory, removed at the end):

{SCRIPT_BEGIN}
{script("certificate.json", p.issuer.kid)}
{SCRIPT_END}

   OpenSSL prints "Signature Verified Successfully" when the key signed exactly those
   bytes, and "Signature Verification Failure" otherwise; the SHA-256 printed last is
   that of the payload, what was signed (JSON); `field protected | unb64url` shows the
   header (alg EdDSA, kid = the signing key's RFC 7638 thumbprint = the name of its
   file in keys/, typ). The key used is the bundle's own keys/KID.pem: it proves
   something only once compared as step 0 says.
{session}"""
