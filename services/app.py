"""The genq HTTP API: `create_app()` builds it from settings; `genq api` serves it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from genq.services.db_errors import install_db_error_handler
from genq.services.deps import guard
from genq.services.errors import install_handlers
from genq.services.maintenance import Maintenance
from genq.services.metrics import Metrics
from genq.services.routes import ROUTERS, adapters, files
from genq.services.state import AppState, Limits, build_state
from genq.services.storage_errors import install_storage_error_handler
from genq.services.upload_cap import UploadCap
from genq.services.webhooks import Dispatcher
from genq.shared.config import Settings, get_settings
from genq.shared.migrate import upgrade

log = logging.getLogger("genq.api")


def create_app(settings: Settings | None = None, *, state: AppState | None = None,
               limits: Limits | None = None, migrate: bool = True, maintenance: bool = True) -> FastAPI:
    settings = settings or (state.settings if state else get_settings())
    state = state or build_state(settings, limits)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            upgrade(settings.database_url)
        log.info("genq api ready: %d models, database %s", len(state.registry.models),
                 settings.database_url.split("@")[-1])
        # Webhooks go out from the API processes, so a slow receiver never holds up a GPU worker.
        dispatcher = Dispatcher(state.sessions, policy=state.webhook_policy) if maintenance else None
        upkeep = Maintenance(state) if maintenance else None
        for service in (dispatcher, upkeep):
            if service:
                service.start()
        try:
            yield
        finally:
            for service in (upkeep, dispatcher):
                if service:
                    service.stop()

    # On every route: with GENQ_AUTH=required each one but /healthz and /readyz needs a key.
    # With auth required, only the probes answer without a key, the API's own documents included.
    docs: dict[str, Any] = {"openapi_url": None, "docs_url": None, "redoc_url": None} \
        if settings.auth == "required" else {}
    app = FastAPI(title="genq", version="0.1.0", lifespan=lifespan, dependencies=[Depends(guard)],
                  description="A distributed job queue for generative models.", **docs)
    app.state.genq = state
    app.state.metrics = Metrics(state.sessions)
    install_handlers(app)
    install_db_error_handler(app)
    install_storage_error_handler(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(UploadCap, state=state,
                       caps={"/v1/files": files.upload_cap, "/v1/adapters": adapters.upload_cap})
    return app


def create_replica() -> FastAPI:
    """The app of one of `genq api --workers N`'s processes: settings from the environment, the
    migrations already applied by the parent (N processes migrating at once would race)."""
    return create_app(get_settings(), migrate=False)
