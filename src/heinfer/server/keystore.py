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
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import re
import secrets
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from heinfer.errors import BadInputError, KeyNotFoundError, StoreUnavailableError

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

log = logging.getLogger(__name__)

# fullmatch, never `$`: `$` also matches before a trailing newline.
_TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{64}")
# Azure container / S3 bucket names that both services accept (lowercase DNS labels).
_AZURE_CONTAINER_RE = re.compile(r"[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]")
_S3_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

# Short timeouts so a dead store turns into a 503 in ~2-3 s instead of hanging request threads
# for the SDK defaults (Azure: 20 s connect and 15-45 s backoff; boto3: 60 s); one retry so a
# stale pooled connection after a store restart is transparently replaced.
DEFAULT_CONNECT_TIMEOUT = 1.0
DEFAULT_READ_TIMEOUT = 2.0
DEFAULT_RETRIES = 1

_AZURE_CONN_ENV = "AZURE_STORAGE_CONNECTION_STRING"
_TMP_PREFIX = ".tmp-"
_WRITE_CHUNK = 1 << 20


class KeyStoreConfigError(ValueError):
    """The key store URL or its environment is wrong: an operator error found at start-up,
    not a request error, so it is deliberately not a `HeinferError` (no HTTP status)."""


def key_id_for(data: bytes) -> str:
    """The content address of `data`; the same function the client uses to name its upload."""
    return hashlib.sha256(data).hexdigest()


def _check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or _TENANT_RE.fullmatch(tenant) is None:
        raise BadInputError(
            "invalid tenant name: expected 1-64 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit"
        )
    return tenant


def _check_key_id(key_id: str) -> str:
    # Anything that is not a well-formed id cannot name a stored key; answering "not found"
    # (rather than 400) means no string can ever be turned into a path or object name.
    if not isinstance(key_id, str) or _KEY_ID_RE.fullmatch(key_id) is None:
        raise KeyNotFoundError("key not found")
    return key_id


def _not_found(key_id: str) -> KeyNotFoundError:
    return KeyNotFoundError(f"key {key_id} not found")


def _as_bytes(data: bytes) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"key material must be bytes, not {type(data).__name__}")


def _verified(tenant: str, key_id: str, data: bytes) -> bytes:
    """Content addressing makes corruption detectable; a corrupt key must not reach SEAL."""
    if key_id_for(data) != key_id:
        log.warning(
            "stored key %s of tenant %s fails its sha256 check; treating as missing", key_id, tenant
        )
        raise _not_found(key_id)
    return data


class KeyStore(ABC):
    """Public key material by (tenant, key_id); key_id = sha256(data).hexdigest().

    Implementations are thread-safe: the service shares one instance between request threads.
    """

    @abstractmethod
    def put(self, tenant: str, data: bytes) -> str:
        """Store `data` for `tenant` and return its key id.

        Atomic (a concurrent reader sees the whole key or nothing) and idempotent (putting the
        same bytes again is harmless and returns the same id; it also repairs a corrupt copy).
        """

    @abstractmethod
    def get(self, tenant: str, key_id: str) -> bytes:
        """The key's bytes; `KeyNotFoundError` if absent, owned by another tenant, or corrupt."""

    @abstractmethod
    def delete(self, tenant: str, key_id: str) -> None:
        """Remove the key; `KeyNotFoundError` if the tenant has no such key."""

    def get_cached(self, tenant: str, key_id: str) -> bytes | None:
        """The key's bytes if they are at hand without I/O, else None (then call `get`).

        Lets an event loop answer the common case inline instead of hopping to a thread.
        """
        return None

    @abstractmethod
    def _scan(self, tenant: str) -> list[tuple[str, int]]:
        """(key id, size in bytes) of each of the tenant's keys, sorted by id."""

    def list_keys(self, tenant: str) -> list[str]:
        """The tenant's key ids, sorted."""
        return [name for name, _ in self._scan(tenant)]

    def usage(self, tenant: str) -> tuple[int, int]:
        """(key count, total bytes) of the tenant, for quota checks before a put."""
        found = self._scan(tenant)
        return len(found), sum(size for _, size in found)

    @abstractmethod
    def check(self) -> None:
        """Cheap reachability probe for /ready; raises `StoreUnavailableError`."""

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing to release
        """Release network clients; the store must not be used afterwards."""


# --------------------------------------------------------------------------------------------
# Local directory
# --------------------------------------------------------------------------------------------


