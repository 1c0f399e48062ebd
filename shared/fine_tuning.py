"""Fine-tuning training files: OpenAI's two JSONL formats, checked line by line.

Used by the API (at upload and when a job is created, so a bad file is refused with the line and
field at fault) and by the training worker (which trains on the parsed examples), so both read a
file the same way. Pure Python: no torch, no database.

A file holds one format throughout:

- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight": 0|1}, ...]}`,
  with at least one assistant message that has content and is not weighted 0 (what is trained on);
- prompt-completion: `{"prompt": str, "completion": str}`, with a non-empty completion.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from genq.shared.jsonl import LineError, jsonl_objects
from genq.shared.requests import Metadata
from genq.shared.schemas import RequestModel, documented

# Limits of a training (or validation) file; its size is capped by the upload limit (GENQ_MAX_BODY_BYTES).
MIN_EXAMPLES = 1  # OpenAI asks for 10; genq trains on fewer (tiny test sets), but not on none
MAX_EXAMPLES = 50_000
MAX_MESSAGES = 256  # per chat example
MAX_EXAMPLE_CHARS = 64_000  # of all the text of one example (a context of some 16k tokens)
MAX_ERRORS_REPORTED = 100

ROLES = ("system", "user", "assistant")
FORMATS = ("chat", "prompt_completion")
Format = Literal["chat", "prompt_completion"]
_SHOWN = {"chat": "chat", "prompt_completion": "prompt-completion"}

# What OpenAI's chat format may hold that genq cannot train on, and why each is refused.
_UNSUPPORTED_MESSAGE_FIELDS = {
    "tool_calls": "tool calls are not supported: genq fine-tunes on text messages only",
    "function_call": "function calls are not supported: genq fine-tunes on text messages only",
    "refusal": "refusals are not supported: give the assistant's answer as `content`",
    "audio": "audio is not supported: genq fine-tunes on text messages only",
}
_UNSUPPORTED_ROLES = {
    "tool": "tool messages are not supported: genq fine-tunes on system, user and assistant text",
    "function": "function messages are not supported: genq fine-tunes on system, user and assistant text",
    "developer": "use role `system` for instructions (genq's chat templates know system, user and assistant)",
}
_UNSUPPORTED_EXAMPLE_FIELDS = {
    "tools": "tool definitions are not supported: genq fine-tunes on text messages only",
    "functions": "function definitions are not supported: genq fine-tunes on text messages only",
    "parallel_tool_calls": "tool calls are not supported: genq fine-tunes on text messages only",
}


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    weight: int = 1  # 0: shown to the model but not trained on (assistant messages only)


@dataclass(frozen=True)
class ChatExample:
    line: int
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class PromptExample:
    line: int
    prompt: str
    completion: str


Example = ChatExample | PromptExample


def example_format(example: Example) -> Format:
    return "chat" if isinstance(example, ChatExample) else "prompt_completion"


def _line_format(obj: dict[str, Any]) -> Format | None:
    if "messages" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    return None


def _message(raw: Any, at: str, line: int) -> tuple[Message | None, list[LineError]]:
    if not isinstance(raw, dict):
        return None, [LineError(line, at, "must be an object with `role` and `content`")]
    for name, why in _UNSUPPORTED_MESSAGE_FIELDS.items():
        if name in raw:
            return None, [LineError(line, f"{at}.{name}", why)]
    unknown = sorted(set(raw) - {"role", "content", "weight"})
    if unknown:
        return None, [LineError(line, f"{at}.{unknown[0]}", "unknown field (a message has role, content and "
                                                              "weight)")]
    role = raw.get("role")
    if role in _UNSUPPORTED_ROLES:
        return None, [LineError(line, f"{at}.role", _UNSUPPORTED_ROLES[role])]
    if role not in ROLES:
        shown = "missing" if role is None else repr(role)
        return None, [LineError(line, f"{at}.role", f"must be one of {', '.join(ROLES)} (got {shown})")]
    content = raw.get("content")
    if isinstance(content, list):
        return None, [LineError(line, f"{at}.content", "must be a string: content parts (images, audio, "
                                                          "files) are not supported")]
    if not isinstance(content, str):
        return None, [LineError(line, f"{at}.content", "must be a string")]
    weight = raw.get("weight", 1)
    if "weight" in raw and role != "assistant":
        return None, [LineError(line, f"{at}.weight", "only assistant messages take a weight")]
    if weight not in (0, 1) or isinstance(weight, bool):
        return None, [LineError(line, f"{at}.weight", "must be 0 or 1")]
    return Message(role, content, int(weight)), []


def _chat(obj: dict[str, Any], line: int) -> tuple[ChatExample | None, list[LineError]]:
    for name, why in _UNSUPPORTED_EXAMPLE_FIELDS.items():
        if name in obj:
            return None, [LineError(line, name, why)]
    if unknown := sorted(set(obj) - {"messages"}):
        return None, [LineError(line, unknown[0], "unknown field (a chat example has only `messages`)")]
    raw = obj["messages"]
    if not isinstance(raw, list) or not raw:
        return None, [LineError(line, "messages", "must be a non-empty list of messages")]
    if len(raw) > MAX_MESSAGES:
        return None, [LineError(line, "messages", f"at most {MAX_MESSAGES} messages, got {len(raw)}")]
    messages: list[Message] = []
    errors: list[LineError] = []
    for i, item in enumerate(raw):
        message, errs = _message(item, f"messages[{i}]", line)
        errors += errs
        if message is not None:
            messages.append(message)
    if errors:
        return None, errors
    if not any(m.role == "assistant" and m.content.strip() and m.weight for m in messages):
        return None, [LineError(line, "messages", "needs an assistant message with non-empty content and "
                                                  "weight 1 (what the model is trained to answer)")]
    return ChatExample(line, tuple(messages)), []


def _prompt(obj: dict[str, Any], line: int) -> tuple[PromptExample | None, list[LineError]]:
    if unknown := sorted(set(obj) - {"prompt", "completion"}):
        return None, [LineError(line, unknown[0], "unknown field (a prompt-completion example has only "
                                                  "`prompt` and `completion`)")]
    errors = [LineError(line, name, "required (a string)" if name not in obj else "must be a string")
              for name in ("prompt", "completion") if not isinstance(obj.get(name), str)]
    if errors:
        return None, errors
    if not obj["completion"].strip():
        return None, [LineError(line, "completion", "must not be empty (it is what the model is trained to write)")]
    return PromptExample(line, obj["prompt"], obj["completion"]), []


def _chars(example: Example) -> int:
    if isinstance(example, ChatExample):
        return sum(len(m.content) for m in example.messages)
    return len(example.prompt) + len(example.completion)


def parse_example(obj: Any, line: int, expected: Format | None = None) -> tuple[Example | None, list[LineError]]:
    """One line's training example, or the errors naming its fields. `expected`: the file's format
    (that of its first example), which every line must share."""
    if not isinstance(obj, dict):
        return None, [LineError(line, None, "must be a JSON object")]
    found = _line_format(obj)
    if found is None:
        return None, [LineError(line, None, "must hold `messages` (chat format) or `prompt` and `completion` "
                                            "(prompt-completion format)")]
    if expected is not None and found != expected:
        return None, [LineError(line, None, f"is in {_SHOWN[found]} format but the file is in {_SHOWN[expected]} "
                                            "format (one format per file, that of its first line)")]
    example, errors = _chat(obj, line) if found == "chat" else _prompt(obj, line)
    if example is not None and _chars(example) > MAX_EXAMPLE_CHARS:
        return None, [LineError(line, "messages" if found == "chat" else None,
                                f"an example holds at most {MAX_EXAMPLE_CHARS} characters of text, got "
                                f"{_chars(example)}")]
    return example, errors


def parse_training_file(data: bytes) -> tuple[list[Example], list[LineError]]:
    """The examples of a training or validation file and every problem found, each naming its
    1-based line and field (`messages[2].content`). A file is usable only when `errors` is empty;
    then it holds MIN_EXAMPLES to MAX_EXAMPLES examples, all in the format of its first line.
    Parsing stops after MAX_ERRORS_REPORTED problems."""
    examples: list[Example] = []
    errors: list[LineError] = []
    expected: Format | None = None
    count = 0
    for line, obj in jsonl_objects(data):
        count += 1
        if count > MAX_EXAMPLES:
            return [], [LineError(line, None, f"a training file holds at most {MAX_EXAMPLES} examples")]
        if isinstance(obj, LineError):
            errors.append(obj)
        else:
            if expected is None and isinstance(obj, dict):
                expected = _line_format(obj)
            example, errs = parse_example(obj, line, expected)
            errors += errs
            if example is not None:
                examples.append(example)
        if len(errors) >= MAX_ERRORS_REPORTED:
            break
    if not errors and len(examples) < MIN_EXAMPLES:
        errors.append(LineError(None, None, "the file holds no training example (one JSON object a line)"))
    return examples, errors


# --- the create request: POST /v1/fine_tuning/jobs ------------------------------------------------

SUFFIX_MAX_CHARS = 64
SEED_MAX = 2**31 - 1
# The ranges OpenAI accepts for the hyperparameters a request may set (or leave "auto").
N_EPOCHS_RANGE, BATCH_SIZE_RANGE, LR_MULTIPLIER_MAX = (1, 50), (1, 256), 10.0
LORA_R_RANGE, LORA_ALPHA_MAX, LORA_MAX_TARGETS = (1, 256), 1024.0, 64
_SUFFIX = re.compile(r"[a-z0-9][a-z0-9._-]*")
_MODULE = re.compile(r"[A-Za-z0-9_.]{1,100}")
METHOD_TYPES = ("supervised", "dpo", "reinforcement")  # OpenAI's; genq trains the first only


def _auto_or_int(value: Any, lo: int, hi: int) -> Any:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
        return value
    raise ValueError(f'must be "auto" or an integer from {lo} to {hi}')


class Hyperparameters(RequestModel):
    """What OpenAI lets a supervised job set; "auto" is resolved from the training file's size
    (resolve_hyperparameters) and the job shows the values it trains with."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=documented(
        n_epochs={"anyOf": [{"const": "auto"}, {"type": "integer", "minimum": N_EPOCHS_RANGE[0],
                                                "maximum": N_EPOCHS_RANGE[1]}], "default": "auto"},
        batch_size={"anyOf": [{"const": "auto"}, {"type": "integer", "minimum": BATCH_SIZE_RANGE[0],
                                                  "maximum": BATCH_SIZE_RANGE[1]}], "default": "auto"},
        learning_rate_multiplier={"anyOf": [{"const": "auto"}, {"type": "number", "exclusiveMinimum": 0,
                                                                "maximum": LR_MULTIPLIER_MAX}], "default": "auto"}))

    n_epochs: Any = "auto"
    batch_size: Any = "auto"
    learning_rate_multiplier: Any = "auto"

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v: Any) -> Any:
        return _auto_or_int(v, *N_EPOCHS_RANGE)

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        return _auto_or_int(v, *BATCH_SIZE_RANGE)

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lr(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= LR_MULTIPLIER_MAX):
            return v
        raise ValueError(f'must be "auto" or a number above 0 and at most {LR_MULTIPLIER_MAX:g}')


