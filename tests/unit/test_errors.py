"""One error model: every error code written anywhere in genq is in the catalogue, and the API's
error type refuses any other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from genq.services.errors import APIError
from genq.shared.db import Job
from genq.shared.errors import ErrorCode, error_type, http_status, job_error, job_failure, known_code
from genq.shared.views import output_line
from tests.support.openai_shapes import check_output_line

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
    assert known_code("worker_lost") is ErrorCode.WORKER_LOST
    assert known_code("a_plugin_code") is ErrorCode.RUNTIME_ERROR and known_code(None) is ErrorCode.RUNTIME_ERROR
    assert job_failure({"code": "a_plugin_code", "message": "boom"}) == (
        500, {"type": "server_error", "code": "runtime_error", "message": "boom", "param": None})


def test_error_types_follow_openai_by_status() -> None:
    assert [error_type(s) for s in (400, 404, 405, 413, 401, 409, 429, 500, 503, 504)] == [
        "invalid_request_error", "invalid_request_error", "invalid_request_error", "invalid_request_error",
        "authentication_error", "conflict_error", "rate_limit_error", "server_error", "service_unavailable",
        "server_error"]
    body = APIError(None, "boom", code="runtime_error").response().body
    assert b'"type":"server_error"' in body


def _job(status: str, error: dict | None = None, result: dict | None = None) -> Job:
    return Job(id="job_01ABC", custom_id="q-1", status=status, error=error, result=result)


# The table in README.md ("How a request that did not succeed answers"): job error code -> the
# output line's response status and error type.
FAILURES = [
    (job_error(ErrorCode.INVALID_REQUEST, "prompt too long", "body.prompt"), 400, "invalid_request_error"),
    (job_error(ErrorCode.MODEL_NOT_FOUND, "model 'x' is not served"), 404, "invalid_request_error"),
    (job_error(ErrorCode.RUNTIME_ERROR, "RuntimeError: oom"), 500, "server_error"),
    (job_error(ErrorCode.WORKER_LOST, "gone"), 500, "server_error"),
    (job_error(ErrorCode.TOO_MANY_ATTEMPTS, "again"), 500, "server_error"),
]


@pytest.mark.parametrize(("error", "status", "kind"), FAILURES)
def test_a_failed_request_is_an_http_error_response_in_its_output_line(error: dict, status: int,
                                                                        kind: str) -> None:
    line = output_line(_job("failed", error))
    check_output_line(line)
    assert line["error"] is None and line["response"]["request_id"] == "job_01ABC"
    assert line["response"]["status_code"] == status
    assert line["response"]["body"] == {"error": {"type": kind, "code": error["code"], "message": error["message"],
                                                  "param": error.get("param")}}
    assert job_failure(error)[0] == status


@pytest.mark.parametrize("code", [ErrorCode.CANCELLED, ErrorCode.BATCH_CANCELLED, ErrorCode.BATCH_EXPIRED])
def test_a_request_that_never_ran_has_only_an_error(code: ErrorCode) -> None:
    line = output_line(_job("cancelled", job_error(code, "not run")))
    check_output_line(line)
    assert line["response"] is None and line["error"] == {"code": code.value, "message": "not run"}


def test_a_success_is_a_200_response() -> None:
    line = output_line(_job("succeeded", result={"object": "text_completion", "choices": []}))
    check_output_line(line)
    assert line == {"id": "batch_req_01ABC", "custom_id": "q-1", "error": None,
                    "response": {"status_code": 200, "request_id": "job_01ABC",
                                 "body": {"object": "text_completion", "choices": []}}}