class FileKeyStore(KeyStore):
    """Keys as files ``root/{tenant}/{key_id}`` (mode 0600).

    Writes go to a hidden temp file in the same directory, are fsynced, then renamed over the
    final name: rename is atomic within a filesystem, so a reader (or a crash) can only ever
    observe no file or the complete key. Temp names start with a dot and never match the key id
    pattern, so listing and lookup cannot see them; leftovers of a crashed writer are removed
    when a store is opened, once older than `stale_tmp_seconds` (an age limit, because another
    replica sharing the directory may be writing right now).
    """

    def __init__(self, root: str | os.PathLike[str], *, stale_tmp_seconds: float = 900.0) -> None:
        self._root = os.path.abspath(os.fspath(root))
        try:
            os.makedirs(self._root, mode=0o700, exist_ok=True)
        except OSError as exc:
            # Not fatal: the volume may be mounted later; check() reports it until then.
            log.warning("key store directory %s is not usable yet: %s", self._root, exc.strerror)
        self.sweep_temp_files(stale_tmp_seconds)

    @property
    def root(self) -> str:
        return self._root

    def __repr__(self) -> str:
        return f"FileKeyStore({self._root!r})"

    def sweep_temp_files(self, older_than_seconds: float) -> int:
        """Delete crashed writers' temp files older than the given age; returns how many."""
        removed = 0
        cutoff = time.time() - older_than_seconds
        try:
            tenants = [e for e in os.scandir(self._root) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return 0
        for tenant_dir in tenants:
            with contextlib.suppress(OSError), os.scandir(tenant_dir.path) as entries:
                for entry in entries:
                    if not entry.name.startswith(_TMP_PREFIX):
                        continue
                    with contextlib.suppress(OSError):
                        if entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                            os.unlink(entry.path)
                            removed += 1
        if removed:
            log.info("removed %d leftover temp file(s) from %s", removed, self._root)
        return removed

    def _unavailable(self, action: str, exc: OSError) -> StoreUnavailableError:
        # The path stays in the server log; clients only learn what kind of failure it was.
        log.warning("key store %s: cannot %s: %s", self._root, action, exc)
        reason = exc.strerror or type(exc).__name__
        return StoreUnavailableError(f"key store directory cannot {action}: {reason}")

    def put(self, tenant: str, data: bytes) -> str:
        tenant = _check_tenant(tenant)
        payload = _as_bytes(data)
        key_id = key_id_for(payload)
        directory = os.path.join(self._root, tenant)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self._write_atomically(directory, key_id, payload)
        except OSError as exc:
            raise self._unavailable("write", exc) from exc
        return key_id

    @staticmethod
    def _write_atomically(directory: str, key_id: str, payload: bytes) -> None:
        tmp = os.path.join(directory, f"{_TMP_PREFIX}{key_id}-{secrets.token_hex(8)}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(tmp, flags, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)  # exact mode whatever the umask
                view = memoryview(payload)
                while len(view) > 0:
                    view = view[os.write(fd, view[:_WRITE_CHUNK]) :]
                os.fsync(fd)  # data durable before the rename makes it visible
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(directory, key_id))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # Make the rename itself durable; some filesystems cannot fsync a directory.
        with contextlib.suppress(OSError):
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def get(self, tenant: str, key_id: str) -> bytes:
        tenant = _check_tenant(tenant)
        key_id = _check_key_id(key_id)
        path = os.path.join(self._root, tenant, key_id)
        try:
            # O_NOFOLLOW: we never create symlinks, so one in the store is not a key of ours.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            raise _not_found(key_id) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _not_found(key_id) from None
            raise self._unavailable("read", exc) from exc
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        except IsADirectoryError:
            raise _not_found(key_id) from None
        except OSError as exc:
            raise self._unavailable("read", exc) from exc
        return _verified(tenant, key_id, data)

    def delete(self, tenant: str, key_id: str) -> None:
        tenant = _check_tenant(tenant)
        key_id = _check_key_id(key_id)
        try:
            os.unlink(os.path.join(self._root, tenant, key_id))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise _not_found(key_id) from None
        except OSError as exc:
            raise self._unavailable("delete", exc) from exc

    def _scan(self, tenant: str) -> list[tuple[str, int]]:
        directory = os.path.join(self._root, _check_tenant(tenant))
        found: list[tuple[str, int]] = []
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if _KEY_ID_RE.fullmatch(entry.name) is None:
                        continue  # temp files and anything else that is not a key
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted while we listed
                    if entry.is_file(follow_symlinks=False):
                        found.append((entry.name, st.st_size))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise self._unavailable("list", exc) from exc
        found.sort()
        return found

    def check(self) -> None:
        try:
            os.makedirs(self._root, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise self._unavailable("be created", exc) from exc
        if not os.access(self._root, os.W_OK | os.X_OK):
            raise self._unavailable("be written", PermissionError(errno.EACCES, "not writable"))


# --------------------------------------------------------------------------------------------
# Azure Blob Storage
# --------------------------------------------------------------------------------------------


class AzureKeyStore(KeyStore):
    """Keys as block blobs ``{tenant}/{key_id}`` in one container.

    Credentials come only from ``AZURE_STORAGE_CONNECTION_STRING`` so they never appear in URLs,
    command lines or config files. Each key is uploaded with a single Put Blob request (the
    single-put limit is raised above any key size), which Azure applies atomically. The
    container is created on first write or probe rather than in the constructor, so the service
    starts (and reports not-ready) while Azure is unreachable, and recovers when it returns.
    """

    def __init__(
        self,
        container: str,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        if _AZURE_CONTAINER_RE.fullmatch(container) is None:
            raise KeyStoreConfigError(f"invalid Azure container name {container!r}")
        conn = os.environ.get(_AZURE_CONN_ENV, "").strip()
        if not conn:
            raise KeyStoreConfigError(
                f"{_AZURE_CONN_ENV} is not set: azure:// key stores read their credentials "
                "only from that environment variable"
            )
        try:
            from azure.storage.blob import BlobServiceClient, LinearRetry
        except ImportError as exc:
            raise KeyStoreConfigError(
                "azure:// key stores need the 'azure' extra (pip install 'heinfer[azure]')"
            ) from exc
        try:
            service = BlobServiceClient.from_connection_string(
                conn,
                connection_timeout=connect_timeout,
                read_timeout=read_timeout,
                # Retry at once: the retry is for a stale pooled connection, not for load.
                retry_policy=LinearRetry(backoff=0, random_jitter_range=0, retry_total=retries),
                max_single_put_size=256 << 20,
            )
        except (ValueError, KeyError):
            # `from None`: the SDK's message may quote the connection string.
            raise KeyStoreConfigError(
                f"{_AZURE_CONN_ENV} is not a valid connection string"
            ) from None
        self._service = service
        self._container: Any = service.get_container_client(container)
        self._container_name = container
        self._container_ready = False

    def __repr__(self) -> str:
        return f"AzureKeyStore(container={self._container_name!r})"

    @contextlib.contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        """Map SDK failures to StoreUnavailableError; not-found is handled by each caller."""
        from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError

        try:
            yield
        except ClientAuthenticationError:
            raise self._auth_error() from None
        except HttpResponseError as exc:
            if exc.status_code == 403:
                raise self._auth_error() from None
            code = getattr(exc, "error_code", None) or exc.reason or "error"
            log.warning(
                "Azure key store %s: %s failed: HTTP %s %s",
                self._container_name,
                action,
                exc.status_code,
                code,
            )
            raise StoreUnavailableError(
                f"Azure Blob Storage failed to {action}: HTTP {exc.status_code} {code}"
            ) from None
        except AzureError as exc:
            log.warning(
                "Azure key store %s: %s failed: %s",
                self._container_name,
                action,
                type(exc).__name__,
            )
            raise StoreUnavailableError(
                f"Azure Blob Storage is unreachable ({type(exc).__name__})"
            ) from exc

    def _auth_error(self) -> StoreUnavailableError:
        log.error(
            "Azure key store %s: credentials rejected; check the account name/key in %s",
            self._container_name,
            _AZURE_CONN_ENV,
        )
        return StoreUnavailableError(
            "Azure Blob Storage rejected the credentials: check the account key in "
            f"{_AZURE_CONN_ENV}"
        )

    def _ensure_container(self) -> None:
        if self._container_ready:
            return
        from azure.core.exceptions import ResourceExistsError

        with self._translate("create the container"):
            try:
                self._container.create_container()
                log.info("created Azure container %s", self._container_name)
            except ResourceExistsError:
                pass
        self._container_ready = True

    def put(self, tenant: str, data: bytes) -> str:
        from azure.core.exceptions import ResourceNotFoundError

        tenant = _check_tenant(tenant)
        payload = _as_bytes(data)
        key_id = key_id_for(payload)
        self._ensure_container()
        for attempt in (1, 2):
            with self._translate("store the key"):
                try:
                    self._container.upload_blob(f"{tenant}/{key_id}", payload, overwrite=True)
                    return key_id
                except ResourceNotFoundError:
                    # Container deleted behind our back (or emulator restarted): recreate once.
                    if attempt == 2:
                        raise
                    self._container_ready = False
            self._ensure_container()
        raise AssertionError("unreachable")  # pragma: no cover

    def get(self, tenant: str, key_id: str) -> bytes:
        from azure.core.exceptions import ResourceNotFoundError

        tenant = _check_tenant(tenant)
        key_id = _check_key_id(key_id)
        with self._translate("read the key"):
            try:
                data: bytes = self._container.download_blob(f"{tenant}/{key_id}").readall()
            except ResourceNotFoundError:
                raise _not_found(key_id) from None
        return _verified(tenant, key_id, data)

    def delete(self, tenant: str, key_id: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        tenant = _check_tenant(tenant)
        key_id = _check_key_id(key_id)
        with self._translate("delete the key"):
            try:
                self._container.delete_blob(f"{tenant}/{key_id}")
            except ResourceNotFoundError:
                raise _not_found(key_id) from None

    def _scan(self, tenant: str) -> list[tuple[str, int]]:
        from azure.core.exceptions import ResourceNotFoundError

        prefix = f"{_check_tenant(tenant)}/"
        found: list[tuple[str, int]] = []
        with self._translate("list keys"):
            try:
                for blob in self._container.list_blobs(name_starts_with=prefix):
                    name = blob.name[len(prefix) :]
                    if _KEY_ID_RE.fullmatch(name) is not None:
                        found.append((name, int(blob.size)))
            except ResourceNotFoundError:
                return []  # no container yet: nobody has stored anything
        found.sort()
        return found

    def check(self) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        with self._translate("reach the container"):
            try:
                self._container.get_container_properties()
                self._container_ready = True
                return
            except ResourceNotFoundError:
                self._container_ready = False
        self._ensure_container()

    def close(self) -> None:
        self._service.close()


# --------------------------------------------------------------------------------------------
# S3 (AWS, Ceph radosgw, ...)
# --------------------------------------------------------------------------------------------


@functools.cache
def _botocore_loader() -> Any:
    from botocore.loaders import create_loader

    return create_loader(os.environ.get("AWS_DATA_PATH"))


_S3_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
        "InvalidSecurity",
    }
)
_S3_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})


