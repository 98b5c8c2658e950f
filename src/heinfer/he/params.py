"""Encryption parameters and their security level.

Security comes from one table: the HomomorphicEncryption.org Security Standard (Albrecht et
al., 2018), Table 1, "distribution (-1, 1)" (uniform ternary secret, which is what SEAL
samples), classical attacks. Each row gives, for a ring dimension N, the largest total
coefficient modulus log2(q) that keeps the given security level. The key-level modulus (all
primes, the special prime included) is what the attacker sees in a public key, so that is the
number checked against the table.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

__all__ = [
    "HE_STANDARD_MAX_LOG_Q",
    "BFVParameters",
    "max_log_q",
    "security_level",
]

# HomomorphicEncryption.org standard (2018), Table 1, ternary secret, classical security:
# {security bits: {N: max log2 q}}.
HE_STANDARD_MAX_LOG_Q: dict[int, dict[int, int]] = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}


def max_log_q(poly_modulus_degree: int, security: int = 128) -> int:
    """Largest total log2(q) the standard allows for this ring at this security level."""
    try:
        return HE_STANDARD_MAX_LOG_Q[security][poly_modulus_degree]
    except KeyError as exc:
        raise ValueError(
            f"no HE-standard row for N={poly_modulus_degree} at {security}-bit security"
        ) from exc


def security_level(poly_modulus_degree: int, total_log_q: float) -> int:
    """The highest standard security level (128/192/256) these sizes meet, or 0 if none."""
    best = 0
    for level, row in HE_STANDARD_MAX_LOG_Q.items():
        limit = row.get(poly_modulus_degree)
        if limit is not None and total_log_q <= limit:
            best = max(best, level)
    return best


@dataclass(frozen=True)
class BFVParameters:
    """A BFV parameter set, by value: the exact primes, not bit sizes, so both sides agree.

    `coeff_modulus` follows SEAL's convention: the last prime is the special prime, used only
    at the key level (public key); ciphertexts live modulo the others.
    """

    poly_modulus_degree: int
    coeff_modulus: tuple[int, ...]
    plain_modulus: int
    scheme: str = field(default="bfv")

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if n < 1024 or n & (n - 1):
            raise ValueError(f"poly_modulus_degree must be a power of two >= 1024, got {n}")
        if len(self.coeff_modulus) < 2:
            raise ValueError("coeff_modulus needs at least one data prime and a special prime")
        for q in self.coeff_modulus:
            if not 2 <= q < 1 << 61 or (q - 1) % (2 * n):
                raise ValueError(f"coefficient prime {q} is not NTT-friendly for N={n}")
        if self.plain_modulus < 2:
            raise ValueError("plain_modulus must be >= 2")

    @property
    def data_primes(self) -> tuple[int, ...]:
        return self.coeff_modulus[:-1]

    @property
    def total_log_q(self) -> float:
        return sum(q.bit_length() for q in self.coeff_modulus)

    @property
    def security_bits(self) -> int:
        return security_level(self.poly_modulus_degree, self.total_log_q)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_modulus": [str(q) for q in self.coeff_modulus],
            "coeff_modulus_bits": [q.bit_length() for q in self.coeff_modulus],
            "plain_modulus": str(self.plain_modulus),
            "security_bits": self.security_bits,
            "security_reference": (
                "HomomorphicEncryption.org Security Standard (2018), Table 1, ternary secret, "
                f"classical: N={self.poly_modulus_degree} allows log2(q) <= "
                f"{HE_STANDARD_MAX_LOG_Q[128].get(self.poly_modulus_degree)} at 128 bits; "
                f"this set uses {self.total_log_q:.0f} bits"
            ),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BFVParameters:
        try:
            if data.get("scheme", "bfv") != "bfv":
                raise ValueError(f"unsupported scheme {data.get('scheme')!r}")
            return cls(
                poly_modulus_degree=int(data["poly_modulus_degree"]),
                coeff_modulus=tuple(int(q) for q in data["coeff_modulus"]),
                plain_modulus=int(data["plain_modulus"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"incomplete BFV parameters: {exc}") from exc

    @cached_property
    def fingerprint(self) -> bytes:
        """32 bytes naming this exact parameter set; keys and ciphertexts carry it. Computed
        once: every request's parameter tag is compared with it (a JSON dump and a SHA-256
        per request before)."""
        canonical = json.dumps(
            [self.scheme, self.poly_modulus_degree, self.coeff_modulus, self.plain_modulus],
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).digest()
