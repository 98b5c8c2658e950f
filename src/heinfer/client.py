"""The data owner's SDK: keys, encryption and decryption stay here; only ciphertexts leave.

Built from the service's public manifest alone; it imports nothing from `heinfer.server`.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterator
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
from heinfer.plans.linear import LAYOUT_KIND, LinearCodec
from heinfer.plans.manifest import Manifest
from heinfer.plans.wire import decode_response, encode_keys, encode_request

__all__ = ["KEY_ID_HEADER", "Client"]

KEY_ID_HEADER = "X-Heinfer-Key-Id"
SECRET_FORMAT = "heinfer.secret"


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
        if self.manifest.layout.get("kind") != LAYOUT_KIND:
            raise ParameterMismatchError(
                f"model {model!r} uses layout {self.manifest.layout.get('kind')!r}, "
                "which this heinfer client does not know; upgrade heinfer"
            )
        self._codec = LinearCodec(self.manifest)
        self._secret: SecretKey | None = None
        self.key_id: str | None = None
        self.last_key_upload: bytes | None = None

    # -- keys -------------------------------------------------------------------------------
    def upload_keys(self) -> str:
        """Make a secret key (kept in this process) and upload only the public key."""
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
        return self.key_id

    def delete_keys(self) -> None:
        """Remove this client's public key from the service's key store."""
        self._request("DELETE", f"/v2/keys/{self._require_key_id()}")
        self.key_id = None

    def save_secret(self, path: str | os.PathLike[str]) -> Path:
        """Write the secret key (and its key id) to a file only the owner can read (0600)."""
        secret = self._require_secret()
        document = {
            "format": SECRET_FORMAT,
            "format_version": 1,
            "model": self.model,
            "parameters": self._codec.params.fingerprint.hex(),
            "key_id": self.key_id,
            "secret_key": base64.b64encode(secret.to_bytes()).decode(),
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
        if document.get("parameters") != self._codec.params.fingerprint.hex():
            raise ParameterMismatchError(
                f"{path} holds a key for other encryption parameters than model {self.model!r}"
            )
        raw = base64.b64decode(document["secret_key"])
        self._secret = SecretKey.from_bytes(self._codec.context, raw)
        self.key_id = document.get("key_id")

    # -- encryption -------------------------------------------------------------------------
    def encrypt(self, X: Any) -> bytes:
        """Request body for X of shape (n_features,) or (n, n_features)."""
        data = self._check_X(X)
        return encode_request(self._codec.encrypt(self._require_secret(), data))

    def decrypt(self, payload: bytes) -> np.ndarray:
        """Scores of shape (n, n_outputs) from a response body."""
        secret = self._require_secret()
        records = decode_response(payload, self._codec.record_bytes)
        return np.stack([self._codec.decrypt(secret, r) for r in records])

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
    ) -> np.ndarray:
        """Encrypt, call the service, decrypt: scores of shape (n, n_outputs).

        Large X is sent in batches (one request each); `progress(k)` is called with the
        number of samples each finished batch held.
        """
        data = self._check_X(X)
        if self.key_id is None:
            self.upload_keys()
        size = batch_size or min(self.manifest.max_batch, 256)
        out = []
        for chunk in _chunks(data, size):
            out.append(self.decrypt(self.infer(self.encrypt(chunk))))
            if progress is not None:
                progress(len(chunk))
        return np.concatenate(out) if out else np.zeros((0, self.manifest.n_outputs))

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


def _chunks(data: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
