"""The server side of a compiled network: `NetworkPlan` (family `ckks-network`), the SEAL
executor of its schedules, and the model privacy treatment of every response.

Model privacy of responses (same contract as the linear plans): after the last rescale the
server adds a fresh public-key encryption (re-randomization) of a plaintext that holds the
last-layer bias in the real parts of the output slots, uniform random values in the real parts
of all other slots (they hold replicas of the scores or the network applied to zeros) and in
the imaginary parts of every slot, and Gaussian flooding noise in every slot part. The flood's
width is the layout's `flood_noise_std` in the manifest's privacy section, which also states
what it reaches against the bound on the weight-dependent evaluation error (`bound.py`):
`statistical_security_bits`, computed, not configured.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from heinfer.errors import ModelFormatError
from heinfer.plans.base import Plan
from heinfer.plans.manifest import Manifest
from heinfer.plans.network.manifest import (
    FAMILY,
    FORMAT_VERSION,
    SINGLE_LAYOUT,
    SUPPORTED_FORMAT_VERSIONS,
    build_plan_manifest,
    common_manifest,
    plan_manifest,
)
from heinfer.plans.network.scales import MASK_RANGE, OUTPUT_PRIMES, plan_scales
from heinfer.plans.network.schedule import (
    BatchSchedule,
    SingleSchedule,
    Vector,
    batch_blocks,
    batch_schedule,
    single_schedule,
)
from heinfer.plans.network.spec import NetworkSpec

__all__ = ["NetworkPlan", "SealOps", "convert_v1_network", "network_key_fingerprint"]

_SINGLE_ARRAYS = (
    "first_shifts",
    "first_diag",
    "first_bias",
    "first_c",
    "first_meta",
    "final_bias",
    "scales",
)


def network_key_fingerprint(network: Mapping[str, Any]) -> bytes:
    """Key uploads carry 32 bytes naming the parameter set; derived from the CKKS primes."""
    from heinfer.he.ckks import CkksParameters

    params = CkksParameters.from_dict(dict(network["params"]))
    return hashlib.sha256(b"heinfer-ckks-keys:" + params.fingerprint).digest()


def _array_names(n_act: int, batch: bool) -> list[str]:
    names = list(_SINGLE_ARRAYS)
    for k in range(n_act):
        names += [f"h{k}_diag", f"h{k}_used", f"h{k}_meta", f"h{k}_bias", f"h{k}_c"]
    if batch:
        for k in range(n_act + 1):
            names += [f"bt{k}_ptr", f"bt{k}_col", f"bt{k}_val"]
            if k < n_act:
                names += [f"bt{k}_bias", f"bt{k}_c"]
    return names


class SealOps:
    """The schedules' operations on SEAL ciphertexts (`schedule.Ops`), with one client's keys
    and the plan's encoded vectors."""

    def __init__(self, ctx: Any, keys: Any, plains: list[Any]) -> None:
        self.ctx = ctx
        self.keys = keys
        self.plains = plains

    def rotate(self, v: Any, step: int) -> Any:
        return self.ctx.rotate(v, step, self.keys.galois)

    def multiply_vector(self, v: Any, w: Vector) -> Any:
        return self.ctx.multiply_plain(v, self.plains[w.index])

    def add_vector(self, v: Any, w: Vector) -> Any:
        return self.ctx.add_plain(v, self.plains[w.index])

    def multiply_scalar(self, v: Any, w: float, scale: float) -> Any:
        return self.ctx.multiply_plain(v, self.ctx.encode_scalar(w, scale, self.ctx.prime_count(v)))

    def add_scalar(self, v: Any, value: float) -> Any:
        plain = self.ctx.encode_scalar(value, v.scale, self.ctx.prime_count(v))
        return self.ctx.add_plain(v, plain)

    def add(self, a: Any, b: Any) -> Any:
        return self.ctx.add(a, b)

    def add_inplace(self, a: Any, b: Any) -> None:
        self.ctx.add_inplace(a, b)

    def multiply(self, a: Any, b: Any) -> Any:
        return self.ctx.multiply(a, b)

    def relinearize(self, v: Any) -> None:
        self.ctx.relinearize_inplace(v, self.keys.relin)

    def rescale(self, v: Any) -> None:
        self.ctx.rescale_inplace(v)

    def drop_to(self, v: Any, primes: int) -> None:
        self.ctx.mod_switch_to(v, primes)

    def zero(self, scale: float, level: int) -> Any:
        return self.ctx.encrypt_public(
            self.keys.encryptor, self.ctx.encode(np.zeros(1), scale, level)
        )

    def level(self, v: Any) -> int:
        return int(self.ctx.prime_count(v))


