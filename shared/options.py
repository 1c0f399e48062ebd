"""Typed registry options: what a `[models.<name>]` entry may set besides kind and source, per kind.

Each option has one default, written here. The registry parses an entry's options into its kind's
model once (unknown keys and bad values stop the process at start, naming the entry and key), and
everything after reads typed attributes. `limit_errors` checks a request against the registry's
limits at submit time; runners check the same limits again on the worker.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from genq.shared.chat import ChatBody, chat_errors, template_of
from genq.shared.schemas import MAX_IMAGE_SIDE, SamplingBody


def _positive_int(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("must be a positive integer")
    return value


PositiveInt = Annotated[int, BeforeValidator(_positive_int)]
Limit = tuple[str, str]  # (the request field at fault, what is wrong), e.g. ("body.max_tokens", "must be <= 256")


class ModelOptions(BaseModel):
    """Options every kind takes."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # TOML values have their own types

    max_batch_size: PositiveInt = Field(default=8, description="rows (sequences or images) in one batched call")
    max_wait_ms: float = Field(default=50.0, ge=0, description="how long a partly filled batch waits for more jobs")
    held_batches: PositiveInt = Field(default=2, description=(
        "a worker holds this many batches' worth of the model's jobs at once: one batch runs while the next "
        "is claimed and prepared"))

    def batches(self) -> bool:
        """Whether jobs of this model may share a call (the worker sizes its concurrency by it)."""
        return self.max_batch_size > 1

    def limit_errors(self, body: BaseModel, model: str, source: str) -> list[Limit]:
        """What in `body` passes the limits of model `model` (registry name), whose weights are at
        `source` (a hub id or a directory); none by default."""
        return []


class AdapterOptions(ModelOptions):
    """Options of kinds that serve LoRA adapters."""

    max_adapters: PositiveInt = Field(default=8, description="LoRA adapters kept loaded (least recently used go)")


def _text_errors(max_tokens: int, body: BaseModel, model: str) -> list[Limit]:
    """A text body's bound on generated tokens, and for chat what the model cannot honour."""
    errors: list[Limit] = []
    asked = body.token_limit if isinstance(body, SamplingBody) else None
    if asked is not None and asked > max_tokens:
        field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        errors.append((f"body.{field}", f"must be <= {max_tokens} for model {model!r}"))
    return errors


class TextOptions(AdapterOptions):
    """`kind = "text"`: a transformers causal LM."""

    max_tokens: PositiveInt = Field(default=1024, description="upper bound for a request's max_tokens")
    prefill_chunk_tokens: PositiveInt = Field(default=256, description=(
        "prompt tokens of joining rows run per decoding step while other rows decode (continuous batching)"))
    revision: str | None = Field(default=None, description="the hub revision (branch, tag or commit) to load")
    chat_template: str | None = Field(default=None, min_length=1, description=(
        "a Jinja chat template for /v1/chat/completions, for models whose tokenizer files have none "
        "(it replaces theirs)"))

    def batches(self) -> bool:
        return True

    def limit_errors(self, body: BaseModel, model: str, source: str) -> list[Limit]:
        errors = _text_errors(self.max_tokens, body, model)
        if isinstance(body, ChatBody):
            errors += chat_errors(body, model, self.chat_template or template_of(source, self.revision))
        return errors


class ImageOptions(AdapterOptions):
    """`kind = "image"`: a diffusers Stable Diffusion pipeline."""

    max_size: int = Field(default=1024, ge=8, le=MAX_IMAGE_SIDE, description="largest width or height in pixels")
    max_steps: PositiveInt = Field(default=150, description="upper bound for num_inference_steps")
    safety_checker: bool = Field(default=True, description="run the pipeline's safety checker")
    revision: str | None = Field(default=None, description="the hub revision (branch, tag or commit) to load")
    # Sizes, steps and guidance split the queue into batch keys: holding more jobs lets the batcher
    # fill a batch of one key from a mixed queue (four keys' worth of a shuffled mix of four).
    held_batches: PositiveInt = Field(default=4, description=(
        "a worker holds this many batches' worth of the model's jobs at once, to fill batches of one "
        "size, steps and guidance from a mixed queue"))

    def limit_errors(self, body: BaseModel, model: str, source: str) -> list[Limit]:
        errors: list[Limit] = []
        width, height = getattr(body, "width", 0), getattr(body, "height", 0)
        if max(width, height) > self.max_size:
            errors.append(("body.size", f"must be at most {self.max_size}x{self.max_size} for model {model!r}"))
        steps = getattr(body, "num_inference_steps", 0)
        if steps > self.max_steps:
            errors.append(("body.num_inference_steps", f"must be <= {self.max_steps} for model {model!r}"))
        return errors


class GanOptions(ModelOptions):
    """`kind = "gan"`: a genq DCGAN generator; one forward pass a request."""

    def batches(self) -> bool:
        return False


class EchoOptions(ModelOptions):
    """`kind = "echo"`: answers without a model (smoke tests, overhead benchmarks)."""

    max_tokens: PositiveInt = Field(default=1024, description="upper bound for a request's max_tokens")
    delay_s: float = Field(default=0.0, ge=0, description="each job takes this long, in ten progress steps")
    batch: bool = Field(default=False, description="let the batcher hand it several jobs at once")

    def batches(self) -> bool:
        return self.batch

    def limit_errors(self, body: BaseModel, model: str, source: str) -> list[Limit]:
        errors = _text_errors(self.max_tokens, body, model)
        if isinstance(body, ChatBody):
            errors += chat_errors(body, model, False)  # echo uses no template
            if body.constrained:
                errors.append(("body.response_format", f"echo model {model!r} does not constrain its output"))
        return errors


class EmbeddingOptions(ModelOptions):
    """`kind = "embedding"`: a sentence-transformers or transformers encoder. The batcher gathers up to
    `max_batch_size` inputs into one call; the runner runs them longest first in forward passes of
    at most `max_batch_size` inputs and `max_batch_tokens` tokens, padding included."""

    max_batch_size: PositiveInt = Field(default=32, description="inputs in one batched call and one forward pass")
    max_batch_tokens: PositiveInt = Field(
        default=8192, description="tokens in one forward pass, counting padding (inputs x the longest); a "
                                  "longer input runs alone")
    matryoshka: bool = Field(default=False, description="the model may be truncated (Matryoshka-trained): "
                                                        "requests may ask for fewer `dimensions`")
    normalize: bool | None = Field(
        default=None, description="L2-normalise the embeddings; unset: as the model's sentence-transformers "
                                  "modules say (a Normalize module), true for a model without them")
    loader: Literal["auto", "sentence-transformers", "transformers"] = Field(
        default="auto", description="auto: sentence-transformers when the model has modules.json, else "
                                    "transformers' AutoModel with mean pooling")
    revision: str | None = Field(default=None, description="the hub revision (branch, tag or commit) to load")

    def limit_errors(self, body: BaseModel, model: str, source: str) -> list[Limit]:
        if getattr(body, "dimensions", None) is not None and not self.matryoshka:
            return [("body.dimensions", f"model {model!r} does not support dimensions: its embeddings "
                                        "may not be truncated")]
        return []
