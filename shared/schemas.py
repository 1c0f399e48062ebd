"""The job contract: what crosses between the API and the workers.

Request lines use the OpenAI Batch input format. The API validates them with these models; the
worker parses the stored body again with the same model, so both sides agree on every field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_JOB_STATUSES = ("succeeded", "failed", "cancelled")
BATCH_STATUSES = (
    "validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled",
)
TERMINAL_BATCH_STATUSES = ("completed", "failed", "expired", "cancelled")

MAX_SEED = 2**63 - 1
# Webhook events a job or batch may subscribe to (`webhook_events`), and those it gets by default.
EVENTS = ("completed", "failed", "cancelled", "expired", "progress")
DEFAULT_EVENTS = ("completed", "failed", "cancelled", "expired")


def documented(**properties: dict[str, Any]) -> Callable[[dict[str, Any], type[BaseModel]], None]:
    """A model's `json_schema_extra`: the JSON schema of fields whose validators check more than
    their types, so that the OpenAPI document (and clients, and fuzzers) states the rule. Checking
    stays with the validators, whose messages name the field. Fields of a model that lets null take
    the default (`nulls_take_defaults`) are documented as nullable."""

    def patch(schema: dict[str, Any], cls: type[BaseModel]) -> None:
        for name, rule in properties.items():
            kept = {k: v for k, v in schema["properties"][name].items() if k not in ("type", "anyOf")}
            schema["properties"][name] = {**kept, **rule}
        if getattr(cls, "nulls_take_defaults", False):
            for name in _defaulted(cls):
                prop = schema["properties"][name]
                if {"type": "null"} in prop.get("anyOf", []):
                    continue
                notes = {k: prop.pop(k) for k in ("default", "description", "title") if k in prop}
                schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **notes}
        if "webhook_events" in schema["properties"]:
            schema["dependentRequired"] = {"webhook_events": ["webhook_url"]}

    return patch


def _defaulted(cls: type[BaseModel]) -> list[str]:
    """Fields with a default other than None."""
    return [name for name, f in cls.model_fields.items() if not f.is_required() and f.default is not None]


# What the webhook fields of request lines and batches accept (checked by the API's validation).
WEBHOOK_FIELDS: dict[str, dict[str, Any]] = {
    "webhook_url": {"anyOf": [{"type": "string", "pattern": r"^https?://[A-Za-z0-9.-]+(:[0-9]+)?(/.*)?$",
                               "maxLength": 2000}, {"type": "null"}]},
    "webhook_events": {"anyOf": [{"type": "array", "items": {"enum": list(EVENTS)}}, {"type": "null"}]},
}


MAX_PROMPTS = 64  # prompts in one completion request

# More unknown fields than this in one object are refused as one error, not one error each.
MAX_UNKNOWN_FIELDS = 32


class RequestModel(BaseModel):
    """The base of every model of a request: unknown fields are refused, many of them as one error
    (a hostile body costs one error, not millions)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _few_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) > len(cls.model_fields) + MAX_UNKNOWN_FIELDS:
            raise ValueError(f"holds {len(data)} fields; it has {len(cls.model_fields)} (unknown fields are refused)")
        return data


def sized(**limits: int | tuple[int, str]) -> Any:
    """A before-validator of a request model for the named list or object fields: one over its
    size is refused before its items are validated (one error, not one per item). A limit may come
    with its message, a template of `{limit}` and `{count}`."""

    def check(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
        limit, message = _limit(limits[info.field_name or ""])
        if isinstance(value, list | dict) and len(value) > limit:
            raise ValueError(message.format(limit=limit, count=len(value)))
        return value

    return field_validator(*limits, mode="before", check_fields=False)(classmethod(check))  # type: ignore[arg-type]


def _limit(spec: int | tuple[int, str]) -> tuple[int, str]:
    return spec if isinstance(spec, tuple) else (spec, "holds {count} items; at most {limit}")


class StreamOptions(RequestModel):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted: genq's chunks carry no obfuscation padding


class JobBody(RequestModel):
    """What every request body has: the model it names, an optional adapter, and prompts whose
    length the API limits. Each endpoint's body (genq.shared.kinds) is one of these."""

    model: str = Field(min_length=1, max_length=200)
    adapter: str | None = Field(default=None, min_length=1, max_length=200)

    def prompt_texts(self) -> list[tuple[str, str]]:
        """(field, text) of each prompt, for the prompt length limit."""
        return []


def _stop_list_errors(v: str | list[str] | None) -> str | list[str] | None:
    if isinstance(v, list):
        if len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in v):
            raise ValueError("stop sequences must not be empty")
    elif v == "":
        raise ValueError("must not be empty")
    return v


STOP_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1},
                         {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
                         {"type": "null"}]}
