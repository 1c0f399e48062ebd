"""Embeddings (`kind = "embedding"`, `/v1/embeddings`) on tiny-embed, a random-weight
sentence-transformers BERT built here: the vectors equal sentence-transformers' own `encode`,
whatever shares their batch; base64, token-id inputs, `dimensions`; the errors OpenAI gives, at
the API and at the worker; the response is OpenAI's type."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from openai.types import CreateEmbeddingResponse

from genq.services.validation import validate_line
from genq.shared.registry import ModelSpec, model_spec, parse_registry
from genq.shared.schemas import EmbeddingBody
from genq.workers.runners.base import BatchItem, InvalidRequest, JobCancelled, RunContext, finish
from genq.workers.runners.embedding import EmbeddingRunner, plan_passes
from genq.workers.tiny import CORPUS
from genq.workers.tiny_embed import (
    TINY_EMBED_DIM,
    TINY_EMBED_ENTRY,
    TINY_EMBED_MAX_SEQ,
    build_tiny_embed,
    write_sentence_transformers_files,
)

TEXTS = ["The weather was mild that morning.", "hello",
         "A job queue lets many users ask for work that takes a while, and lets a pool of workers do that "
         "work in the order it arrived.", "Numbers: 1, 2, 3 and 42!", "bread, apples, cheese and flowers"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_embed(tmp_path_factory.mktemp("embed") / "tiny-embed", CORPUS)


def _spec(model_dir: Path, **options: Any) -> ModelSpec:
    entry = {k: v for k, v in TINY_EMBED_ENTRY.items() if k not in ("kind", "source")}
    return model_spec("tiny-embed", "embedding", str(model_dir), **{**entry, **options})


def _runner(model_dir: Path, **options: Any) -> EmbeddingRunner:
    runner = EmbeddingRunner(_spec(model_dir, **options), device="cpu")
    runner.load()
    return runner


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> EmbeddingRunner:
    return _runner(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Any:
    """sentence-transformers itself, in this process, on the same model directory."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu")


def _body(input: Any, **fields: Any) -> EmbeddingBody:
    return EmbeddingBody(model="tiny-embed", input=input, **fields)


def _vectors(result: dict[str, Any]) -> np.ndarray:
    return np.array([d["embedding"] for d in result["data"]], dtype=np.float64)


# --- the tiny model -------------------------------------------------------------------------------

