"""OpenAI's shapes to check genq's answers against. Objects the `openai` package has types for
(Batch, Model, FileObject, the error object) are checked with those; a batch output line has no
type in the package, so it is written here from OpenAI's OpenAPI schema `BatchRequestOutput`
(`id`, `custom_id`, `response: {status_code, request_id, body} | null`,
`error: {code, message} | null`)."""

from __future__ import annotations

from typing import Any

from openai.types.shared import ErrorObject
from pydantic import BaseModel, ConfigDict


class _Exact(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class OutputResponse(_Exact):
    status_code: int
    request_id: str
    body: dict[str, Any]


class OutputError(_Exact):
    code: str
    message: str


class BatchRequestOutput(_Exact):
    id: str
    custom_id: str
    response: OutputResponse | None
    error: OutputError | None


def check_output_line(line: dict[str, Any]) -> BatchRequestOutput:
    """Validate one line of an output or error file: OpenAI's shape, exactly one of `response` and
    `error`, and a non-200 response whose body is OpenAI's error object (all four fields present)."""
    out = BatchRequestOutput.model_validate(line)
    assert (out.response is None) != (out.error is None), line
    if out.response is not None and out.response.status_code != 200:
        error = out.response.body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        ErrorObject.model_validate(error)
    return out
