"""The chat contract: OpenAI `/v1/chat/completions` bodies and `chat.completion` results, and where
a model's chat template comes from.

The body accepts OpenAI's whole request surface so that nothing a client sends is dropped
unseen: fields and content parts genq cannot honour (images for a text-only model, audio, tools)
parse here and are refused by the serving kind's limits (`unsupported()`), with the field named.
The worker builds the prompt with the model's own chat template; the API only checks that one
exists (`template_of`), reading the model's files and never importing torch.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from genq.shared.response_format import check_response_format
from genq.shared.schemas import (
    LOGIT_BIAS_SCHEMA,
    STOP_SCHEMA,
    RequestModel,
    SamplingBody,
    StreamOptions,
    Usage,
    documented,
    sized,
)

CHAT_URL = "/v1/chat/completions"
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_MESSAGES = 2048
MAX_TOOLS = 128  # OpenAI's limit of tools (and of functions) in one request
MAX_PARTS = 1024  # content parts in one message


class _Part(RequestModel):
    pass


class TextPart(_Part):
    type: Literal["text"]
    text: str


class RefusalPart(_Part):
    type: Literal["refusal"]
    refusal: str


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: dict[str, Any]


class AudioPart(_Part):
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


class FilePart(_Part):
    type: Literal["file"]
    file: dict[str, Any]


ContentPart = Annotated[TextPart | RefusalPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")]
TEXT_PARTS = (TextPart, RefusalPart)


class ChatMessage(_Part):
    """One message of a conversation, as OpenAI takes it."""

    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = None  # assistant: the calls it made earlier
    tool_call_id: str | None = Field(default=None, max_length=256)  # tool: which call this answers
    refusal: str | None = None
    audio: dict[str, Any] | None = None  # assistant: an earlier audio answer (refused: text only)
    function_call: dict[str, Any] | None = None  # deprecated form of tool_calls (refused)

    _message_sizes = sized(content=MAX_PARTS, tool_calls=MAX_TOOLS)

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError("only tool messages take tool_call_id")
        if self.role != "assistant" and (self.tool_calls is not None or self.refusal is not None):
            raise ValueError("only assistant messages take tool_calls or refusal")
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal)):
            raise ValueError("content is required (null only for an assistant message with tool_calls)")
        return self

    @property
    def text(self) -> str:
        """The message's text: a string content, or its text parts joined by newlines."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text if isinstance(p, TextPart) else p.refusal
                         for p in self.content or [] if isinstance(p, TEXT_PARTS))


class ResponseFormat(_Part):
    """OpenAI's response_format; its schema is checked (and compiled) by genq.shared.response_format."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatBody(SamplingBody):
    """An OpenAI `/v1/chat/completions` body plus genq's top_k, repetition_penalty and adapter."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=documented(
        stop=STOP_SCHEMA, logit_bias=LOGIT_BIAS_SCHEMA))

    _chat_sizes = sized(tools=MAX_TOOLS, functions=MAX_TOOLS, modalities=8, metadata=16)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, le=32768, description="Deprecated by OpenAI for "
                                   "max_completion_tokens; either bounds the tokens of each choice.")
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    metadata: dict[str, str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI fields genq accepts and needs nothing for.
    store: bool | None = None
    service_tier: str | None = Field(default=None, max_length=32)
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    safety_identifier: str | None = Field(default=None, max_length=256)
    parallel_tool_calls: bool | None = None
    # OpenAI fields genq parses so that it can refuse them by name (see `unsupported`).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("at most 16 pairs, keys up to 64 and values up to 512 characters")
        return v

    @model_validator(mode="after")
    def _pairs(self) -> ChatBody:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        return self

    def prompt_texts(self) -> list[tuple[str, str]]:
        return [(f"body.messages[{i}].content", m.text) for i, m in enumerate(self.messages)]

    @property
    def top_logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def constrained(self) -> bool:
        """Whether the output must follow a grammar (json_object or json_schema)."""
        return self.response_format is not None and self.response_format.type != "text"

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) of what this body asks that no genq model does today."""
        out: list[tuple[str, str]] = []
        if self.tools or self.functions:
            name = "tools" if self.tools else "functions"
            out.append((f"body.{name}", "tool calling is not supported by genq's chat models"))
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none", "auto"):
                out.append((f"body.{name}", "tool calling is not supported by genq's chat models"))
        if self.modalities is not None and self.modalities != ["text"]:
            out.append(("body.modalities", "genq's chat models answer in text only"))
        for name in ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options", "moderation"):
            if getattr(self, name) is not None:
                out.append((f"body.{name}", "not supported by genq's chat models"))
        if self.store:
            out.append(("body.store", "genq does not store chat completions for later listing; "
                                      "send false or leave it out"))
        if self.service_tier not in (None, "auto", "default"):
            out.append(("body.service_tier", "genq has one service tier: use auto or default (or priority "
                                             "on the request line)"))
        for i, message in enumerate(self.messages):
            at = f"body.messages[{i}]"
            if message.audio is not None or message.function_call is not None:
                field = "audio" if message.audio is not None else "function_call"
                out.append((f"{at}.{field}", "not supported by genq's chat models"))
            for j, part in enumerate(message.content if isinstance(message.content, list) else []):
                if not isinstance(part, TEXT_PARTS):
                    out.append((f"{at}.content[{j}]", f"{part.type} content parts are not supported: "
                                                      "genq's chat models read text only"))
        return out

    def template_messages(self) -> list[dict[str, Any]]:
        """The conversation as chat templates take it. `developer` is OpenAI's newer name for
        `system`, which is what open models' templates know."""
        out = []
        for m in self.messages:
            message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
            for key in ("name", "tool_calls", "tool_call_id"):
                if getattr(m, key) is not None:
                    message[key] = getattr(m, key)
            out.append(message)
        return out


