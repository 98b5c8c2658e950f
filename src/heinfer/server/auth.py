"""Bearer tokens for tenants: the server stores only SHA-256 hashes of tokens.

A token is shown once, when `heinfer token new` makes it. Keys belong to the tenant whose
token uploaded them; without auth every caller is the single tenant `public`.

Tokens are 256-bit random strings, so an unsalted SHA-256 is enough: nobody can brute-force a
preimage, and a leaked auth file gives an attacker no usable token. The running service
re-reads the auth file when it changes (checked at most once a second), so `heinfer token new`
and `heinfer token revoke` take effect without a restart. A file that becomes unreadable,
corrupt or absent fails closed: every token is refused (503) until it can be read again,
because keeping the last good tokens would keep a revoked token working whenever the revoking
write went wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path

from heinfer.errors import AuthError, BadInputError, ServiceUnavailableError

__all__ = ["PUBLIC_TENANT", "TokenFile", "TokenRegistry", "new_token", "revoke_token"]

PUBLIC_TENANT = "public"
# fullmatch, never `$` (which also matches before a trailing newline).
_TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_MAX_TOKEN_CHARS = 512
log = logging.getLogger("heinfer.auth")


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _bearer(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header (scheme is case-insensitive)."""
    if not authorization:
        raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > _MAX_TOKEN_CHARS:
        raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
    return token


class TokenRegistry:
    """Tenant lookup by token hash; every known hash is compared, in constant time each."""

    def __init__(self, tenants: dict[str, str]) -> None:
        for tenant, digest in tenants.items():
            if _TENANT.fullmatch(tenant) is None or _DIGEST.fullmatch(digest) is None:
                raise BadInputError(f"auth file: bad entry for tenant {tenant[:64]!r}")
        self._entries = [(digest.encode(), tenant) for tenant, digest in tenants.items()]

    @property
    def tenants(self) -> list[str]:
        return sorted(tenant for _, tenant in self._entries)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TokenRegistry:
        try:
            document = json.loads(Path(path).read_text())
            tenants = {str(t): str(v["token_sha256"]) for t, v in document["tenants"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # the reason by type only: a parser's message may quote the file's content
            raise BadInputError(
                f"cannot read auth file {path}: {type(exc).__name__} (not a heinfer auth file, "
                "or unreadable)"
            ) from exc
        return cls(tenants)

    def tenant_for(self, authorization: str | None) -> str:
        digest = _hash(_bearer(authorization)).encode()
        found: str | None = None
        for known, tenant in self._entries:  # no early exit: time does not depend on the match
            if hmac.compare_digest(known, digest):
                found = tenant
        if found is None:
            raise AuthError("invalid bearer token")
        return found


class TokenFile:
    """A `TokenRegistry` that follows its file: reloaded when its mtime/size/inode change."""

    def __init__(self, path: str | os.PathLike[str], check_interval: float = 1.0) -> None:
        self._path = Path(path)
        self._interval = check_interval
        self._lock = threading.Lock()
        self._stamp = self._stat()
        # errors here are fatal at start; None later: the file cannot be read, refuse all
        self._registry: TokenRegistry | None = TokenRegistry.from_file(self._path)
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = self._path.stat()
        except OSError:
            return None
        # ctime too: a chmod that makes the file unreadable changes nothing else
        return st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino

    @property
    def registry(self) -> TokenRegistry:
        now = time.monotonic()
        if now - self._checked >= self._interval:
            with self._lock:
                if now - self._checked >= self._interval:
                    self._checked = now
                    stamp = self._stat()
                    if stamp != self._stamp or (stamp is not None and self._registry is None):
                        self._reload(stamp)
        if self._registry is None:
            raise ServiceUnavailableError(
                "the service cannot read its auth file, so it refuses every token until an "
                "operator repairs it"
            )
        return self._registry

    def _reload(self, stamp: tuple[int, int, int, int] | None) -> None:
        self._stamp = stamp
        try:
            if stamp is None:
                raise BadInputError("the auth file is gone")
            self._registry = TokenRegistry.from_file(self._path)
        except BadInputError as exc:
            if self._registry is not None:  # once per failure, not per request
                log.error(f"refusing every token: {exc.message}")
            self._registry = None
            return
        log.info("reloaded the auth file", extra={"tenants": len(self._registry.tenants)})

    def tenant_for(self, authorization: str | None) -> str:
        return self.registry.tenant_for(authorization)


def _read_document(path: Path) -> dict[str, dict[str, dict[str, str]]]:
    if not path.exists():
        return {"tenants": {}}
    TokenRegistry.from_file(path)  # refuse to rewrite a file we cannot parse
    document: dict[str, dict[str, dict[str, str]]] = json.loads(path.read_text())
    return document


def new_token(tenant: str, auth_file: str | os.PathLike[str]) -> str:
    """Create (or replace) a tenant's token; returns the token, stores only its hash."""
    if _TENANT.fullmatch(tenant) is None:
        raise BadInputError("tenant names are 1-64 chars of a-z, 0-9, '_' and '-'")
    path = Path(auth_file)
    document = _read_document(path)
    token = secrets.token_urlsafe(32)
    document.setdefault("tenants", {})[tenant] = {"token_sha256": _hash(token)}
    _write_document(path, document)
    return token


def revoke_token(tenant: str, auth_file: str | os.PathLike[str]) -> bool:
    """Remove a tenant's token (a running service refuses it within a second); False when the
    file holds no such tenant. The tenant's keys stay in the key store until deleted."""
    path = Path(auth_file)
    if not path.exists():
        return False
    document = _read_document(path)
    if document.get("tenants", {}).pop(tenant, None) is None:
        return False
    _write_document(path, document)
    return True


def _write_document(path: Path, document: dict[str, dict[str, dict[str, str]]]) -> None:
    """Atomically: a reader sees the old file or the new one, never a partial write."""
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(document, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
