"""Models, health, readiness and metrics."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from genq.services import fine_tuned
from genq.services.body import refuse_nul_params
from genq.services.deps import SessionDep, StateDep, TenantDep, require_operator
from genq.services.errors import APIError, error_response
from genq.services.objects import Deleted, ModelList, ModelObject
from genq.shared.errors import ErrorCode
from genq.shared.views import model_object

router = APIRouter(tags=["system"])
log = logging.getLogger("genq.api")


@router.get("/v1/models", response_model=ModelList)
def list_models(state: StateDep, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """The registry in OpenAI's list shape, with each model's kind and queue, then the caller's
    fine-tuned models (oldest first)."""
    data = [model_object(s) for s in state.registry.models.values()]
    return {"object": "list", "data": data + fine_tuned.listed(session, state.registry, tenant=tenant)}


def _unknown(model: str) -> APIError:
    return APIError(None, fine_tuned.unknown_model(model), code=ErrorCode.MODEL_NOT_FOUND, param="model")


@router.get("/v1/models/{model}", response_model=ModelObject, dependencies=[Depends(refuse_nul_params)])
def get_model(model: str, state: StateDep, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """One registered model or fine-tuned model of the caller's, as OpenAI's `client.models.retrieve` reads it."""
    spec = state.registry.get(model)
    if spec is not None:
        return model_object(spec)
    row = fine_tuned.find(session, tenant=tenant, model=model)
    obj = None if row is None else fine_tuned.model_object(state.registry, row)
    if obj is None:
        raise _unknown(model)
    return obj


@router.delete("/v1/models/{model}", response_model=Deleted, dependencies=[Depends(refuse_nul_params)],
               responses={403: error_response("A registry model (code `permission_denied`): only fine-tuned "
                                              "models can be deleted")})
def delete_model(model: str, state: StateDep, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """Delete one of the caller's fine-tuned models: its adapter and files (as DELETE /v1/adapters/{id}
    does). Registry models are the operator's."""
    if state.registry.get(model) is not None:
        raise APIError(403, f"model {model!r} comes from the model registry (GENQ_MODELS_FILE) and cannot be "
                       "deleted through the API; only fine-tuned models (ft:...) can", code="permission_denied",
                       param="model")
    row = fine_tuned.find(session, tenant=tenant, model=model)
    if row is None:
        raise _unknown(model)
    return fine_tuned.delete(session, state.storage, row)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: answered on the event loop, so it never waits behind requests that hold threads."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "A dependency does not answer; `checks` says which"}})
def readyz(state: StateDep) -> JSONResponse:
    """Ready when the database, the broker and storage all answer, each asked afresh on every
    call. Anyone may ask, so a failing check says only `error: unavailable`; the log has the rest."""
    checks: dict[str, str] = {}

    def check(name: str, fn: Any) -> None:
        try:
            fn()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - report any failure as not ready
            log.warning("readiness: %s unavailable: %r", name, exc.__cause__ or exc)
            checks[name] = "error: unavailable"

    def db() -> None:
        with state.sessions() as s:
            s.execute(text("SELECT 1"))

    check("database", db)
    check("broker", state.publisher.ping)
    check("storage", state.storage.ping)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                        status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response, dependencies=[Depends(require_operator)],
            responses={200: {"description": "Prometheus metrics", "content": {"text/plain": {}}},
                       403: error_response("A tenant's key (code `permission_denied`): metrics are the operator's")})
def metrics(request: Request) -> Response:
    """Prometheus metrics of every model and worker: for the operator token (GENQ_METRICS_TOKEN)."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
