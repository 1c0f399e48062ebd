"""Errors in the OpenAI shape: {"error": {"type", "code", "message", "param"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from genq.shared.errors import ErrorCode, error_object, http_status
from genq.shared.storage import MissingObject

log = logging.getLogger("genq.api")


class APIError(Exception):
    """The one error the API answers with: an HTTP status, a code from the catalogue
    (genq.shared.errors; an unknown code fails where it is raised), the field at fault, extra
    fields of the error object, and response headers (`Retry-After`, `WWW-Authenticate`)."""

    def __init__(self, status: int | None, message: str, *, code: ErrorCode | str, param: str | None = None,
                 extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.status = status if status is not None else http_status(self.code)
        self.message, self.param, self.extra, self.headers = message, param, extra, headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.status, self.message, self.code, self.param, **(self.extra or {})),
                            status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, code: ErrorCode | str | None = None, param: str | None = None,
               **extra: Any) -> dict[str, Any]:
    return {"error": error_object(status, message, code, param, **extra)}


def not_found(kind: str, ident: str) -> APIError:
    return APIError(404, f"no {kind} with id {ident!r}", code="not_found", param="id")


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "title": "Error", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["type", "code", "message", "param"],
        "properties": {
            "type": {"type": "string"}, "code": {"type": ["string", "null"]}, "message": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "line": {"type": ["integer", "null"], "description": "The 1-based line of a batch at fault."},
            "errors": {"type": "array", "items": {"type": "object"},
                       "description": "Every problem found (up to 100), each with line, param, code, message."},
        }}},
}


def error_response(description: str) -> dict[str, Any]:
    """An OpenAPI response in the error shape, for a route's `responses=`."""
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def document_errors(app: FastAPI) -> None:
    """Document the error shape in the OpenAPI document: any operation may answer 4XX with it, and
    FastAPI's 422 (which genq answers as 400, see below) is dropped."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas["Error"] = ERROR_SCHEMA
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    responses = op.setdefault("responses", {})
                    responses.pop("422", None)
                    responses.setdefault("4XX", error_response("A bad request, in OpenAI's error shape"))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_handlers(app: FastAPI) -> None:
    document_errors(app)

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        return JSONResponse(error_body(400, f"{param + ': ' if param else ''}{first['msg']}",
                                       "invalid_request", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = ErrorCode.NOT_FOUND if exc.status_code == 404 else ErrorCode.HTTP_ERROR
        return JSONResponse(error_body(exc.status_code, str(exc.detail), code), status_code=exc.status_code)

    @app.exception_handler(MissingObject)
    async def _missing(_req: Request, exc: MissingObject) -> JSONResponse:
        # A row names an object that storage no longer holds (removed by hand, lost in an outage).
        log.warning("stored object %s is missing", exc.args[0] if exc.args else "?")
        return JSONResponse(error_body(404, "the stored object behind this resource is missing from storage",
                                       "object_not_found"), status_code=404)

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(500, "internal error", "internal_error"), status_code=500)
