"""OpenAI `response_format` for chat completions: its shape, and the JSON grammar it asks for.

The API calls `check_response_format` at submit to answer 400 for a format that is malformed or
whose schema llguidance cannot compile; the text workers build their grammars through
`json_grammar`, so both sides compile exactly the same grammar. Torch-free: llguidance's core needs
neither a tokenizer nor torch to compile and validate a grammar.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import llguidance

# JSON as json.dumps writes it: ", " and ": ", no other whitespace between tokens. Free whitespace
# would let a model emit blanks or newlines forever (a known failure of constrained JSON decoding).
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}  # json_object: OpenAI promises a JSON object, not any value
FORMAT_TYPES = ("text", "json_object", "json_schema")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}


class ResponseFormatError(ValueError):
    """A response_format the service cannot honour; the message names the offending field."""


def schema_of(response_format: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema to enforce for `response_format`, or None for free text (absent or `text`).

    Raises ResponseFormatError for a malformed format. `strict` is accepted and not needed: the
    schema is always enforced.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ResponseFormatError("response_format must be an object")
    kind = response_format.get("type")
    if kind not in FORMAT_TYPES:
        raise ResponseFormatError(f"response_format.type must be one of {', '.join(map(repr, FORMAT_TYPES))}")
    allowed = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    if extra := sorted(set(response_format) - allowed):
        raise ResponseFormatError(f"response_format.{extra[0]} is not allowed with type {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(ANY_OBJECT)
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise ResponseFormatError("response_format.json_schema is required with type 'json_schema' and must be an "
                                  "object")
    if extra := sorted(set(spec) - _JSON_SCHEMA_KEYS):
        raise ResponseFormatError(f"response_format.json_schema.{extra[0]} is not a known field")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ResponseFormatError("response_format.json_schema.name is required: 1-64 letters, digits, '_' or '-'")
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise ResponseFormatError("response_format.json_schema.description must be a string")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise ResponseFormatError("response_format.json_schema.strict must be a boolean")
    if "schema" not in spec:
        raise ResponseFormatError("response_format.json_schema.schema is required")
    if not isinstance(spec["schema"], Mapping):
        raise ResponseFormatError("response_format.json_schema.schema must be a JSON Schema object")
    return dict(spec["schema"])


def canonical(schema: Mapping[str, Any]) -> str:
    """The schema as compact JSON: the cache key of its grammar. Key order is kept, not sorted:
    the output follows the order of `properties`, so two orders are two grammars."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def json_grammar(schema: Mapping[str, Any]) -> str:
    """The llguidance grammar enforcing `schema` with JSON_OPTIONS; ResponseFormatError if it cannot compile.

    Compiled without a tokenizer (so without torch); cached by the schema's canonical JSON.
    """
    grammar, error = _compile(canonical(schema))
    if error is not None:
        raise ResponseFormatError(error)
    return grammar


@lru_cache(maxsize=256)
def _compile(schema_json: str) -> tuple[str, str | None]:
    """(grammar, None) or ("", the message naming why): errors are cached too, so a batch of one
    bad schema costs one compile."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_json, overrides=JSON_OPTIONS)
    except ValueError as exc:
        return "", f"response_format.json_schema.schema cannot be used: {exc}"
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        return "", f"response_format.json_schema.schema is not supported: {' '.join(messages[0].split())}"
    return grammar, None


def check_response_format(response_format: Mapping[str, Any] | None) -> str | None:
    """None if `response_format` can be served, else a message naming what is wrong (for a 400)."""
    try:
        schema = schema_of(response_format)
        if schema is not None:
            json_grammar(schema)
    except ResponseFormatError as exc:
        return str(exc)
    return None
