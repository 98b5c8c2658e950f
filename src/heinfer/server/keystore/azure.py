"""Keys in Azure Blob Storage (or Azurite)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

from heinfer.errors import StoreUnavailableError
from heinfer.server.keystore.base import (
    _KEY_ID_RE,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_RETRIES,
    KeyStore,
    KeyStoreConfigError,
    _as_bytes,
    _check_key_id,
    _check_tenant,
    _is_key_id,
    _not_found,
    _verified,
    key_id_for,
)

__all__ = ["AzureKeyStore"]

log = logging.getLogger(__name__)

# Container names Azure accepts (lowercase DNS labels without "--").
_AZURE_CONTAINER_RE = re.compile(r"[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]")
_AZURE_CONN_ENV = "AZURE_STORAGE_CONNECTION_STRING"
_AZURE_URL_ENV = "AZURE_STORAGE_ACCOUNT_URL"


class AzureKeyStore(KeyStore):
    """Keys as block blobs ``{tenant}/{key_id}`` in one container.

    Credentials come only from the environment so they never appear in URLs, command lines or
    config files: ``AZURE_STORAGE_CONNECTION_STRING`` (an account key or SAS), or else
    ``AZURE_STORAGE_ACCOUNT_URL`` (``https://ACCOUNT.blob.core.windows.net``) with a token
    credential, azure-identity's ``DefaultAzureCredential`` — on Azure ML, App Service or AKS
    that is the managed identity (``AZURE_CLIENT_ID`` picks a user-assigned one), so no secret
    is deployed at all; the identity needs "Storage Blob Data Contributor". Each key is
    uploaded with a single Put Blob request (the single-put limit is raised above any key
    size), which Azure applies atomically. The
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
        account_url = os.environ.get(_AZURE_URL_ENV, "").strip()
        if not conn and not account_url:
            raise KeyStoreConfigError(
                f"neither {_AZURE_CONN_ENV} nor {_AZURE_URL_ENV} is set: azure:// key stores "
                "read a connection string, or an account URL for a token credential (managed "
                "identity), only from those environment variables"
            )
        try:
            from azure.storage.blob import BlobServiceClient, LinearRetry
        except ImportError as exc:
            raise KeyStoreConfigError(
                "azure:// key stores need the 'azure' extra (pip install 'heinfer[azure]')"
            ) from exc
        options: dict[str, Any] = {
            "connection_timeout": connect_timeout,
            "read_timeout": read_timeout,
            # Retry at once: the retry is for a stale pooled connection, not for load.
            "retry_policy": LinearRetry(backoff=0, random_jitter_range=0, retry_total=retries),
            "max_single_put_size": 256 << 20,
        }
        self._credential: Any = None
        if conn:
            self._source = _AZURE_CONN_ENV
            try:
                service = BlobServiceClient.from_connection_string(conn, **options)
            except (ValueError, KeyError):
                # `from None`: the SDK's message may quote the connection string.
                raise KeyStoreConfigError(
                    f"{_AZURE_CONN_ENV} is not a valid connection string"
                ) from None
        else:
            self._source = f"the token credential for {_AZURE_URL_ENV} (managed identity?)"
            self._credential = _token_credential()
            try:
                service = BlobServiceClient(account_url, credential=self._credential, **options)
            except ValueError as exc:
                raise KeyStoreConfigError(f"{_AZURE_URL_ENV} is not usable: {exc}") from None
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
            "Azure key store %s: credentials rejected or unavailable; check %s",
            self._container_name,
            self._source,
        )
        return StoreUnavailableError(
            f"Azure Blob Storage rejected the credentials: check {self._source}"
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

    def exists(self, tenant: str, key_id: str) -> bool:
        tenant = _check_tenant(tenant)
        if not _is_key_id(key_id):
            return False
        with self._translate("look up the key"):
            # A HEAD request (Get Blob Properties); a missing container is a missing key too.
            return bool(self._container.get_blob_client(f"{tenant}/{key_id}").exists())

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
        if self._credential is not None:
            self._credential.close()


def _token_credential() -> Any:
    """azure-identity's DefaultAzureCredential: environment, workload identity, then the
    managed identity of the host (Azure ML's MSI_ENDPOINT, App Service, IMDS), then developer
    logins. Made lazily, since only account-URL stores need azure-identity."""
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError as exc:
        raise KeyStoreConfigError(
            f"{_AZURE_URL_ENV} needs azure-identity (pip install 'heinfer[azure]')"
        ) from exc
    # Interactive and shared-cache logins make no sense in a service: leave them out.
    return DefaultAzureCredential(
        exclude_interactive_browser_credential=True, exclude_shared_token_cache_credential=True
    )