LOGIT_BIAS_SCHEMA = {"anyOf": [{"type": "object", "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                                "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                                "maxProperties": 300}, {"type": "null"}]}


class SamplingBody(JobBody):
    """What text bodies (completions and chat) share: OpenAI's sampling fields plus genq's top_k and
    repetition_penalty. OpenAI declares these fields nullable, so an explicit null takes the default
    (batch files written for OpenAI often carry `"temperature": null`)."""

    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0, description="0 keeps only the most likely token.")
    top_k: int = Field(default=0, ge=0, le=1000, description="0 disables top-k filtering.")
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Token id (as a string) to a bias from -100 to 100 added to its logit.")
    user: str | None = Field(default=None, max_length=256)  # accepted so that OpenAI batch files work unchanged

    nulls_take_defaults: ClassVar[bool] = True
    _sampling_sizes = sized(stop=(4, "at most {limit} stop sequences, got {count}"),
                            logit_bias=(300, "at most {limit} tokens may be biased, got {count}"))

    @model_validator(mode="before")
    @classmethod
    def _nulls_take_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            defaulted = set(_defaulted(cls))
            data = {k: v for k, v in data.items() if not (v is None and k in defaulted)}
        return data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        return _stop_list_errors(v)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if len(v) > 300:
            raise ValueError("at most 300 tokens may be biased")
        for key, bias in v.items():
            if not (key.isascii() and key.isdigit() and len(key) <= 9):
                raise ValueError(f"keys must be token ids written as strings, not {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {key} must be between -100 and 100")
        return v

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def sampling(self) -> bool:
        """Whether tokens are sampled; `temperature: 0` means greedy."""
        return self.temperature > 0

    @property
    def top_logprob_count(self) -> int | None:
        """How many top logprobs each generated token reports; None: no logprobs asked."""
        return None

    @property
    def token_limit(self) -> int | None:
        """The most tokens a choice may generate; None: as many as the model allows."""
        return None

    @property
    def token_bias(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}


class CompletionBody(SamplingBody):
    """An OpenAI `/v1/completions` body plus genq's sampling extras."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=documented(
        prompt={"anyOf": [{"type": "string", "minLength": 1},
                          {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                           "maxItems": 64}]},
        stop=STOP_SCHEMA, logit_bias=LOGIT_BIAS_SCHEMA))

    _completion_sizes = sized(prompt=(MAX_PROMPTS, "must hold between 1 and {limit} prompts, got {count}"))
    prompt: str | list[str] = Field(description="One prompt, or a list of prompts answered in order.")
    max_tokens: int = Field(default=16, ge=1, le=4096)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    do_sample: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not 1 <= len(v) <= MAX_PROMPTS:
                raise ValueError(f"must hold between 1 and {MAX_PROMPTS} prompts")
            if any(not p for p in v):
                raise ValueError("prompts must not be empty")
        elif not v:
            raise ValueError("must not be empty")
        return v

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def prompt_texts(self) -> list[tuple[str, str]]:
        """(field, text) of each prompt, for the prompt length limit."""
        if isinstance(self.prompt, str):
            return [("body.prompt", self.prompt)]
        return [(f"body.prompt[{i}]", p) for i, p in enumerate(self.prompt)]

    @property
    def sampling(self) -> bool:
        """Whether tokens are sampled; `temperature: 0` means greedy unless do_sample says otherwise."""
        if self.do_sample is not None:
            return self.do_sample
        return self.temperature > 0

    @property
    def top_logprob_count(self) -> int | None:
        return self.logprobs

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


# Scheduler names a request may give; runners map them to diffusers scheduler classes.
SCHEDULERS = ("ddim", "pndm", "euler", "euler_ancestral", "dpm_solver_multistep", "heun", "unipc")
MAX_IMAGE_SIDE = 2048


class ImageBody(JobBody):
    """An OpenAI `/v1/images/generations` body plus diffusion extras."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=documented(
        size={"type": "string", "pattern": r"^[0-9]+x[0-9]+$"}))

    prompt: str = Field(default="", max_length=4000)
    n: int = Field(default=1, ge=1, le=10)
    size: str = Field(default="512x512", description="WIDTHxHEIGHT in pixels, each a multiple of 8.")
    response_format: Literal["url", "b64_json"] = "url"
    negative_prompt: str | None = Field(default=None, max_length=4000)
    num_inference_steps: int = Field(default=30, ge=1, le=200)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=50.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    scheduler: Literal[SCHEDULERS] | None = None  # type: ignore[valid-type]
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

    def prompt_texts(self) -> list[tuple[str, str]]:
        """(field, text) of the prompt and negative prompt, for the prompt length limit."""
        return [("body.prompt", self.prompt)] + (
            [("body.negative_prompt", self.negative_prompt)] if self.negative_prompt is not None else [])

    @property
    def width(self) -> int:
        return int(self.size.partition("x")[0])

    @property
    def height(self) -> int:
        return int(self.size.partition("x")[2])


