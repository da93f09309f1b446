"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

``split(secret, threshold, xs)`` gives one share per evaluation point in ``xs`` (distinct, nonzero);
any ``threshold`` of them give the secret back through Lagrange interpolation at 0 (``combine``),
fewer say nothing about it. One field element holds a whole 32-byte secret (a mask seed or an
X25519 private key), so each share is one number of 66 bytes. The polynomial's coefficients come
from ``secrets`` (the OS's entropy).
"""
from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

PRIME = 2 ** 521 - 1  # a Mersenne prime above every 32-byte secret
SHARE_BYTES = 66  # (521 + 7) // 8


class ShamirError(ValueError):
    """Too few shares, or shares that do not belong together."""


def split(secret: bytes, threshold: int, xs: Iterable[int]) -> dict[int, bytes]:
    """Shares of ``secret`` at the points ``xs``: point -> 66-byte share."""
    xs = list(xs)
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"a threshold of {threshold} needs between 1 and {len(xs)} shares")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShamirError("share points must be distinct and nonzero")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in xs}


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for c in reversed(coefficients):
        value = (value * x + c) % PRIME
    return value


def combine(shares: Mapping[int, bytes], threshold: int, size: int = 32) -> bytes:
    """The ``size``-byte secret from at least ``threshold`` shares (point -> share)."""
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares cannot rebuild a secret shared with threshold {threshold}")
    points = list(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + int.from_bytes(yi, "big") * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * size):
        raise ShamirError("the shares do not belong to one secret")
    return secret.to_bytes(size, "big")
