"""One interface for every layout, and the registry that finds them by manifest kind.

A *layout* is one request format of a compiled model: how the client lays its inputs into
ciphertexts, what the server computes on them, and how the answer comes back. A model offers
one or more layouts that share one key upload (`coeff-rowpack` and `coeff-batch` share a BFV
public key; `ckks-network` and `ckks-network-batch` share CKKS keys, the batch layout needing a
subset). The request body's first four bytes (its magic) say which layout it uses.

Two sides, two families of classes, built from the same public manifest:

    server (private weights)                    client (secret key, manifest only)
    ------------------------                    ----------------------------------
    Plan            one compiled model          Codec            one model's manifest
      .check(body) -> Request   (no HE work)      .keygen() -> Secret
      .load_keys(upload) -> Keys (parsed once)    .key_upload(secret, layouts) -> bytes
      .evaluate(body, keys) -> bytes              .encrypt(secret, X, layout) -> bytes
      .split(request, ways) / .join(bodies)       .decrypt(secret, body) -> scores
    ServerLayout    one request format          ClientLayout     one request format

The HTTP process calls only `check` (sizes, frames, parameter tags), the workers `load_keys`
and `evaluate`, the client the `Codec` verbs: none of them knows which layouts exist. A new
layout is a `ServerLayout` and a `ClientLayout` in its own module, registered with
`register_layout`; a new family of layouts (another scheme) is a `Plan` and a `Codec`
registered with `register_family`. See docs/architecture.md.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from heinfer.errors import (
    BadInputError,
    MalformedPayloadError,
    ModelFormatError,
    ParameterMismatchError,
)
from heinfer.plans.manifest import Manifest
from heinfer.plans.wire import decode_keys, encode_keys

__all__ = [
    "ClientLayout",
    "Codec",
    "Keys",
    "Plan",
    "Request",
    "Secret",
    "ServerLayout",
    "codec_for",
    "family_of",
    "layout_kinds",
    "plan_from_arrays",
    "register_family",
    "register_layout",
    "split_evenly",
]


class Keys(Protocol):
    """A client's public key material, parsed and validated by the plan (one per upload)."""

    @property
    def nbytes(self) -> int:
        """Memory the parsed keys hold: what the workers' key cache is bounded by."""
        ...


class Secret(Protocol):
    """A client's secret key. Never leaves the client process except through `to_bytes`."""

    def to_bytes(self) -> bytes: ...


@dataclass(frozen=True)
class Request:
    """What `Plan.check` learned about a request body without any HE work."""

    layout: str  # the layout kind the body's magic names
    samples: int  # inputs the request holds (what the service counts)
    body: bytes | memoryview


# -- one request format ------------------------------------------------------------------------


class ServerLayout(abc.ABC):
    """Server side of one request format. Built by its plan, which it may read freely."""

    kind: ClassVar[str]
    request_magic: ClassVar[bytes]
    key_parts: frozenset[str]  # the public key parts its evaluation needs

    @abc.abstractmethod
    def check(self, body: bytes | memoryview) -> Request:
        """Frame, sizes and parameter tag of a request: cheap, no HE library call."""

    @abc.abstractmethod
    def evaluate(self, body: bytes | memoryview, keys: Any) -> bytes:
        """The response body for one request body (checked again: workers trust nothing)."""

    def split(self, request: Request, ways: int) -> list[bytes | memoryview]:
        """Independent request bodies whose responses `join` reassembles (default: one)."""
        return [request.body]

    def join(self, responses: Sequence[bytes]) -> bytes:
        """One response body from the responses to `split`'s bodies, in order."""
        if len(responses) != 1:
            raise ValueError(f"{self.kind} does not split requests")
        return responses[0]


class ClientLayout(abc.ABC):
    """Client side of one request format, built from the manifest by its codec."""

    kind: ClassVar[str]
    response_magic: ClassVar[bytes]

    @property
    @abc.abstractmethod
    def capacity(self) -> int:
        """Most samples one request holds."""

    @property
    def preferred_from(self) -> int | None:
        """Fewest samples for which this layout beats one-sample-per-record layouts (on the
        wire and on the server); None: never chosen automatically."""
        return None

    @property
    def request_bytes_hint(self) -> int:
        """An upper bound on one request body (used to stay within the service's body limit);
        0 when it depends on the number of samples only mildly."""
        return 0

    @property
    @abc.abstractmethod
    def key_parts(self) -> frozenset[str]:
        """Which public key parts (`public`, `relin`, `galois`) the server needs for it."""

    @abc.abstractmethod
    def wire_bytes(self, samples: int) -> int:
        """Request plus response bytes of one request of `samples` samples."""

    @abc.abstractmethod
    def encrypt(self, secret: Any, X: np.ndarray) -> bytes:
        """A request body for X (n, n_features), 1 <= n <= capacity."""

    @abc.abstractmethod
    def decrypt(self, secret: Any, body: bytes) -> np.ndarray:
        """Scores (n, n_outputs) from a response body of this layout."""