def response_id(prefix: str, suffix: str) -> str:
    """A text or chat response's id, `cmpl-<job id without job_>` / `chatcmpl-...`: a streamed
    answer's chunks (written by the API) and its stored result (by the worker) share it."""
    return f"{prefix}-{suffix}"


# --- results: what a succeeded job's `result` holds ------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: dict[str, Any] | None = None  # OpenAI's legacy shape: tokens, token_logprobs, top_logprobs, text_offset
    finish_reason: Literal["stop", "length"]


class TextCompletion(BaseModel):
    """An OpenAI `text_completion` response body."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ImageDatum(BaseModel):
    """One image: `url` or `b64_json` is filled in by the API on every read, as the request asked."""

    url: str | None = None
    b64_json: str | None = None
    seed: int
    index: int
    revised_prompt: str | None = None
    nsfw_content_detected: bool | None = None  # only when the safety checker blacked the image out


class ImagesResult(BaseModel):
    """An OpenAI images response plus genq's `parameters` (what the images were made with).

    As stored, a result also holds `output_keys`: the storage key of image i at index i. The API
    turns each into the image's `url` or `b64_json` on every read and never shows the keys."""

    created: int
    data: list[ImageDatum]
    parameters: dict[str, Any]
    output_keys: list[str] = Field(default_factory=list, exclude=True)


# --- embeddings ------------------------------------------------------------------------------------

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit of inputs in one request
MAX_EMBEDDING_DIMENSIONS = 65536
MAX_INPUT_TOKENS = 32768  # token ids in one input of a list of them (the model's context limits it further)

_Text = Annotated[str, Field(min_length=1)]
_TokenId = Annotated[int, Strict(), Field(ge=0)]  # strict: true and 1.0 are not token ids


def _input_kind(value: Any) -> str | None:
    """Which form an `input` takes, read from its first element, so that a bad element is reported
    at its own index (`body.input[3]`) rather than once for each form it fails."""
    if isinstance(value, str):
        return "string"
    if not isinstance(value, list):
        return None
    first = value[0] if value else ""
    if isinstance(first, list):
        return "token_lists"
    return "tokens" if isinstance(first, int) and not isinstance(first, bool) else "strings"


EmbeddingInput = Annotated[
    Annotated[_Text, Tag("string")]
    | Annotated[list[_Text], Tag("strings"), Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    | Annotated[list[_TokenId], Tag("tokens"), Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    | Annotated[list[Annotated[list[_TokenId], Field(min_length=1, max_length=MAX_INPUT_TOKENS)]], Tag("token_lists"),
                Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)],
    Discriminator(_input_kind, custom_error_type="invalid_input",
                  custom_error_message="must be a string, a list of strings, a list of token ids or a list of "
                                       "lists of token ids"),
]


class EmbeddingBody(JobBody):
    """An OpenAI `/v1/embeddings` body."""

    input: EmbeddingInput = Field(description=f"A string, up to {MAX_EMBEDDING_INPUTS} strings, a list of token ids, "
                                              f"or up to {MAX_EMBEDDING_INPUTS} lists of token ids; none empty.")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: each embedding as the base64 of its little-endian float32 bytes.")
    dimensions: int | None = Field(default=None, ge=1, le=MAX_EMBEDDING_DIMENSIONS,
                                   description="Keep the first this many dimensions (models whose registry "
                                               "entry allows it).")
    user: str | None = Field(default=None, max_length=256)  # accepted, as OpenAI's is

    @property
    def inputs(self) -> list[str] | list[list[int]]:
        """Each input in order: a text, or a list of token ids."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if isinstance(value[0], int):
            return [cast(list[int], value)]  # one list of token ids is one input
        return cast("list[str] | list[list[int]]", value)

    def input_param(self, index: int) -> str:
        """The field of input `index`: `body.input` when the request holds one input."""
        one = isinstance(self.input, str) or (bool(self.input) and isinstance(self.input[0], int))
        return "body.input" if one else f"body.input[{index}]"

    def prompt_texts(self) -> list[tuple[str, str]]:
        """(field, text) of each text input, for the prompt length limit."""
        return [(self.input_param(i), text) for i, text in enumerate(self.inputs) if isinstance(text, str)]


class EmbeddingDatum(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32 (encoding_format: base64)


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResult(BaseModel):
    """An OpenAI embeddings response body (`"object": "list"`), one embedding per input in order."""

    object: Literal["list"] = "list"
    data: list[EmbeddingDatum]
    model: str
    usage: EmbeddingUsage
