"""TextRunner batches on the tiny random GPT-2, with real peft LoRA adapters: what a request gets is
the same alone or batched, whatever shares the batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from genq.shared.registry import load_registry
from genq.shared.schemas import CompletionBody
from genq.workers.runners.base import BatchItem, InvalidRequest, JobCancelled, LocalAdapter, Outcome, RunContext, finish
from genq.workers.runners.text import TextRunner


def run_batch(runner: TextRunner, items: list[BatchItem]) -> list[Outcome]:
    """The runner's batch with each outcome finished, as the worker's job threads finish them."""
    return [finish(o) for o in runner.run_batch(items)]

# Mixed parameters on purpose: greedy and sampled rows, filters, penalties, stops, n and lists.
REQUESTS: list[dict[str, Any]] = [
    {"prompt": "The train", "temperature": 0, "max_tokens": 12},
    {"prompt": "A much longer prompt about job queues and their workers", "seed": 5, "top_p": 0.9},
    {"prompt": "x", "seed": 9, "n": 3, "top_k": 20, "temperature": 0.7, "max_tokens": 9},
    {"prompt": ["one", "two three"], "temperature": 0, "logprobs": 2, "max_tokens": 7},
    {"prompt": "stop here", "seed": 1, "stop": ["e"], "repetition_penalty": 1.3, "presence_penalty": 0.5},
    {"prompt": "Queues", "seed": 2, "frequency_penalty": 1.0, "max_tokens": 30, "echo": True, "logprobs": 1},
]


@pytest.fixture(scope="module")
def runner(tiny_dir: Path) -> TextRunner:
    """A runner of its own: adapter tests change what it has loaded."""
    spec = load_registry(tiny_dir / "models.toml").get("tiny-gpt2")
    assert spec is not None
    r = TextRunner(spec, device="cpu")
    r.load()
    return r


@pytest.fixture(scope="module")
def adapters(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, LocalAdapter]:
    from genq.workers.tiny_lora import build_text_lora

    out = tmp_path_factory.mktemp("loras")
    return {name: LocalAdapter(name, build_text_lora(tiny_dir / "tiny-gpt2", out / name, seed=seed))
            for name, seed in (("lora-a", 1), ("lora-b", 2))}


def item(runner: TextRunner, adapter: LocalAdapter | None = None, ctx: RunContext | None = None,
         **fields: Any) -> BatchItem:
    body = {"model": "tiny-gpt2", "prompt": "Hello", "max_tokens": 16, **fields}
    if adapter is not None:
        body["adapter"] = adapter.id
    it = BatchItem(CompletionBody.model_validate(body), ctx or RunContext(), adapter)
    runner.prepare(it)
    return it


def choices(outcome: Any) -> list[tuple[str, str, Any]]:
    """Text, finish reason and logprob tokens: these must match exactly."""
    assert isinstance(outcome, dict), outcome
    return [(c["text"], c["finish_reason"], c["logprobs"] and c["logprobs"]["tokens"]) for c in outcome["choices"]]


def logprob_values(outcome: dict[str, Any]) -> list[float]:
    return [v for c in outcome["choices"] if c["logprobs"] for v in c["logprobs"]["token_logprobs"] if v is not None]


def test_every_request_gets_the_same_answer_alone_and_in_a_mixed_batch(runner: TextRunner) -> None:
    alone = [run_batch(runner, [item(runner, **q)])[0] for q in REQUESTS]
    together = run_batch(runner, [item(runner, **q) for q in REQUESTS])
    reversed_ = run_batch(runner, [item(runner, **q) for q in reversed(REQUESTS)])[::-1]
    for a, b, c in zip(alone, together, reversed_, strict=True):
        assert choices(a) == choices(b) == choices(c)
        assert a["usage"] == b["usage"] == c["usage"]
        # Logprobs are the row's own logits, which padding can move in the last float bits only.
        assert logprob_values(b) == pytest.approx(logprob_values(a), abs=1e-4)
        assert logprob_values(c) == pytest.approx(logprob_values(a), abs=1e-4)


def test_choice_i_is_the_single_request_with_seed_plus_i(runner: TextRunner) -> None:
    many = run_batch(runner, [item(runner, prompt="Seeds", seed=40, n=3, max_tokens=10)])[0]
    singles = run_batch(runner, [item(runner, prompt="Seeds", seed=40 + i, max_tokens=10) for i in range(3)])
    assert [c[0] for c in choices(many)] == [choices(s)[0][0] for s in singles]
    assert len({c[0] for c in choices(many)}) == 3


def test_rows_stop_at_their_own_max_tokens_and_stop_strings(runner: TextRunner) -> None:
    full = run_batch(runner, [item(runner, temperature=0, max_tokens=20)])[0]["choices"][0]["text"]
    stop = full[6:8]
    short, long_, stopped = run_batch(runner, [
        item(runner, temperature=0, max_tokens=3), item(runner, temperature=0, max_tokens=20),
        item(runner, temperature=0, max_tokens=20, stop=[stop])])
    assert short["usage"]["completion_tokens"] == 3 and short["choices"][0]["finish_reason"] == "length"
    assert long_["usage"]["completion_tokens"] == 20 and long_["choices"][0]["text"] == full
    assert full.startswith(short["choices"][0]["text"])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["text"] == full[:full.index(stop)]
    assert stopped["usage"]["completion_tokens"] < 20


def test_a_cancelled_job_stops_alone_inside_a_batch(runner: TextRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    from genq.workers.runners import text_engine as text_module

    monkeypatch.setattr(text_module, "POLL_SECONDS", 0.0)
    polls = {"n": 0}

    def cancelled_after_three_polls() -> bool:
        polls["n"] += 1
        return polls["n"] > 3

    cancelled = item(runner, ctx=RunContext(job_id="job_c", is_cancelled=cancelled_after_three_polls),
                     temperature=0, max_tokens=40)
    kept = item(runner, temperature=0, max_tokens=40)
    out_cancelled, out_kept = run_batch(runner, [cancelled, kept])
    assert isinstance(out_cancelled, JobCancelled)
    assert out_kept["usage"]["completion_tokens"] == 40
    assert choices(out_kept) == choices(run_batch(runner, [item(runner, temperature=0, max_tokens=40)])[0])


def test_an_adapter_changes_the_output_and_plain_requests_are_unaffected(
        runner: TextRunner, adapters: dict[str, LocalAdapter]) -> None:
    plain = {"prompt": "The station", "temperature": 0, "max_tokens": 12}
    before = choices(run_batch(runner, [item(runner, **plain)])[0])
    with_a = choices(run_batch(runner, [item(runner, adapters["lora-a"], **plain)])[0])
    assert with_a != before
    after = choices(run_batch(runner, [item(runner, **plain)])[0])  # adapter now resident
    assert after == before


def test_adapters_stay_isolated_inside_a_mixed_batch(runner: TextRunner, adapters: dict[str, LocalAdapter]) -> None:
    a, b = adapters["lora-a"], adapters["lora-b"]
    plain = {"prompt": "The station", "temperature": 0, "max_tokens": 12}
    sampled = {"prompt": "Queues and workers", "seed": 3, "max_tokens": 12}
    alone = [choices(run_batch(runner, [item(runner, adapter, **q)])[0])
             for adapter, q in ((a, plain), (b, plain), (None, plain), (a, sampled), (b, sampled))]
    assert alone[0] != alone[1] != alone[2]
    mixed = run_batch(runner, [item(runner, adapter, **q)
                              for adapter, q in ((a, plain), (b, plain), (None, plain), (a, sampled), (b, sampled))])
    assert [choices(m) for m in mixed] == alone  # request A never sees adapter B, and plain sees neither


def test_adapter_lru_evicts_and_reloads(tiny_dir: Path, adapters: dict[str, LocalAdapter]) -> None:
    spec = load_registry(tiny_dir / "models.toml").get("tiny-gpt2")
    assert spec is not None
    runner = TextRunner(spec.with_options(max_adapters=1), device="cpu")
    runner.load()
    q = {"prompt": "The station", "temperature": 0, "max_tokens": 10}
    first_a = choices(run_batch(runner, [item(runner, adapters["lora-a"], **q)])[0])
    run_batch(runner, [item(runner, adapters["lora-b"], **q)])
    assert runner.adapters.ids() == ["lora-b"]
    assert choices(run_batch(runner, [item(runner, adapters["lora-a"], **q)])[0]) == first_a
    assert runner.adapters.stats.loads == 3 and runner.adapters.stats.evictions == 2
    # A batch needing both adapters keeps both for its duration, then trims back on the next load.
    both = run_batch(runner, [item(runner, adapters["lora-a"], **q), item(runner, adapters["lora-b"], **q)])
    assert choices(both[0]) == first_a and set(runner.adapters.ids()) == {"lora-a", "lora-b"}


def test_a_broken_adapter_fails_only_its_own_job(runner: TextRunner, adapters: dict[str, LocalAdapter],
                                                 tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in adapters["lora-a"].path.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    good = item(runner, temperature=0, max_tokens=5)
    bad = item(runner, LocalAdapter("broken", broken), temperature=0, max_tokens=5)
    out_good, out_bad = run_batch(runner, [good, bad])
    assert isinstance(out_bad, InvalidRequest) and out_bad.param == "body.adapter"
    assert choices(out_good) == choices(run_batch(runner, [item(runner, temperature=0, max_tokens=5)])[0])


def test_unload_frees_the_model_and_load_brings_it_back(tiny_dir: Path) -> None:
    spec = load_registry(tiny_dir / "models.toml").get("tiny-gpt2")
    assert spec is not None
    runner = TextRunner(spec, device="cpu")
    runner.load()
    size = runner.memory_bytes()
    first = choices(run_batch(runner, [item(runner, temperature=0)])[0])
    runner.unload()
    assert size > 0 and runner.memory_bytes() == 0
    runner.load()
    assert choices(run_batch(runner, [item(runner, temperature=0)])[0]) == first