def test_tiny_embed_is_a_sentence_transformers_model_dir(model_dir: Path, reference: Any, tmp_path: Path) -> None:
    modules = json.loads((model_dir / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((model_dir / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    assert reference.max_seq_length == TINY_EMBED_MAX_SEQ and (model_dir / "model.safetensors").is_file()
    # WordPiece: lower-cased corpus words are single tokens, unknown words fall apart into letters.
    tokens = reference.tokenizer.tokenize("The Weather was mild, qzx!")
    assert tokens == ["the", "weather", "was", "mild", ",", "q", "##z", "##x", "!"]
    # The same seed writes the same files; another seed other weights and the same vocabulary.
    same = build_tiny_embed(tmp_path / "same", CORPUS, seed=0)
    other = build_tiny_embed(tmp_path / "other", CORPUS, seed=1)
    for name in ("model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json"):
        assert (same / name).read_bytes() == (model_dir / name).read_bytes(), name
    assert (other / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()


# --- what the vectors are ------------------------------------------------------------------------

@pytest.mark.parametrize("loader", ["auto", "transformers"])
def test_embeddings_equal_sentence_transformers_encode(model_dir: Path, reference: Any, loader: str) -> None:
    runner = _runner(model_dir, loader=loader)
    expected_class = "SentenceTransformerEncoder" if loader == "auto" else "TransformersEncoder"
    assert type(runner.encoder).__name__ == expected_class
    result = runner.run(_body(TEXTS))
    expected = reference.encode(TEXTS, convert_to_numpy=True)
    assert np.abs(_vectors(result) - expected).max() < 1e-5
    assert np.allclose(np.linalg.norm(_vectors(result), axis=1), 1, atol=1e-5)  # the model's Normalize module
    assert [d["index"] for d in result["data"]] == list(range(len(TEXTS)))
    tokens = sum(len(reference.tokenizer(t)["input_ids"]) for t in TEXTS)  # [CLS] and [SEP] included
    assert result["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert result["model"] == "tiny-embed" and result["object"] == "list"


def test_an_input_alone_and_in_mixed_length_batches_gives_the_same_vector(runner: EmbeddingRunner,
                                                                         model_dir: Path) -> None:
    alone = {t: _vectors(runner.run(_body(t)))[0] for t in TEXTS}
    # Other requests of other lengths in the same call, on a runner with a small token budget, so
    # that each input shares passes of several widths with different neighbours.
    small = _runner(model_dir, max_batch_tokens=64, max_batch_size=3)
    filler = ["a much longer request about the train that left the station just after midnight, "
              "with its lights and empty platforms", "short one", "x"]
    for mates in (filler, filler[::-1], TEXTS[::-1]):
        items = [BatchItem(_body(t)) for t in [*mates, *TEXTS]]
        for item in items:
            small.prepare(item)
        outcomes = [finish(o) for o in small.run_batch(items)]
        for item, outcome in zip(items[len(mates):], outcomes[len(mates):], strict=True):
            assert isinstance(outcome, dict)
            assert np.abs(_vectors(outcome)[0] - alone[item.body.input]).max() < 1e-5  # type: ignore[attr-defined]
    together = _vectors(runner.run(_body(TEXTS)))
    assert np.abs(together - np.stack([alone[t] for t in TEXTS])).max() < 1e-5


class RecordingEncoder:
    """The runner's own encoder, recording each forward pass's inputs and width (a test class)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.tokenizer, self.model = inner.tokenizer, inner.model
        self.max_length, self.normalizes = inner.max_length, inner.normalizes
        self.passes: list[tuple[int, int]] = []  # (inputs, longest)

    def encode(self, ids: list[list[int]]) -> torch.Tensor:
        self.passes.append((len(ids), max(len(row) for row in ids)))
        return self.inner.encode(ids)  # type: ignore[no-any-return]


def test_forward_passes_keep_to_the_token_budget(model_dir: Path) -> None:
    runner = _runner(model_dir, max_batch_tokens=60, max_batch_size=4)
    recorder = RecordingEncoder(runner.encoder)
    runner.encoder = recorder
    texts = [" ".join(["word"] * n) for n in (1, 30, 3, 12, 2, 7, 1, 20, 5, 4)]
    progress: list[float] = []
    result = runner.run(_body(texts), RunContext(set_progress=progress.append))
    assert len(result["data"]) == len(texts)
    assert sum(n for n, _ in recorder.passes) == len(texts) and len(recorder.passes) > 2
    assert all(n <= 4 and n * width <= 60 for n, width in recorder.passes), recorder.passes
    widths = [w for _, w in recorder.passes]
    assert widths == sorted(widths, reverse=True)  # longest first: little padding
    assert progress == sorted(progress) and progress[-1] == 1.0


def test_plan_passes_takes_each_input_once_within_the_limits() -> None:
    lengths = [5, 40, 3, 3, 17, 200, 8, 8, 1]
    passes = plan_passes(lengths, max_rows=3, max_tokens=48)
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    assert passes[0] == [5]  # longer than the budget: alone
    for p in passes[1:]:
        assert len(p) <= 3 and len(p) * max(lengths[i] for i in p) <= 48
    assert plan_passes([4, 4, 4], max_rows=8, max_tokens=1000) == [[0, 1, 2]]


def test_token_ids_embed_like_their_text(runner: EmbeddingRunner, reference: Any) -> None:
    ids = [reference.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:3]]
    from_text = _vectors(runner.run(_body(TEXTS[:3])))
    assert np.abs(_vectors(runner.run(_body(ids))) - from_text).max() < 1e-6
    one = runner.run(_body(ids[0]))  # a single list of ids is one input
    assert len(one["data"]) == 1 and np.abs(_vectors(one)[0] - from_text[0]).max() < 1e-6


def test_base64_is_the_little_endian_float32_bytes(runner: EmbeddingRunner) -> None:
    floats = runner.run(_body(TEXTS))
    packed = runner.run(_body(TEXTS, encoding_format="base64"))
    assert all(isinstance(d["embedding"], str) for d in packed["data"])
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed["data"]])
    assert decoded.shape == (len(TEXTS), TINY_EMBED_DIM)
    assert np.array_equal(decoded.astype(np.float64), _vectors(floats))  # the same float32 values, bit for bit
    assert packed["usage"] == floats["usage"]


def test_dimensions_truncate_then_normalise_again(runner: EmbeddingRunner) -> None:
    full = _vectors(runner.run(_body(TEXTS)))
    short = _vectors(runner.run(_body(TEXTS, dimensions=16)))
    assert short.shape == (len(TEXTS), 16)
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    assert np.abs(short - expected).max() < 1e-6
    same = _vectors(runner.run(_body(TEXTS, dimensions=TINY_EMBED_DIM)))
    assert np.abs(same - full).max() < 1e-7


def test_responses_are_openai_embedding_responses(runner: EmbeddingRunner) -> None:
    for body in (_body("hello"), _body(TEXTS, dimensions=8), _body([[5, 6, 7], [8]])):
        parsed = CreateEmbeddingResponse.model_validate(runner.run(body))
        assert parsed.object == "list" and all(d.object == "embedding" for d in parsed.data)
        assert parsed.usage.total_tokens == parsed.usage.prompt_tokens > 0
    packed = runner.run(_body(TEXTS, encoding_format="base64"))
    for datum in packed["data"]:  # what the openai package does with base64 (it asks for it by default)
        datum["embedding"] = np.frombuffer(base64.b64decode(datum["embedding"]), dtype="float32").tolist()
    assert len(CreateEmbeddingResponse.model_validate(packed).data[0].embedding) == TINY_EMBED_DIM


def test_a_cancelled_job_stops_and_its_batch_mates_finish(runner: EmbeddingRunner) -> None:
    gone = BatchItem(_body(TEXTS), RunContext(job_id="job_gone", is_cancelled=lambda: True))
    kept = BatchItem(_body(TEXTS[:2]))
    for item in (gone, kept):
        runner.prepare(item)
    first, second = (finish(o) for o in runner.run_batch([gone, kept]))
    assert isinstance(first, JobCancelled) and isinstance(second, dict) and len(second["data"]) == 2


# --- loading models without sentence-transformers files ----------------------------------------

def _plain_copy(model_dir: Path, dest: Path) -> Path:
    """The model's transformers files only (what a plain hub encoder has)."""
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("modules.json", "sentence_bert_config.json",
                                                                   "1_Pooling", "2_Normalize"))
    return dest


def test_a_plain_transformers_model_gets_mean_pooling_and_the_normalize_option(
        model_dir: Path, reference: Any, tmp_path: Path) -> None:
    plain = _plain_copy(model_dir, tmp_path / "plain")
    expected = reference.encode(TEXTS, convert_to_numpy=True)  # mean pooling, then Normalize
    normalised = EmbeddingRunner(model_spec("p", "embedding", str(plain)), device="cpu")
    normalised.load()
    assert type(normalised.encoder).__name__ == "TransformersEncoder"
    assert np.abs(_vectors(normalised.run(_body(TEXTS))) - expected).max() < 1e-5
    raw = EmbeddingRunner(model_spec("p", "embedding", str(plain), normalize=False, matryoshka=True), device="cpu")
    raw.load()
    vectors = _vectors(raw.run(_body(TEXTS)))
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    assert np.abs(vectors / np.linalg.norm(vectors, axis=1, keepdims=True) - expected).max() < 1e-5
    cut = _vectors(raw.run(_body(TEXTS, dimensions=8)))  # not normalised: truncation only
    assert np.abs(cut - vectors[:, :8]).max() < 1e-7
    # Without a max_seq_length of its own, the limit is the position embeddings'.
    assert raw.encoder is not None and raw.encoder.max_length == 512


def test_the_pooling_config_is_read_by_the_transformers_loader(model_dir: Path, tmp_path: Path) -> None:
    cls_dir = shutil.copytree(model_dir, tmp_path / "cls")
    config = json.loads((cls_dir / "1_Pooling" / "config.json").read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (cls_dir / "1_Pooling" / "config.json").write_text(json.dumps(config))
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(cls_dir), device="cpu").encode(TEXTS, convert_to_numpy=True)
    for loader in ("auto", "transformers"):
        runner = EmbeddingRunner(model_spec("c", "embedding", str(cls_dir), loader=loader), device="cpu")
        assert np.abs(_vectors(runner.run(_body(TEXTS))) - expected).max() < 1e-5


@pytest.mark.parametrize("loader", ["auto", "transformers"])
def test_a_model_whose_modules_do_not_normalise_is_not_normalised_unless_asked(
        model_dir: Path, reference: Any, tmp_path: Path, loader: str) -> None:
    raw_dir = shutil.copytree(model_dir, tmp_path / "raw", ignore=shutil.ignore_patterns("2_Normalize"))
    write_sentence_transformers_files(raw_dir, TINY_EMBED_DIM, TINY_EMBED_MAX_SEQ, normalize=False)
    expected = reference.encode(TEXTS, convert_to_numpy=True)
    as_is = EmbeddingRunner(model_spec("r", "embedding", str(raw_dir), loader=loader), device="cpu")
    vectors = _vectors(as_is.run(_body(TEXTS)))
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    assert np.abs(vectors / np.linalg.norm(vectors, axis=1, keepdims=True) - expected).max() < 1e-5
    asked = EmbeddingRunner(model_spec("r", "embedding", str(raw_dir), loader=loader, normalize=True), device="cpu")
    assert np.abs(_vectors(asked.run(_body(TEXTS))) - expected).max() < 1e-5


def test_normalize_false_on_a_normalising_model_fails_at_load(model_dir: Path) -> None:
    runner = EmbeddingRunner(model_spec("n", "embedding", str(model_dir), normalize=False), device="cpu")
    with pytest.raises(RuntimeError, match="normalize = false"):
        runner.load()


# --- errors ----------------------------------------------------------------------------------------

REG = parse_registry("""
[models.tiny-embed]
kind = "embedding"
source = "x"
matryoshka = true
[models.plain-embed]
kind = "embedding"
source = "x"
[models.t]
kind = "text"
source = "x"
""", Path("."))


def _line(**body: Any) -> dict[str, Any]:
    return {"custom_id": "e", "url": "/v1/embeddings", "body": {"model": "tiny-embed", **body}}


@pytest.mark.parametrize("body, param, words", [
    ({"input": ["x"] * 2049}, "body.input", "at most 2048 items"),
    ({"input": ""}, "body.input", "at least 1 character"),
    ({"input": []}, "body.input", "at least 1 item"),
    ({"input": ["a", "b", "c", ""]}, "body.input[3]", "at least 1 character"),
    ({"input": [[1, 2], []]}, "body.input[1]", "at least 1 item"),
    ({"input": [1, -2]}, "body.input[1]", "greater than or equal to 0"),
    ({"input": ["a", 7]}, "body.input[1]", "valid string"),
    ({"input": [True]}, "body.input[0]", "valid string"),
    ({"input": {"text": "a"}}, "body.input", "a list of token ids"),
    ({"input": "a", "dimensions": 0}, "body.dimensions", "greater than or equal to 1"),
    ({"input": "a", "dimensions": 8, "model": "plain-embed"}, "body.dimensions", "may not be truncated"),
    ({"input": "a", "encoding_format": "int8"}, "body.encoding_format", "'float' or 'base64'"),
    ({"input": "a", "truncate": True}, "body.truncate", "unknown field"),
    ({"input": "a", "model": "t"}, "body.model", "cannot serve /v1/embeddings"),
    ({"input": "a", "adapter": "tiny-gpt2-lora"}, "body.adapter", "does not serve adapters"),
])
def test_the_api_refuses_bad_bodies_naming_the_field(body: dict[str, Any], param: str, words: str) -> None:
    ok, errors = validate_line(_line(**body), 1, REG)
    assert ok is None and errors[0].param == param and words in errors[0].message, errors


def test_the_api_accepts_every_input_form() -> None:
    for value in ("hi", ["hi", "there"], [1, 2, 3], [[1], [2, 3]], ["x"] * 2048):
        ok, errors = validate_line(_line(input=value, encoding_format="base64", dimensions=8, user="u-1"), 1, REG)
        assert errors == [] and ok is not None and ok.body.inputs[0] in ("hi", [1, 2, 3], [1], "x")  # type: ignore[attr-defined]


def test_the_worker_refuses_what_only_the_model_knows(runner: EmbeddingRunner) -> None:
    too_long = " ".join(["word"] * TINY_EMBED_MAX_SEQ)  # 128 words + [CLS] + [SEP]
    cases = [
        (_body(["ok", too_long]), "body.input[1]", f"130 tokens; model tiny-embed reads at most {TINY_EMBED_MAX_SEQ}"),
        (_body(too_long), "body.input", "the input is 130 tokens"),
        (_body([[1, 2], list(range(TINY_EMBED_MAX_SEQ - 1))]), "body.input[1]", "129 tokens"),
        (_body([3, 100000]), "body.input", "token id 100000 is not in the vocabulary"),
        (_body("a", dimensions=TINY_EMBED_DIM + 1), "body.dimensions", f"embeddings of {TINY_EMBED_DIM}"),
    ]
    for body, param, words in cases:
        with pytest.raises(InvalidRequest) as exc:
            runner.run(body)
        assert exc.value.param == param and words in str(exc.value), str(exc.value)
    # Just under the limit is served.
    assert len(runner.run(_body(" ".join(["word"] * (TINY_EMBED_MAX_SEQ - 2))))["data"]) == 1


def test_the_worker_refuses_dimensions_for_a_model_that_may_not_be_truncated(model_dir: Path) -> None:
    runner = _runner(model_dir, matryoshka=False)
    with pytest.raises(InvalidRequest) as exc:
        runner.run(_body("a", dimensions=8))
    assert exc.value.param == "body.dimensions"


# --- the API's routes ------------------------------------------------------------------------------

def test_the_routes_take_embedding_requests(tmp_path: Path) -> None:
    from tests.support.app import api_client

    registry = tmp_path / "models.toml"
    registry.write_text('[models.tiny-embed]\nkind = "embedding"\nsource = "./none"\nmatryoshka = true\n')
    with api_client(tmp_path, models_file=str(registry)) as c:
        paths = c.get("/openapi.json").json()["paths"]
        assert "/v1/embeddings" in paths
        job = c.post("/v1/jobs", json={"url": "/v1/embeddings", "body": {"model": "tiny-embed", "input": ["a", "b"]}})
        assert job.status_code == 202, job.text
        assert job.json()["url"] == "/v1/embeddings" and job.json()["status"] == "queued"
        batch = c.post("/v1/batches", json={"endpoint": "/v1/embeddings", "requests": [
            {"custom_id": f"e-{i}", "url": "/v1/embeddings", "body": {"model": "tiny-embed", "input": f"text {i}"}}
            for i in range(3)]})
        assert batch.status_code == 202 and batch.json()["endpoint"] == "/v1/embeddings", batch.text
        # The synchronous endpoint validates before it waits for a worker.
        bad = c.post("/v1/embeddings", json={"model": "tiny-embed", "input": ["a", ""]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "body.input[1]", bad.text
