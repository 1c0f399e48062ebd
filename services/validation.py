"""Request-line validation shared by single jobs and batches.

Every problem is reported with the 1-based line number and the field (`body.temperature`), and
a batch with any bad line is refused whole, so nothing is half-written.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from genq.services.adapters import AdapterCatalog, AdapterError
from genq.services.egress import AddressPolicy
from genq.services.fine_tuned import unknown_model
from genq.services.webhooks import validate_subscription
from genq.shared.config import Settings
from genq.shared.fine_tuning_jobs import is_fine_tuned
from genq.shared.jsonl import LineError, parse_json_line
from genq.shared.kinds import body_model, served_by
from genq.shared.registry import Registry
from genq.shared.requests import RequestLine
from genq.shared.schemas import JobBody

__all__ = ["LineError", "ValidLine", "field_errors", "parse_json_line", "validate_batch", "validate_line"]

MAX_ERRORS_REPORTED = 100
MAX_PROMPT_CHARS: int = Settings.model_fields["max_prompt_chars"].default  # the API passes its configured value


@dataclass(frozen=True)
class ValidLine:
    line: int
    request: RequestLine
    body: JobBody  # as it runs: a fine-tuned model's request names its base model and adapter
    requested_model: str | None = None  # the fine-tuned model's name, when the request named one


def _loc(prefix: str, loc: tuple[int | str, ...]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _union_fields(model: type[BaseModel]) -> set[str]:
    """Fields typed as a union of several types: pydantic puts the member's name (`str`,
    `list[str]`) after theirs in an error's location."""
    out = set()
    for name, field in model.model_fields.items():
        members = [a for a in get_args(field.annotation) if a is not type(None)]
        if get_origin(field.annotation) in (Union, types.UnionType) and len(members) > 1:
            out.add(name)
    return out


def _pydantic_errors(exc: ValidationError, line: int | None, prefix: str,
                     model: type[BaseModel] | None = None) -> list[LineError]:
    """One error per field at fault. A value that fits no member of a union field is one error at
    the field ("a valid string or a valid list"); one that fits a member's shape but not its
    contents is reported inside it (`body.prompt[1]`)."""
    unions = _union_fields(model) if model is not None else set()
    found: list[tuple[tuple[int | str, ...], bool, str]] = []  # (location, in a union member, message)
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "int_parsing_size":  # pydantic says "input string" even of a number
            msg = "Input is too large for an integer"
        loc = tuple(err["loc"])
        member = len(loc) > 1 and loc[0] in unions
        found.append(((loc[0], *loc[2:]) if member else loc, member, msg))
    errors: list[LineError] = []
    done: set[int | str] = set()
    for loc, member, msg in found:
        if not member:
            errors.append(LineError(line, _loc(prefix, loc) or None, msg))
            continue
        if loc[0] in done:
            continue
        done.add(loc[0])
        same = [(at, m) for at, is_member, m in found if is_member and at[0] == loc[0]]
        inside = [(at, m) for at, m in same if len(at) > 1]
        if inside:
            errors += [LineError(line, _loc(prefix, at), m) for at, m in inside]
        else:
            joined = " or ".join(dict.fromkeys(m.removeprefix("Input should be ") for _, m in same))
            errors.append(LineError(line, _loc(prefix, loc), f"Input should be {joined}"
                                    if all(m.startswith("Input should be ") for _, m in same) else joined))
    return errors



def field_errors(exc: ValidationError, model: type[BaseModel]) -> list[LineError]:
    """A request body's validation errors, one per field at fault (`hyperparameters.n_epochs`), in
    the words of the line errors (unknown fields are "unknown field")."""
    return _pydantic_errors(exc, None, "", model)


def _prompt_errors(body: JobBody, line: int | None, max_chars: int) -> list[LineError]:
    """Each prompt (and negative prompt) may hold at most `max_chars` characters."""
    return [LineError(line, param, f"must be at most {max_chars} characters, got {len(text)}")
            for param, text in body.prompt_texts() if len(text) > max_chars]


