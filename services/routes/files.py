"""The OpenAI Files API (purposes `batch` and `fine-tune` for uploads, `batch_output` for genq's results)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from genq.services.body import NUL_MESSAGE, has_nul, refuse_nul_params
from genq.services.deps import RendererDep, SessionDep, StateDep, TenantDep
from genq.services.errors import APIError
from genq.services.fine_tuning import FINE_TUNE_PURPOSE, file_errors
from genq.services.objects import Deleted, FileObject, Page
from genq.services.output_files import render_output_file
from genq.services.resources import Once, create_once, cursor_page, get_owned
from genq.services.state import AppState
from genq.services.upload_cap import Cap
from genq.shared.db import File as FileRow
from genq.shared.db import new_id, owned_by
from genq.shared.fine_tuning import parse_training_file
from genq.shared.views import file_object

router = APIRouter(prefix="/v1/files", tags=["files"], dependencies=[Depends(refuse_nul_params)])
UPLOAD_PURPOSES = ("batch", FINE_TUNE_PURPOSE)
Purpose = Annotated[str, Form(json_schema_extra={"enum": list(UPLOAD_PURPOSES)})]  # checked in the route
CHUNK = 1024 * 1024


def load_file(session: SessionDep, file_id: str, tenant: str | None) -> FileRow:
    return get_owned(session, FileRow, file_id, tenant, "file")


def _too_large(limit: int) -> APIError:
    return APIError(413, f"file is over the limit of {limit} bytes", code="file_too_large", param="file")


def upload_cap(state: AppState) -> Cap:
    """What UploadCap lets in for an upload: the body is refused while it arrives."""
    return Cap(state.limits.max_file_bytes, _too_large(state.limits.max_file_bytes))


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await upload.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("", response_model=FileObject)
async def upload_file(request: Request, state: StateDep, session: SessionDep, tenant: TenantDep,
                      file: Annotated[UploadFile, File()],
                      purpose: Purpose) -> dict[str, Any]:
    """Store an uploaded JSONL file; batches name it by `input_file_id`, fine-tuning jobs by
    `training_file` (a body over the limit is refused while it arrives, by UploadCap). Training
    data is checked line by line here, so a bad line is refused before any job names the file."""
    if purpose not in UPLOAD_PURPOSES:
        raise APIError(400, f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}", code="invalid_request",
                       param="purpose")
    if has_nul(file.filename):
        raise APIError(400, f"file: the filename {NUL_MESSAGE}", code="invalid_request", param="file")
    data = await _read_limited(file, state.limits.max_file_bytes)

    def store(once: Once) -> dict[str, Any]:
        if purpose == FINE_TUNE_PURPOSE and (errors := parse_training_file(data)[1]):
            raise file_errors("file", [e.as_dict() for e in errors])
        file_id = new_id("file")
        storage_key = f"files/{file_id}.jsonl"
        state.storage.put(storage_key, data, "application/jsonl")
        row = FileRow(id=file_id, tenant=tenant, purpose=purpose, filename=(file.filename or "upload.jsonl")[:512],
                      bytes=len(data), key=storage_key, created_at=time.time())
        session.add(row)
        once.remember(file_id)
        try:
            session.commit()
        except IntegrityError:  # the same key raced us: the winner's file is the answer
            state.storage.delete(storage_key)
            raise
        return file_object(row)

    content = [purpose.encode(), b"\0", (file.filename or "").encode(), b"\0", data]
    return await create_once(request, session, tenant, "file", content, store,
                             lambda file_id: file_object(load_file(session, file_id, tenant)))


@router.get("", response_model=Page[FileObject])
def list_files(session: SessionDep, tenant: TenantDep, purpose: str | None = None, limit: int = 100,
               after: str | None = None) -> dict[str, Any]:
    q = select(FileRow).where(owned_by(FileRow.tenant, tenant))
    if purpose:
        q = q.where(FileRow.purpose == purpose)
    return cursor_page(session, q, FileRow.id, after=after, limit=max(1, min(limit, 10_000)), view=file_object)


@router.get("/{file_id}", response_model=FileObject)
def get_file(file_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return file_object(load_file(session, file_id, tenant))


@router.get("/{file_id}/content", response_class=Response,
            responses={200: {"description": "The file's bytes", "content": {"application/jsonl": {}}}})
def file_content(file_id: str, state: StateDep, session: SessionDep, tenant: TenantDep,
                 renderer: RendererDep) -> Response:
    """The file's bytes; a batch output file's image URLs are made afresh on each read."""
    row = load_file(session, file_id, tenant)
    data = render_output_file(session, renderer, row, state.storage.get(row.key))
    return Response(data, media_type="application/jsonl")


@router.delete("/{file_id}", response_model=Deleted)
def delete_file(file_id: str, state: StateDep, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    row = load_file(session, file_id, tenant)
    # The bytes first: with storage down this answers 503 and the file is still there to delete again.
    state.storage.delete(row.key)
    session.delete(row)
    session.commit()
    return {"id": file_id, "object": "file", "deleted": True}
