"""LoRA adapters: upload (an archive of a peft or diffusers adapter directory), list, read, delete.

Uploads belong to the caller's tenant; registry adapters (`[adapters.<name>]` in the registry file)
are listed for everyone, with their name as id, and cannot be deleted here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from genq.services import adapters as adapters_data
from genq.services.adapter_archive import check_archive
from genq.services.adapters import AdapterError, AdapterTooLarge
from genq.services.body import refuse_nul_params
from genq.services.deps import SessionDep, StateDep, TenantDep
from genq.services.errors import APIError, not_found
from genq.services.objects import AdapterObject, Deleted, Page
from genq.services.resources import Once, create_once
from genq.services.state import AppState
from genq.services.upload_cap import Cap
from genq.shared.kinds import ADAPTER_KINDS

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], dependencies=[Depends(refuse_nul_params)])


def _too_large(limit: int) -> APIError:
    return APIError(413, f"file: the adapter archive is over the limit of {limit} bytes (GENQ_MAX_ADAPTER_BYTES)",
                    code="file_too_large", param="file")


def upload_cap(state: AppState) -> Cap:
    """What UploadCap lets in for an upload: the body is refused while it arrives."""
    return Cap(state.settings.max_adapter_bytes, _too_large(state.settings.max_adapter_bytes))


def _exists(name: str, where: str) -> APIError:
    return APIError(409, f"name: an adapter named {name!r} already exists {where}; delete it first or choose "
                    "another name", code="adapter_exists", param="name")


@router.post("", response_model=AdapterObject)
async def create_adapter(request: Request, state: StateDep, session: SessionDep, tenant: TenantDep,
                         file: Annotated[UploadFile, File(description="zip, tar or tar.gz of the adapter directory")],
                         name: Annotated[str, Form(max_length=64)],
                         model: Annotated[str, Form(max_length=200)]) -> dict[str, Any]:
    """Register a LoRA adapter for `model` from an archive holding adapter_config.json and one
    .safetensors weights file (nothing else; pickle-based weights are refused)."""
    limit = state.settings.max_adapter_bytes  # the body was capped while it arrived (UploadCap)
    if (file.size or 0) > limit:
        raise _too_large(limit)
    if (why := adapters_data.check_name(name)) is not None:
        raise APIError(400, f"name: {why}", code="invalid_request", param="name")
    spec = state.registry.get(model)
    if spec is None:
        raise APIError(400, f"model: {model!r} is not in the registry", code="model_not_found", param="model")
    if spec.kind not in ADAPTER_KINDS:
        raise APIError(400, f"model: {model!r} is a {spec.kind} model, which does not serve adapters "
                       f"(only {' and '.join(ADAPTER_KINDS)} models do)", code="invalid_request", param="model")
    if name in state.registry.adapters:
        raise _exists(name, "in the model registry")

    def create(once: Once) -> dict[str, Any]:
        try:
            checked = check_archive(file.file, model=spec, max_bytes=limit)
        except AdapterTooLarge:
            raise _too_large(limit) from None
        except AdapterError as exc:
            raise APIError(400, f"file: {exc.message}", code=exc.code, param="file") from None
        with checked:
            if adapters_data.find(session, tenant=tenant, name=name) is not None:
                raise _exists(name, "for this tenant")
            row = adapters_data.create(session, state.storage, tenant=tenant, name=name, model=spec,
                                       checked=checked, remember=once.remember)
        if row is None:
            raise _exists(name, "for this tenant")
        return adapters_data.adapter_object(row)

    def replay(adapter_id: str) -> dict[str, Any]:
        row = adapters_data.get(session, tenant=tenant, adapter_id=adapter_id)
        if row is None:  # deleted since: the key's object is gone
            raise not_found("adapter", adapter_id)
        return adapters_data.adapter_object(row)

    def content() -> Iterator[bytes]:
        yield from (name.encode(), b"\0", model.encode(), b"\0")
        file.file.seek(0)
        while chunk := file.file.read(1 << 20):
            yield chunk
        file.file.seek(0)  # check_archive reads it again

    return await create_once(request, session, tenant, "adapter", content(), create, replay)


@router.get("", response_model=Page[AdapterObject])
def list_adapters(state: StateDep, session: SessionDep, tenant: TenantDep, model: str | None = None) -> dict[str, Any]:
    """The caller's uploads (oldest first), then the registry's adapters; `model` filters by base model."""
    data = [adapters_data.adapter_object(r) for r in adapters_data.list_uploaded(session, tenant=tenant, model=model)]
    data += [adapters_data.registry_adapter_object(state.registry, n) for n, spec in state.registry.adapters.items()
             if model is None or spec.model == model]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": False}


@router.get("/{adapter_id}", response_model=AdapterObject)
def get_adapter(adapter_id: str, state: StateDep, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    row = adapters_data.get(session, tenant=tenant, adapter_id=adapter_id)
    if row is not None:
        return adapters_data.adapter_object(row)
    if adapter_id in state.registry.adapters:
        return adapters_data.registry_adapter_object(state.registry, adapter_id)
    raise not_found("adapter", adapter_id)


@router.delete("/{adapter_id}", response_model=Deleted)
def delete_adapter(adapter_id: str, state: StateDep, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """Delete an uploaded adapter and its files (a fine-tuned model's adapter too, which deletes
    that model, as DELETE /v1/models/{model} does). Jobs already queued with it fail when they run."""
    row = adapters_data.get(session, tenant=tenant, adapter_id=adapter_id)
    if row is None:
        if adapter_id in state.registry.adapters:
            raise APIError(400, f"adapter {adapter_id!r} comes from the model registry (GENQ_MODELS_FILE) and "
                           "cannot be deleted through the API", code="registry_adapter", param="id")
        raise not_found("adapter", adapter_id)
    adapters_data.delete(session, state.storage, row)
    return {"id": adapter_id, "object": "adapter", "deleted": True}
