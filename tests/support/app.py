"""The in-process API the fast tests use: SQLite, file storage and an in-memory broker under one
directory, through the real `create_app`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from genq.services.app import create_app
from genq.services.state import Limits
from genq.shared.config import build_settings


def api_client(directory: Path, *, limits: dict[str, Any] | None = None, migrate: bool = True,
               maintenance: bool = False, **settings: Any) -> TestClient:
    """A TestClient of a genq API keeping its state under `directory`; `settings` override the
    GENQ_ settings (`broker_url`, `auth`, `database_url`, ...) and `limits` the API's Limits."""
    values = {"database_url": f"sqlite:///{directory}/g.db", "broker_url": "memory://",
              "storage_url": f"file://{directory}/obj", **settings}
    app = create_app(build_settings(**values), limits=Limits(**(limits or {})), migrate=migrate,
                     maintenance=maintenance)
    return TestClient(app)
