"""One error model: every error code written anywhere in genq is in the catalogue, and the API's
error type refuses any other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from genq.services.errors import APIError
from genq.shared.errors import ErrorCode, http_status, job_error

ROOT = Path(__file__).resolve().parents[2]
CODE_LITERAL = re.compile(r"""code(?:=|["']\s*:\s*)["']([a-z_]+)["']""")


def _source_codes() -> set[str]:
    found: set[str] = set()
    for folder in ("genq", "shared", "services", "workers"):
        for path in (ROOT / folder).rglob("*.py"):
            found |= set(CODE_LITERAL.findall(path.read_text()))
    return found


def test_every_code_in_the_source_is_in_the_catalogue() -> None:
    codes = _source_codes()
    assert "invalid_request" in codes  # the scan sees the literals (a broken scan would pass vacuously)
    assert codes - {c.value for c in ErrorCode} == set()


def test_an_unknown_code_fails_where_it_is_raised() -> None:
    with pytest.raises(ValueError):
        APIError(400, "x", code="no_such_code")


def test_the_status_comes_from_the_catalogue_unless_given() -> None:
    assert APIError(None, "x", code=ErrorCode.QUEUED_JOBS_LIMIT).status == 429 == http_status(
        ErrorCode.RATE_LIMIT_EXCEEDED)
    assert APIError(None, "x", code="invalid_request").status == 400
    response = APIError(None, "slow down", code="rate_limit_exceeded", headers={"Retry-After": "3"}).response()
    assert response.status_code == 429 and response.headers["retry-after"] == "3"


def test_job_errors_name_the_field_only_when_there_is_one() -> None:
    assert job_error(ErrorCode.WORKER_LOST, "gone") == {"code": "worker_lost", "message": "gone"}
    assert job_error(ErrorCode.INVALID_REQUEST, "bad", "body.prompt")["param"] == "body.prompt"


def test_a_job_error_code_outside_the_catalogue_answers_as_a_runtime_error() -> None:
    from genq.services.routes.sync import _known

    assert _known("worker_lost") is ErrorCode.WORKER_LOST
    assert _known("a_plugin_code") is ErrorCode.RUNTIME_ERROR and _known(None) is ErrorCode.RUNTIME_ERROR
