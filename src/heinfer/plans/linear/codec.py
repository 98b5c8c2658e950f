"""Client side of a linear model: one BFV secret key, one seeded public key, input quantization.

Built from the public manifest alone; both linear layouts encrypt under the same secret key.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from heinfer.errors import MalformedPayloadError, ParameterMismatchError
from heinfer.he.backend import Context, SecretKey, unpack_bits
from heinfer.he.params import BFVParameters
from heinfer.plans.base import Codec
from heinfer.plans.linear.plan import FAMILY
from heinfer.plans.manifest import Manifest

__all__ = ["LinearCodec", "decrypt_compact"]


class LinearCodec(Codec):
    """Keys and quantization shared by the linear layouts."""

    family: ClassVar[str] = FAMILY

    def __init__(self, manifest: Manifest) -> None:
        if manifest.layout.get("kind") != FAMILY:
            raise ParameterMismatchError(f"not a {FAMILY} manifest")
        self.params = BFVParameters.from_dict(manifest.scheme)
        self.context = Context(self.params)
        super().__init__(manifest)

    @property
    def key_fingerprint(self) -> bytes:
        return self.params.fingerprint

    def keygen(self) -> SecretKey:
        return SecretKey.generate(self.context)

    def load_secret(self, data: bytes) -> SecretKey:
        return SecretKey.from_bytes(self.context, data)

    def public_keys(self, secret: Any, parts: frozenset[str]) -> dict[str, bytes]:
        assert isinstance(secret, SecretKey)
        keys = {"public": secret.public_key_bytes()}
        if "galois" in parts:  # coeff-packed: the elements the manifest names
            from heinfer.he.galois import make_galois_keys

            keys["galois"] = make_galois_keys(secret, self.manifest.keys.galois_elements)
        return keys

    def quantize(self, X: np.ndarray) -> np.ndarray:
        """x_int = round((x - low) / (high - low) * (2**bits - 1)), clipped to the range."""
        spec = self.manifest.input
        if spec.bits is None:
            raise ParameterMismatchError("this manifest has no BFV input quantization")
        levels = (1 << spec.bits) - 1
        scaled = np.asarray(X, dtype=np.float64) - spec.low
        scaled /= spec.high - spec.low
        scaled *= levels
        np.rint(scaled, out=scaled)
        np.maximum(scaled, 0, out=scaled)
        np.minimum(scaled, levels, out=scaled)
        return scaled.astype(np.int64)


def decrypt_compact(
    secret: SecretKey,
    record: bytes,
    params: BFVParameters,
    results: list[dict[str, Any]],
    bits: int,
    n_outputs: int,
    divisor: float,
) -> np.ndarray:
    """Scores from a compact result record: per result ciphertext, c1 (N coefficients) then c0
    at its output coefficients only, bit-packed at `bits` modulo the one remaining prime.
    Output `outputs[i]` is coefficient `coefficients[i]` divided by `divisor`."""
    n = params.poly_modulus_degree
    q1 = np.uint64(params.coeff_modulus[0])
    scores = np.zeros(n_outputs, dtype=np.float64)
    offset = 0
    for result in results:
        outputs, coefficients = result["outputs"], result["coefficients"]
        c1_size = (n * bits + 7) // 8
        c0_size = (len(coefficients) * bits + 7) // 8
        c1 = unpack_bits(record[offset : offset + c1_size], n, bits)
        c0_out = unpack_bits(
            record[offset + c1_size : offset + c1_size + c0_size], len(coefficients), bits
        )
        offset += c1_size + c0_size
        if np.any(c1 >= q1) or np.any(c0_out >= q1):
            raise MalformedPayloadError("result coefficient out of range")
        scores[outputs] = secret.decrypt_coefficients(c0_out, c1, coefficients) / divisor
    return scores
