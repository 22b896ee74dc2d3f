"""Is a 32-byte Ed25519 public key a sound one? Pure arithmetic on edwards25519 (RFC 8032
§5.1), for the one check the signature library leaves out.

OpenSSL's Ed25519 verification accepts any encoding that decodes to a point, including
the eight points of small order (the identity among them) and non-canonical encodings
(y ≥ p). For such a key, signatures can be made without any private key: with the
identity as public key, R = identity and S = 0 verify over every message. Evidence that a
third party is to trust must never rest on such a key, so every public key bbprobe binds
or verifies with is first decoded here, canonically (RFC 8032 §5.1.3), and refused when 8·A
is the identity (a point of small order: the cofactor 8 clears it).
"""

from __future__ import annotations

P = 2**255 - 19
D = (-121665 * pow(121666, P - 2, P)) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)

Point = tuple[int, int]
IDENTITY: Point = (0, 1)


def decode(raw: bytes) -> Point | str:
    """The affine point of a 32-byte encoding, or why it is none (RFC 8032 §5.1.3, with
    the canonical checks: y < p, and no "negative zero" x)."""
    if len(raw) != 32:
        return f"an Ed25519 public key is 32 bytes, not {len(raw)}"
    number = int.from_bytes(raw, "little")
    sign = number >> 255
    y = number & ((1 << 255) - 1)
    if y >= P:
        return "not a canonical encoding (y ≥ p)"
    u = (y * y - 1) % P
    v = (D * y * y + 1) % P
    x2 = u * pow(v, P - 2, P) % P
    if x2 == 0:
        if sign:
            return "not a canonical encoding (x = 0 with the sign bit set)"
        return (0, y)
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P:
        return "not a point of the curve"
    if x & 1 != sign:
        x = P - x
    return (x, y)


def add(a: Point, b: Point) -> Point:
    """Affine addition on -x² + y² = 1 + d·x²·y² (complete: d is not a square)."""
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    x3 = (x1 * y2 + y1 * x2) * pow(1 + t, P - 2, P) % P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, P - 2, P) % P
    return (x3, y3)


def unsound(raw: bytes) -> str | None:
    """Why ``raw`` is no public key to trust (None: it is sound). Pure."""
    point = decode(raw)
    if isinstance(point, str):
        return point
    for _ in range(3):  # 8·A
        point = add(point, point)
    if point == IDENTITY:
        return "a point of small order: anyone could sign for it"
    return None
