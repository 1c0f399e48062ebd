"""Models, health, readiness and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from genq.services.deps import StateDep

router = APIRouter(tags=["system"])


@router.get("/v1/models")
def list_models(state: StateDep) -> dict[str, Any]:
    """The registry in OpenAI's list shape, with each model's kind and queue."""
    data = [{"id": s.name, "object": "model", "created": 0, "owned_by": "genq", "kind": s.kind,
             "queue": s.queue, "max_batch_size": s.options.max_batch_size} for s in state.registry.models.values()]
    return {"object": "list", "data": data}


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "A dependency does not answer; `checks` says which"}})
def readyz(state: StateDep) -> JSONResponse:
    """Ready when the database, the broker and storage all answer."""
    checks: dict[str, str] = {}

    def check(name: str, fn: Any) -> None:
        try:
            fn()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - report any failure as not ready
            checks[name] = f"error: {type(exc).__name__}: {exc}"[:300]

    def db() -> None:
        with state.sessions() as s:
            s.execute(text("SELECT 1"))

    check("database", db)
    check("broker", state.publisher.ping)
    check("storage", state.storage.ping)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                        status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus metrics", "content": {"text/plain": {}}}})
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
