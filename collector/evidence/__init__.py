"""Evidence bundles (issue 27): a certificate or a probe's sessions, with the signed
results, the keys, and what a verifier needs to recompute the certificate offline.

payload.py: certificate.json's payload, written and read strictly; bundle.py: writes a
bundle (a directory, or a zip with the same members); verify.py and archive.py check one.
"""
