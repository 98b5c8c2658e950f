"""One exception hierarchy for the whole package.

Every error a request can cause is a `HeinferError` subclass carrying its HTTP status, so the
service maps errors to responses in exactly one place (`heinfer.server.app`) and the client
maps responses back to the same classes (`heinfer.client`).
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BadInputError",
    "BudgetExceededError",
    "HeinferError",
    "KeyNotFoundError",
    "LayoutDisabledError",
    "MalformedPayloadError",
    "ModelFormatError",
    "ModelNotFoundError",
    "NotFittedError",
    "ParameterMismatchError",
    "PayloadTooLargeError",
    "QuotaExceededError",
    "ServiceUnavailableError",
    "ShapeError",
    "StoreUnavailableError",
    "UnsupportedModelError",
    "error_for_status",
]


class HeinferError(Exception):
    """Base class: `status` is the HTTP status the service answers with, `code` a stable name."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


class BadInputError(HeinferError, ValueError):
    """The caller sent something we can name as wrong."""

    status = 400
    code = "bad_input"


class ShapeError(BadInputError):
    status = 400
    code = "bad_shape"


class MalformedPayloadError(BadInputError):
    """Bytes that do not decode as the ciphertext or key the manifest describes."""

    status = 400
    code = "malformed_payload"


class ParameterMismatchError(BadInputError):
    """A well-formed ciphertext or key made for other encryption parameters or another model."""

    status = 422
    code = "parameter_mismatch"


class PayloadTooLargeError(BadInputError):
    status = 413
    code = "payload_too_large"


class AuthError(HeinferError):
    status = 401
    code = "unauthorized"


class ModelNotFoundError(HeinferError, LookupError):
    status = 404
    code = "model_not_found"


class KeyNotFoundError(HeinferError, LookupError):
    """Unknown key id, or a key owned by another tenant (the two are indistinguishable)."""

    status = 404
    code = "key_not_found"


class QuotaExceededError(HeinferError):
    status = 429
    code = "quota_exceeded"


class BudgetExceededError(QuotaExceededError):
    """The (tenant, model) pair has evaluated its sample budget (heinfer.server.budget)."""

    code = "sample_budget_exceeded"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LayoutDisabledError(HeinferError):
    """A layout the service's budget rules switch off for this tenant and model."""

    status = 403
    code = "layout_disabled"


class ServiceUnavailableError(HeinferError):
    """Temporary: the caller should retry after `retry_after` seconds."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, retry_after: int = 2) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreUnavailableError(ServiceUnavailableError):
    code = "key_store_unavailable"


class ModelFormatError(HeinferError, ValueError):
    """A saved model file that is not a heinfer model or has an unsupported format version."""

    status = 500
    code = "model_format"


class NotFittedError(HeinferError, ValueError):
    status = 400
    code = "not_fitted"


class UnsupportedModelError(HeinferError, TypeError):
    status = 400
    code = "unsupported_model"


def _all_subclasses(cls: type[HeinferError]) -> list[type[HeinferError]]:
    found: list[type[HeinferError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


def error_for_status(status: int, code: str, message: str) -> HeinferError:
    """Rebuild the exception the service raised from its JSON error body (client side)."""
    for cls in _all_subclasses(HeinferError):
        if cls.code == code and cls.status == status:
            return cls(message)
    err = HeinferError(message)
    err.status = status
    err.code = code
    return err
