"""genq configuration: the `GENQ_*` environment variables of the public contract (section 4).

Build settings with `get_settings()` (cached) in processes, or `Settings(...)` directly in tests.
Every value is checked when the settings are built, so a bad URL stops a process at start with
a message that names the variable.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, IPvAnyNetwork, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

EMBEDDED_BROKER_URL = "sqla+sqlite:///./var/broker.db"
PRESIGN_SECONDS = 3600  # how long a presigned image URL stays valid, unless GENQ_PRESIGN_SECONDS says
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # S3's limit for a presigned URL

MIN_TOKEN_CHARS = 24  # an operator token is a random secret, not a password

_DB_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "postgresql+psycopg2")
_BROKER_SCHEMES = ("redis", "rediss", "sqla+sqlite", "sqla+postgresql", "sqla+postgresql+psycopg",
                   "amqp", "pyamqp", "memory")
_STORAGE_SCHEMES = ("file", "s3")


class ConfigError(ValueError):
    """Raised with one line per bad variable, each naming it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENQ_", extra="ignore", frozen=True)

    database_url: str = Field(default="sqlite:///./var/genq.db")
    broker_url: str = Field(default=EMBEDDED_BROKER_URL)
    storage_url: str = Field(default="file://./var/objects")
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_secure: bool = True
    models_file: Path | None = None
    auth: Literal["off", "required"] = "off"
    # The operator's credential for /metrics (every tenant's job counts): a bearer token, checked
    # whatever GENQ_AUTH says. With auth required and no token, /metrics is served to nobody.
    metrics_token: SecretStr | None = None
    # Limits (services.state.Limits is built from these).
    max_queued_jobs: int = 1_000_000  # per tenant, queued plus running
    rate_limit_per_minute: int = 0  # create requests per tenant per minute (shared by replicas on Redis); 0: unlimited
    # Synchronous requests (POST /v1/completions, ...) waiting at once per tenant (shared by replicas
    # on Redis); 0: unlimited.
    max_sync_waits_per_tenant: int = 64
    max_batch_lines: int = 50_000
    max_body_bytes: int = 200 * 1024 * 1024  # request bodies and uploaded files
    max_prompt_chars: int = 32_000
    max_adapter_bytes: int = 1024 * 1024 * 1024  # an uploaded LoRA adapter archive, and its unpacked files
    # Outputs: the life of each presigned image URL the API hands out (made afresh on every read).
    presign_seconds: int = PRESIGN_SECONDS
    # Webhooks reach public addresses only, plus these networks (comma-separated CIDRs) for receivers
    # inside the cluster: loopback, private, link-local and the like are refused otherwise.
    webhook_allow_networks: Annotated[tuple[IPvAnyNetwork, ...], NoDecode] = ()

    @field_validator("database_url")
    @classmethod
    def _db(cls, v: str) -> str:
        scheme = urlsplit(v).scheme
        if scheme not in _DB_SCHEMES:
            raise ValueError(f"scheme {scheme!r} is not supported; use sqlite:///PATH or postgresql+psycopg://...")
        return v

    @field_validator("broker_url")
    @classmethod
    def _broker(cls, v: str) -> str:
        scheme = urlsplit(v).scheme
        if scheme not in _BROKER_SCHEMES:
            raise ValueError(f"scheme {scheme!r} is not supported; use redis://HOST:PORT/DB or {EMBEDDED_BROKER_URL}")
        return v

    @field_validator("storage_url")
    @classmethod
    def _storage(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in _STORAGE_SCHEMES:
            raise ValueError(f"scheme {parts.scheme!r} is not supported; use file://DIR or s3://BUCKET[/PREFIX]")
        if parts.scheme == "s3" and not parts.netloc:
            raise ValueError("s3:// needs a bucket name, e.g. s3://genq-outputs")
        if parts.scheme == "file" and not (parts.netloc or parts.path):
            raise ValueError("file:// needs a directory, e.g. file://./var/objects")
        return v

    @field_validator("max_queued_jobs", "max_batch_lines", "max_body_bytes", "max_prompt_chars", "max_adapter_bytes")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be a whole number of at least 1, got {v}")
        return v

    @field_validator("presign_seconds")
    @classmethod
    def _presign(cls, v: int) -> int:
        if not 1 <= v <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"must be from 1 to {MAX_PRESIGN_SECONDS} seconds (7 days, S3's limit), got {v}")
        return v

    @field_validator("rate_limit_per_minute", "max_sync_waits_per_tenant")
    @classmethod
    def _zero_or_positive(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be 0 (unlimited) or a positive whole number, got {v}")
        return v

    @field_validator("metrics_token")
    @classmethod
    def _token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < MIN_TOKEN_CHARS:
            raise ValueError(f"must be at least {MIN_TOKEN_CHARS} characters (make one with `openssl rand -hex 32`)")
        return v

    @field_validator("webhook_allow_networks", mode="before")
    @classmethod
    def _networks(cls, v: Any) -> Any:
        return tuple(n for n in v.replace(",", " ").split()) if isinstance(v, str) else v

    @field_validator("models_file")
    @classmethod
    def _models_file(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"{v} is not a file (write one with `genq models build-tiny`)")
        return v

    def check_s3(self) -> None:
        if urlsplit(self.storage_url).scheme == "s3" and not self.s3_endpoint:
            raise ConfigError("GENQ_S3_ENDPOINT: required when GENQ_STORAGE_URL is s3://")


def build_settings(**overrides: object) -> Settings:
    """Build settings, turning pydantic's report into one line per variable."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"GENQ_{field.upper()}: {msg}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    settings.check_s3()
    return settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return build_settings()
