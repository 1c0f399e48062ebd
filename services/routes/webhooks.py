"""Webhooks: the tenant's signing secret, and recent deliveries with their attempts (debugging)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from genq.services.body import refuse_nul_params
from genq.services.deps import SessionDep, TenantDep
from genq.services.webhooks import public_error, tenant_secret
from genq.shared.db import WebhookAttempt, WebhookDelivery, owned_by

router = APIRouter(tags=["webhooks"], dependencies=[Depends(refuse_nul_params)])


@router.get("/v1/webhooks/secret")
def get_secret(session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """The secret that signs this tenant's webhooks (Standard Webhooks, `whsec_...`)."""
    secret = tenant_secret(session, tenant)
    session.commit()
    return {"object": "webhook_secret", "secret": secret}


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


def _delivery(d: WebhookDelivery, attempts: list[WebhookAttempt]) -> dict[str, Any]:
    return {
        "id": d.id, "object": "webhook_delivery", "type": d.event, "object_id": d.object_id, "url": d.url,
        "status": d.status, "attempts": d.attempts, "created_at": _ts(d.created_at),
        "next_attempt_at": _ts(d.next_attempt_at) if d.status == "pending" else None,
        "delivered_at": _ts(d.delivered_at), "last_error": public_error(d.last_error), "payload": d.payload,
        "attempt_log": [{"attempt": a.attempt, "at": _ts(a.at), "status_code": a.status_code,
                         "error": public_error(a.error), "duration_ms": round(a.duration_s * 1000, 1)}
                        for a in attempts],
    }


@router.get("/v1/webhooks/deliveries")
def list_deliveries(session: SessionDep, tenant: TenantDep, object_id: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    """This tenant's deliveries, newest first, optionally for one job or batch."""
    q = select(WebhookDelivery).where(
        owned_by(WebhookDelivery.tenant, tenant))
    if object_id:
        q = q.where(WebhookDelivery.object_id == object_id)
    rows = session.execute(q.order_by(WebhookDelivery.id.desc()).limit(limit + 1)).scalars().all()
    page = rows[:limit]
    by_delivery: dict[str, list[WebhookAttempt]] = {d.id: [] for d in page}
    if page:
        attempts = session.execute(select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(by_delivery))
                                   .order_by(WebhookAttempt.id)).scalars()
        for a in attempts:
            by_delivery[a.delivery_id].append(a)
    return {"object": "list", "data": [_delivery(d, by_delivery[d.id]) for d in page],
            "has_more": len(rows) > limit}
