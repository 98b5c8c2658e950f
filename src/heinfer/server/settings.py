"""Service configuration: CLI flags first, then HEINFER_* environment variables."""

from __future__ import annotations

import os

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ServiceSettings"]


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HEINFER_", frozen=True)

    model_paths: list[str] = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    key_store: str = "./heinfer-keys"
    auth_file: str | None = None
    max_body_bytes: int = Field(default=64 << 20, ge=1024)
    max_key_bytes: int = Field(default=4 << 20, ge=1024)
    max_keys_per_tenant: int = Field(default=1000, ge=1)
    max_key_bytes_per_tenant: int = Field(default=1 << 30, ge=1024)
    max_concurrent_requests: int = Field(default=64, ge=1)
    key_cache_bytes: int = Field(default=256 << 20, ge=0)
    key_ttl_seconds: float | None = None
