"""503 when the results database cannot be reached, in the OpenAI error shape.

Every request records or reads state in the database, so while it is down the API answers
503 `database_unavailable` (with Retry-After) instead of a bare 500; a broker outage does not
get here: submissions are recorded and published later (shared/outbox.py)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError

from genq.services.errors import APIError
from genq.shared.db import is_unavailable
from genq.shared.errors import ErrorCode

log = logging.getLogger("genq.api")
RETRY_AFTER_S = 5


def install_db_error_handler(app: FastAPI) -> None:
    @app.exception_handler(DBAPIError)
    async def _db_error(_req: Request, exc: DBAPIError) -> JSONResponse:
        if not is_unavailable(exc):
            log.exception("database error", exc_info=exc)
            return APIError(None, "internal error", code=ErrorCode.INTERNAL_ERROR).response()
        log.warning("database unavailable: %s", type(exc.orig).__name__)
        return APIError(None, "the database is unavailable; retry shortly", code=ErrorCode.DATABASE_UNAVAILABLE,
                        headers={"Retry-After": str(RETRY_AFTER_S)}).response()
