"""The data owner's SDK: keys, encryption and decryption stay here; only ciphertexts leave.

Built from the service's public manifest alone; it imports nothing from `heinfer.server`.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from heinfer.errors import (
    BadInputError,
    HeinferError,
    ParameterMismatchError,
    ShapeError,
    error_for_status,
)
from heinfer.he.backend import SecretKey
from heinfer.plans.linear import BATCH_LAYOUT_KIND, LAYOUT_KIND, LinearCodec
from heinfer.plans.manifest import Manifest
from heinfer.plans.network import BATCH_LAYOUT as NETWORK_BATCH_LAYOUT_KIND
from heinfer.plans.network import NetworkCodec
from heinfer.plans.wire import (
    BatchRequest,
    decode_batch_response,
    decode_response,
    encode_keys,
    encode_request,
    is_batch_response,
)

__all__ = ["KEY_ID_HEADER", "Client"]

KEY_ID_HEADER = "X-Heinfer-Key-Id"
SECRET_FORMAT = "heinfer.secret"
NETWORK_LAYOUT_KIND = "ckks-network"
# Networks: one batched request costs the server about the same for 1 or 4,096 images (the
# MNIST CNN of bench/cnn.py: 29.8 s, vs 115 ms per single image, so ~260 images), and its body
# is ~148 MB whatever n is; past 300 images the batch is cheaper on the server.
NETWORK_BATCH_THRESHOLD = 300
# The service's default body limit (ServiceSettings.max_body_bytes): coeff-batch requests of
# models so wide that they would not fit are not picked automatically.
DEFAULT_MAX_BODY_BYTES = 192 << 20


class Client:
    """Encrypted predictions from a heinfer service, like the old `EILinearRegressionClient`.

    >>> client = Client("http://127.0.0.1:8000", model="mnist")   # doctest: +SKIP
    >>> client.upload_keys()                                       # doctest: +SKIP
    >>> scores = client.predict(X)                                 # doctest: +SKIP
    """

    def __init__(
        self,
        url: str,
        model: str = "mnist",
        *,
        token: str | None = None,
        timeout: float = 120.0,
        http: httpx.Client | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = http or httpx.Client(base_url=url, headers=headers, timeout=timeout)
        self.model = model
        self.manifest = Manifest.from_dict(self._json("GET", f"/v2/models/{model}"))
        kind = self.manifest.layout.get("kind")
        # Neural networks (CKKS) keep their own codec; everything below branches on it once.
        self._network: NetworkCodec | None = None
        if kind == NETWORK_LAYOUT_KIND:
            self._network = NetworkCodec(self.manifest.layout["plan_manifest"])
        elif kind == LAYOUT_KIND:
            self._codec = LinearCodec(self.manifest)
        else:
            raise ParameterMismatchError(
                f"model {model!r} uses layout {kind!r}, which this heinfer client does not "
                "know; upgrade heinfer"
            )
        self._secret: SecretKey | None = None
        self.key_id: str | None = None
        self.last_key_upload: bytes | None = None
        self._batch_only_keys = False  # networks: the uploaded key set serves batches only

    # -- keys -------------------------------------------------------------------------------
    def upload_keys(self, *, layout: str | None = None) -> str:
        """Make a secret key (kept in this process) and upload only the public material the
        manifest asks for: one public key for linear models; for networks also the
        relinearization key and Galois keys for exactly the rotations the plan uses, or with
        `layout="ckks-network-batch"` only what batched requests need (no Galois keys)."""
        if self._network is not None:
            if not self._network.has_keys:
                self._network.keygen()
            batch_only = layout == NETWORK_BATCH_LAYOUT_KIND
            parts = self._network.public_keys(NETWORK_BATCH_LAYOUT_KIND if batch_only else None)
            body = encode_keys(self._network.key_fingerprint, parts)
        else:
            if self._secret is None:
                self._secret = SecretKey.generate(self._codec.context)
            body = encode_keys(
                self._codec.params.fingerprint, {"public": self._secret.public_key_bytes()}
            )
        self.last_key_upload = body
        reply = self._json(
            "POST",
            "/v2/keys",
            content=body,
            params={"model": self.model},
            headers={"Content-Type": "application/octet-stream"},
        )
        self.key_id = str(reply["key_id"])
        self._batch_only_keys = self._network is not None and layout == NETWORK_BATCH_LAYOUT_KIND
        return self.key_id

    def delete_keys(self) -> None:
        """Remove this client's public key from the service's key store."""
        self._request("DELETE", f"/v2/keys/{self._require_key_id()}")
        self.key_id = None

    def save_secret(self, path: str | os.PathLike[str]) -> Path:
        """Write the secret key (and its key id) to a file only the owner can read (0600)."""
        if self._network is not None:
            raw = self._network.secret_bytes()
        else:
            raw = self._require_secret().to_bytes()
        document = {
            "format": SECRET_FORMAT,
            "format_version": 1,
            "model": self.model,
            "parameters": self._fingerprint().hex(),
            "key_id": self.key_id,
            "secret_key": base64.b64encode(raw).decode(),
        }
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), 0o600)
            json.dump(document, fh)
        return path

    def load_secret(self, path: str | os.PathLike[str]) -> None:
        """Resume with a secret key saved by `save_secret` (same model parameters)."""
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BadInputError(f"cannot read secret key file {path}: {exc}") from exc
        if document.get("format") != SECRET_FORMAT:
            raise BadInputError(f"{path} is not a heinfer secret key file")
        if document.get("parameters") != self._fingerprint().hex():
            raise ParameterMismatchError(
                f"{path} holds a key for other encryption parameters than model {self.model!r}"
            )
        raw = base64.b64decode(document["secret_key"])
        if self._network is not None:
            self._network.load_secret(raw)
        else:
            self._secret = SecretKey.from_bytes(self._codec.context, raw)
        self.key_id = document.get("key_id")

    # -- encryption -------------------------------------------------------------------------
    def layout_for(self, samples: int) -> str:
        """The layout `encrypt` picks for this many samples in one request.

        coeff-batch (one ciphertext per feature for up to N samples) once a request is large
        enough to be smaller on the wire than per-sample ciphertexts (`batch_crossover`,
        computed from the manifest; about 440 MNIST digits); it is then also far faster on
        the server. Otherwise coeff-rowpack, one ciphertext per sample.
        """
        if self._network is not None:
            capacity = self._network.batch_capacity
            if NETWORK_BATCH_THRESHOLD <= samples <= capacity:
                return NETWORK_BATCH_LAYOUT_KIND
            return NETWORK_LAYOUT_KIND
        crossover = self._codec.batch_crossover
        if (
            crossover is not None
            and crossover <= samples <= self._codec.batch_capacity
            and self._codec.batch_request_bytes + 8 <= DEFAULT_MAX_BODY_BYTES
        ):
            return BATCH_LAYOUT_KIND
        return LAYOUT_KIND

    def encrypt(self, X: Any, *, layout: str | None = None) -> bytes:
        """Request body for X of shape (n_features,) or (n, n_features).

        `layout` is "coeff-rowpack" (a HEQ1 body, one ciphertext per sample) or "coeff-batch"
        (a HEB1 body, at most `batch_capacity` samples); by default `layout_for(len(X))`. For
        networks: "ckks-network" (HNQ1, one ciphertext per image) or "ckks-network-batch" (HNB1,
        one ciphertext per pixel for up to 4,096 images).
        """
        data = self._check_X(X)
        if self._network is not None:
            chosen = layout or self.layout_for(len(data))
            if chosen not in (NETWORK_LAYOUT_KIND, NETWORK_BATCH_LAYOUT_KIND):
                raise BadInputError(
                    f"unknown layout {chosen!r}: {NETWORK_LAYOUT_KIND} or "
                    f"{NETWORK_BATCH_LAYOUT_KIND}"
                )
            return self._network.encrypt(data, layout=chosen)
        chosen = layout or self.layout_for(len(data))
        secret = self._require_secret()
        if chosen == BATCH_LAYOUT_KIND:
            if self._codec.batch is None:
                raise ParameterMismatchError(
                    f"model {self.model!r} does not offer the {BATCH_LAYOUT_KIND} layout"
                )
            return encode_request(BatchRequest(len(data), self._codec.encrypt_batch(secret, data)))
        if chosen != LAYOUT_KIND:
            raise BadInputError(f"unknown layout {chosen!r}: {LAYOUT_KIND} or {BATCH_LAYOUT_KIND}")
        return encode_request(self._codec.encrypt(secret, data))

    def decrypt(self, payload: bytes) -> np.ndarray:
        """Scores of shape (n, n_outputs) from a response body of either layout."""
        if self._network is not None:
            return self._network.decrypt(payload)
        secret = self._require_secret()
        if is_batch_response(payload):
            batch = decode_batch_response(payload, self._codec.batch_capacity)
            return self._codec.decrypt_batch(secret, batch.record, batch.samples)
        records = decode_response(payload, self._codec.record_bytes)
        return np.stack([self._codec.decrypt(secret, r) for r in records])

    @property
    def batch_capacity(self) -> int:
        """Most samples one coeff-batch request holds (0: the model has no batch layout)."""
        return 0 if self._network is not None else self._codec.batch_capacity

    def infer(self, body: bytes) -> bytes:
        """POST one encrypted request body; returns the encrypted response body."""
        response = self._request(
            "POST",
            f"/v2/models/{self.model}/infer",
            content=body,
            headers={
                KEY_ID_HEADER: self._require_key_id(),
                "Content-Type": "application/octet-stream",
            },
        )
        return response.content

    def predict(
        self,
        X: Any,
        *,
        batch_size: int | None = None,
        progress: Callable[[int], None] | None = None,
        concurrency: int = 2,
        layout: str | None = None,
    ) -> np.ndarray:
        """Encrypt, call the service, decrypt: scores of shape (n, n_outputs).

        X is sent in chunks, one request each, each in the layout `layout_for` picks: by
        default full coeff-batch requests (N samples) while enough samples remain, the rest
        per-sample. `batch_size` fixes the chunk size instead. Up to `concurrency` requests
        are in flight at once (one service worker each); `progress(k)` is called, in order,
        with the number of samples each finished chunk held. `layout` forces one layout for
        every chunk (see `encrypt`); networks then upload only the keys that layout needs.
        """
        data = self._check_X(X)
        bounds = self._chunk_bounds(len(data), batch_size, layout)
        layouts = [layout or self.layout_for(stop - start) for start, stop in bounds]
        if self._network is not None and layouts:
            batch_only = all(chosen == NETWORK_BATCH_LAYOUT_KIND for chosen in layouts)
            if self.key_id is None or (self._batch_only_keys and not batch_only):
                self.upload_keys(layout=NETWORK_BATCH_LAYOUT_KIND if batch_only else None)
        elif self.key_id is None:
            self.upload_keys()

        def round_trip(start: int, stop: int, chosen: str) -> np.ndarray:
            return self.decrypt(self.infer(self.encrypt(data[start:stop], layout=chosen)))

        out = []
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            futures = [
                pool.submit(round_trip, start, stop, chosen)
                for (start, stop), chosen in zip(bounds, layouts, strict=True)
            ]
            try:
                for future, (start, stop) in zip(futures, bounds, strict=True):
                    out.append(future.result())
                    if progress is not None:
                        progress(stop - start)
            finally:
                for future in futures:
                    future.cancel()
        return np.concatenate(out) if out else np.zeros((0, self.manifest.n_outputs))

    def _chunk_bounds(
        self, total: int, batch_size: int | None, layout: str | None = None
    ) -> list[tuple[int, int]]:
        if batch_size is not None:
            if batch_size < 1:
                raise BadInputError("batch_size must be at least 1")
            return [(i, min(total, i + batch_size)) for i in range(0, total, batch_size)]
        if self._network is not None:
            capacity = self._network.batch_capacity
            bounds, start = [], 0
            if layout == NETWORK_BATCH_LAYOUT_KIND or (layout is None and capacity):
                least = 1 if layout == NETWORK_BATCH_LAYOUT_KIND else NETWORK_BATCH_THRESHOLD
                while capacity and total - start >= least:
                    stop = min(total, start + capacity)
                    bounds.append((start, stop))
                    start = stop
            size = self.manifest.max_batch
            bounds.extend((i, min(total, i + size)) for i in range(start, total, size))
            return bounds
        bounds, start = [], 0
        capacity = self._codec.batch_capacity
        crossover = self._codec.batch_crossover
        if crossover is not None and self.layout_for(crossover) == BATCH_LAYOUT_KIND:
            while total - start >= crossover:
                stop = min(total, start + capacity)
                bounds.append((start, stop))
                start = stop
        size = min(self.manifest.max_batch, 256)
        bounds.extend((i, min(total, i + size)) for i in range(start, total, size))
        return bounds

    def classify(self, X: Any, **kwargs: Any) -> np.ndarray:
        """Class labels (argmax of decrypted scores; sign for binary models)."""
        scores = self.predict(X, **kwargs)
        classes = self.manifest.output.classes
        if classes is None:
            raise BadInputError(f"model {self.model!r} is a regressor; use predict")
        index = (scores[:, 0] > 0).astype(int) if scores.shape[1] == 1 else scores.argmax(1)
        return np.asarray(classes)[index]

    # -- plumbing ---------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(model={self.model!r}, key_id={self.key_id!r})"

    def _check_X(self, X: Any) -> np.ndarray:
        n = self.manifest.n_features
        data = np.asarray(X, dtype=np.float64)
        if data.ndim == 1:
            data = data.reshape(1, -1)
        if data.ndim != 2 or data.shape[1] != n:
            raise ShapeError(f"expected X of shape (n_samples, {n}) or ({n},), got {np.shape(X)}")
        spec = self.manifest.input
        tolerance = 1e-9 * (spec.high - spec.low)
        if not np.all(np.isfinite(data)):
            raise ShapeError("X contains NaN or infinite values")
        if data.min() < spec.low - tolerance or data.max() > spec.high + tolerance:
            raise ShapeError(
                f"X has values in [{data.min():g}, {data.max():g}] but model {self.model!r} "
                f"encodes inputs in [{spec.low:g}, {spec.high:g}] (for pixels: divide by 255)"
            )
        return data

    def _fingerprint(self) -> bytes:
        if self._network is not None:
            return self._network.key_fingerprint
        return self._codec.params.fingerprint

    def _require_secret(self) -> SecretKey:
        if self._secret is None:
            raise BadInputError("no secret key yet: call upload_keys() or load_secret(path)")
        return self._secret

    def _require_key_id(self) -> str:
        if self.key_id is None:
            raise BadInputError("no key uploaded yet: call upload_keys() first")
        return self.key_id

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()


def _error_from(response: httpx.Response) -> HeinferError:
    try:
        body = response.json()
        return error_for_status(response.status_code, body["error"], body["message"])
    except (ValueError, KeyError, TypeError):
        return error_for_status(response.status_code, "http_error", response.text[:200])

