"""FastAPI dependencies: routes receive sessions, storage and the publisher through these."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from genq.services.auth import hash_key, resolve_key
from genq.services.errors import APIError
from genq.services.guards import check_rate, unauthorized
from genq.services.state import AppState
from genq.shared.kinds import ENDPOINTS
from genq.shared.results import ResultRenderer

# Paths open without a key when GENQ_AUTH=required (probes must work without secrets).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
# Paths for the operator, not for tenants: they take the operator token (require_operator), never a tenant key.
OPERATOR_PATHS = frozenset({"/metrics"})
# The create endpoints: each request counts against its tenant's rate (GENQ_RATE_LIMIT_PER_MINUTE).
RATE_LIMITED = frozenset({"/v1/jobs", "/v1/batches", "/v1/batches/{batch_id}/retry", "/v1/files", "/v1/adapters",
                          "/v1/fine_tuning/jobs", *ENDPOINTS})


async def get_state(request: Request) -> AppState:
    """The app's state. Async, like every dependency of the app-wide `guard`, so that a route that
    needs no thread (/healthz) never waits for one."""
    return request.app.state.genq  # type: ignore[no-any-return]


def get_session(state: Annotated[AppState, Depends(get_state)]) -> Iterator[Session]:
    session = state.sessions()
    try:
        yield session
    finally:
        session.close()


def _bearer(header: str | None) -> str | None:
    scheme, _, token = (header or "").strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def _route_path(request: Request) -> str:
    """The matched route's path template (`/v1/batches/{batch_id}/retry`), whatever the mount point."""
    return getattr(request.scope.get("route"), "path", request.url.path)


def _lookup(state: AppState, key: str) -> str | None:
    with state.sessions() as session:
        return resolve_key(session, key)


async def get_tenant(request: Request, state: Annotated[AppState, Depends(get_state)]) -> str | None:
    """The caller's tenant from `Authorization: Bearer <key>`, or 401. None while GENQ_AUTH is off:
    keys are then ignored and everything belongs to no tenant. Lookups are cached in-process for
    a short while (see KeyCache), so a revoked key stops working within that time."""
    if state.settings.auth != "required" or _route_path(request) in PUBLIC_PATHS | OPERATOR_PATHS:
        return None
    key = _bearer(request.headers.get("authorization"))
    if key is None:
        raise unauthorized("missing API key: send `Authorization: Bearer <key>` (make one with "
                           "`genq keys create --tenant NAME`)")
    key_hash = hash_key(key)
    found, tenant = state.keys.get(key_hash)
    if not found:
        tenant = await run_in_threadpool(_lookup, state, key)
        state.keys.put(key_hash, tenant)
    if tenant is None:
        raise unauthorized("invalid API key: it is unknown or was revoked")
    return tenant


async def require_operator(request: Request, state: Annotated[AppState, Depends(get_state)]) -> None:
    """The gate of the operator's paths: `Authorization: Bearer <GENQ_METRICS_TOKEN>`. Open only
    while auth is off and no token is set (one anonymous tenant: nothing to keep apart)."""
    token = state.settings.metrics_token
    if token is None and state.settings.auth != "required":
        return
    presented = _bearer(request.headers.get("authorization"))
    if presented is None:
        raise unauthorized("missing operator token: send `Authorization: Bearer <GENQ_METRICS_TOKEN>`")
    if token is None or not hmac.compare_digest(presented.encode(), token.get_secret_value().encode()):
        raise APIError(403, "this path shows every tenant's jobs and is served only to the operator token "
                       "(GENQ_METRICS_TOKEN), not to a tenant's API key", code="permission_denied")


async def guard(request: Request, state: Annotated[AppState, Depends(get_state)],
                tenant: Annotated[str | None, Depends(get_tenant)]) -> None:
    """Every route's gate (an app-wide dependency): authenticates through get_tenant, and answers
    429 with Retry-After when a create request takes its tenant over the request rate."""
    per_minute = state.limits.rate_limit_per_minute
    if per_minute and request.method == "POST" and _route_path(request) in RATE_LIMITED:
        await run_in_threadpool(check_rate, state.rate, tenant, per_minute)


async def get_renderer(request: Request, state: Annotated[AppState, Depends(get_state)]) -> ResultRenderer:
    """Fresh image URLs for this request: presigned for GENQ_PRESIGN_SECONDS, or on this API's address."""
    return ResultRenderer(state.storage, str(request.base_url), state.settings.presign_seconds)


StateDep = Annotated[AppState, Depends(get_state)]
SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[str | None, Depends(get_tenant)]
RendererDep = Annotated[ResultRenderer, Depends(get_renderer)]
