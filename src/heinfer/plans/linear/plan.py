"""Server side of a compiled linear model: quantized weights as BFV plaintexts, one public key.

Both linear layouts (`rowpack`, `batch`) evaluate with this plan's weights and the client's one
public key, and both give every result the same privacy treatment (see `Treatment`).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from heinfer.errors import MalformedPayloadError, ModelFormatError, ParameterMismatchError
from heinfer.he.backend import Context, EvaluationKey
from heinfer.he.params import BFVParameters
from heinfer.plans.base import Keys, Plan
from heinfer.plans.manifest import Manifest
from heinfer.rlwe.ring import linear_combination

__all__ = ["FAMILY", "LinearPlan", "Treatment"]

FAMILY = "coeff-rowpack"  # the manifest's `layout.kind` of every linear model
_ARRAYS = ("coef", "intercept", "w_int", "b_int")


@dataclass(frozen=True)
class Treatment:
    """What hides the weights in a result: a fresh encryption of zero added (so c1 reveals
    nothing), flooding noise at the output coefficients (so the noise reveals nothing) and
    uniform masks on every other coefficient (so partial sums reveal nothing). Production
    plans always apply all three; tests switch one off through `LinearPlan._treatment` to show
    that the attack it stops then succeeds."""

    rerandomize: bool = True
    flood: bool = True
    mask: bool = True


class LinearPlan(Plan):
    """Quantized weights in NTT form, bias plaintexts, and the SEAL context they live in."""

    family: ClassVar[str] = FAMILY

    def __init__(self, manifest: Manifest, arrays: dict[str, np.ndarray]) -> None:
        super().__init__(manifest)
        self.arrays = arrays
        self.params = BFVParameters.from_dict(manifest.scheme)
        self._layout = manifest.layout
        self._context: Context | None = None
        self._weights: list[Any] = []
        self._biases: list[Any] = []
        self._treatment = Treatment()

    @classmethod
    def from_arrays(cls, manifest: Manifest, arrays: dict[str, np.ndarray]) -> LinearPlan:
        missing = [name for name in _ARRAYS if name not in arrays]
        if missing:
            raise ModelFormatError(f"linear model arrays missing: {missing}")
        w_int = np.asarray(arrays["w_int"])
        if w_int.shape != (manifest.n_outputs, manifest.n_features):
            raise ModelFormatError(
                f"weights of shape {w_int.shape} do not match the manifest's "
                f"{manifest.n_outputs} outputs x {manifest.n_features} features"
            )
        return cls(manifest, {name: np.asarray(arrays[name]) for name in _ARRAYS})

    def to_arrays(self) -> dict[str, np.ndarray]:
        return dict(self.arrays)

    @property
    def context(self) -> Context:
        if self._context is None:
            self._prepare()
        assert self._context is not None
        return self._context

    def _prepare(self) -> None:
        """Build SEAL objects: precomputed NTT weight plaintexts and bias plaintexts."""
        context = Context(self.params)
        w_int = self.arrays["w_int"]
        b_int = self.arrays["b_int"]
        n = w_int.shape[1]
        weights, biases = [], []
        for result in self._layout["results"]:
            rows = result["outputs"]
            weights.append(context.ntt_plaintext(_weight_polynomial(w_int, rows, context.n)))
            bias = np.zeros(context.n, dtype=np.int64)
            for position, row in enumerate(rows):
                bias[position * n + n - 1] = b_int[row]
            biases.append(context.plaintext_from_coefficients(bias))
        self._context, self._weights, self._biases = context, weights, biases

    def predict_plain(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float64) @ self.arrays["coef"].T + self.arrays["intercept"]

    # -- keys ----------------------------------------------------------------------------------
    @property
    def key_fingerprint(self) -> bytes:
        return self.params.fingerprint

    def _check_part_sizes(self, parts: dict[str, bytes]) -> None:
        expected = self.context.public_key_bytes
        if len(parts["public"]) != expected:
            raise MalformedPayloadError(
                f"public key must be {expected} bytes for these parameters, "
                f"got {len(parts['public'])}"
            )
        if "galois" in parts:  # coeff-packed: exact size, no SEAL call
            from heinfer.he.galois import galois_key_bytes

            size = galois_key_bytes(self.context, self.manifest.keys.galois_elements)
            if len(parts["galois"]) != size:
                raise MalformedPayloadError(
                    f"Galois keys must be {size} bytes for this model, got {len(parts['galois'])}"
                )

    def _load_key_parts(self, parts: dict[str, bytes]) -> Keys:
        if "galois" in parts:
            from heinfer.he.galois import GaloisEvaluationKey

            return GaloisEvaluationKey.from_parts(
                self.context, parts["public"], parts["galois"], self.manifest.keys.galois_elements
            )
        return self.context.load_evaluation_key(parts["public"])

    def warm_up(self) -> None:
        super().warm_up()
        _ = self.context

    def prepare_ahead(self, recent: Sequence[Keys]) -> bool:
        """One step of idle-time work: a uniform mask, else an encryption of zero for one of
        the most recently used keys. Each is used once, so results stay freshly randomized."""
        if self._treatment.mask and self.context.prepare_spare_mask(_SPARE_MASKS):
            return True
        keys = [key for key in recent[:_SPARE_KEYS] if isinstance(key, EvaluationKey)]
        return any(key.prepare_spare(_SPARES_PER_KEY) for key in keys)

    # -- evaluation (called by the layouts) ----------------------------------------------------
    def check_tag(self, data: bytes | memoryview, what: str) -> None:
        """Refuse a ciphertext made for other parameters by its 8-byte parameter tag."""
        if bytes(data[:_TAG_BYTES]) != self.params.fingerprint[:_TAG_BYTES]:
            raise ParameterMismatchError(
                f"{what} was made for other encryption parameters: fetch the model's manifest "
                "again and re-encrypt"
            )

    def evaluate_record_full(self, record: bytes, key: EvaluationKey) -> list[Any]:
        """Homomorphic W x + b with the privacy treatment, before compaction (tests inspect
        the ciphertexts)."""
        context = self.context
        request = context.load_request(record)
        results = request.multiply_ntt(self._weights)
        for index, (ciphertext, bias) in enumerate(zip(results, self._biases, strict=True)):
            context.evaluator.add_plain_inplace(ciphertext, bias)
            if self._treatment.rerandomize:
                context.add(ciphertext, key.encrypt_zero())
            noise = context.uniform_c0() if self._treatment.mask else np.zeros(
                (len(context.data_primes), context.n), dtype=np.uint64
            )
            outputs = self._layout["results"][index]["coefficients"]
            noise[:, outputs] = self._flooding(len(outputs))
            context.add_to_c0(ciphertext, noise)
        return results

    def _flooding(self, count: int) -> np.ndarray:
        """Uniform integers in [-F, F] reduced modulo each data prime, from `secrets`."""
        bound = int(self._layout["flood_bound"]) if self._treatment.flood else 0
        draws = [secrets.randbelow(2 * bound + 1) - bound for _ in range(count)]
        primes = self.context.data_primes.tolist()
        return np.array([[d % q for d in draws] for q in primes], dtype=np.uint64)

    def evaluate_batch_full(self, record: bytes, samples: int, key: EvaluationKey) -> list[Any]:
        """W X + b for a coeff-batch record, with the privacy treatment, before compaction."""
        context = self.context
        n = context.n
        w_int = self.arrays["w_int"]
        primes = context.params.data_primes
        rows = w_int.shape[0]
        # sum_i w_ji * ct_i, block of ciphertexts by block, accumulated modulo each prime
        out = np.zeros((rows, 2, len(primes), n), dtype=np.uint64)
        for first, c0, c1 in context.iter_batch_request(record, w_int.shape[1]):
            weights = w_int[:, first : first + c0.shape[1]]
            for j, q in enumerate(primes):
                _add_mod(out[:, 0, j], linear_combination(weights, c0[j], q), q)
                _add_mod(out[:, 1, j], linear_combination(weights, c1[j], q), q)
        # Bias at the used coefficients, flooding there, uniform masks everywhere else.
        extra = np.zeros((len(primes), rows, n), dtype=np.uint64)
        extra[:, :, :samples] = context.scale_plain(self.arrays["b_int"])[:, :, None]
        if self._treatment.flood:
            log2_bound = int(self._layout["batch"]["flood_bound"]).bit_length() - 1
            flood = context.uniform_flood((rows, samples), log2_bound)
            for j, q in enumerate(primes):
                _add_mod(extra[j, :, :samples], flood[j], q)
        if self._treatment.mask:
            for r in range(rows):
                extra[:, r, samples:] = context.uniform_c0()[:, samples:]
        for j, q in enumerate(primes):
            _add_mod(out[:, 0, j], extra[j], q)
        results = []
        for r in range(rows):
            ciphertext = context.ciphertext_from_arrays(out[r], last_level=False)
            if self._treatment.rerandomize:
                context.add(ciphertext, key.encrypt_zero())
            results.append(ciphertext)
        return results


# Idle-time stock: per-sample requests need two public-key encryptions of zero and two uniform
# masks; made while a worker waits, they leave the request path. Bounded per key and in keys.
_SPARES_PER_KEY = 4
_SPARE_KEYS = 4
_SPARE_MASKS = 4
_TAG_BYTES = 8


def _weight_polynomial(w_int: np.ndarray, rows: list[int], degree: int) -> np.ndarray:
    n = w_int.shape[1]
    poly = np.zeros(degree, dtype=np.int64)
    for position, row in enumerate(rows):
        poly[position * n : position * n + n] = w_int[row, ::-1]
    return poly


def _add_mod(target: np.ndarray, values: np.ndarray, q: int) -> None:
    """target = (target + values) mod q in place; both already reduced mod q < 2**63."""
    target += values
    target -= np.uint64(q) * (target >= np.uint64(q))
