"""The data owner's SDK: keys, encryption and decryption stay here; only ciphertexts leave.

Built from the service's public manifest alone, through the manifest's `Codec`; it imports
nothing from `heinfer.server` and knows no layout by name.
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
    LayoutDisabledError,
    ParameterMismatchError,
    ShapeError,
    error_for_status,
)
from heinfer.plans.base import Codec, Secret, codec_for
from heinfer.plans.manifest import Manifest

__all__ = ["KEY_ID_HEADER", "Client"]

KEY_ID_HEADER = "X-Heinfer-Key-Id"
SECRET_FORMAT = "heinfer.secret"
# The service's default body limit (ServiceSettings.max_body_bytes): layouts whose requests
# would not fit are not picked automatically.
DEFAULT_MAX_BODY_BYTES = 192 << 20
# Per-sample layouts split large inputs into requests of at most this many samples, so that
# several requests are in flight (one per service worker) and progress is reported often.
_CHUNK = 256


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
        self.manifest = Manifest.from_dict(self._json("GET", f"/v2/models/{model}/manifest"))
        try:
            self.codec: Codec = codec_for(self.manifest)
        except HeinferError as exc:
            raise ParameterMismatchError(exc.message) from None
        # What the service lets this caller use (the manifest's `allowed_layouts`, absent when
        # every layout is open); layouts this heinfer does not know are left out.
        offered = self.manifest.allowed_layouts
        self.allowed_layouts: tuple[str, ...] = tuple(
            kind for kind in self.codec.layouts if offered is None or kind in offered
        )
        self._secret: Secret | None = None
        self.key_id: str | None = None
        # Merged with the base URL once, as httpx merges it: parsing it on every call cost
        # ~0.08 ms of a single image's ~2 ms of client CPU (docs/performance.md).
        self._infer_url = self._http.build_request("POST", f"/v2/models/{model}/infer").url
        self.last_key_upload: bytes | None = None
        self._key_parts: frozenset[str] = frozenset()  # what the uploaded key set holds

    # -- keys -------------------------------------------------------------------------------
    def upload_keys(self, *, layout: str | None = None) -> str:
        """Make a secret key (kept in this process) and upload only the public material the
        manifest asks for: by default what every layout open to this caller needs
        (`allowed_layouts`), with `layout` only what that layout needs (for networks, the
        batched layout needs no Galois keys)."""
        if layout is not None:
            self._check_layout(layout)
        elif not self.allowed_layouts:
            raise LayoutDisabledError(
                f"every layout of model {self.model!r} is switched off for this tenant"
            )
        if self._secret is None:
            self._secret = self.codec.keygen()
        layouts: list[str] | None = None
        if layout is not None:
            layouts = [layout]
        elif set(self.allowed_layouts) != set(self.codec.layouts):
            layouts = list(self.allowed_layouts)
        body = self.codec.key_upload(self._secret, layouts)
        self.last_key_upload = body
        reply = self._json(
            "POST",
            "/v2/keys",
            content=body,
            params={"model": self.model},
            headers={"Content-Type": "application/octet-stream"},
        )
        self.key_id = str(reply["key_id"])
        self._key_parts = self.codec.key_parts(layouts)
        return self.key_id

    def delete_keys(self) -> None:
        """Remove this client's public key from the service's key store."""
        self._request("DELETE", f"/v2/keys/{self._require_key_id()}")
        self.key_id = None
        self._key_parts = frozenset()

    def save_secret(self, path: str | os.PathLike[str]) -> Path:
        """Write the secret key (and its key id) to a new file only the owner can read (0600).

        The file is opened without following symbolic links, so a link planted at `path`
        cannot redirect the key elsewhere.
        """
        document = {
            "format": SECRET_FORMAT,
            "format_version": 1,
            "model": self.model,
            "parameters": self.codec.key_fingerprint.hex(),
            "key_id": self.key_id,
            "secret_key": base64.b64encode(self._require_secret().to_bytes()).decode(),
        }
        path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise BadInputError(f"cannot write secret key file {path}: {exc}") from exc
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
        if not isinstance(document, dict) or document.get("format") != SECRET_FORMAT:
            raise BadInputError(f"{path} is not a heinfer secret key file")
        if document.get("parameters") != self.codec.key_fingerprint.hex():
            raise ParameterMismatchError(
                f"{path} holds a key for other encryption parameters than model {self.model!r}"
            )
        self._secret = self.codec.load_secret(base64.b64decode(document["secret_key"]))
        self.key_id = document.get("key_id")
        self._key_parts = self.codec.key_parts() if self.key_id else frozenset()

    # -- encryption -------------------------------------------------------------------------
    def layout_for(self, samples: int) -> str:
        """The layout `encrypt` picks for this many samples in one request: a batch layout
        once it is cheaper than per-sample ciphertexts (computed from the manifest, e.g. about
        440 MNIST digits for the linear model), otherwise the model's per-sample layout; only
        among `allowed_layouts`."""
        return self.codec.layout_for(samples, DEFAULT_MAX_BODY_BYTES, self._open())

    def encrypt(self, X: Any, *, layout: str | None = None) -> bytes:
        """Request body for X of shape (n_features,) or (n, n_features), in `layout` (one of
        `self.codec.layouts`) or by default `layout_for(len(X))`."""
        if layout is not None:
            self._check_layout(layout)
        data = self._check_X(X)
        chosen = layout or self.layout_for(len(data))
        return self.codec.encrypt(self._require_secret(), data, chosen)

    def decrypt(self, payload: bytes) -> np.ndarray:
        """Scores of shape (n, n_outputs) from a response body of any layout."""
        return self.codec.decrypt(self._require_secret(), payload)

    @property
    def batch_capacity(self) -> int:
        """Most samples one request of the model's largest layout holds (0: only per-sample
        requests)."""
        capacities = [
            layout.capacity for kind, layout in self.codec.layouts.items()
            if kind != self.codec.default_layout and kind in self.allowed_layouts
        ]
        return max(capacities, default=0)

    def infer(self, body: bytes) -> bytes:
        """POST one encrypted request body; returns the encrypted response body."""
        response = self._request(
            "POST",
            self._infer_url,
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

        X is sent in chunks, one request each: by default full batch-layout requests while
        enough samples remain, the rest per-sample (`Codec.chunks`). `batch_size` fixes the
        chunk size instead. Up to `concurrency` requests are in flight at once (one service
        worker each; one chunk, e.g. one image, is sent from the calling thread, with no thread
        pool); `progress(k)` is called, in order, with the number of samples each
        finished chunk held. `layout` forces one layout for every chunk; keys are then
        uploaded for that layout only. Only `allowed_layouts` are used; forcing another one
        raises LayoutDisabledError before anything is encrypted.
        """
        if layout is not None:
            self._check_layout(layout)
        data = self._check_X(X)
        chunks = self._chunks(len(data), batch_size, layout)
        used = {chosen for _, _, chosen in chunks}
        if chunks and (self.key_id is None or not self.codec.key_parts(used) <= self._key_parts):
            self.upload_keys(layout=next(iter(used)) if len(used) == 1 else None)

        def round_trip(start: int, stop: int, chosen: str) -> np.ndarray:
            return self.decrypt(self.infer(self.encrypt(data[start:stop], layout=chosen)))

        if len(chunks) == 1 or concurrency <= 1:
            # In this thread: a thread pool per call cost a single image ~1.2 ms to start and
            # join its thread, and its encryption and decryption ran slower in that fresh
            # thread (docs/performance.md).
            out = []
            for chunk in chunks:
                out.append(round_trip(*chunk))
                if progress is not None:
                    progress(chunk[1] - chunk[0])
            return np.concatenate(out) if out else np.zeros((0, self.manifest.n_outputs))
        out = []
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            futures = [pool.submit(round_trip, *chunk) for chunk in chunks]
            try:
                for future, (start, stop, _) in zip(futures, chunks, strict=True):
                    out.append(future.result())
                    if progress is not None:
                        progress(stop - start)
            finally:
                for future in futures:
                    future.cancel()
        return np.concatenate(out) if out else np.zeros((0, self.manifest.n_outputs))

    def _chunks(
        self, total: int, batch_size: int | None, layout: str | None
    ) -> list[tuple[int, int, str]]:
        if batch_size is not None:
            if batch_size < 1:
                raise BadInputError("batch_size must be at least 1")
            starts = range(0, total, batch_size)
            stops = [min(total, start + batch_size) for start in starts]
            return [
                (start, stop, layout or self.layout_for(stop - start))
                for start, stop in zip(starts, stops, strict=True)
            ]
        return self.codec.chunks(
            total, DEFAULT_MAX_BODY_BYTES, layout, per_request=_CHUNK, allowed=self._open()
        )

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

    def _open(self) -> tuple[str, ...]:
        """`allowed_layouts`, refusing early (no request would succeed) when it is empty."""
        if not self.allowed_layouts:
            raise LayoutDisabledError(
                f"the service switches every layout of model {self.model!r} off for this "
                "tenant (the manifest's allowed_layouts is empty)"
            )
        return self.allowed_layouts

    def _check_layout(self, layout: str) -> None:
        """A forced layout must be one the service lets this caller use: refused here, before
        any encryption, rather than with a 403 after uploading and encrypting."""
        self.codec.layout(layout)  # an unknown layout: BadInputError naming the model's
        if layout not in self._open():
            raise LayoutDisabledError(
                f"the {layout} layout of model {self.model!r} is switched off for this tenant; "
                f"allowed: {', '.join(self.allowed_layouts)}"
            )

    def _require_secret(self) -> Secret:
        if self._secret is None:
            raise BadInputError("no secret key yet: call upload_keys() or load_secret(path)")
        return self._secret

    def _require_key_id(self) -> str:
        if self.key_id is None:
            raise BadInputError("no key uploaded yet: call upload_keys() first")
        return self.key_id

    def _request(self, method: str, path: str | httpx.URL, **kwargs: Any) -> httpx.Response:
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

