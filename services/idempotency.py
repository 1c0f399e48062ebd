"""`Idempotency-Key` for the create endpoints: a repeat with the same key and the same request
returns the original object and creates nothing; the same key with a different request is a 409."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable

from fastapi import Request
from sqlalchemy.orm import Session

from genq.services.errors import APIError
from genq.shared.db import IdempotencyKey, tenant_key

HEADER = "idempotency-key"


def request_key(request: Request) -> str | None:
    key = request.headers.get(HEADER)
    if key is not None and not 1 <= len(key) <= 255:
        raise APIError(400, "Idempotency-Key must be 1 to 255 characters", code="invalid_request",
                       param="Idempotency-Key")
    return key


def fingerprint(request: Request, body: Iterable[bytes]) -> str:
    """What makes two requests the same: method, path, media type and the body's chunks in order."""
    digest = hashlib.sha256(f"{request.method} {request.url.path}\n".encode())
    digest.update(request.headers.get("content-type", "").split(";")[0].encode() + b"\n")
    for chunk in body:
        digest.update(chunk)
    return digest.hexdigest()


def replayed(session: Session, tenant: str | None, key: str | None, fp: str, object_type: str) -> str | None:
    """The id of the object an earlier request with this key created, if any."""
    if key is None:
        return None
    row = session.get(IdempotencyKey, (tenant_key(tenant), key))
    if row is None:
        return None
    if row.request_hash != fp or row.object_type != object_type:
        raise APIError(409, f"Idempotency-Key {key!r} was already used with a different request",
                       code="idempotency_key_reused", param="Idempotency-Key")
    return row.object_id


def race_winner(session: Session, tenant: str | None, key: str | None, fp: str, object_type: str,
                exc: Exception) -> str:
    """After `remember` lost a race to a concurrent request with the same key (the insert raised
    `exc`): the id of the object that request created."""
    session.rollback()
    prior = replayed(session, tenant, key, fp, object_type)
    if prior is None:
        raise exc
    return prior


def remember(session: Session, tenant: str | None, key: str | None, fp: str, object_type: str,
             object_id: str) -> None:
    """Record the key in the same transaction that creates the object."""
    if key is not None:
        session.add(IdempotencyKey(tenant=tenant_key(tenant), key=key, request_hash=fp, object_type=object_type,
                                   object_id=object_id, created_at=time.time()))
