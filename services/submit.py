"""The two steps every submission path shares once its jobs are recorded: admission (quotas) and
publishing to the broker."""

from __future__ import annotations

from sqlalchemy.orm import Session

from services.state import AppState
from shared.broker import Publish


def admit(state: AppState, session: Session, tenant: str | None, jobs: int) -> None:
    """Raise an APIError (429) if this tenant may not queue `jobs` more jobs now."""


def publish(state: AppState, items: list[Publish]) -> None:
    """Hand committed jobs to the broker."""
    state.publisher.publish(items)
