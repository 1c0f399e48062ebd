"""503 when object storage cannot be reached, in the OpenAI error shape.

Reading a file's content, an upload, an image returned inline: while storage is unreachable,
slow, failing or without its bucket the API answers 503 `storage_unavailable` with Retry-After.
The message names no host, bucket or key; the error with those goes to the API's log."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from genq.services.db_errors import RETRY_AFTER_S
from genq.services.errors import APIError
from genq.shared.errors import ErrorCode
from genq.shared.storage import StorageError, StorageUnavailable

log = logging.getLogger("genq.api")


def install_storage_error_handler(app: FastAPI) -> None:
    @app.exception_handler(StorageError)
    async def _storage_error(req: Request, exc: StorageError) -> JSONResponse:
        if not isinstance(exc, StorageUnavailable):
            log.error("storage error on %s %s", req.method, req.url.path, exc_info=exc)
            return APIError(None, "internal error", code=ErrorCode.INTERNAL_ERROR).response()
        log.warning("storage unavailable on %s %s: %r", req.method, req.url.path, exc.__cause__ or exc)
        return APIError(None, "object storage is unavailable; retry shortly", code=ErrorCode.STORAGE_UNAVAILABLE,
                        headers={"Retry-After": str(RETRY_AFTER_S)}).response()
