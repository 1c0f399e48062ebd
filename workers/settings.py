"""A worker's own settings: `GENQ_WORKER_*` environment variables, which `genq worker`'s options
override. Each default is written here once."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from genq.workers.cache import parse_bytes


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENQ_WORKER_", extra="ignore", frozen=True)

    lease_s: float = Field(default=30.0, gt=0, description="seconds a job's lease lasts between renewals")
    max_attempts: int = Field(default=3, ge=1, description="starts of one job before it is failed")
    memory_budget: str = Field(default="auto", description="bytes of loaded models to keep: auto, 0 (no limit), 20GiB")
    concurrency: int | None = Field(default=None, ge=1, description="jobs held at once; default from the models")
    work: Literal["both", "inference", "training"] = Field(
        default="both", description="the jobs taken: inference, fine-tuning of the models (training), or both")
    checkpoint_every: int = Field(default=50, ge=1, description="fine-tuning steps between checkpoints")

    @field_validator("memory_budget")
    @classmethod
    def _size(cls, value: str) -> str:
        if value != "auto":
            parse_bytes(value)  # raises ValueError naming the value
        return value

    def budget_bytes(self) -> int | None:
        """The memory budget in bytes; None for `auto` (the device's default)."""
        return None if self.memory_budget == "auto" else parse_bytes(self.memory_budget)
