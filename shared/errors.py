"""The catalogue of error codes: every `code` an API answer, a failed job or a batch's errors may
carry, with the HTTP status it answers with and the OpenAI error `type` of that status. The API's
errors (genq.services.errors), the workers' job errors and the output lines of a failed request
(genq.shared.views) all take their codes, statuses and types from here, so each is written once."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    # Requests the API refuses.
    INVALID_REQUEST = "invalid_request"
    INVALID_JSON = "invalid_json"
    INVALID_API_KEY = "invalid_api_key"
    PERMISSION_DENIED = "permission_denied"
    MODEL_NOT_FOUND = "model_not_found"
    ADAPTER_NOT_FOUND = "adapter_not_found"
    INVALID_ADAPTER = "invalid_adapter"
    ADAPTER_EXISTS = "adapter_exists"
    REGISTRY_ADAPTER = "registry_adapter"
    INVALID_FILE = "invalid_file"
    NOTHING_TO_RETRY = "nothing_to_retry"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    NOT_FOUND = "not_found"
    OBJECT_NOT_FOUND = "object_not_found"
    BODY_TOO_LARGE = "body_too_large"
    FILE_TOO_LARGE = "file_too_large"
    BATCH_TOO_LARGE = "batch_too_large"
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    QUEUED_JOBS_LIMIT = "queued_jobs_limit"
    SYNC_WAITS_LIMIT = "sync_waits_limit"
    # Waiting on a synchronous endpoint.
    NO_WORKER_AVAILABLE = "no_worker_available"
    TIMEOUT = "timeout"
    # How a job ended other than with a result.
    CANCELLED = "cancelled"
    BATCH_CANCELLED = "batch_cancelled"
    BATCH_EXPIRED = "batch_expired"
    RUNTIME_ERROR = "runtime_error"
    WORKER_LOST = "worker_lost"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    TRAINING_FAILED = "training_failed"  # a fine-tuning job's training raised an error
    # The API's own failures.
    DATABASE_UNAVAILABLE = "database_unavailable"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    INTERNAL_ERROR = "internal_error"
    HTTP_ERROR = "http_error"  # what the HTTP layer refuses (a method not allowed, say)


# The HTTP status of each code the API answers with; a job's codes are shown inside the job.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_API_KEY: 401, ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.NOT_FOUND: 404, ErrorCode.OBJECT_NOT_FOUND: 404,
    ErrorCode.MODEL_NOT_FOUND: 404,  # a model looked up alone; one line of a request among others is 400
    ErrorCode.ADAPTER_EXISTS: 409, ErrorCode.IDEMPOTENCY_KEY_REUSED: 409, ErrorCode.CANCELLED: 409,
    ErrorCode.BODY_TOO_LARGE: 413, ErrorCode.FILE_TOO_LARGE: 413, ErrorCode.BATCH_TOO_LARGE: 413,
    ErrorCode.RATE_LIMIT_EXCEEDED: 429, ErrorCode.QUEUED_JOBS_LIMIT: 429, ErrorCode.SYNC_WAITS_LIMIT: 429,
    ErrorCode.RUNTIME_ERROR: 500, ErrorCode.INTERNAL_ERROR: 500, ErrorCode.WORKER_LOST: 500,
    ErrorCode.TOO_MANY_ATTEMPTS: 500, ErrorCode.TRAINING_FAILED: 500,
    ErrorCode.NO_WORKER_AVAILABLE: 503, ErrorCode.DATABASE_UNAVAILABLE: 503, ErrorCode.STORAGE_UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 504,
}


# OpenAI's error `type` by HTTP status; any other status below 500 is `invalid_request_error`, any
# other from 500 up `server_error`.
ERROR_TYPES: dict[int, str] = {401: "authentication_error", 403: "permission_error", 409: "conflict_error",
                               429: "rate_limit_error", 503: "service_unavailable"}


def http_status(code: ErrorCode) -> int:
    return HTTP_STATUS.get(code, 400)


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def known_code(code: str | None) -> ErrorCode:
    """A stored job error's code, or runtime_error for one outside the catalogue (a plugin runner's)."""
    try:
        return ErrorCode(code or "")
    except ValueError:
        return ErrorCode.RUNTIME_ERROR


def error_object(status: int, message: str, code: ErrorCode | str | None = None, param: str | None = None,
                 **extra: Any) -> dict[str, Any]:
    """OpenAI's error object, `{"type", "code", "message", "param"}` (plus genq's extras), for an
    answer of HTTP status `status`."""
    return {"type": error_type(status), "code": None if code is None else str(code), "message": message,
            "param": param, **extra}


def job_failure(error: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
    """The HTTP status and error object a failed job answers with, in its batch output line and on
    the synchronous endpoints alike."""
    error = error or {}
    code = known_code(error.get("code"))
    status = http_status(code)
    return status, error_object(status, error.get("message") or "the request failed", code, error.get("param"))


def job_error(code: ErrorCode, message: str, param: str | None = None) -> dict[str, Any]:
    """A job's `error` object as stored and shown: `{"code", "message"}`, and `param` when one field
    is at fault."""
    error: dict[str, Any] = {"code": str(code), "message": message}
    if param is not None:
        error["param"] = param
    return error