class S3KeyStore(KeyStore):
    """Keys as objects ``{tenant}/{key_id}`` in one bucket.

    Endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (passed explicitly because
    older botocore releases ignore them), credentials and region from the standard AWS
    environment/credential chain. Path-style addressing, because S3-compatible servers rarely
    have wildcard DNS for virtual-host buckets. A single PutObject is atomic in S3. Checksum
    trailers (botocore >= 1.36 default) are only sent when required, as many S3-compatible
    servers reject them. The bucket is created lazily for the same reason as Azure's container.
    """

    def __init__(
        self,
        bucket: str,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        if _S3_BUCKET_RE.fullmatch(bucket) is None or ".." in bucket:
            raise KeyStoreConfigError(f"invalid S3 bucket name {bucket!r}")
        try:
            import botocore.session
            from botocore.config import Config
        except ImportError as exc:
            raise KeyStoreConfigError(
                "s3:// key stores need the 's3' extra (pip install 'heinfer[s3]')"
            ) from exc
        self._bucket = bucket
        self._endpoint = (
            os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        )
        self._region = (
            os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        )
        options: dict[str, Any] = {
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "retries": {"total_max_attempts": retries + 1, "mode": "standard"},
            "s3": {"addressing_style": "path"},
            "signature_version": "s3v4",
        }
        try:
            config = Config(
                **options,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
        except TypeError:  # botocore < 1.36 has neither option nor the behaviour they turn off
            config = Config(**options)
        # A private session (sessions are not thread-safe, and a fresh one re-reads credentials
        # from the environment), but shared parsed service models: loading them is ~0.3 s.
        session = botocore.session.get_session()
        session.register_component("data_loader", _botocore_loader())
        self._client: Any = session.create_client(
            "s3", endpoint_url=self._endpoint, region_name=self._region, config=config
        )
        self._bucket_ready = False

    def __repr__(self) -> str:
        return f"S3KeyStore(bucket={self._bucket!r}, endpoint={self._endpoint!r})"

    @staticmethod
    def _code(exc: Any) -> tuple[str, int]:
        response = getattr(exc, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code, status

    def _is_missing(self, exc: Any) -> bool:
        code, status = self._code(exc)
        return code in _S3_MISSING_CODES or (status == 404 and not code)

    @contextlib.contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        """Map botocore failures to StoreUnavailableError; not-found is handled by callers."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from urllib3.exceptions import HTTPError as Urllib3Error

        try:
            yield
        except ClientError as exc:
            code, status = self._code(exc)
            if code in _S3_AUTH_CODES or status in (401, 403):
                log.error(
                    "S3 key store %s: credentials rejected (%s); check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY",
                    self._bucket,
                    code or status,
                )
                raise StoreUnavailableError(
                    f"S3 rejected the credentials ({code or status}): check AWS_ACCESS_KEY_ID "
                    "and AWS_SECRET_ACCESS_KEY"
                ) from None
            log.warning(
                "S3 key store %s: %s failed: HTTP %s %s", self._bucket, action, status, code
            )
            raise StoreUnavailableError(f"S3 failed to {action}: HTTP {status} {code}") from None
        except (NoCredentialsError, PartialCredentialsError):
            log.error("S3 key store %s: no usable credentials in the environment", self._bucket)
            raise StoreUnavailableError(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        except (BotoCoreError, Urllib3Error, OSError) as exc:
            log.warning("S3 key store %s: %s failed: %s", self._bucket, action, type(exc).__name__)
            raise StoreUnavailableError(
                f"S3 endpoint is unreachable ({type(exc).__name__})"
            ) from exc

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        from botocore.exceptions import ClientError

        kwargs: dict[str, Any] = {"Bucket": self._bucket}
        if self._region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self._region}
        with self._translate("create the bucket"):
            try:
                self._client.create_bucket(**kwargs)
                log.info("created S3 bucket %s", self._bucket)
            except ClientError as exc:
                code, _ = self._code(exc)
                if code == "BucketAlreadyExists":
                    raise StoreUnavailableError(
                        f"S3 bucket {self._bucket} belongs to another account"
                    ) from None
                if code != "BucketAlreadyOwnedByYou":
                    raise
        self._bucket_ready = True

    def put(self, tenant: str, data: bytes) -> str:
        from botocore.exceptions import ClientError

        tenant = _check_tenant(tenant)
        payload = _as_bytes(data)
        key_id = key_id_for(payload)
        self._ensure_bucket()
        for attempt in (1, 2):
            with self._translate("store the key"):
                try:
                    self._client.put_object(
                        Bucket=self._bucket, Key=f"{tenant}/{key_id}", Body=payload
                    )
                    return key_id
                except ClientError as exc:
                    if attempt == 2 or self._code(exc)[0] != "NoSuchBucket":
                        raise
                    self._bucket_ready = False  # deleted behind our back: recreate once
            self._ensure_bucket()
        raise AssertionError("unreachable")  # pragma: no cover

    def get(self, tenant: str, key_id: str) -> bytes:
        from botocore.exceptions import ClientError

        tenant = _check_tenant(tenant)
        key_id = _check_key_id(key_id)
        with self._translate("read the key"):
            try:
                response = self._client.get_object(Bucket=self._bucket, Key=f"{tenant}/{key_id}")
            except ClientError as exc:
                if self._is_missing(exc):
                    raise _not_found(key_id) from None
                raise
            body = response["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
        return _verified(tenant, key_id, data)

    def delete(self, tenant: str, key_id: str) -> None:
        from botocore.exceptions import ClientError

        tenant = _check_tenant(tenant)
        key_id = _check_key_id(key_id)
        name = f"{tenant}/{key_id}"
        with self._translate("delete the key"):
            # DeleteObject succeeds for absent keys, so ask first to honour the 404 contract.
            try:
                self._client.head_object(Bucket=self._bucket, Key=name)
            except ClientError as exc:
                if self._is_missing(exc):
                    raise _not_found(key_id) from None
                raise
            self._client.delete_object(Bucket=self._bucket, Key=name)

    def _scan(self, tenant: str) -> list[tuple[str, int]]:
        from botocore.exceptions import ClientError

        prefix = f"{_check_tenant(tenant)}/"
        found: list[tuple[str, int]] = []
        with self._translate("list keys"):
            try:
                pages = self._client.get_paginator("list_objects_v2").paginate(
                    Bucket=self._bucket, Prefix=prefix
                )
                for page in pages:
                    for obj in page.get("Contents", []):
                        name = str(obj["Key"])[len(prefix) :]
                        if _KEY_ID_RE.fullmatch(name) is not None:
                            found.append((name, int(obj["Size"])))
            except ClientError as exc:
                if self._code(exc)[0] == "NoSuchBucket":
                    return []  # no bucket yet: nobody has stored anything
                raise
        found.sort()
        return found

    def check(self) -> None:
        from botocore.exceptions import ClientError

        with self._translate("reach the bucket"):
            try:
                self._client.head_bucket(Bucket=self._bucket)
                self._bucket_ready = True
                return
            except ClientError as exc:
                if not self._is_missing(exc):
                    raise
                self._bucket_ready = False
        self._ensure_bucket()

    def close(self) -> None:
        self._client.close()


# --------------------------------------------------------------------------------------------
# In-memory cache in front of any store
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A consistent snapshot of the cache counters, for the /metrics endpoint."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_bytes: int


class CachedKeyStore(KeyStore):
    """LRU cache of key bytes in front of a (remote) store, bounded in bytes.

    Bounded in bytes rather than entries because keys range from kilobytes to several
    megabytes. Every inference needs its tenant's evaluation keys, so this turns a remote
    round trip + multi-MB download into a dict lookup. Content addressing means a cached entry
    can only be stale by *existence* (deleted through another replica), which `ttl_seconds`
    bounds; deletes through this instance evict immediately. Writes go through to the store
    and populate the cache (a freshly uploaded key is usually used next).
    """

    def __init__(
        self,
        inner: KeyStore,
        max_bytes: int,
        ttl_seconds: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be > 0 or None")
        self._inner = inner
        self._max_bytes = max_bytes
        self._ttl = ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        # Bumped by every delete: a get that started fetching before a delete must not
        # re-insert the key it fetched after that delete evicted it.
        self._generation = 0

    @property
    def inner(self) -> KeyStore:
        return self._inner

    def __repr__(self) -> str:
        return f"CachedKeyStore({self._inner!r}, max_bytes={self._max_bytes}, ttl={self._ttl})"

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._entries),
                bytes=self._bytes,
                max_bytes=self._max_bytes,
            )

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _insert_locked(self, key: tuple[str, str], data: bytes) -> None:
        if len(data) > self._max_bytes:
            return  # would evict everything else and still not fit
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[0])
        self._entries[key] = (data, self._clock())
        self._bytes += len(data)
        while self._bytes > self._max_bytes:
            _, (evicted, _) = self._entries.popitem(last=False)
            self._bytes -= len(evicted)
            self._evictions += 1

    def _evict_locked(self, key: tuple[str, str]) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[0])

    def put(self, tenant: str, data: bytes) -> str:
        payload = _as_bytes(data)
        key_id = self._inner.put(tenant, payload)
        with self._lock:
            self._insert_locked((tenant, key_id), payload)
        return key_id

    def _lookup_locked(self, key: tuple[str, str]) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._ttl is not None and self._clock() - entry[1] > self._ttl:
            self._evict_locked(key)
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return entry[0]

    def get_cached(self, tenant: str, key_id: str) -> bytes | None:
        key = (_check_tenant(tenant), _check_key_id(key_id))
        with self._lock:
            return self._lookup_locked(key)

    def get(self, tenant: str, key_id: str) -> bytes:
        key = (_check_tenant(tenant), _check_key_id(key_id))
        with self._lock:
            cached = self._lookup_locked(key)
            if cached is not None:
                return cached
            self._misses += 1
            generation = self._generation
        data = self._inner.get(tenant, key_id)  # outside the lock: may take a while
        with self._lock:
            if generation == self._generation:
                self._insert_locked(key, data)
        return data

    def delete(self, tenant: str, key_id: str) -> None:
        key = (_check_tenant(tenant), _check_key_id(key_id))
        try:
            self._inner.delete(tenant, key_id)
        finally:
            # Evict even when the store says "not found": then our copy is stale anyway.
            with self._lock:
                self._generation += 1
                self._evict_locked(key)

    def _scan(self, tenant: str) -> list[tuple[str, int]]:
        return self._inner._scan(tenant)  # listings are never cached: quotas need them fresh

    def check(self) -> None:
        self._inner.check()

    def close(self) -> None:
        self._inner.close()


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


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
    from AZURE_STORAGE_CONNECTION_STRING), ``s3://bucket`` (endpoint and credentials from the
    standard AWS environment variables). Raises `KeyStoreConfigError` for a bad URL or missing
    configuration; does no network I/O, so it succeeds while the store is down.
    """
    return CachedKeyStore(_store_for_url(url), cache_bytes, ttl_seconds)
