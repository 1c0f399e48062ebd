"""The job contract: what crosses between the API and the workers.

Request lines use the OpenAI Batch input format. The API validates them with these models; the
worker parses the stored body again with the same model, so both sides agree on every field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TEXT_URL = "/v1/completions"
IMAGE_URL = "/v1/images/generations"

# Job kinds by request url. A url listed here but without a runner kind in a model's registry
# entry is refused at validation time.
URL_KINDS: dict[str, str] = {TEXT_URL: "text", IMAGE_URL: "image"}

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_JOB_STATUSES = ("succeeded", "failed", "cancelled")
BATCH_STATUSES = (
    "validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled",
)
TERMINAL_BATCH_STATUSES = ("completed", "failed", "expired", "cancelled")

MAX_SEED = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CompletionBody(_Strict):
    """An OpenAI `/v1/completions` body plus genq's sampling extras."""

    model: str = Field(min_length=1, max_length=200)
    prompt: str | list[str] = Field(description="One prompt, or a list of prompts answered in order.")
    max_tokens: int = Field(default=16, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1000, description="0 disables top-k filtering.")
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    do_sample: bool | None = None
    adapter: str | None = Field(default=None, min_length=1, max_length=200)
    # Accepted so that existing OpenAI batch files work unchanged.
    user: str | None = Field(default=None, max_length=256)
    stream: Literal[False] = False

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not 1 <= len(v) <= 64:
                raise ValueError("must hold between 1 and 64 prompts")
            if any(not p for p in v):
                raise ValueError("prompts must not be empty")
        elif not v:
            raise ValueError("must not be empty")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must not be empty")
        elif v == "":
            raise ValueError("must not be empty")
        return v

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def sampling(self) -> bool:
        """Whether tokens are sampled; `temperature: 0` means greedy unless do_sample says otherwise."""
        if self.do_sample is not None:
            return self.do_sample
        return self.temperature > 0


# Scheduler names a request may give; runners map them to diffusers scheduler classes.
SCHEDULERS = ("ddim", "pndm", "euler", "euler_ancestral", "dpm_solver_multistep", "heun", "unipc")
MAX_IMAGE_SIDE = 2048


class ImageBody(_Strict):
    """An OpenAI `/v1/images/generations` body plus diffusion extras."""

    model: str = Field(min_length=1, max_length=200)
    prompt: str = Field(default="", max_length=4000)
    n: int = Field(default=1, ge=1, le=10)
    size: str = Field(default="512x512", description="WIDTHxHEIGHT in pixels, each a multiple of 8.")
    response_format: Literal["url", "b64_json"] = "url"
    negative_prompt: str | None = Field(default=None, max_length=4000)
    num_inference_steps: int = Field(default=30, ge=1, le=200)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=50.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    scheduler: Literal[SCHEDULERS] | None = None  # type: ignore[valid-type]
    adapter: str | None = Field(default=None, min_length=1, max_length=200)
    # Accepted so that existing OpenAI requests work; genq has one quality and style per model.
    quality: str | None = Field(default=None, max_length=32)
    style: str | None = Field(default=None, max_length=32)
    user: str | None = Field(default=None, max_length=256)

    @field_validator("size")
    @classmethod
    def _size(cls, v: str) -> str:
        w, sep, h = v.partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise ValueError("must look like 512x512 (WIDTHxHEIGHT)")
        width, height = int(w), int(h)
        if width % 8 or height % 8:
            raise ValueError("width and height must be multiples of 8")
        if not (8 <= width <= MAX_IMAGE_SIDE and 8 <= height <= MAX_IMAGE_SIDE):
            raise ValueError(f"width and height must be between 8 and {MAX_IMAGE_SIDE}")
        return f"{width}x{height}"

    @property
    def width(self) -> int:
        return int(self.size.partition("x")[0])

    @property
    def height(self) -> int:
        return int(self.size.partition("x")[2])


BODY_MODELS: dict[str, type[BaseModel]] = {TEXT_URL: CompletionBody, IMAGE_URL: ImageBody}


class RequestLine(_Strict):
    """One request: the OpenAI Batch input line format, plus genq's optional extras."""

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
        if v not in URL_KINDS:
            raise ValueError(f"must be one of {', '.join(URL_KINDS)}")
        return v


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

    requests: list[Any] | None = None
    input_file_id: str | None = Field(default=None, max_length=64)
    endpoint: str | None = None
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
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
        if v is not None and v not in URL_KINDS:
            raise ValueError(f"must be one of {', '.join(URL_KINDS)}")
        return v
