"""The table of kinds: every job kind genq serves, declared once.

An `Endpoint` is a request url (`/v1/completions`): its body schema, its result schema, and the
synchronous route the API serves for it. A `Kind` is what a registry model is (`kind = "text"`):
the endpoints it serves, its typed registry options, whether it takes LoRA adapters, and the
runner class a worker builds for it ("module:Class", imported only by workers, so the API never
loads torch). The registry, request validation, the API's routes and rate limits, the OpenAPI
document and the worker's runner map are all derived from these two tables.

Adding a kind is one runner module (genq/workers/runners/) plus one `Kind` entry here; a new
request url is one `Endpoint` entry (its body and result models in genq.shared.schemas).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from genq.shared.chat import CHAT_URL, ChatBody, ChatCompletion
from genq.shared.options import EchoOptions, EmbeddingOptions, GanOptions, ImageOptions, ModelOptions, TextOptions
from genq.shared.schemas import (
    CompletionBody,
    EmbeddingBody,
    EmbeddingsResult,
    ImageBody,
    ImagesResult,
    JobBody,
    TextCompletion,
)

COMPLETIONS_URL = "/v1/completions"
IMAGES_URL = "/v1/images/generations"
EMBEDDINGS_URL = "/v1/embeddings"


@dataclass(frozen=True)
class Endpoint:
    url: str
    body: type[JobBody]  # the request body a line with this url carries
    result: type[BaseModel]  # what a succeeded job's `result` is
    operation: str  # the synchronous route's name in the OpenAPI document
    summary: str


@dataclass(frozen=True)
class Kind:
    name: str
    endpoints: tuple[Endpoint, ...]
    options: type[ModelOptions]
    runner: str  # "module:Class", imported lazily by workers
    adapters: bool = False  # serves LoRA adapters (its options then include max_adapters)


COMPLETIONS = Endpoint(COMPLETIONS_URL, CompletionBody, TextCompletion, "completions",
                       "An OpenAI completion, answered through the queue")
CHAT = Endpoint(CHAT_URL, ChatBody, ChatCompletion, "chat_completions",
                "An OpenAI chat completion, answered through the queue")
IMAGES = Endpoint(IMAGES_URL, ImageBody, ImagesResult, "image_generations",
                  "An OpenAI image generation, answered through the queue")

EMBEDDINGS = Endpoint(EMBEDDINGS_URL, EmbeddingBody, EmbeddingsResult, "embeddings",
                      "OpenAI embeddings, answered through the queue")

ENDPOINTS: dict[str, Endpoint] = {e.url: e for e in (COMPLETIONS, CHAT, IMAGES, EMBEDDINGS)}

KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("text", (COMPLETIONS, CHAT), TextOptions, "genq.workers.runners.text:TextRunner", adapters=True),
    Kind("image", (IMAGES,), ImageOptions, "genq.workers.runners.image:ImageRunner", adapters=True),
    Kind("gan", (IMAGES,), GanOptions, "genq.workers.runners.gan:GANRunner"),
    Kind("echo", (COMPLETIONS, CHAT), EchoOptions, "genq.workers.runners.echo:EchoRunner"),
    Kind("embedding", (EMBEDDINGS,), EmbeddingOptions, "genq.workers.runners.embedding:EmbeddingRunner"),
)}

ADAPTER_KINDS: tuple[str, ...] = tuple(k.name for k in KINDS.values() if k.adapters)


def served_by(url: str) -> tuple[str, ...]:
    """The kinds whose models may serve requests to `url`."""
    return tuple(k.name for k in KINDS.values() if any(e.url == url for e in k.endpoints))


def body_model(url: str) -> type[JobBody]:
    return ENDPOINTS[url].body
