"""FastAPI dependencies: routes receive sessions, storage and the publisher through these."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from services.state import AppState
from shared.results import ResultRenderer


def get_state(request: Request) -> AppState:
    return request.app.state.genq  # type: ignore[no-any-return]


def get_session(state: Annotated[AppState, Depends(get_state)]) -> Iterator[Session]:
    session = state.sessions()
    try:
        yield session
    finally:
        session.close()


def get_tenant() -> str | None:
    """The caller's tenant; None while auth is off (keys and tenants arrive with auth)."""
    return None


def get_renderer(request: Request, state: Annotated[AppState, Depends(get_state)]) -> ResultRenderer:
    return ResultRenderer(state.storage, str(request.base_url))


StateDep = Annotated[AppState, Depends(get_state)]
SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[str | None, Depends(get_tenant)]
RendererDep = Annotated[ResultRenderer, Depends(get_renderer)]
