"""Where clients' public HE key material lives between upload and inference.

Keys are content addressed (``key_id = sha256(data)``) because that makes every property the
service needs cheap: an upload is idempotent (re-sending the same key gives the same id and
overwrites identical bytes), replicas agree on ids without talking to each other, corruption is
detected on every read, and a cached copy can never hold *different* bytes than the store, only
bytes the store has since deleted (which is what the cache TTL bounds).

Keys are stored under ``{tenant}/{key_id}``: isolation between tenants is structural, so a
tenant asking for another tenant's id simply finds nothing, and "someone else's key" and "no
such key" are indistinguishable to the caller (both `KeyNotFoundError`, HTTP 404).

Every backend failure that a retry might fix (connection refused, timeouts, 5xx, rejected
credentials) surfaces as `StoreUnavailableError` (HTTP 503 + Retry-After), and the backends keep
no broken state behind, so the service recovers by itself once the store is back. Key bytes and
connection strings are never logged or put into error messages.

Layout: `base` (the `KeyStore` contract, key ids, tenant and id checks), one module per backend
(`file`, `azure`, `s3`), `cached` (the LRU cache the service puts in front of any of them), and
here the URL factory. To add a backend, implement `KeyStore`'s abstract methods in a new module
(reuse the checks in `base` so ids and tenants mean the same everywhere, and map every failure
a retry might fix to `StoreUnavailableError`), then give it a URL scheme in `_store_for_url`.
"""

from __future__ import annotations

import os
import urllib.parse

from heinfer.server.keystore.azure import AzureKeyStore
from heinfer.server.keystore.base import KeyStore, KeyStoreConfigError, key_id_for
from heinfer.server.keystore.cached import CachedKeyStore, CacheStats
from heinfer.server.keystore.file import FileKeyStore
from heinfer.server.keystore.s3 import S3KeyStore

__all__ = [
    "AzureKeyStore",
    "CacheStats",
    "CachedKeyStore",
    "FileKeyStore",
    "KeyStore",
    "KeyStoreConfigError",
    "S3KeyStore",
    "key_id_for",
    "open_key_store",
]


def _store_for_url(url: str) -> KeyStore:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "":
        if not url:
            raise KeyStoreConfigError("empty key store URL")
        return FileKeyStore(url)
    if scheme == "file":
        path = urllib.parse.unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not os.path.isabs(path):
            raise KeyStoreConfigError(
                f"file key store URLs need an absolute path (file:///abs/path), got {url!r}"
            )
        return FileKeyStore(path)
    if scheme in ("azure", "s3"):
        name = parts.netloc
        if not name or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise KeyStoreConfigError(f"expected {scheme}://<name> with nothing after the name")
        return AzureKeyStore(name) if scheme == "azure" else S3KeyStore(name)
    raise KeyStoreConfigError(
        f"unsupported key store URL scheme {parts.scheme!r} (use file://, azure:// or s3://)"
    )


def open_key_store(
    url: str, *, cache_bytes: int = 256 << 20, ttl_seconds: float | None = None
) -> KeyStore:
    """The configured store behind a byte-bounded cache.

    `url`: ``file:///abs/path`` or a bare directory path, ``azure://container`` (credentials
    from AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_URL and a managed identity),
    ``s3://bucket`` (endpoint and credentials from the
    standard AWS environment variables). Raises `KeyStoreConfigError` for a bad URL or missing
    configuration; does no network I/O, so it succeeds while the store is down.
    """
    return CachedKeyStore(_store_for_url(url), cache_bytes, ttl_seconds)
