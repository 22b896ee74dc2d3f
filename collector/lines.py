"""Line vocabulary shared by the service, the fleet selectors, compliance and the storage
(pure): what is known of the line a probe sits on, and how its access technology is spelt.

Delibera 156/23/CONS brought fixed-wireless access (FWA) into scope beside the wired
accesses: a line's technology is one of ``TECHNOLOGIES``, spelt as here.
"""

from __future__ import annotations

from dataclasses import dataclass

TECHNOLOGIES = ("ADSL", "VDSL", "FTTC", "FTTB", "FTTH", "FWA", "cable", "satellite",
                "other")


def canonical_technology(text: str) -> str | None:
    """The canonical spelling of a known access technology, in any case; None if
    ``text`` is none of them."""
    wanted = text.strip().lower()
    return next((t for t in TECHNOLOGIES if t.lower() == wanted), None)


@dataclass(frozen=True, slots=True)
class LineMetadata:
    """What an analyst knows about the line a probe sits on (the contract's figures)."""

    operator: str | None = None
    offer: str | None = None
    region: str | None = None
    technology: str | None = None
    download_nominal_kbps: float | None = None
    download_min_kbps: float | None = None
    upload_nominal_kbps: float | None = None
    upload_min_kbps: float | None = None
    max_delay_ms: float | None = None
    max_loss_ratio: float | None = None
    # The offer's "normally available" speeds (delibera 156/23/CONS: every offer declares
    # minimum, normally available and maximum speeds; *_nominal_kbps is the maximum).
    download_normal_kbps: float | None = None
    upload_normal_kbps: float | None = None
