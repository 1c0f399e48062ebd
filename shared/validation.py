"""Request-line validation shared by single jobs and batches.

Every problem is reported with the 1-based line number and the field (`body.temperature`), and
a batch with any bad line is refused whole, so nothing is half-written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from shared.registry import Registry
from shared.schemas import BODY_MODELS, CompletionBody, ImageBody, RequestLine

# Which registry kinds may serve each request url.
URL_SERVED_BY: dict[str, tuple[str, ...]] = {
    "/v1/completions": ("text", "echo"),
    "/v1/images/generations": ("image", "gan"),
}
MAX_ERRORS_REPORTED = 100


@dataclass(frozen=True)
class LineError:
    line: int | None
    param: str | None
    message: str
    code: str = "invalid_request"

    def as_dict(self) -> dict[str, Any]:
        where = f"line {self.line}: " if self.line is not None else ""
        field = f"{self.param}: " if self.param else ""
        return {"code": self.code, "line": self.line, "param": self.param,
                "message": f"{where}{field}{self.message}"}


@dataclass(frozen=True)
class ValidLine:
    line: int
    request: RequestLine
    body: BaseModel


def _loc(prefix: str, loc: tuple[int | str, ...]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _pydantic_errors(exc: ValidationError, line: int | None, prefix: str) -> list[LineError]:
    errors = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        errors.append(LineError(line, _loc(prefix, err["loc"]) or None, msg))
    return errors


def parse_json_line(text: str | bytes, line: int) -> tuple[Any, LineError | None]:
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text), None
    except UnicodeDecodeError:
        return None, LineError(line, None, "not valid UTF-8", code="invalid_json")
    except json.JSONDecodeError as exc:
        return None, LineError(line, None, f"not valid JSON ({exc.msg} at column {exc.colno})",
                               code="invalid_json")
    except RecursionError:
        return None, LineError(line, None, "JSON nested too deeply", code="invalid_json")


def validate_line(obj: Any, line: int | None, registry: Registry, *,
                  endpoint: str | None = None) -> tuple[ValidLine | None, list[LineError]]:
    """Check one request line against the schema and the registry."""
    if not isinstance(obj, dict):
        return None, [LineError(line, None, "must be a JSON object")]
    try:
        req = RequestLine.model_validate(obj)
    except ValidationError as exc:
        return None, _pydantic_errors(exc, line, "")
    if req.webhook_url is not None or req.webhook_events is not None:
        from shared.webhooks import validate_subscription  # imported here: webhooks imports this module's users

        try:
            validate_subscription(req.webhook_url, req.webhook_events)
        except ValueError as exc:
            return None, [LineError(line, "webhook_url", str(exc))]
    if endpoint is not None and req.url != endpoint:
        return None, [LineError(line, "url", f"must equal the batch endpoint {endpoint}")]
    try:
        body = BODY_MODELS[req.url].model_validate(req.body)
    except ValidationError as exc:
        return None, _pydantic_errors(exc, line, "body")

    model = req.body.get("model")
    spec = registry.get(model)
    if spec is None:
        return None, [LineError(line, "body.model", f"model {model!r} is not in the registry",
                                code="model_not_found")]
    if spec.kind not in URL_SERVED_BY[req.url]:
        return None, [LineError(line, "body.model",
                                f"model {model!r} is a {spec.kind} model and cannot serve {req.url}")]
    if isinstance(body, CompletionBody) and body.max_tokens > spec.max_tokens:
        return None, [LineError(line, "body.max_tokens",
                                f"must be <= {spec.max_tokens} for model {model!r}")]
    if isinstance(body, ImageBody):
        max_side = int(spec.options.get("max_size", 1024))
        if max(body.width, body.height) > max_side:
            return None, [LineError(line, "body.size", f"must be at most {max_side}x{max_side} for model {model!r}")]
        max_steps = int(spec.options.get("max_steps", 150))
        if body.num_inference_steps > max_steps:
            return None, [LineError(line, "body.num_inference_steps",
                                    f"must be <= {max_steps} for model {model!r}")]
    if getattr(body, "adapter", None):
        return None, [LineError(line, "body.adapter", f"adapter {body.adapter!r} is not registered")]  # type: ignore[attr-defined]
    return ValidLine(line or 0, req, body), []


def validate_batch(objs: list[tuple[int, Any]], registry: Registry, *, max_lines: int,
                   endpoint: str | None = None) -> tuple[list[ValidLine], list[LineError]]:
    """Validate numbered request lines; custom_id is required and unique within a batch."""
    valid: list[ValidLine] = []
    errors: list[LineError] = []
    if not objs:
        return [], [LineError(None, "requests", "a batch needs at least one request line")]
    if len(objs) > max_lines:
        return [], [LineError(None, "requests", f"a batch holds at most {max_lines} lines, got {len(objs)}",
                              code="batch_too_large")]
    seen: dict[str, int] = {}
    for line, obj in objs:
        if isinstance(obj, LineError):
            errors.append(obj)
            continue
        ok, errs = validate_line(obj, line, registry, endpoint=endpoint)
        errors.extend(errs)
        if ok is None:
            continue
        cid = ok.request.custom_id
        if cid is None:
            errors.append(LineError(line, "custom_id", "required in a batch"))
        elif cid in seen:
            errors.append(LineError(line, "custom_id", f"duplicate of line {seen[cid]}"))
        else:
            seen[cid] = line
            valid.append(ok)
    return valid, errors
