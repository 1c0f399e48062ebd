"""Reading request bodies with a size cap, parsing them into numbered request lines, refusing NUL
characters in path and query parameters, and documenting the bodies in the OpenAPI document."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from pydantic import BaseModel

from genq.services.errors import APIError
from genq.shared.jsonl import BOM, LineError, parse_json_line
from genq.shared.kinds import ENDPOINTS
from genq.shared.requests import RequestLine

NUL_MESSAGE = "must not contain NUL (\\u0000) characters"


def has_nul(value: object) -> bool:
    return isinstance(value, str) and "\x00" in value


async def refuse_nul_params(request: Request) -> None:
    """A router dependency: 400 naming the parameter if a path or query parameter holds a NUL
    character. No genq id, name or cursor has one, and PostgreSQL text cannot hold one. Async: a
    check this cheap should not cost each read a trip through the thread pool."""
    for name, value in [*request.path_params.items(), *request.query_params.multi_items()]:
        if has_nul(value):
            raise APIError(400, f"{name}: {NUL_MESSAGE}", code="invalid_request", param=name)


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body is {declared} bytes; the limit is {max_bytes}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body is over the limit of {max_bytes} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_body(raw: bytes, prefix: str = "") -> Any:
    """The body as JSON, or a 400 `invalid_json` naming the field at fault where there is one
    (under `prefix`, for endpoints whose body is what a request line holds under `body`). A
    leading byte order mark is ignored."""
    obj, err = parse_json_line(raw.removeprefix(BOM), 1)
    if err is None:
        return obj
    param = ".".join(p for p in (prefix, err.param) if p) if err.param else None
    if param:
        raise APIError(400, f"{param}: {err.message}", code="invalid_json", param=param)
    joint = " is " if err.message.startswith(("not ", "JSON ")) else ": "
    raise APIError(400, f"request body{joint}{err.message}", code="invalid_json")


def batch_error(errors: list[LineError]) -> APIError:
    first = errors[0]
    more = len(errors) - 1
    message = first.as_dict()["message"] + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
    status = 413 if first.code == "batch_too_large" else 400
    return APIError(status, message, code=first.code, param=first.param,
                    extra={"line": first.line, "errors": [e.as_dict() for e in errors[:100]]})


# The routes read their bodies themselves (to cap the size and to number NDJSON lines), so FastAPI
# cannot describe them; these give the OpenAPI document (and clients, and fuzzers) the real shapes.

def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its nested models written inline (no `$defs`, so that it can be
    placed anywhere in the OpenAPI document). Each request model spells out its validators' rules
    itself (genq.shared.schemas.documented)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(n) for n in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            ref = node["$ref"].removeprefix("#/$defs/")
            return inline({**defs[ref], **{k: v for k, v in node.items() if k != "$ref"}})
        out = {k: inline(v) for k, v in node.items()}
        if isinstance(out.get("discriminator"), dict):  # its mapping names $defs, gone now
            out["discriminator"] = {"propertyName": out["discriminator"]["propertyName"]}
        return out

    return inline(schema)


def request_line_schema(*, batch: bool = False) -> dict[str, Any]:
    """A request line: one variant per `url`, each with that url's body (the model keeps `body` a
    plain object so that the model of its `url` checks it). In a batch, `custom_id` is required."""
    variants = []
    for url, endpoint in ENDPOINTS.items():
        schema = model_schema(RequestLine)
        if batch:
            schema["properties"]["custom_id"] = {"type": "string", "minLength": 1, "maxLength": 512,
                                                 "title": "Custom Id", "description": "Unique within the batch."}
            schema["required"] = [*schema.get("required", []), "custom_id"]
        schema["properties"]["url"] = {"const": url, "title": "Url"}
        schema["properties"]["body"] = model_schema(endpoint.body)
        variants.append(schema)
    return {"title": "RequestLine", "description": RequestLine.__doc__, "anyOf": variants}


def request_body_doc(schema: dict[str, Any], *, ndjson: dict[str, Any] | None = None,
                     required: bool = True) -> dict[str, Any]:
    """`openapi_extra` documenting a JSON body (and optionally an NDJSON one, one object a line)."""
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if ndjson is not None:
        content["application/x-ndjson"] = {"schema": {"type": "array", "items": ndjson, "minItems": 1,
                                                      "description": "One request line per line of text."}}
    return {"requestBody": {"required": required, "content": content}}
