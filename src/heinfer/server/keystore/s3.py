"""Keys in S3 or an S3-compatible server (Ceph radosgw, ...)."""

from __future__ import annotations

import contextlib
import functools
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

__all__ = ["S3KeyStore"]

log = logging.getLogger(__name__)

# Bucket names S3 accepts (lowercase DNS labels; ".." is checked separately).
_S3_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


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
        # from the environment), but shared parsed service models: loading them is slow.
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

    def _head(self, name: str) -> bool:
        """Whether the object exists, by a HEAD request (no body is transferred)."""
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self._bucket, Key=name)
        except ClientError as exc:
            if self._is_missing(exc):
                return False  # also when the bucket itself is missing
            raise
        return True

    def exists(self, tenant: str, key_id: str) -> bool:
        tenant = _check_tenant(tenant)
        if not _is_key_id(key_id):
            return False
        with self._translate("look up the key"):
            return self._head(f"{tenant}/{key_id}")

    def delete(self, tenant: str, key_id: str) -> None:
        tenant = _check_tenant(tenant)
        key_id = _check_key_id(key_id)
        name = f"{tenant}/{key_id}"
        with self._translate("delete the key"):
            # DeleteObject succeeds for absent keys, so ask first to honour the 404 contract.
            if not self._head(name):
                raise _not_found(key_id)
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