def validate_line(obj: Any, line: int | None, registry: Registry, *, endpoint: str | None = None,
                  max_prompt_chars: int = MAX_PROMPT_CHARS,
                  adapters: AdapterCatalog | None = None,
                  stream: bool = False,
                  webhook_policy: AddressPolicy = AddressPolicy()) -> tuple[ValidLine | None, list[LineError]]:
    """Check one request line against the schema, the prompt length limit and the registry.
    `stream`: the caller answers `stream: true` bodies as Server-Sent Events (only the
    synchronous endpoints do).

    A named adapter is resolved through `adapters` (the submitting tenant's uploads and the
    registry's; registry adapters only when None) and the body keeps its stable id, so a later
    rename or deletion of a same-named adapter cannot change what the job runs. A fine-tuned
    model of the tenant (`ft:...`) is served by its base model with its adapter: the body names
    those, and `requested_model` keeps the name the request used."""
    if not isinstance(obj, dict):
        return None, [LineError(line, None, "must be a JSON object")]
    try:
        req = RequestLine.model_validate(obj)
    except ValidationError as exc:
        return None, _pydantic_errors(exc, line, "", RequestLine)
    for name in ("custom_id", "webhook_url"):  # stored as text, which cannot hold NUL on PostgreSQL
        if "\x00" in (getattr(req, name) or ""):
            return None, [LineError(line, name, "must not contain NUL (\\u0000) characters")]
    if req.webhook_url is not None or req.webhook_events is not None:
        try:
            validate_subscription(req.webhook_url, req.webhook_events, webhook_policy)
        except ValueError as exc:
            return None, [LineError(line, "webhook_url", str(exc))]
    if endpoint is not None and req.url != endpoint:
        return None, [LineError(line, "url", f"must equal the batch endpoint {endpoint}")]
    try:
        body = body_model(req.url).model_validate(req.body)
    except ValidationError as exc:
        return None, _pydantic_errors(exc, line, "body", body_model(req.url))
    if errors := _prompt_errors(body, line, max_prompt_chars):
        return None, errors
    if getattr(body, "stream", False) and not stream:
        return None, [LineError(line, "body.stream", f"only POST {req.url} streams; jobs and batch lines "
                                                     "are answered whole (leave stream out or false)")]

    catalog = adapters if adapters is not None else AdapterCatalog(None, registry, None)
    named = body.model  # what messages name: the model the request named
    requested: str | None = None
    if is_fine_tuned(named):
        served, errors = _on_base_model(body, line, named, catalog)
        if served is None:
            return None, errors
        body, requested = served, named
    model = body.model
    spec = registry.get(model)
    if spec is None:
        message = unknown_model(model) if requested is None else \
            f"model {requested!r} is fine-tuned from {model!r}, which is no longer in the registry"
        return None, [LineError(line, "body.model", message, code="model_not_found")]
    if spec.kind not in served_by(req.url):
        return None, [LineError(line, "body.model",
                                f"model {named!r} is a {spec.kind} model and cannot serve {req.url}")]
    if limits := spec.options.limit_errors(body, named, spec.source):
        param, message = limits[0]
        return None, [LineError(line, param, message)]
    ref = body.adapter
    if ref is not None and requested is None:
        try:
            adapter_id = catalog.resolve(model=model, ref=ref)
        except AdapterError as exc:
            return None, [LineError(line, "body.adapter", exc.message, code=exc.code)]
        body = body.model_copy(update={"adapter": adapter_id})
    return ValidLine(line or 0, req, body, requested), []


def _on_base_model(body: JobBody, line: int | None, model: str,
                   catalog: AdapterCatalog) -> tuple[JobBody | None, list[LineError]]:
    """A request naming the tenant's fine-tuned model `model`, as its base model's request with
    the model's adapter (by its stable id, as a named adapter is kept)."""
    if body.adapter is not None:
        return None, [LineError(line, "body.adapter", f"model {model!r} is a fine-tuned model and brings its own "
                                "adapter: leave adapter out, or name its base model with the adapter")]
    found = catalog.fine_tuned(model)
    if found is None:
        return None, [LineError(line, "body.model", unknown_model(model), code="model_not_found")]
    adapter_id, base = found
    return body.model_copy(update={"model": base, "adapter": adapter_id}), []


def too_many_lines(count: int, max_lines: int) -> LineError | None:
    """The `batch_too_large` error of a batch of `count` lines, if that is over `max_lines`."""
    if count <= max_lines:
        return None
    return LineError(None, "requests", f"a batch holds at most {max_lines} lines, got {count}",
                     code="batch_too_large")


def validate_batch(objs: Iterable[tuple[int, Any]], registry: Registry, *, max_lines: int,
                   endpoint: str | None = None, max_prompt_chars: int = MAX_PROMPT_CHARS,
                   adapters: AdapterCatalog | None = None,
                   webhook_policy: AddressPolicy = AddressPolicy()) -> tuple[list[ValidLine], list[LineError]]:
    """Validate numbered request lines; custom_id is required and unique within a batch. One
    `adapters` catalog serves every line (the tenant's uploads are read once). `objs` may be
    consumed lazily (genq.services.ndjson), so that each parsed line is dropped once validated;
    a lazy caller counts its lines against `max_lines` itself, before parsing them."""
    if isinstance(objs, Sized) and (over := too_many_lines(len(objs), max_lines)) is not None:
        return [], [over]
    valid: list[ValidLine] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    webhook_policy = webhook_policy.remembering()  # one lookup per webhook host for the whole batch
    met = False  # any line, even a bad one
    for line, obj in objs:
        met = True
        if isinstance(obj, LineError):
            errors.append(obj)
            continue
        ok, errs = validate_line(obj, line, registry, endpoint=endpoint, max_prompt_chars=max_prompt_chars,
                                 adapters=adapters, webhook_policy=webhook_policy)
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
    if not met:
        return [], [LineError(None, "requests", "a batch needs at least one request line")]
    return valid, errors