class Supervised(RequestModel):
    hyperparameters: Hyperparameters | None = None


class Method(RequestModel):
    """OpenAI's `method`: genq trains `supervised` only."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=documented(type={"const": "supervised"}))

    type: str
    supervised: Supervised | None = None
    dpo: Any = None
    reinforcement: Any = None

    @field_validator("type")
    @classmethod
    def _supervised(cls, v: str) -> str:
        if v in METHOD_TYPES and v != "supervised":
            raise ValueError(f"genq trains only supervised fine-tuning jobs, not {v}")
        if v != "supervised":
            raise ValueError("must be supervised")
        return v

    @field_validator("dpo", "reinforcement")
    @classmethod
    def _other(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and info.data.get("type") == "supervised":  # another type is refused on its own
            raise ValueError("genq trains only supervised fine-tuning jobs")
        return v


class Lora(RequestModel):
    """genq's extension: the LoRA adapter a job trains (the openai SDK sends it through `extra_body`).
    `alpha` defaults to twice `r`; `target_modules` to the worker's choice for the architecture."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=documented(target_modules={"anyOf": [
        {"type": "array", "items": {"type": "string", "pattern": _MODULE.pattern}, "minItems": 1,
         "maxItems": LORA_MAX_TARGETS}, {"const": "all-linear"}, {"type": "null"}]}))

    r: int = Field(default=8, ge=LORA_R_RANGE[0], le=LORA_R_RANGE[1], strict=True)
    alpha: float | None = Field(default=None, gt=0, le=LORA_ALPHA_MAX)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: Any = None

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if v is None or v == "all-linear":
            return v
        if (not isinstance(v, list) or not 1 <= len(v) <= LORA_MAX_TARGETS
                or not all(isinstance(m, str) and _MODULE.fullmatch(m) for m in v)):
            raise ValueError(f'must be "all-linear" or a list of 1 to {LORA_MAX_TARGETS} module names '
                             "(letters, digits, '_' and '.')")
        return v


