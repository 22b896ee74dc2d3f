"""Line vocabulary shared by the service, the fleet selectors and the storage (pure).

Delibera 156/23/CONS brought fixed-wireless access (FWA) into scope beside the wired
accesses: a line's technology is one of ``TECHNOLOGIES``, spelt as here.
"""

from __future__ import annotations

TECHNOLOGIES = ("ADSL", "VDSL", "FTTC", "FTTB", "FTTH", "FWA", "cable", "satellite",
                "other")


def canonical_technology(text: str) -> str | None:
    """The canonical spelling of a known access technology, in any case; None if
    ``text`` is none of them."""
    wanted = text.strip().lower()
    return next((t for t in TECHNOLOGIES if t.lower() == wanted), None)
