"""The client side of a network model, from its public manifest alone: CKKS keys (the secret is
an explicit `NetworkSecret` the caller holds; the codec keeps no key state), key parts in SEAL's
seeded form, and the two layouts' encryption and decryption (`single.py`, `batch.py`)."""

from __future__ import annotations

from typing import Any

from heinfer.errors import BadInputError, ModelFormatError
from heinfer.plans.base import Codec
from heinfer.plans.manifest import Manifest
from heinfer.plans.network.manifest import (
    BATCH_LAYOUT,
    FAMILY,
    SUPPORTED_FORMAT_VERSIONS,
    plan_manifest,
)
from heinfer.plans.network.plan import network_key_fingerprint

__all__ = ["NetworkCodec", "NetworkSecret"]

_PARTS = frozenset({"public", "relin", "galois"})


class NetworkSecret:
    """A CKKS secret key (with the SEAL objects built from it); `to_bytes` saves it."""

    def __init__(self, keys: Any) -> None:
        self.keys = keys  # heinfer.he.ckks.ClientKeys

    def __repr__(self) -> str:  # never print key material
        return "NetworkSecret()"

    def to_bytes(self) -> bytes:
        return bytes(self.keys.secret_bytes())


class NetworkCodec(Codec):
    family = FAMILY

    def __init__(self, manifest: Manifest) -> None:
        from heinfer.he.ckks import CkksContext, CkksParameters

        network = manifest.layout.get("plan_manifest")
        if manifest.layout.get("kind") != FAMILY or not isinstance(network, dict):
            raise ModelFormatError("not a heinfer network manifest")
        if network.get("format") != "heinfer-network":
            raise ModelFormatError("not a heinfer network manifest")
        if network.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
            raise ModelFormatError(f"unsupported network format {network.get('format_version')}")
        self.network = plan_manifest(manifest)
        try:
            self.ctx = CkksContext(CkksParameters.from_dict(network["params"]))
            self.n_features = int(network["input"]["shape"][0])
            layout = network["input"]["layout"]
            ok = layout["type"] == "copies" and layout["slots"] == self.ctx.slots
            ok = ok and int(layout["copies"]) * int(layout["stride"]) <= self.ctx.slots
            ok = ok and int(layout["stride"]) >= self.n_features
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"invalid network manifest: {exc}") from exc
        if not ok:
            raise ModelFormatError("unsupported input layout")
        batch = network.get("batch")
        if batch is not None and (
            batch.get("layout") != BATCH_LAYOUT
            or batch.get("max_images") != self.ctx.slots
            or batch.get("ciphertexts") != self.n_features
        ):
            raise ModelFormatError("unsupported batched layout")
        super().__init__(manifest)

    @property
    def key_fingerprint(self) -> bytes:
        return network_key_fingerprint(self.network)

    def keygen(self) -> NetworkSecret:
        from heinfer.he.ckks import ClientKeys

        return NetworkSecret(ClientKeys(self.ctx))

    def load_secret(self, data: bytes) -> NetworkSecret:
        from heinfer.he.ckks import ClientKeys

        return NetworkSecret(ClientKeys.from_secret_bytes(self.ctx, data))

    def client_keys(self, secret: Any) -> Any:
        if not isinstance(secret, NetworkSecret):
            raise BadInputError("a network model needs the secret its codec's keygen() made")
        if secret.keys.ctx.fingerprint != self.ctx.fingerprint:
            raise BadInputError("this secret key was made for another model's parameters")
        return secret.keys

    def public_keys(self, secret: Any, parts: frozenset[str]) -> dict[str, bytes]:
        unknown = set(parts) - _PARTS
        if unknown or "public" not in parts:
            raise BadInputError(f"network key parts are public, relin, galois; not {sorted(parts)}")
        steps = self.network["keys"]["galois_steps"] if "galois" in parts else []
        return dict(self.client_keys(secret).public_keys(steps, relin="relin" in parts))