class FineTuningJobCreate(RequestModel):
    """`POST /v1/fine_tuning/jobs`: OpenAI's body, plus genq's `lora`. Top-level `hyperparameters`
    (which OpenAI deprecates) and `method` are refused together: say it once."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=documented(
        suffix={"anyOf": [{"type": "string", "pattern": f"^{_SUFFIX.pattern}$", "maxLength": SUFFIX_MAX_CHARS},
                          {"type": "null"}]},
        integrations={"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}],
                      "description": "Not supported: leave it out."}))

    model: str = Field(max_length=200)
    training_file: str = Field(max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    suffix: str | None = None
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX, strict=True)
    metadata: Metadata | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    integrations: Any = None
    lora: Lora | None = None
    # genq's extensions, as on jobs and batches: where to POST the job's webhook events, and which.
    webhook_url: str | None = Field(default=None, max_length=2000)
    webhook_events: list[Literal["succeeded", "failed", "cancelled", "progress"]] | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if len(v) > SUFFIX_MAX_CHARS:
            raise ValueError(f"at most {SUFFIX_MAX_CHARS} characters, got {len(v)}")
        if not _SUFFIX.fullmatch(v):
            raise ValueError("may hold only a-z, 0-9, '-', '_' and '.', starting with a letter or digit "
                             "(it becomes part of the fine-tuned model's name)")
        return v

    @field_validator("method")
    @classmethod
    def _one_place(cls, v: Method | None, info: ValidationInfo) -> Method | None:
        if v is not None and info.data.get("hyperparameters") is not None:
            raise ValueError("give hyperparameters in method.supervised.hyperparameters or at the top level "
                             "(deprecated by OpenAI), not both")
        return v

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, v: Any) -> Any:
        if v:
            raise ValueError("not supported: genq reports a job's metrics as its events and checkpoints, not "
                             "to an outside service (leave integrations out)")
        return None

    def requested_hyperparameters(self) -> Hyperparameters:
        """The hyperparameters asked for, wherever they were given (method or top level)."""
        given = self.method.supervised.hyperparameters if self.method and self.method.supervised else None
        return given or self.hyperparameters or Hyperparameters()


# --- what a job trains with ---------------------------------------------------------------------

AUTO_EXAMPLE_PASSES = 300  # auto epochs: enough to see ~300 examples, between 1 and MAX_AUTO_EPOCHS
MAX_AUTO_EPOCHS, MAX_AUTO_BATCH_SIZE = 10, 16


def resolve_hyperparameters(asked: Hyperparameters, examples: int) -> dict[str, Any]:
    """The values a job trains with: those asked for, "auto" made concrete from the number of
    training examples (more epochs for small files; batches of about 0.2% of the file)."""
    epochs = asked.n_epochs if asked.n_epochs != "auto" else \
        min(MAX_AUTO_EPOCHS, max(1, math.ceil(AUTO_EXAMPLE_PASSES / max(examples, 1))))
    batch = asked.batch_size if asked.batch_size != "auto" else \
        min(MAX_AUTO_BATCH_SIZE, max(1, math.ceil(examples * 0.002)))
    lr = 1.0 if asked.learning_rate_multiplier == "auto" else float(asked.learning_rate_multiplier)
    return {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": lr}


def resolve_lora(asked: Lora | None) -> dict[str, Any]:
    """The adapter a job trains: {"r", "alpha", "dropout", "target_modules"} (None: the worker's
    default modules for the architecture)."""
    lora = asked or Lora()
    return {"r": lora.r, "alpha": lora.alpha if lora.alpha is not None else 2.0 * lora.r,
            "dropout": lora.dropout, "target_modules": lora.target_modules}