class NetworkPlan(Plan):
    """Server-side compiled network: private weights and spec, the common `manifest`."""

    family = FAMILY

    def __init__(
        self, manifest: Manifest, arrays: Mapping[str, np.ndarray], spec: NetworkSpec
    ) -> None:
        super().__init__(manifest)
        self.network = plan_manifest(manifest)
        self.spec = spec
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.n_act = int(self.network["activations"])
        self.n_features = int(self.network["input"]["shape"][0])
        self._ctx: Any = None
        self._single: tuple[SingleSchedule, list[Any]] | None = None
        self._batch: BatchSchedule | None = None
        self._lock = threading.Lock()

    # -- keys -----------------------------------------------------------------------------------
    @property
    def key_fingerprint(self) -> bytes:
        return network_key_fingerprint(self.network)

    def _check_part_sizes(self, parts: dict[str, bytes]) -> None:
        """Every key part in SEAL's seeded form (the server expands each uniform half from the
        client's seed), checked in the HTTP process before a key is stored."""
        from heinfer.he.ckks import (
            KIND_GALOIS,
            KIND_PUBLIC,
            KIND_RELIN,
            CkksParameters,
            check_seeded,
        )

        params = CkksParameters.from_dict(self.network["params"])
        kinds = {"public": KIND_PUBLIC, "relin": KIND_RELIN, "galois": KIND_GALOIS}
        for name, data in parts.items():
            if name in kinds:
                check_seeded(params, kinds[name], data)

    def _load_key_parts(self, parts: dict[str, bytes]) -> Any:
        """SEAL-validated keys; a batch-only upload (no Galois part) loads without Galois keys
        and single-image requests then refuse it."""
        from heinfer.he.ckks import ServerKeys

        steps = self.network["keys"]["galois_steps"] if "galois" in parts else []
        return ServerKeys(self.ctx, parts, steps, True)

    # -- plaintext reference and persistence ----------------------------------------------------
    def predict_plain(self, X: np.ndarray) -> np.ndarray:
        return self.spec.predict_plain(X)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {**{k: v.copy() for k, v in self._arrays.items()}, **self.spec.to_arrays()}

    @classmethod
    def from_arrays(cls, manifest: Manifest, arrays: dict[str, np.ndarray]) -> NetworkPlan:
        network = manifest.layout.get("plan_manifest")
        if manifest.layout.get("kind") != FAMILY or not isinstance(network, dict):
            raise ModelFormatError("not a heinfer network manifest")
        if network.get("format") != "heinfer-network":
            raise ModelFormatError("not a heinfer network manifest")
        version = network.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise ModelFormatError(
                f"network format version {version} is not supported by this heinfer (reads "
                f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); upgrade heinfer"
            )
        try:
            n_act = int(network["activations"])
            need = _array_names(n_act, version == FORMAT_VERSION)
            need += [k for k in ("flood_std", "schedule") if k in arrays]
            missing = [k for k in need if k not in arrays]
            if missing:
                raise ModelFormatError(f"network arrays missing: {missing}")
            from heinfer.he.ckks import CkksParameters

            params = CkksParameters.from_dict(network["params"])
            n_features = int(network["input"]["shape"][0])
            low, high = network["input"]["range"]
            rebuilt = build_plan_manifest(
                network["name"],
                params,
                {k: arrays[k] for k in need},
                n_act,
                n_features,
                (low, high),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            if isinstance(exc, ModelFormatError):
                raise
            raise ModelFormatError(f"network manifest and arrays do not fit: {exc}") from exc
        checked = ("format_version", "keys", "input", "output", "batch")
        if any(rebuilt.get(k) != network.get(k) for k in checked):
            raise ModelFormatError("network manifest does not match its arrays")
        spec = NetworkSpec.from_arrays(arrays)
        counted = spec.parameter_count if manifest.privacy.extraction is not None else None
        expected = common_manifest(network, manifest.estimator, counted)
        fields = ("name", "input", "output", "scheme", "keys", "precision", "privacy", "max_batch")
        if any(getattr(expected, f) != getattr(manifest, f) for f in fields):
            raise ModelFormatError("network manifest does not match its common fields")
        n_out = int(network["output"]["shape"][0])
        probe = spec.predict_plain(np.zeros((1, spec.n_features))) if spec.n_features else None
        if spec.n_features != n_features or probe is None or probe.shape[1] != n_out:
            raise ModelFormatError("the network's layers do not match its manifest")
        return cls(manifest, {k: np.asarray(arrays[k]) for k in need}, spec)

    # -- HE state and the schedules ---------------------------------------------------------------
    @property
    def ctx_fingerprint(self) -> bytes:
        """The 8-byte parameter tag of this model's ciphertext envelopes (no SEAL context)."""
        from heinfer.he.ckks import CkksParameters

        return CkksParameters.from_dict(self.network["params"]).fingerprint

    def seal_ops(self, keys: Any, plains: list[Any] | None = None) -> SealOps:
        return SealOps(self.ctx, keys, plains or [])

    @property
    def ctx(self) -> Any:
        if self._ctx is None:
            from heinfer.he.ckks import CkksContext, CkksParameters

            self._ctx = CkksContext(CkksParameters.from_dict(self.network["params"]))
        return self._ctx

    def scales(self) -> dict[str, Any]:
        """Exact scales per stage (SEAL divides by the exact primes)."""
        primes = [int(p) for p in self.network["params"]["coeff_modulus"]]
        return plan_scales(primes, self.n_act, self._arrays)

    def single_schedule(self) -> tuple[SingleSchedule, list[Any]]:
        """The single-image schedule and the SEAL encodings of its vectors, built once."""
        with self._lock:
            if self._single is None:
                ctx = self.ctx

                def encode(values: np.ndarray, scale: float, level: int) -> tuple[Any, bool]:
                    plain = ctx.encode(values, scale, level)
                    return plain, bool(plain.is_zero())

                self._single = single_schedule(
                    self._arrays, self.scales(), self.n_act, ctx.slots, encode
                )
            return self._single

    def batch_schedule(self) -> BatchSchedule:
        with self._lock:
            if self._batch is None:
                blocks = batch_blocks(self._arrays, self.n_act, self.n_features)
                self._batch = batch_schedule(blocks, self.scales(), self.n_act)
            return self._batch

    @property
    def final_bias(self) -> np.ndarray:
        return self._arrays["final_bias"]

    # -- the final treatment of every response ciphertext ----------------------------------------
    def flood_std(self, layout: str) -> float:
        """The layout's flooding std per slot part, in score units (the manifest's)."""
        if layout == SINGLE_LAYOUT:
            return float(self.network["privacy"]["flood_noise_std"])
        return float(self.network["batch"]["privacy"]["flood_noise_std"])

    def mask_and_flood(
        self, ct: Any, values: np.ndarray, used: int, keys: Any, flood_std: float
    ) -> Any:
        """Add one fresh public-key encryption of `values` in the real parts of the first
        `used` slots, uniform masks from the OS CSPRNG in the real parts of the others and the
        imaginary parts of all, and Gaussian flooding of std `flood_std` (score units) in every
        slot part (module docstring)."""
        from heinfer.rlwe.sampling import os_random_normal, os_random_uniform

        ctx = self.ctx
        S = ctx.slots
        plain_values = np.empty(S, dtype=np.complex128)
        plain_values[:used] = values
        plain_values[used:] = (2.0 * os_random_uniform(S - used) - 1.0) * MASK_RANGE
        plain_values += 1j * (2.0 * os_random_uniform(S) - 1.0) * MASK_RANGE
        noise = os_random_normal(2 * S).reshape(2, S) * flood_std
        plain_values += noise[0] + 1j * noise[1]
        plain = ctx.encode(plain_values, ct.scale, OUTPUT_PRIMES)
        ctx.add_inplace(ct, ctx.encrypt_public(keys.encryptor, plain))
        return ct

    # -- plaintext simulation --------------------------------------------------------------------
    def simulate(
        self, X: np.ndarray, rng: np.random.Generator | None = None, *, layout: str = SINGLE_LAYOUT
    ) -> np.ndarray:
        """Scores of the encrypted evaluation emulated in plaintext with CKKS-like noise
        (`simulate.simulate`): accuracy without keys."""
        from heinfer.plans.network.simulate import simulate

        return simulate(self, X, rng, layout=layout)


def convert_v1_network(
    header: Mapping[str, Any],
    manifest_json: str | bytes | dict[str, Any],
    arrays: Mapping[str, np.ndarray],
) -> tuple[Manifest, dict[str, np.ndarray]]:
    """A network model file of the previous release (`heinfer.json` {"plan": "network",
    "layers": ..., "estimator": ...}, `manifest.json` the network dict, arrays prefixed `plan_`
    and `spec{i}_`) as this release's (Manifest, arrays) for `NetworkPlan.from_arrays`.

    That release fixed the input of convolutional networks at 1x28x28 (MNIST); the shape is
    written into the converted spec here, once."""
    try:
        network = manifest_json if isinstance(manifest_json, dict) else json.loads(manifest_json)
        layers = list(header["layers"])
        plan_arrays = {k[5:]: np.asarray(v) for k, v in arrays.items() if k.startswith("plan_")}
        first = layers[0]["type"] if layers else None
        n_features = int(network["input"]["shape"][0])
        shape = (1, 28, 28) if first in ("conv2d", "avgpool") else (n_features,)
        spec = NetworkSpec.from_layers(layers, arrays, shape)
        # The stored claims (flooding, precision) are recomputed by this release's rules from
        # the arrays: the service states what its own code guarantees, not what an older one did.
        from heinfer.he.ckks import CkksParameters

        rebuilt = build_plan_manifest(
            network["name"],
            CkksParameters.from_dict(network["params"]),
            plan_arrays,
            int(network["activations"]),
            n_features,
            (float(network["input"]["range"][0]), float(network["input"]["range"][1])),
        )
        manifest = common_manifest(
            rebuilt, str(header.get("estimator") or "network"), spec.parameter_count
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        if isinstance(exc, ModelFormatError):
            raise
        raise ModelFormatError(f"cannot read this network model: {exc}") from exc
    return manifest, {**plan_arrays, **spec.to_arrays()}
