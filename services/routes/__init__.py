"""The API's routes, one module per resource; `ROUTERS` in the order the app includes them."""

from __future__ import annotations

from fastapi import APIRouter

from genq.services.routes import adapters, batches, events, files, fine_tuning, jobs, sync, system, webhooks

ROUTERS: tuple[APIRouter, ...] = tuple(m.router for m in (jobs, batches, events, files, fine_tuning, adapters, sync,
                                                          webhooks, system))
