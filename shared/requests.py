"""The lines and batches a user submits: OpenAI's Batch input line format plus genq's extras."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints, field_validator

from genq.shared.kinds import ENDPOINTS
from genq.shared.schemas import WEBHOOK_FIELDS, RequestModel, documented, sized

# genq's priorities run from 0, the default and least urgent, to 9, the most urgent.
DEFAULT_PRIORITY = 0


def effective_priority(*given: int | None) -> int:
    """The first priority given (a line's, then its batch's), else the default: what the queue serves
    a job at and what the API shows."""
    return next((p for p in given if p is not None), DEFAULT_PRIORITY)


class _Strict(RequestModel):
    _webhook_sizes = sized(webhook_events=32)


class RequestLine(_Strict):
    """One request: the OpenAI Batch input line format, plus genq's optional extras."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=documented(**WEBHOOK_FIELDS))

    custom_id: str | None = Field(default=None, min_length=1, max_length=512)
    method: Literal["POST"] = "POST"
    url: str
    body: dict[str, Any]
    # genq extensions: 0 (default, lowest) to 9 (most urgent), honoured by the broker on Redis;
    # and, for single jobs, a webhook called when the job ends.
    priority: int | None = Field(default=None, ge=0, le=9)
    webhook_url: str | None = Field(default=None, max_length=2000)
    webhook_events: list[str] | None = None

    @field_validator("url")
    @classmethod
    def _known_url(cls, v: str) -> str:
        if v not in ENDPOINTS:
            raise ValueError(f"must be one of {', '.join(ENDPOINTS)}")
        return v


# OpenAI's metadata limits: at most 16 pairs, keys up to 64 characters, string values up to 512.
METADATA_MAX_PAIRS, METADATA_MAX_KEY_CHARS, METADATA_MAX_VALUE_CHARS = 16, 64, 512
Metadata = Annotated[
    dict[Annotated[str, StringConstraints(max_length=METADATA_MAX_KEY_CHARS)],
         Annotated[str, StringConstraints(max_length=METADATA_MAX_VALUE_CHARS)]],
    Field(max_length=METADATA_MAX_PAIRS,
          description=f"Up to {METADATA_MAX_PAIRS} pairs; keys up to {METADATA_MAX_KEY_CHARS} characters, "
                      f"string values up to {METADATA_MAX_VALUE_CHARS}."),
]


_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def window_seconds(window: str) -> int:
    """`24h` (OpenAI's only value), or any `<n>s|m|h|d` up to 7 days (a genq extension)."""
    n, unit = window[:-1], window[-1:]
    if not n.isdigit() or unit not in _WINDOW_UNITS or not 1 <= int(n) * _WINDOW_UNITS[unit] <= 7 * 86400:
        raise ValueError("must be like 24h (a number and s, m, h or d; at most 7 days)")
    return int(n) * _WINDOW_UNITS[unit]


class BatchCreate(_Strict):
    """`POST /v1/batches` in either shape: requests inline, or OpenAI's `input_file_id` +
    `endpoint` + `completion_window` (an NDJSON body is parsed by the route into `requests`)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=documented(
        **WEBHOOK_FIELDS,
        completion_window={"type": "string", "description": "A number and s, m, h or d; at most 7 days.",
                           "pattern": r"^([1-9][0-9]{0,4}s|[1-9][0-9]{0,3}m|[1-9][0-9]?h|[1-7]d)$"},
        endpoint={"anyOf": [{"enum": list(ENDPOINTS)}, {"type": "null"}]}))

    requests: list[Any] | None = None
    input_file_id: str | None = Field(default=None, max_length=64)
    endpoint: str | None = None
    completion_window: str = "24h"
    metadata: Metadata | None = None
    priority: int | None = Field(default=None, ge=0, le=9)
    webhook_url: str | None = Field(default=None, max_length=2000)
    webhook_events: list[str] | None = None

    @field_validator("completion_window")
    @classmethod
    def _window(cls, v: str) -> str:
        window_seconds(v)
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and v not in ENDPOINTS:
            raise ValueError(f"must be one of {', '.join(ENDPOINTS)}")
        return v
