"""Service configuration: CLI flags first, then HEINFER_* environment variables."""

from __future__ import annotations

import os

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from heinfer.server.budget import BudgetRule

__all__ = ["ServiceSettings"]


class ServiceSettings(BaseSettings):
    """Every limit the service enforces; see SECURITY.md ("Limits") for what each protects."""

    model_config = SettingsConfigDict(env_prefix="HEINFER_", frozen=True)

    model_paths: list[str] = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    key_store: str = "./heinfer-keys"
    auth_file: str | None = None
    # The browser page at / (heinfer.web): None = on when `host` is loopback, off elsewhere.
    web_page: bool | None = None
    # Size limits: bodies are refused from Content-Length before they are read.
    # A full batched CNN request (4,096 images: 784 seeded ciphertexts) is ~141 MiB.
    max_body_bytes: int = Field(default=192 << 20, ge=1024)
    max_key_bytes: int = Field(default=32 << 20, ge=1024)  # CNN key sets are ~17 MB
    # Bodies being received or evaluated at once, in bytes (from Content-Length, or the size
    # limit when it is absent): a bound on the memory large requests can pin. Beyond it new
    # large requests get 503 + Retry-After; one request always fits.
    max_inflight_body_bytes: int = Field(default=1 << 30, ge=1024)
    # Per-tenant key store quotas (HTTP 429 when exceeded).
    max_keys_per_tenant: int = Field(default=1000, ge=1)
    max_key_bytes_per_tenant: int = Field(default=1 << 30, ge=1024)
    # Admission control: at most `max_concurrent_requests` requests use the worker pool at once,
    # at most `max_queued_requests` more wait for it (for at most `queue_timeout_seconds`);
    # anything beyond that is refused at once with 503 + Retry-After instead of queueing.
    max_concurrent_requests: int = Field(default=64, ge=1)
    max_queued_requests: int = Field(default=64, ge=0)
    queue_timeout_seconds: float = Field(default=30.0, gt=0)
    # A request body must arrive within this time (slow senders get 408).
    body_timeout_seconds: float = Field(default=60.0, gt=0)
    # Upper bound on one evaluation call in the pool before the caller gets 503.
    evaluation_timeout_seconds: float = Field(default=300.0, gt=0)
    retry_after_seconds: int = Field(default=1, ge=1)
    # Parsed keys per worker (and key bytes in the HTTP process): sized so that 16 tenants'
    # full CNN key sets stay parsed (docs/performance.md, "16 tenants").
    key_cache_bytes: int = Field(default=512 << 20, ge=0)
    key_ttl_seconds: float | None = None
    # The extraction budget (server/budget.py): samples one tenant may have evaluated per
    # model per window (0: unlimited), 429 + Retry-After beyond it; rules override it per
    # model and tenant and switch layouts off. `auto`: counted in this process, or in one Ray
    # actor all replicas share under Ray Serve; `local`: each process alone; `ray:NAME`.
    sample_budget: int = Field(default=1_000_000, ge=0)
    sample_budget_window_seconds: float = Field(default=3600.0, gt=0)
    budget_rules: list[BudgetRule] = Field(default_factory=list)
    budget_store: str = "auto"
    # /v2/health/ready answers from one probe of the workers and key store at a time, reused
    # for this long: anonymous callers cannot make each request reach the store.
    ready_cache_seconds: float = Field(default=2.0, ge=0)
