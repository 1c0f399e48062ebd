"""Everything the routes use, built once per app: settings, registry, DB, storage, publisher."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from shared.broker import CeleryPublisher, Publisher, make_celery
from shared.config import Settings
from shared.db import session_factory
from shared.registry import Registry, load_registry
from shared.storage import Storage, storage_from_settings


@dataclass(frozen=True)
class Limits:
    max_batch_lines: int = 50_000  # OpenAI's limit per batch
    max_body_bytes: int = 200 * 1024 * 1024  # OpenAI's input file limit
    max_file_bytes: int = 200 * 1024 * 1024
    max_page: int = 1000
    sync_start_timeout_s: float = 30.0  # synchronous endpoints: how long a job may wait for a worker
    sync_timeout_s: float = 600.0  # ... and how long in all before answering 504 with the job id


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    sessions: sessionmaker[Session]
    storage: Storage
    publisher: Publisher
    limits: Limits = field(default_factory=Limits)


def build_state(settings: Settings, limits: Limits | None = None) -> AppState:
    return AppState(
        settings=settings,
        registry=load_registry(settings.models_file),
        sessions=session_factory(settings.database_url),
        storage=storage_from_settings(settings),
        publisher=CeleryPublisher(make_celery(settings)),
        limits=limits or Limits(),
    )