# --- results ----------------------------------------------------------------------------------

class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    """An OpenAI `chat.completion` response body."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str
    service_tier: str | None = None


# --- where a model's chat template comes from ----------------------------------------------------

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def template_in(files: dict[str, str]) -> str | None:
    """The default chat template among a model's tokenizer files (name -> text), as transformers
    reads them: `chat_template.jinja`, then `chat_template.json`, then tokenizer_config.json's
    `chat_template` (a string, or named templates of which `default` is used)."""
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"]
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            found = json.loads(files[name]).get("chat_template") if name in files else None
        except (ValueError, AttributeError):
            continue
        if isinstance(found, list):
            found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"),
                         None)
        if isinstance(found, str) and found:
            return found
    return None


@lru_cache(maxsize=256)
def template_of(source: str, revision: str | None = None) -> str | None | Literal[False]:
    """The chat template in a model's files: the text, None when the files have none, or False when
    they cannot be read here (a hub model not in the local cache: the worker decides)."""
    files: dict[str, str] = {}
    local = Path(source)
    if local.is_dir():
        for name in TEMPLATE_FILES:
            if (local / name).is_file():
                files[name] = (local / name).read_text(encoding="utf-8")
        return template_in(files)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    config = try_to_load_from_cache(source, "tokenizer_config.json", revision=revision)
    if not isinstance(config, str):
        return False
    for name in TEMPLATE_FILES:
        path = try_to_load_from_cache(source, name, revision=revision)
        if isinstance(path, str):
            files[name] = Path(path).read_text(encoding="utf-8")
    return template_in(files)


def mentions_tools(template: str) -> bool:
    """Whether a chat template renders tool calls and results at all."""
    return "tool" in template


def chat_errors(body: ChatBody, model: str, template: str | None | Literal[False]) -> list[tuple[str, str]]:
    """What a chat-serving kind refuses at submit: fields genq cannot honour, a model without a
    chat template (`template` None; False: unknown here, the worker checks), and tool messages for
    a template that renders no tools."""
    errors = body.unsupported()
    fmt = body.response_format
    if fmt is not None and (problem := check_response_format(fmt.model_dump(exclude_none=True))):
        errors.append(("body.response_format", problem))
    if template is None:
        errors.append(("body.model", f"model {model!r} has no chat template (its tokenizer files have "
                                     "none and its registry entry sets no chat_template); send its prompts "
                                     "to /v1/completions instead"))
    elif template is not False and not mentions_tools(template):
        for i, m in enumerate(body.messages):
            if m.role == "tool" or m.tool_calls:
                errors.append((f"body.messages[{i}]", f"model {model!r}'s chat template has no tool messages"))
                break
    return errors
