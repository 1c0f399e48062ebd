"""What every runner offers the worker: load once, then serve validated requests in batches.

The worker's batcher (workers/batching.py) calls `prepare` for each job in that job's own thread,
collects prepared items with equal `batch_key` up to the model's `max_batch_size` rows, and hands
them to `run_batch` together. A runner that cannot batch a kind of work gives each item its own key.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

from genq.shared.options import ModelOptions
from genq.shared.registry import ModelSpec
from genq.shared.schemas import MAX_SEED, ImageDatum, ImagesResult, response_id
from genq.workers.runners.lora import AdapterLRU


class JobCancelled(Exception):
    """Raised by a runner when its context reports that the job was cancelled."""


class InvalidRequest(ValueError):
    """The request cannot be served by this model (e.g. prompt longer than its context)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _keep_in_memory(outputs: dict[str, bytes]) -> Callable[[str, bytes, str], str]:
    def put(name: str, data: bytes, content_type: str) -> str:
        outputs[name] = data
        return name

    return put


@dataclass
class RunContext:
    """Per-job hooks a runner may use; the defaults make a runner callable without a worker.

    `put_output(name, data, content_type)` stores one output file (an image, say) and returns its
    object key; the worker puts it under `jobs/<job id>/<attempt>/<name>` and removes it again if
    the job does not succeed. The default keeps outputs in `outputs`, for tests and direct use.

    `emit`, set for a `stream: true` job where the broker carries token streams, takes the new text
    of choices as (choice index, text) pairs while the job runs; the final result stays the whole
    answer, and streamed text must be a prefix of each choice's final text.
    """

    job_id: str = "job_local"
    set_progress: Callable[[float], None] = lambda p: None
    is_cancelled: Callable[[], bool] = lambda: False
    outputs: dict[str, bytes] = field(default_factory=dict)
    put_output: Callable[[str, bytes, str], str] | None = None
    emit: Callable[[list[tuple[int, str]]], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.put_output is None:
            self.put_output = _keep_in_memory(self.outputs)


def _completion(prefix: str, obj: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int,
                completion_tokens: int, job_id: str, **extra: Any) -> dict[str, Any]:
    """The frame text and chat responses share: id, object, created, model, choices, usage."""
    suffix = job_id.removeprefix("job_") if job_id != RunContext.job_id else uuid.uuid4().hex[:24]
    return {
        "id": response_id(prefix, suffix), "object": obj, "created": int(time.time()), "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        **extra,
    }


def text_completion(model: str, choices: list[dict[str, Any]], prompt_tokens: int,
                    completion_tokens: int, job_id: str = RunContext.job_id) -> dict[str, Any]:
    """An OpenAI `text_completion` response body."""
    return _completion("cmpl", "text_completion", model, choices, prompt_tokens, completion_tokens, job_id)


def chat_completion(model: str, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int,
                    fingerprint: str, job_id: str = RunContext.job_id) -> dict[str, Any]:
    """An OpenAI `chat.completion` response body."""
    return _completion("chatcmpl", "chat.completion", model, choices, prompt_tokens, completion_tokens, job_id,
                       system_fingerprint=fingerprint)


def images_result(data: list[ImageDatum], parameters: dict[str, Any], output_keys: list[str]) -> dict[str, Any]:
    """An images result as stored: image i's storage key at output_keys[i]; the API fills in each
    image's url or b64_json on every read."""
    body = ImagesResult(created=int(time.time()), data=data, parameters=parameters).model_dump()
    for datum in body["data"]:
        del datum["url"], datum["b64_json"]
        if datum["nsfw_content_detected"] is None:  # named only for a blacked-out image
            del datum["nsfw_content_detected"]
    return {**body, "output_keys": output_keys}


def derive_seed(seed: int, index: int) -> int:
    """Image `index` of a request with seed `seed` uses seed + index, so the same request gives the
    same images and image k alone is reproduced by asking for n=1 with seed + k."""
    return (seed + index) % (MAX_SEED + 1)


# Seeds genq picks for requests that gave none: reported back so the request can be repeated, and
# small enough to stay exact as JSON numbers everywhere (JavaScript included) and easy to type.
RANDOM_SEED_BOUND = 2**31


def random_seed() -> int:
    """A fresh seed for a request that gave none."""
    return secrets.randbelow(RANDOM_SEED_BOUND)


@dataclass(frozen=True)
class LocalAdapter:
    """A LoRA adapter ready to load: its stable id (the adapter object's id, or a registry
    adapter's name) and a local directory with its files."""

    id: str
    path: Path


@dataclass
class BatchItem:
    """One job's request on its way through the batcher."""

    body: BaseModel
    ctx: RunContext = field(default_factory=RunContext)
    adapter: LocalAdapter | None = None
    prepared: Any = None  # whatever the runner's prepare() kept (token ids, seeds, ...)


class Deferred:
    """An outcome whose last step (encoding and storing outputs) is left to the job's own thread,
    so the device thread can start the next batch meanwhile. `finish()` gives the response body."""

    def __init__(self, finish: Callable[[], dict[str, Any]]) -> None:
        self.finish = finish


Outcome = dict[str, Any] | BaseException | Deferred  # a response body, or what went wrong for that item


def finish(outcome: Outcome) -> dict[str, Any] | BaseException:
    """Complete a deferred outcome here; an error while doing so is that item's outcome."""
    if not isinstance(outcome, Deferred):
        return outcome
    try:
        return outcome.finish()
    except Exception as exc:  # noqa: BLE001 - the outcome of this item alone
        return exc


class Runner(Protocol):
    """What the worker's model cache, batcher and runtime use of a runner (one per model).

    `adapters` is the one optional capability: the LoRA adapters loaded on the model, or None for
    a runner whose kind serves none (genq.shared.kinds says which kinds do)."""

    kind: ClassVar[str]
    spec: ModelSpec
    adapters: AdapterLRU[Any] | None

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None: ...

    def load(self) -> None:
        """Load weights onto the device; called once before the first batch."""

    def unload(self) -> None:
        """Drop the weights (the model cache evicts this model); load() may be called again."""

    def memory_bytes(self) -> int:
        """Bytes the loaded weights hold on their device (parameters and buffers)."""

    def prepare(self, item: BatchItem) -> None:
        """Check one request against the model (raise InvalidRequest) and precompute what the
        batch needs (token ids, seeds) into item.prepared. Runs in the job's own thread."""

    def batch_key(self, item: BatchItem) -> Hashable:
        """Items with equal keys may share one batched call."""

    def rows(self, item: BatchItem) -> int:
        """How many batch rows the item takes (sequences or images); bounded by max_batch_size."""

    def run_batch(self, items: list[BatchItem]) -> list[Outcome]:
        """Serve the items together: one outcome per item, in order (a Deferred one is finished
        in the job's thread). Raising fails nobody yet: the batcher retries the items in smaller
        groups, so only a culprit fails."""


# A continuous runner's view of its batcher. pull(choose) offers the waiting items of the runner's
# model, oldest first, each with the seconds it has waited; `choose` returns those it takes.
# deliver(item, outcome) ends one item.
Choose = Callable[[list[tuple[BatchItem, float]]], list[BatchItem]]
Pull = Callable[[Choose], list[BatchItem]]
Deliver = Callable[[BatchItem, Outcome], None]


@runtime_checkable
class ContinuousRunner(Protocol):
    """A runner that batches at the iteration level: items join a running batch as rows free up."""

    def serve(self, items: list[BatchItem], pull: Pull, deliver: Deliver) -> None:
        """Serve `items` and whatever `pull` gives while rows are free, delivering each item's
        outcome as soon as it is known; return when none is left. Raising fails the undelivered
        items' batch: the batcher retries them through run_batch in smaller groups."""


OptionsT = TypeVar("OptionsT", bound=ModelOptions)


def typed_options(spec: ModelSpec, cls: type[OptionsT]) -> OptionsT:
    """The spec's options as the runner's own options model (a runner built for the wrong kind
    of model fails here, at construction, rather than on its first job)."""
    if not isinstance(spec.options, cls):
        raise TypeError(f"model {spec.name} has {type(spec.options).__name__}; this runner needs {cls.__name__}")
    return spec.options


class SerialRunner:
    """For runners that serve one request at a time through `run(body, ctx)`: each item is its
    own batch, and `run_batch` turns an item's exception into that item's outcome."""

    spec: ModelSpec
    adapters: AdapterLRU[Any] | None = None

    def run(self, body: BaseModel, ctx: RunContext) -> dict[str, Any]:
        raise NotImplementedError

    def unload(self) -> None:
        pass

    def memory_bytes(self) -> int:
        return 0

    def prepare(self, item: BatchItem) -> None:
        if item.adapter is not None:
            raise InvalidRequest(f"model {self.spec.name} does not serve adapters", "body.adapter")

    def batch_key(self, item: BatchItem) -> Hashable:
        return id(item)

    def rows(self, item: BatchItem) -> int:
        return 1

    def run_batch(self, items: list[BatchItem]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for item in items:
            try:
                outcomes.append(self.run(item.body, item.ctx))
            except Exception as exc:  # noqa: BLE001 - the outcome of this item alone
                outcomes.append(exc)
        return outcomes


def module_bytes(*modules: Any) -> int:
    """Parameter and buffer bytes of torch modules (what a loaded model holds on its device)."""
    total = 0
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            total += tensor.numel() * tensor.element_size()
    return total
