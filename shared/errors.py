"""The catalogue of error codes: every `code` an API answer, a failed job or a batch's errors may
carry, with the HTTP status the API answers it with. The API's errors (genq.services.errors) and
the workers' job errors both take their codes from here, so a code is written once."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    # Requests the API refuses.
    INVALID_REQUEST = "invalid_request"
    INVALID_JSON = "invalid_json"
    INVALID_API_KEY = "invalid_api_key"
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
    # The API's own failures.
    DATABASE_UNAVAILABLE = "database_unavailable"
    INTERNAL_ERROR = "internal_error"
    HTTP_ERROR = "http_error"  # what the HTTP layer refuses (a method not allowed, say)


# The HTTP status of each code the API answers with; a job's codes are shown inside the job.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_API_KEY: 401,
    ErrorCode.NOT_FOUND: 404, ErrorCode.OBJECT_NOT_FOUND: 404,
    ErrorCode.ADAPTER_EXISTS: 409, ErrorCode.IDEMPOTENCY_KEY_REUSED: 409, ErrorCode.CANCELLED: 409,
    ErrorCode.BODY_TOO_LARGE: 413, ErrorCode.FILE_TOO_LARGE: 413, ErrorCode.BATCH_TOO_LARGE: 413,
    ErrorCode.RATE_LIMIT_EXCEEDED: 429, ErrorCode.QUEUED_JOBS_LIMIT: 429,
    ErrorCode.RUNTIME_ERROR: 500, ErrorCode.INTERNAL_ERROR: 500, ErrorCode.WORKER_LOST: 500,
    ErrorCode.TOO_MANY_ATTEMPTS: 500,
    ErrorCode.NO_WORKER_AVAILABLE: 503, ErrorCode.DATABASE_UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 504,
}


def http_status(code: ErrorCode) -> int:
    return HTTP_STATUS.get(code, 400)


def job_error(code: ErrorCode, message: str, param: str | None = None) -> dict[str, Any]:
    """A job's `error` object as stored and shown: `{"code", "message"}`, and `param` when one field
    is at fault."""
    error: dict[str, Any] = {"code": str(code), "message": message}
    if param is not None:
        error["param"] = param
    return error
