"""Fine-tuned models on the API side. A succeeded fine-tuning job's training worker registers its
LoRA adapter as an uploaded adapter of the job's tenant, named by the job's `fine_tuned_model`
(`ft:<base>:<suffix or genq>:<job id>`). Requests naming that model run on the base model with the
adapter (genq.services.validation); /v1/models lists, reads and deletes the tenant's fine-tuned
models beside the registry's. The adapter row is the model: deleting it through /v1/models or
/v1/adapters is the same act.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from genq.services import adapters as adapters_data
from genq.shared.db import Adapter, owned_by
from genq.shared.fine_tuning_jobs import FINE_TUNED_PREFIX, is_fine_tuned
from genq.shared.registry import Registry
from genq.shared.storage import Storage
from genq.shared.views import fine_tuned_model_object


def unknown_model(model: str) -> str:
    """What a request naming no model it may use is told (code `model_not_found`, param model):
    another tenant's fine-tuned model is as unknown as one that never existed."""
    if is_fine_tuned(model):
        return f"model {model!r} is not in the registry or among your fine-tuned models"
    return f"model {model!r} is not in the registry"


def find(session: Session, *, tenant: str | None, model: str) -> Adapter | None:
    """The tenant's fine-tuned model `model` (its adapter row), or None."""
    return adapters_data.find(session, tenant=tenant, name=model) if is_fine_tuned(model) else None


def list_rows(session: Session, *, tenant: str | None) -> list[Adapter]:
    """The tenant's fine-tuned models, oldest first."""
    q = select(Adapter).where(owned_by(Adapter.tenant, tenant), Adapter.name.startswith(FINE_TUNED_PREFIX))
    return list(session.execute(q.order_by(Adapter.id)).scalars())


def model_object(registry: Registry, row: Adapter) -> dict[str, Any] | None:
    """The model object of a fine-tuned model, or None while its base model is not in the registry
    (a request could not run it; it can still be deleted)."""
    base = registry.get(row.base_model)
    return None if base is None else fine_tuned_model_object(row, base)


def listed(session: Session, registry: Registry, *, tenant: str | None) -> list[dict[str, Any]]:
    """The model objects of the tenant's fine-tuned models that can run now."""
    return [obj for row in list_rows(session, tenant=tenant) if (obj := model_object(registry, row)) is not None]


def delete(session: Session, storage: Storage, row: Adapter) -> dict[str, Any]:
    """Delete a fine-tuned model (its adapter row and files); OpenAI's answer. Jobs already queued
    with it fail when a worker takes them, saying the adapter no longer exists."""
    adapters_data.delete(session, storage, row)
    return {"id": row.name, "object": "model", "deleted": True}
