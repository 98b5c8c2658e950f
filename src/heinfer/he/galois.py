"""Galois (automorphism) keys for the BFV linear path, travelling seeded like the public key.

SEAL's `KeyGenerator.create_galois_keys(elements)` makes, per Galois element, one RLWE pair
(k0, a) per data prime (the key-switching decomposition), in NTT form at the key level. As in
`SecretKey.public_key_bytes`, the client replaces every uniform half `a` by one expanded from a
fresh public seed (SHAKE-128, `heinfer.rlwe.sampling.expand_uniform` under its own tag) and
corrects k0 to match (`heinfer.rlwe.encrypt.replace_uniform_half`, tested against SEAL), so
only the seed and the k0 halves travel, bit-packed at each prime's width: the upload has an
exact size the HTTP process checks without SEAL. The server expands the uniform halves, writes
the pairs into a SEAL GaloisKeys template of the same shape and hands it to SEAL's validating
loader.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from heinfer.errors import MalformedPayloadError
from heinfer.he import serialization as fmt
from heinfer.he.backend import Context, EvaluationKey, SecretKey, _unpack_limbs, pack_bits
from heinfer.he.scratch import SCRATCH
from heinfer.rlwe.encrypt import replace_uniform_half
from heinfer.rlwe.sampling import SEED_BYTES, expand_uniform

__all__ = ["GALOIS_A_TAG", "GaloisEvaluationKey", "galois_key_bytes", "make_galois_keys"]

GALOIS_A_TAG = b"heinfer/galois-key/a/v1"  # the uniform halves of seeded Galois keys


def _components(context: Context, elements: Sequence[int]) -> int:
    return len(elements) * len(context.params.data_primes)


def galois_key_bytes(context: Context, elements: Sequence[int]) -> int:
    """Exact upload size: one seed, then k0 of every component bit-packed prime by prime."""
    per = sum((context.n * q.bit_length() + 7) // 8 for q in context.params.coeff_modulus)
    return SEED_BYTES + _components(context, elements) * per


def _component_arrays(serialized: bytes, context: Context) -> list[np.ndarray]:
    found: list[np.ndarray] = []
    levels = len(context.params.coeff_modulus)

    def collect(body: bytes) -> bytes:
        found.append(fmt.key_arrays(body, context.n, levels))
        return body

    fmt.map_kswitch_keys(serialized, collect)
    return found


def make_galois_keys(secret: SecretKey, elements: Sequence[int]) -> bytes:
    """The client's seeded Galois keys for `elements` (ascending order is SEAL's order)."""
    context = secret._context
    keys = seal.GaloisKeys()
    seal.KeyGenerator(context.seal_context, secret._secret).create_galois_keys(
        sorted(elements), keys
    )
    pairs = _component_arrays(SCRATCH.save(keys), context)
    s = context.plaintext_arrays(secret._secret)  # (L+1, N), NTT form, key level
    primes = context.params.coeff_modulus
    seed = os.urandom(SEED_BYTES)
    fresh = expand_uniform(seed, primes, len(pairs), context.n, tag=GALOIS_A_TAG)
    out = [seed]
    for index, (k0, a) in enumerate(pairs):
        corrected = replace_uniform_half(k0, a, fresh[:, index], s, primes)
        out += [pack_bits(limb, q.bit_length()) for limb, q in zip(corrected, primes, strict=True)]
    return b"".join(out)


class GaloisEvaluationKey(EvaluationKey):
    """The public key (re-randomization) plus the Galois keys of the packing tree."""

    galois: Any = None

    @classmethod
    def from_parts(
        cls, context: Context, public: bytes, galois: bytes, elements: Sequence[int]
    ) -> GaloisEvaluationKey:
        key = cls.from_bytes(context, public)
        assert isinstance(key, cls)
        key.galois = _load_galois(context, galois, elements)
        key.nbytes += _components(context, elements) * key.nbytes
        return key


_TEMPLATES: dict[tuple[bytes, tuple[int, ...]], bytes] = {}


def _template(context: Context, elements: tuple[int, ...]) -> bytes:
    """A serialized GaloisKeys of the right shape (throwaway secret): metadata to fill in."""
    name = (context.params.fingerprint, elements)
    if name not in _TEMPLATES:
        keys = seal.GaloisKeys()
        seal.KeyGenerator(context.seal_context).create_galois_keys(list(elements), keys)
        _TEMPLATES[name] = SCRATCH.save(keys)
    return _TEMPLATES[name]


def _load_galois(context: Context, data: bytes, elements: Sequence[int]) -> Any:
    ordered = tuple(sorted(elements))
    if len(data) != galois_key_bytes(context, ordered):
        raise MalformedPayloadError(
            f"Galois keys must be {galois_key_bytes(context, ordered)} bytes for this model, "
            f"got {len(data)}"
        )
    primes = context.params.coeff_modulus
    count = _components(context, ordered)
    fresh = expand_uniform(data[:SEED_BYTES], primes, count, context.n, tag=GALOIS_A_TAG)
    offset = SEED_BYTES
    halves = []
    for _ in range(count):
        k0, offset = _unpack_limbs(data, offset, primes, context.n, "Galois key")
        halves.append(k0)
    position = iter(range(count))

    def fill(body: bytes) -> bytes:
        index = next(position)
        return fmt.key_body(body, np.stack([halves[index], fresh[:, index]]))

    serialized = fmt.map_kswitch_keys(_template(context, ordered), fill)
    try:
        keys = SCRATCH.load(seal.GaloisKeys(), context.seal_context, serialized)
    except (RuntimeError, ValueError) as exc:
        raise MalformedPayloadError(f"Galois keys rejected by SEAL: {exc}") from exc
    if not all(keys.has_key(e) for e in ordered):
        raise MalformedPayloadError("Galois keys lack an element of the packing tree")
    return keys
