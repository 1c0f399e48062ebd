"""Continuous batching in the text runner (workers/runners/text_engine.py) on the tiny GPT-2 and real
peft adapters: jobs join a running batch mid-flight, rows leave at their own end, results come back
as each job ends, and a row's tokens are those it gets alone whatever joins or leaves around it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from genq.shared.registry import load_registry
from genq.workers.runners import text as text_module
from genq.workers.runners import text_engine
from genq.workers.runners.base import BatchItem, JobCancelled, LocalAdapter, Outcome, RunContext, finish
from genq.workers.runners.text import TextRunner
from tests.unit.test_text_batching import REQUESTS, choices, item, logprob_values


@pytest.fixture(scope="module")
def runner(tiny_dir: Path) -> TextRunner:
    spec = load_registry(tiny_dir / "models.toml").get("tiny-gpt2")
    assert spec is not None
    r = TextRunner(spec.with_options(max_batch_size=8), device="cpu")
    r.load()
    return r


@pytest.fixture(scope="module")
def adapters(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, LocalAdapter]:
    from genq.workers.tiny_lora import build_text_lora

    out = tmp_path_factory.mktemp("loras")
    return {name: LocalAdapter(name, build_text_lora(tiny_dir / "tiny-gpt2", out / name, seed=seed))
            for name, seed in (("lora-a", 1), ("lora-b", 2))}


class Feed:
    """A batcher stand-in: items offered on given pulls (the engine pulls once per step while it has
    room), outcomes recorded in delivery order with the pull count at delivery."""

    def __init__(self, later: dict[int, list[BatchItem]] | None = None) -> None:
        self.later = later or {}
        self.pulls = 0
        self.refused: list[BatchItem] = []
        self.delivered: list[tuple[BatchItem, Any, int]] = []

    def pull(self, choose: Any) -> list[BatchItem]:
        self.pulls += 1
        offered = self.refused + self.later.pop(self.pulls, [])
        taken = choose([(it, 0.0) for it in offered]) if offered else []
        self.refused = [it for it in offered if it not in taken]
        return taken

    def deliver(self, it: BatchItem, outcome: Outcome) -> None:
        self.delivered.append((it, finish(outcome), self.pulls))

    def outcome(self, it: BatchItem) -> Any:
        return next(o for i, o, _ in self.delivered if i is it)

    def order(self) -> list[BatchItem]:
        return [i for i, _, _ in self.delivered]


def alone(runner: TextRunner, **fields: Any) -> Any:
    return finish(runner.run_batch([item(runner, **fields)])[0])


def test_a_job_joins_mid_flight_and_ends_first_with_the_tokens_it_gets_alone(runner: TextRunner) -> None:
    long_ = item(runner, prompt="A long story about queues", temperature=0, max_tokens=60)
    short = item(runner, prompt="x", seed=4, top_p=0.9, max_tokens=5, logprobs=2)
    feed = Feed({10: [short]})
    runner.serve([long_], feed.pull, feed.deliver)
    assert feed.order() == [short, long_]  # the short job's result did not wait for the long row
    joined_at, ended_at = 10, next(p for i, _, p in feed.delivered if i is short)
    assert ended_at - joined_at <= 6  # a prefill and five tokens
    assert choices(feed.outcome(short)) == choices(alone(runner, prompt="x", seed=4, top_p=0.9, max_tokens=5,
                                                         logprobs=2))
    assert logprob_values(feed.outcome(short)) == pytest.approx(
        logprob_values(alone(runner, prompt="x", seed=4, top_p=0.9, max_tokens=5, logprobs=2)), abs=1e-4)
    assert choices(feed.outcome(long_)) == choices(alone(runner, prompt="A long story about queues",
                                                         temperature=0, max_tokens=60))


def test_every_request_joining_at_a_different_step_gets_its_answer_alone(runner: TextRunner) -> None:
    expected = [alone(runner, **q) for q in REQUESTS]
    items = [item(runner, **q) for q in REQUESTS]
    feed = Feed({1 + 3 * k: [it] for k, it in enumerate(items[1:])})
    runner.serve(items[:1], feed.pull, feed.deliver)
    assert len(feed.delivered) == len(items)
    for it, want in zip(items, expected, strict=True):
        got = feed.outcome(it)
        assert choices(got) == choices(want) and got["usage"] == want["usage"]
        assert logprob_values(got) == pytest.approx(logprob_values(want), abs=1e-4)


def test_rows_free_up_and_waiting_jobs_take_them(runner: TextRunner) -> None:
    """max_batch_size 8: eight one-row jobs fill the batch; the ninth joins when the first ends."""
    first = [item(runner, prompt=f"job {i}", temperature=0, max_tokens=4 if i == 0 else 30) for i in range(8)]
    ninth = item(runner, prompt="the ninth", temperature=0, max_tokens=4)
    feed = Feed({1: [ninth]})
    runner.serve(first, feed.pull, feed.deliver)
    assert feed.order()[:2] == [first[0], ninth]  # it joined as soon as the first row ended
    assert choices(feed.outcome(ninth)) == choices(alone(runner, prompt="the ninth", temperature=0, max_tokens=4))


def test_a_cancel_takes_a_row_out_at_the_next_step(runner: TextRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_engine, "POLL_SECONDS", 0.0)
    polls = {"n": 0}

    def cancelled_after_five_polls() -> bool:
        polls["n"] += 1
        return polls["n"] > 5

    doomed = item(runner, ctx=RunContext(job_id="job_c", is_cancelled=cancelled_after_five_polls),
                  prompt="doomed", n=2, temperature=0.9, seed=1, max_tokens=80)
    kept = item(runner, prompt="kept", temperature=0, max_tokens=40)
    later = item(runner, prompt="later", seed=8, max_tokens=12)
    feed = Feed({3: [later]})
    runner.serve([doomed, kept], feed.pull, feed.deliver)
    assert isinstance(feed.outcome(doomed), JobCancelled)
    assert feed.order()[0] is doomed and polls["n"] == 6  # out at the poll that saw it, never asked again
    assert choices(feed.outcome(kept)) == choices(alone(runner, prompt="kept", temperature=0, max_tokens=40))
    assert choices(feed.outcome(later)) == choices(alone(runner, prompt="later", seed=8, max_tokens=12))


def test_stop_strings_end_rows_that_joined_late(runner: TextRunner) -> None:
    full = alone(runner, prompt="Stops", temperature=0, max_tokens=20)["choices"][0]["text"]
    stop = full[6:8]
    stopped = item(runner, prompt="Stops", temperature=0, max_tokens=20, stop=[stop])
    feed = Feed({4: [stopped]})
    runner.serve([item(runner, prompt="long", temperature=0, max_tokens=40)], feed.pull, feed.deliver)
    out = feed.outcome(stopped)
    assert out["choices"][0]["finish_reason"] == "stop" and out["choices"][0]["text"] == full[:full.index(stop)]
    assert feed.order()[0] is stopped


def test_long_prompts_join_in_chunks_while_other_rows_decode(runner: TextRunner, tiny_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_registry(tiny_dir / "models.toml").get("tiny-gpt2")
    assert spec is not None
    chunked = TextRunner(spec.with_options(prefill_chunk_tokens=8), device="cpu")
    chunked.load()
    steps: list[str] = []
    prefill_advance, decode_step = text_engine._Prefill.advance, text_engine._Decoding.step
    monkeypatch.setattr(text_engine._Prefill, "advance",
                        lambda self, *a: steps.append(f"prefill{len(self.rows)}x{a[-1]}") or prefill_advance(self, *a))
    monkeypatch.setattr(text_engine._Decoding, "step",
                        lambda self, *a: steps.append("decode") or decode_step(self, *a))
    prompt = " ".join(["queues and workers"] * 20)
    joining = [item(chunked, prompt=prompt, seed=s, max_tokens=6) for s in (1, 2)]
    feed = Feed({3: joining})
    chunked.serve([item(chunked, prompt="busy", temperature=0, max_tokens=40)], feed.pull, feed.deliver)
    chunks = [s for s in steps if s.startswith("prefill2")]
    width = len(joining[0].prepared.prompt_ids[0])
    assert chunks and all(c == "prefill2x4" for c in chunks) and len(chunks) == -(-width // 4)
    first = steps.index(chunks[0])
    assert steps[first:first + 2 * len(chunks)] == [x for c in chunks for x in (c, "decode")]  # interleaved
    for it, s in zip(joining, (1, 2), strict=True):
        assert choices(feed.outcome(it)) == choices(alone(chunked, prompt=prompt, seed=s, max_tokens=6))


def test_mixed_adapters_join_and_are_never_evicted_under_a_running_row(
        tiny_dir: Path, adapters: dict[str, LocalAdapter]) -> None:
    spec = load_registry(tiny_dir / "models.toml").get("tiny-gpt2")
    assert spec is not None
    fresh = TextRunner(spec.with_options(max_adapters=1), device="cpu")  # no adapter loaded yet
    fresh.load()
    q = {"prompt": "The station", "temperature": 0, "max_tokens": 12}
    want = {name: choices(finish(fresh.run_batch([item(fresh, adapters.get(name), **q)])[0]))
            for name in ("lora-a", "lora-b", None)}
    fresh.unload()
    fresh.load()
    plain = item(fresh, **{**q, "max_tokens": 30})
    with_a = item(fresh, adapters["lora-a"], **q)
    with_b = item(fresh, adapters["lora-b"], **q)
    feed = Feed({2: [with_a], 3: [with_b]})
    loads, evictions = fresh.adapters.stats.loads, fresh.adapters.stats.evictions
    fresh.serve([plain], feed.pull, feed.deliver)
    assert choices(feed.outcome(with_a)) == want["lora-a"] and choices(feed.outcome(with_b)) == want["lora-b"]
    assert choices(feed.outcome(plain))[0][0].startswith(want[None][0][0])
    # Room for one adapter: lora-b waited for lora-a's row to end rather than evicting it under it.
    assert feed.order().index(with_a) < feed.order().index(with_b)
    assert (fresh.adapters.stats.loads - loads, fresh.adapters.stats.evictions - evictions) == (2, 1)


@pytest.mark.parametrize("patience", [text_module.ADAPTER_PATIENCE_S, 0.0], ids=["placement", "oldest-first"])
def test_more_adapters_than_fit_load_each_only_a_few_times(
        tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
        patience: float) -> None:
    """Four adapters, room for two, 32 jobs queued round-robin: preferring jobs whose adapter is
    loaded, the worker loads each adapter about once; taking them oldest first, it thrashes."""
    import threading

    from genq.workers.batching import Batcher
    from genq.workers.tiny_lora import build_text_lora
    from tests.support.waiting import wait_for

    monkeypatch.setattr(text_module, "ADAPTER_PATIENCE_S", patience)
    out = tmp_path_factory.mktemp("four-loras")
    loras = [LocalAdapter(f"l{k}", build_text_lora(tiny_dir / "tiny-gpt2", out / f"l{k}", seed=10 + k))
             for k in range(4)]
    spec = load_registry(tiny_dir / "models.toml").get("tiny-gpt2")
    assert spec is not None
    spec = spec.with_options(max_adapters=2, max_batch_size=2, max_wait_ms=60_000)
    runner = TextRunner(spec, device="cpu")
    runner.load()
    batcher = Batcher()
    results: dict[int, Any] = {}
    items = [item(runner, loras[i % 4], prompt=f"job {i}", temperature=0, max_tokens=6) for i in range(32)]
    threads = []
    with batcher.arrival():  # the batch waits while jobs are on their way in: all 32 queue up first
        for i, it in enumerate(items):
            joined = batcher._joined
            threads.append(threading.Thread(
                target=lambda i=i, it=it: results.__setitem__(i, batcher.submit("tiny-gpt2", runner, it))))
            threads[-1].start()
            wait_for(lambda joined=joined: batcher._joined != joined, 10, 0.001, f"job {i} queued")
    for t in threads:
        t.join(60)
    batcher.stop()
    assert len(results) == 32 and all(r["usage"]["completion_tokens"] == 6 for r in results.values())
    loads = runner.adapters.stats.loads
    if patience:
        assert loads <= 5, loads  # each of the four about once
    else:
        assert loads >= 12, loads  # the baseline this test guards against


def test_constrained_chat_rows_join_free_rows_mid_flight(tiny_dir: Path) -> None:
    import json

    import jsonschema

    from tests.unit.test_chat_runner import PERSON, chat_item, texts

    spec = load_registry(tiny_dir / "models.toml").get("tiny-chat")
    assert spec is not None
    chat = TextRunner(spec, device="cpu")
    chat.load()
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    asks = [{"seed": 3, "max_completion_tokens": 40},
            {"temperature": 0, "response_format": schema_format, "max_completion_tokens": 120},
            {"seed": 5, "n": 2, "temperature": 0.9, "response_format": schema_format, "max_completion_tokens": 120}]
    want = [texts(finish(chat.run_batch([chat_item(chat, **a)])[0])) for a in asks]
    items = [chat_item(chat, **a) for a in asks]
    feed = Feed({2: [items[1]], 5: [items[2]]})
    chat.serve(items[:1], feed.pull, feed.deliver)
    for it, expected in zip(items, want, strict=True):
        assert texts(feed.outcome(it)) == expected
    for choice in feed.outcome(items[2])["choices"]:
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
