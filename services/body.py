"""Reading request bodies with a size cap, and parsing them into numbered request lines."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from services.errors import APIError
from shared.validation import LineError, parse_json_line


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


def parse_json_body(raw: bytes) -> Any:
    obj, err = parse_json_line(raw, 1)
    if err is not None:
        raise APIError(400, f"request body is {err.message}", code="invalid_json")
    return obj


def ndjson_lines(raw: bytes) -> list[tuple[int, Any]]:
    """Numbered objects of an NDJSON body; blank lines are skipped but still counted."""
    out: list[tuple[int, Any]] = []
    for number, text in enumerate(raw.split(b"\n"), start=1):
        if not text.strip():
            continue
        obj, err = parse_json_line(text, number)
        out.append((number, err if err is not None else obj))
    return out


def batch_error(errors: list[LineError]) -> APIError:
    first = errors[0]
    more = len(errors) - 1
    message = first.as_dict()["message"] + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
    status = 413 if first.code == "batch_too_large" else 400
    return APIError(status, message, code=first.code, param=first.param,
                    extra={"line": first.line, "errors": [e.as_dict() for e in errors[:100]]})
