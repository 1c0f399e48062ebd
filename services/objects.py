"""The API's response objects, as models: routes declare them (`response_model`), so the OpenAPI
document describes what the routes return, and a route that strays from its shape fails loudly.
The dicts themselves are built by genq.shared.views (shared with webhooks and batch files) and the
adapter and file modules; these models describe them field for field."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class _Object(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobError(_Object):
    code: str
    message: str
    param: str | None = None


class JobObject(_Object):
    id: str
    object: Literal["job"] = "job"
    batch_id: str | None
    custom_id: str | None
    url: str
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    priority: int = Field(ge=0, le=9)
    progress: float = Field(ge=0, le=1)
    attempts: int
    created_at: int | None
    started_at: int | None
    finished_at: int | None
    error: JobError | None
    result: dict[str, Any] | None = Field(description="the endpoint's result (a text_completion, or images)")


class RequestCounts(_Object):
    total: int
    completed: int
    failed: int
    cancelled: int
    running: int
    queued: int


class BatchObject(_Object):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: dict[str, Any] | None
    input_file_id: str | None
    completion_window: str
    status: Literal["validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int | None
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    priority: int = Field(ge=0, le=9)


class FileObject(_Object):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int | None
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: None = None


class AdapterObject(_Object):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    model: str
    owned_by: Literal["user", "registry"]
    created_at: int | None
    bytes: int | None
    files: list[str]
    rank: int | None
    lora_alpha: float | None
    target_modules: list[str] | str | None


class ModelObject(_Object):
    """OpenAI's Model object plus genq's fields."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: str
    queue: str
    max_batch_size: int


class ModelList(_Object):
    """The models list: OpenAI's, which does not page."""

    object: Literal["list"] = "list"
    data: list[ModelObject]


class Deleted(_Object):
    id: str
    object: str
    deleted: Literal[True] = True


class Page(_Object, Generic[T]):
    """OpenAI's list object."""

    object: Literal["list"] = "list"
    data: list[T]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FineTuningError(_Object):
    code: str
    message: str
    param: str | None = None


class FineTuningHyperparameters(_Object):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class SupervisedMethod(_Object):
    hyperparameters: FineTuningHyperparameters


class FineTuningMethod(_Object):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod


class FineTuningJobObject(_Object):
    """OpenAI's `fine_tuning.job`, field for field (genq's `lora` is recorded in the job's first
    events' data, not here, so OpenAI clients see exactly OpenAI's object)."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: FineTuningError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: FineTuningHyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    integrations: None
    metadata: dict[str, str] | None
    method: FineTuningMethod


class FineTuningEventObject(_Object):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None
    type: Literal["message", "metrics"]


class CheckpointMetrics(_Object):
    step: float
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class FineTuningCheckpointObject(_Object):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int
