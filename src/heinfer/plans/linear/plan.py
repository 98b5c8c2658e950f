"""Server side of a compiled linear model: quantized weights, one public key.

Both linear layouts (`rowpack`, `batch`) evaluate with this plan's weights and the client's one
public key, and both give every result the same privacy treatment (see `Treatment`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from heinfer.errors import MalformedPayloadError, ModelFormatError, ParameterMismatchError
from heinfer.he.backend import Context, EvaluationKey
from heinfer.he.params import BFVParameters
from heinfer.plans.base import Keys, Plan
from heinfer.plans.manifest import Manifest
from heinfer.rlwe.encrypt import divide_and_round_q_last
from heinfer.rlwe.ring import (
    SmallProduct,
    linear_combination,
    negacyclic_at,
)
from heinfer.rlwe.sampling import centered_binomial, ternary

__all__ = ["FAMILY", "LinearPlan", "RowpackResult", "Treatment"]

FAMILY = "coeff-rowpack"  # the manifest's `layout.kind` of every linear model
_ARRAYS = ("coef", "intercept", "w_int", "b_int")


@dataclass(frozen=True)
class Treatment:
    """What hides the weights in a result: a fresh encryption of zero added (so c1 reveals
    nothing), flooding noise at the output coefficients (so the noise reveals nothing) and,
    where a layout sends coefficients that are not outputs (coeff-batch, coeff-packed),
    uniform masks on them (so partial sums reveal nothing; coeff-rowpack never computes or
    sends them). Production plans always apply all three; tests switch one off through
    `LinearPlan._treatment` to show that the attack it stops then succeeds."""

    rerandomize: bool = True
    flood: bool = True
    mask: bool = True


@dataclass(frozen=True)
class RowpackResult:
    """One coeff-rowpack result ciphertext before the switch to the last prime: c1 whole and
    c0 at the output coefficients only, (L, N) and (L, outputs) uint64 at the data primes."""

    c0: np.ndarray
    c1: np.ndarray


class LinearPlan(Plan):
    """Quantized weights, the SEAL context of their parameters, and (built on first use) the
    weights as coeff-rowpack evaluates them (`_RowpackWeights`)."""

    family: ClassVar[str] = FAMILY

    def __init__(self, manifest: Manifest, arrays: dict[str, np.ndarray]) -> None:
        super().__init__(manifest)
        self.arrays = arrays
        self.params = BFVParameters.from_dict(manifest.scheme)
        self._tag = self.params.fingerprint[:_TAG_BYTES]
        self._layout = manifest.layout
        self._context: Context | None = None
        self._treatment = Treatment()
        self._rowpack: _RowpackWeights | None = None

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
        self._context = Context(self.params)

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
        key: EvaluationKey
        if "galois" in parts:
            from heinfer.he.galois import GaloisEvaluationKey

            key = GaloisEvaluationKey.from_parts(
                self.context, parts["public"], parts["galois"], self.manifest.keys.galois_elements
            )
        else:
            key = self.context.load_evaluation_key(parts["public"])
        self.rowpack_weights.key_spectra(key)  # once per key, counted in the cache's bound
        return key

    def warm_up(self) -> None:
        super().warm_up()
        _ = self.rowpack_weights

    @property
    def rowpack_weights(self) -> _RowpackWeights:
        if self._rowpack is None:
            self._rowpack = _RowpackWeights(self)
        return self._rowpack

    # -- evaluation (called by the layouts) ----------------------------------------------------
    def check_tag(self, data: bytes | memoryview, what: str) -> None:
        """Refuse a ciphertext made for other parameters by its 8-byte parameter tag."""
        if bytes(data[:_TAG_BYTES]) != self._tag:
            raise ParameterMismatchError(
                f"{what} was made for other encryption parameters: fetch the model's manifest "
                "again and re-encrypt"
            )

    def evaluate_record_full(
        self, record: bytes | memoryview, key: EvaluationKey
    ) -> list[RowpackResult]:
        """Homomorphic W x + b with the privacy treatment, per result ciphertext, before the
        switch to the last prime (tests inspect these), all in numpy.

        c1 = c1_x * W_g + pk1 * u_g + e1 whole (exact FFT products sharing one inverse FFT);
        c0 = c0_x * W_g + round(q*b/t) + pk0 * u_g + e0 + flood at the output coefficients
        only (dot products); u_g fresh ternary and e0, e1 fresh centered binomial, all from
        the OS: the public-key encryption of zero SEAL's encryptor makes, at the data primes.
        """
        c0_x, c1_x = self.context.request_arrays(record)
        return self.rowpack_weights.evaluate(c0_x, c1_x, key, self._treatment)

    def evaluate_record_compact(
        self, record: bytes | memoryview, key: EvaluationKey
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """`evaluate_record_full`, then SEAL's exact switch to the last prime: per result
        ciphertext (c1 (N,), c0 at the outputs (m,)), uint64 below the last prime."""
        primes = self.context.params.data_primes
        results = self.evaluate_record_full(record, key)
        # every c1, then every output of c0: one switch for all
        values = np.concatenate([r.c1 for r in results] + [r.c0 for r in results], axis=1)
        switched = divide_and_round_q_last(values, primes)[0]
        n, groups = self.context.n, len(results)
        c1 = switched[: n * groups].reshape(groups, n)
        c0 = np.split(switched[n * groups :], self.rowpack_weights.splits)
        return list(zip(c1, c0, strict=True))

    def flood_draws(self, count: int, treatment: Treatment) -> list[int]:
        """Uniform integers in [-F, F], from `secrets` (all zero with flooding switched off)."""
        bound = int(self._layout["flood_bound"]) if treatment.flood else 0
        return [secrets.randbelow(2 * bound + 1) - bound for _ in range(count)]

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


_TAG_BYTES = 8


class _RowpackWeights:
    """A plan's weights as coeff-rowpack evaluates them: per result group g the spectrum of W_g
    (for c1_x * W_g) and W_g itself (for c0_x * W_g at the output coefficients only), the
    scaled bias there; per key, pk1's digit spectra and pk0."""

    def __init__(self, plan: LinearPlan) -> None:
        context = plan.context
        self.plan = plan
        self.primes = context.params.data_primes
        degree = context.n
        w_int = np.asarray(plan.arrays["w_int"], dtype=np.int64)
        results = plan._layout["results"]
        polys = np.stack([_weight_polynomial(w_int, r["outputs"], degree) for r in results])
        l1 = int(np.abs(polys).sum(axis=1).max())
        # One product sums c1_x * W_g and pk1 * u (||u||_1 <= N).
        self.product = SmallProduct(degree, l1 + degree, self.primes)
        self.weight_spectra = self.product.spectrum(polys)  # (G, N/2)
        coefficients = [list(r["coefficients"]) for r in results]
        if np.abs(polys).max(initial=0) >= 1 << 31:
            raise ModelFormatError("quantized weights must be below 2**31 in absolute value")
        self.polys = polys.astype(np.int32)
        # output m is coefficient at[m] of the product with group which[m]'s polynomial
        self.at = np.concatenate([np.asarray(c, dtype=np.int64) for c in coefficients])
        self.which = np.repeat(np.arange(len(coefficients)), [len(c) for c in coefficients])
        outputs = [row for r in results for row in r["outputs"]]
        bias = context.scale_plain(np.asarray(plan.arrays["b_int"])[outputs])  # (L, M)
        self.bias: list[list[int]] = bias.tolist()
        self.splits = np.cumsum([len(c) for c in coefficients])[:-1]

    def key_spectra(self, key: EvaluationKey) -> tuple[np.ndarray, np.ndarray]:
        """pk1's digit spectra (D, N/2) and pk0 (L, N), made once per key."""
        def make() -> tuple[np.ndarray, ...]:
            pk0, pk1 = key.coefficients()
            return self.product.digit_spectra(pk1), np.ascontiguousarray(pk0, dtype=np.uint64)

        pk1, pk0 = key.derived(("rowpack", self.product.widths), make)
        return pk1, pk0

    def evaluate(
        self, c0_x: np.ndarray, c1_x: np.ndarray, key: EvaluationKey, treatment: Treatment
    ) -> list[RowpackResult]:
        """The c0 terms at the few output coefficients are summed as Python ints and reduced
        once per prime (cheaper than numpy calls on ten values); e1 joins c1 inside `reduce`."""
        groups, degree = self.weight_spectra.shape[0], self.product.degree
        spectra = self.product.digit_spectra(c1_x)[:, None, :] * self.weight_spectra
        at, which, primes = self.at, self.which, self.primes
        terms = [negacyclic_at(self.polys, c0_x, at, which, primes).tolist(), self.bias]
        e1 = None
        outputs = at.size
        if treatment.rerandomize:
            pk1, pk0 = self.key_spectra(key)
            u = ternary((groups, degree))
            spectra += pk1[:, None, :] * self.product.spectrum(u)
            terms.append(negacyclic_at(u, pk0, at, which, primes).tolist())
            errors = centered_binomial((groups * degree + outputs,)).astype(np.int64)
            e1 = errors[: groups * degree].reshape(groups, degree)
            terms.append([errors[groups * degree :].tolist()] * len(self.primes))
        c1 = self.product.reduce(spectra, e1)  # (L, G, N)
        terms.append([self.plan.flood_draws(outputs, treatment)] * len(self.primes))
        c0 = np.array(
            [
                [sum(values) % q for values in zip(*rows, strict=True)]
                for q, *rows in zip(self.primes, *terms, strict=True)
            ],
            dtype=np.uint64,
        )  # (L, M)
        parts = np.split(c0, self.splits, axis=1)
        return [RowpackResult(c0=parts[g], c1=c1[:, g]) for g in range(groups)]


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
