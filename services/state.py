"""Everything the routes use, built once per app: settings, registry, DB, storage, publisher."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from genq.services.auth import KeyCache
from genq.services.egress import AddressPolicy
from genq.services.guards import RequestRate
from genq.services.sync_waits import SyncWaits
from genq.shared.broker import CeleryPublisher, Publisher, make_celery
from genq.shared.config import Settings
from genq.shared.db import session_factory
from genq.shared.registry import Registry, load_registry
from genq.shared.storage import Storage, storage_from_settings


def _default(name: str) -> Any:
    """A limit's default is its setting's (genq.shared.config.Settings), written there once."""
    return Settings.model_fields[name].default


@dataclass(frozen=True)
class Limits:
    """The API's limits: the GENQ_ settings' values (see Settings), plus the synchronous endpoints'
    waits, which have no setting."""

    max_batch_lines: int = _default("max_batch_lines")
    max_body_bytes: int = _default("max_body_bytes")
    max_file_bytes: int = _default("max_body_bytes")
    max_queued_jobs: int = _default("max_queued_jobs")
    rate_limit_per_minute: int = _default("rate_limit_per_minute")
    max_prompt_chars: int = _default("max_prompt_chars")
    max_sync_waits_per_tenant: int = _default("max_sync_waits_per_tenant")
    sync_start_timeout_s: float = 30.0  # synchronous endpoints: how long a job may wait for a worker
    sync_timeout_s: float = 600.0  # ... and how long in all before answering 504 with the job id

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(max_batch_lines=settings.max_batch_lines, max_body_bytes=settings.max_body_bytes,
                   max_file_bytes=settings.max_body_bytes, max_queued_jobs=settings.max_queued_jobs,
                   rate_limit_per_minute=settings.rate_limit_per_minute,
                   max_prompt_chars=settings.max_prompt_chars,
                   max_sync_waits_per_tenant=settings.max_sync_waits_per_tenant)


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    sessions: sessionmaker[Session]
    storage: Storage
    publisher: Publisher
    limits: Limits = field(default_factory=Limits)
    keys: KeyCache = field(default_factory=KeyCache)  # recent API key lookups
    rate: RequestRate = field(default_factory=RequestRate)  # request rate per tenant (in memory)
    sync_waits: SyncWaits = field(default_factory=SyncWaits)  # waiting synchronous requests (in memory)

    @property
    def webhook_policy(self) -> AddressPolicy:
        """The addresses webhooks may reach (GENQ_WEBHOOK_ALLOW_NETWORKS), at submit and at delivery."""
        return AddressPolicy(allow=self.settings.webhook_allow_networks)


def build_state(settings: Settings, limits: Limits | None = None) -> AppState:
    return AppState(
        settings=settings,
        registry=load_registry(settings.models_file),
        sessions=session_factory(settings.database_url),
        storage=storage_from_settings(settings),
        publisher=CeleryPublisher(make_celery(settings)),
        limits=limits or Limits.from_settings(settings),
        rate=RequestRate.for_broker(settings.broker_url),  # Redis, shared by the replicas, if the broker is
        sync_waits=SyncWaits.for_broker(settings.broker_url),  # likewise
    )
