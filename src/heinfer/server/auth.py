"""Bearer tokens for tenants: the server stores only SHA-256 hashes of tokens.

A token is shown once, when `heinfer token new` makes it. Keys belong to the tenant whose
token uploaded them; without auth every caller is the single tenant `public`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from pathlib import Path

from heinfer.errors import AuthError, BadInputError

__all__ = ["PUBLIC_TENANT", "TokenRegistry", "new_token"]

PUBLIC_TENANT = "public"
_TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenRegistry:
    """Tenant lookup by token hash; constant-time comparison of hashes."""

    def __init__(self, tenants: dict[str, str]) -> None:
        self._by_hash = {digest: tenant for tenant, digest in tenants.items()}

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TokenRegistry:
        try:
            document = json.loads(Path(path).read_text())
            tenants = {str(t): str(v["token_sha256"]) for t, v in document["tenants"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BadInputError(f"cannot read auth file {path}: {exc}") from exc
        return cls(tenants)

    def tenant_for(self, authorization: str | None) -> str:
        if not authorization or not authorization.startswith("Bearer "):
            raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
        digest = _hash(authorization[len("Bearer ") :].strip())
        for known, tenant in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return tenant
        raise AuthError("invalid token")


def new_token(tenant: str, auth_file: str | os.PathLike[str]) -> str:
    """Create (or replace) a tenant's token; returns the token, stores only its hash."""
    if not _TENANT.match(tenant):
        raise BadInputError("tenant names are 1-64 chars of a-z, 0-9, '_' and '-'")
    path = Path(auth_file)
    document: dict[str, dict[str, dict[str, str]]] = {"tenants": {}}
    if path.exists():
        document = json.loads(path.read_text())
    token = secrets.token_urlsafe(32)
    document.setdefault("tenants", {})[tenant] = {"token_sha256": _hash(token)}
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(document, fh, indent=2)
    os.replace(tmp, path)
    return token