def split_evenly(items: Sequence[Any], ways: int) -> list[Sequence[Any]]:
    """`items` in at most `ways` consecutive runs of (nearly) equal length, in order."""
    size = max(1, -(-len(items) // max(1, ways)))
    return [items[i : i + size] for i in range(0, len(items), size)]


# -- one compiled model --------------------------------------------------------------------------


class Plan(abc.ABC):
    """Server side of one compiled model: private weights, its layouts, its key format."""

    family: ClassVar[str]

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._layouts: dict[bytes, ServerLayout] | None = None

    @property
    def layouts(self) -> Mapping[bytes, ServerLayout]:
        """The layouts this model serves, by request magic (built on first use)."""
        if self._layouts is None:
            self._layouts = {
                layout.request_magic: layout
                for layout in (entry.server(self) for entry in _layouts_of(self))
            }
        return self._layouts

    def layout(self, body: bytes | memoryview) -> ServerLayout:
        magic = bytes(body[:4])
        layout = self.layouts.get(magic)
        if layout is not None:
            return layout
        known = _magic_names(_LAYOUTS_BY_FAMILY.get(self.family, []))
        if magic in known:
            raise ParameterMismatchError(
                f"model {self.manifest.name!r} does not serve the {known[magic]} layout; "
                f"it serves {', '.join(sorted(x.kind for x in self.layouts.values()))}"
            )
        expected = " or ".join(m.decode() for m in self.layouts)
        raise MalformedPayloadError(
            f"request body does not start with a magic of model {self.manifest.name!r} "
            f"({expected})"
        )

    def check(self, body: bytes | memoryview) -> Request:
        """What the HTTP process checks before a request reaches a worker."""
        return self.layout(body).check(body)

    def split(self, request: Request, ways: int) -> list[bytes | memoryview]:
        if request.samples <= 1 or ways <= 1:  # nothing to share out: no second parse
            return [request.body]
        return self.layout(request.body).split(request, ways)

    def join(self, request: Request, responses: Sequence[bytes]) -> bytes:
        return self.layout(request.body).join(responses)

    def evaluate(self, body: bytes | memoryview, keys: Any) -> bytes:
        return self.layout(body).evaluate(body, keys)

    def warm_up(self) -> None:
        """Build what evaluation needs (HE contexts, encoded weights) before the first request.
        The HTTP process never calls it: `check` needs none of it."""
        _ = self.layouts

    def prepare_ahead(self, recent: Sequence[Keys]) -> bool:
        """One step of idle-time work that makes later requests cheaper without changing their
        results' distribution (e.g. fresh randomness drawn ahead, each used once); `recent` are
        this model's cached keys, most recently used first. False when there is nothing to do."""
        return False

    def check_keys(self, upload: bytes) -> None:
        """Cheap checks of a key upload (frame, parameters, part sizes) for the HTTP process."""
        fingerprint, parts = decode_keys(upload)
        self._check_key_parts(fingerprint, parts)

    def load_keys(self, upload: bytes) -> Keys:
        """Parse and validate a key upload with the HE library's loaders (once per worker)."""
        fingerprint, parts = decode_keys(upload)
        self._check_key_parts(fingerprint, parts, part_sizes=False)
        return self._load_key_parts(parts)

    def _check_key_parts(
        self, fingerprint: bytes, parts: dict[str, bytes], *, part_sizes: bool = True
    ) -> None:
        """Parameters and the set of parts; with `part_sizes`, also `_check_part_sizes`, which
        the workers skip because every `_load_key_parts` loader checks sizes and seeded forms
        itself (running both cost a CKKS key-cache miss about 20 ms of its ~110 ms)."""
        if fingerprint != self.key_fingerprint:
            raise ParameterMismatchError(
                f"these keys were made for other encryption parameters than model "
                f"{self.manifest.name!r}: fetch its manifest and make keys for it"
            )
        accepted = {frozenset(entry.key_parts) for entry in self.layouts.values()}
        if frozenset(parts) not in accepted and frozenset(parts) != self.all_key_parts:
            options = " or ".join(str(sorted(a)) for a in sorted(accepted, key=len))
            raise ParameterMismatchError(
                f"model {self.manifest.name!r} needs exactly one of these sets of key parts: "
                f"{options}"
            )
        if part_sizes:
            self._check_part_sizes(parts)

    @property
    def all_key_parts(self) -> frozenset[str]:
        parts: frozenset[str] = frozenset()
        for layout in self.layouts.values():
            parts |= layout.key_parts
        return parts

    @property
    @abc.abstractmethod
    def key_fingerprint(self) -> bytes:
        """32 bytes naming the parameters keys must be made for (the key upload's header)."""

    def _check_part_sizes(self, parts: dict[str, bytes]) -> None:  # noqa: B027
        """Exact sizes where the family knows them without the HE library."""

    @abc.abstractmethod
    def _load_key_parts(self, parts: dict[str, bytes]) -> Keys:
        """Key parts (parameters and set checked) -> parsed keys; the loaders check sizes and
        seeded forms themselves, since workers call this without `_check_part_sizes`."""

    @abc.abstractmethod
    def predict_plain(self, X: np.ndarray) -> np.ndarray:
        """Plaintext reference scores (n, n_outputs): what decrypted results must match."""

    @abc.abstractmethod
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything private the plan needs besides its manifest (saved as npz, no pickle)."""

    @classmethod
    @abc.abstractmethod
    def from_arrays(cls, manifest: Manifest, arrays: dict[str, np.ndarray]) -> Plan:
        """Inverse of `to_arrays`, checking the arrays against the manifest."""


class Codec(abc.ABC):
    """Client side of one model, built from its public manifest alone."""

    family: ClassVar[str]

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.layouts: dict[str, ClientLayout] = {
            entry.kind: entry.client(self) for entry in _layouts_of(self)
        }
        self._by_response = {layout.response_magic: layout for layout in self.layouts.values()}

    @property
    @abc.abstractmethod
    def key_fingerprint(self) -> bytes:
        """32 bytes naming the parameters keys are made for (the key upload's header)."""

    @property
    def default_layout(self) -> str:
        """The layout for small requests: the first one the family registered."""
        return next(iter(self.layouts))

    @abc.abstractmethod
    def keygen(self) -> Secret:
        """A fresh secret key for this model's parameters."""

    @abc.abstractmethod
    def load_secret(self, data: bytes) -> Secret:
        """A secret key saved with `Secret.to_bytes`, validated against the parameters."""

    @abc.abstractmethod
    def public_keys(self, secret: Any, parts: frozenset[str]) -> dict[str, bytes]:
        """The public key parts to upload, each in its seeded wire form."""

    def key_parts(self, layouts: Iterable[str] | None = None) -> frozenset[str]:
        """The key parts that serve every layout in `layouts` (default: all of them)."""
        parts: frozenset[str] = frozenset()
        for kind in layouts if layouts is not None else self.layouts:
            parts |= self.layout(kind).key_parts
        return parts

    def key_upload(self, secret: Any, layouts: Iterable[str] | None = None) -> bytes:
        """The `POST /v2/keys` body serving `layouts` (default: every layout of the model)."""
        return encode_keys(self.key_fingerprint, self.public_keys(secret, self.key_parts(layouts)))

    def layout(self, kind: str) -> ClientLayout:
        try:
            return self.layouts[kind]
        except KeyError:
            raise BadInputError(
                f"unknown layout {kind!r} for model {self.manifest.name!r}: "
                + " or ".join(self.layouts)
            ) from None

    def encrypt(self, secret: Any, X: np.ndarray, layout: str | None = None) -> bytes:
        X = np.asarray(X)
        if X.ndim == 1:  # one sample: len(X) would count its features as samples
            X = X[None, :]
        chosen = self.layout(layout or self.layout_for(len(X)))
        if not 1 <= len(X) <= chosen.capacity:
            raise BadInputError(
                f"a {chosen.kind} request holds 1..{chosen.capacity} samples, got {len(X)}"
            )
        return chosen.encrypt(secret, X)

    def decrypt(self, secret: Any, body: bytes) -> np.ndarray:
        layout = self._by_response.get(bytes(body[:4]))
        if layout is None:
            expected = " or ".join(m.decode() for m in self._by_response)
            raise MalformedPayloadError(f"response body does not start with {expected}")
        return layout.decrypt(secret, body)

    def layout_for(
        self,
        samples: int,
        max_body_bytes: int | None = None,
        allowed: Collection[str] | None = None,
    ) -> str:
        """The cheapest layout for one request of `samples` samples: the largest-capacity
        layout that holds them and is preferred from that many samples on, else the default;
        only among `allowed` when given (the manifest's `allowed_layouts`)."""
        return self._preferred(samples, max_body_bytes, allowed, must_hold=True)

    def fallback_layout(self, allowed: Collection[str] | None = None) -> str:
        """The layout for requests no batch layout takes: the default, or the first allowed
        one when the caller may not use the default."""
        if allowed is None or self.default_layout in allowed:
            return self.default_layout
        for kind in self.layouts:
            if kind in allowed:
                return kind
        raise BadInputError(f"no layout of model {self.manifest.name!r} is allowed")

    def _preferred(
        self,
        samples: int,
        max_body_bytes: int | None,
        allowed: Collection[str] | None,
        *,
        must_hold: bool,
    ) -> str:
        candidates = []
        for layout in self.layouts.values():
            start = layout.preferred_from
            if start is None or samples < start or (must_hold and samples > layout.capacity):
                continue
            if max_body_bytes is not None and layout.request_bytes_hint > max_body_bytes:
                continue
            if allowed is not None and layout.kind not in allowed:
                continue
            candidates.append(layout)
        if not candidates:
            return self.fallback_layout(allowed)
        return max(candidates, key=lambda layout: layout.capacity).kind

    def chunks(
        self,
        total: int,
        max_body_bytes: int | None = None,
        layout: str | None = None,
        *,
        per_request: int | None = None,
        allowed: Collection[str] | None = None,
    ) -> list[tuple[int, int, str]]:
        """(start, stop, layout) per request for `total` samples: full requests in the
        preferred batch layout while enough samples remain, then the fallback layout in
        requests of at most `per_request` samples; only `allowed` layouts when given. A forced
        `layout` is used throughout."""
        fallback = self.fallback_layout(allowed)

        def sized(kind: str) -> int:
            capacity = self.layout(kind).capacity
            if kind == fallback and per_request is not None:
                return min(capacity, per_request)
            return capacity

        if layout is not None:
            size = sized(layout)
            return [(i, min(total, i + size), layout) for i in range(0, total, size)]
        bounds: list[tuple[int, int, str]] = []
        start = 0
        while start < total:
            kind = self._preferred(total - start, max_body_bytes, allowed, must_hold=False)
            if kind == fallback:
                break
            stop = min(total, start + self.layouts[kind].capacity)
            bounds.append((start, stop, kind))
            start = stop
        size = sized(fallback)
        bounds.extend((i, min(total, i + size), fallback) for i in range(start, total, size))
        return bounds


# -- the registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LayoutEntry:
    kind: str
    family: str
    server: Callable[[Any], ServerLayout]
    client: Callable[[Any], ClientLayout]
    offered: Callable[[Manifest], bool]
    request_magic: bytes


@dataclass(frozen=True)
class _FamilyEntry:
    kind: str
    plan: type[Plan]
    codec: type[Codec]


_FAMILIES: dict[str, _FamilyEntry] = {}
_LAYOUTS_BY_FAMILY: dict[str, list[_LayoutEntry]] = {}


def register_family(kind: str, plan: type[Plan], codec: type[Codec]) -> None:
    """A family of layouts sharing keys, found by the manifest's `layout.kind`."""
    _FAMILIES[kind] = _FamilyEntry(kind, plan, codec)


def register_layout(
    family: str,
    server: type[ServerLayout],
    client: type[ClientLayout],
    offered: Callable[[Manifest], bool] = lambda _: True,
) -> None:
    """One request format of `family`; `offered(manifest)` says whether a model serves it.
    Layouts are tried in registration order; the first is the family's default."""
    if server.kind != client.kind:
        raise ValueError(f"server layout {server.kind!r} paired with client {client.kind!r}")
    entry = _LayoutEntry(server.kind, family, server, client, offered, server.request_magic)
    _LAYOUTS_BY_FAMILY.setdefault(family, []).append(entry)


def layout_kinds() -> list[str]:
    """Every registered layout kind (what a manifest may name)."""
    _ensure_registered()
    return [entry.kind for entries in _LAYOUTS_BY_FAMILY.values() for entry in entries]


def _ensure_registered() -> None:
    """Import the built-in layouts (each module registers itself on import)."""
    import heinfer.plans.layouts  # noqa: F401


def family_of(manifest: Manifest) -> _FamilyEntry:
    _ensure_registered()
    kind = str(manifest.layout.get("kind"))
    try:
        return _FAMILIES[kind]
    except KeyError:
        raise ModelFormatError(
            f"model {manifest.name!r} uses layout {kind!r}, which this heinfer does not know "
            f"(known: {', '.join(sorted(_FAMILIES))}); upgrade heinfer"
        ) from None


def _layouts_of(side: Plan | Codec) -> list[_LayoutEntry]:
    _ensure_registered()
    return [
        entry
        for entry in _LAYOUTS_BY_FAMILY.get(side.family, [])
        if entry.offered(side.manifest)
    ]


def _magic_names(entries: list[_LayoutEntry]) -> dict[bytes, str]:
    return {entry.request_magic: entry.kind for entry in entries}


def plan_from_arrays(manifest: Manifest, arrays: dict[str, np.ndarray]) -> Plan:
    """The server plan of a saved model, by its manifest's family."""
    return family_of(manifest).plan.from_arrays(manifest, arrays)


def codec_for(manifest: Manifest) -> Codec:
    """The client codec of a manifest fetched from a service."""
    return family_of(manifest).codec(manifest)
