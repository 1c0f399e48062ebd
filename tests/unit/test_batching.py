"""The worker's batcher and model cache, with small runner classes behind the real interface."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Any

import pytest

from genq.shared.registry import ModelSpec, model_spec
from genq.workers.batching import OVERTAKES, Batcher
from genq.workers.cache import ModelCache, parse_bytes
from genq.workers.runners.base import BatchItem, Outcome, RunContext
from tests.support.waiting import wait_for


class _Body:
    def __init__(self, value: str, key: str = "k", rows: int = 1) -> None:
        self.value, self.key, self.rows = value, key, rows


SIZE = 100  # bytes each SizedRunner holds when loaded


class ListRunner:
    """Answers each item with its value; records the calls; raises for a batch holding 'bad'."""

    def __init__(self, max_batch_size: int = 4, max_wait_ms: float = 50, hold: threading.Event | None = None,
                 batch: bool = True) -> None:
        self.spec = model_spec("m", "echo", "none", max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                               batch=batch)
        self.calls: list[list[str]] = []
        self.hold = hold  # the first call waits for it, so that items pile up behind it

    def batch_key(self, item: BatchItem) -> Hashable:
        return item.body.key  # type: ignore[attr-defined]

    def rows(self, item: BatchItem) -> int:
        return item.body.rows  # type: ignore[attr-defined]

    def run_batch(self, items: list[BatchItem]) -> list[Outcome]:
        values = [it.body.value for it in items]  # type: ignore[attr-defined]
        self.calls.append(values)
        if self.hold is not None and len(self.calls) == 1:
            assert self.hold.wait(10)
        if "bad" in values and len(values) > 1:
            raise RuntimeError("a batched kernel failed")
        return [ValueError("bad alone") if v == "bad" else {"echo": v} for v in values]


def submit_all(batcher: Batcher, runner: ListRunner, bodies: list[_Body]) -> list[Any]:
    """Submit from one thread per body, in order; return each outcome (or exception)."""
    results: list[Any] = [None] * len(bodies)

    def one(i: int) -> None:
        try:
            results[i] = batcher.submit("m", runner, BatchItem(bodies[i], RunContext()))  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    def seen() -> int:  # items the batcher holds or has handed to the runner
        return len(batcher._waiting) + sum(len(c) for c in runner.calls)

    before = seen()
    for i, t in enumerate(threads):
        t.start()  # arrival order = list order: the next starts once this one is in the batcher
        wait_for(lambda i=i: seen() > before + i, 10, 0.001, f"item {i} in the batcher")
    for t in threads:
        t.join(20)
    return results


def test_a_model_that_does_not_batch_runs_each_item_alone_and_at_once() -> None:
    """An echo model without `batch = true` (and a GAN) never batches: items waiting behind a
    running one still run one a call, and none waits max_wait_ms (or the grace) for company."""
    hold = threading.Event()
    runner, batcher = ListRunner(max_batch_size=4, max_wait_ms=60_000, hold=hold, batch=False), Batcher()
    done: list[Any] = []
    first = threading.Thread(target=lambda: done.append(submit_all(batcher, runner, [_Body("first")])))
    first.start()
    wait_for(lambda: runner.calls, 10, 0.005, "the first call")
    rest = threading.Thread(target=lambda: done.append(submit_all(batcher, runner, [_Body("a"), _Body("b")])))
    rest.start()
    wait_for(lambda: len(batcher._waiting) >= 2, 10, 0.005, "2 items waiting")
    hold.set()
    first.join(20)
    rest.join(20)  # within max_wait_ms' 60 s only if nobody waited for it
    assert not rest.is_alive()
    assert runner.calls == [["first"], ["a"], ["b"]]


def test_waiting_items_share_batches_up_to_the_limit_in_arrival_order() -> None:
    hold = threading.Event()
    runner, batcher = ListRunner(max_batch_size=4, hold=hold), Batcher()
    done: dict[str, Any] = {}
    first = threading.Thread(target=lambda: done.update(first=submit_all(batcher, runner, [_Body("first")])))
    first.start()
    wait_for(lambda: runner.calls, 10, 0.005, "the first call")
    rest = threading.Thread(target=lambda: done.update(rest=(
        submit_all(batcher, runner, [_Body(f"j{i}") for i in range(6)] + [_Body("other", key="x")]))))
    rest.start()
    wait_for(lambda: len(batcher._waiting) >= 7, 10, 0.005, "7 items waiting")
    hold.set()
    first.join(20)
    rest.join(20)
    assert runner.calls == [["first"], ["j0", "j1", "j2", "j3"], ["j4", "j5"], ["other"]]
    assert done["rest"] == [{"echo": f"j{i}"} for i in range(6)] + [{"echo": "other"}]
    stats = batcher.stats["m"]
    assert (stats.batches, stats.items, stats.rows, stats.largest) == (4, 8, 8, 4)


def test_rows_bound_a_batch_and_a_big_item_runs_alone() -> None:
    hold = threading.Event()
    runner, batcher = ListRunner(max_batch_size=4, hold=hold), Batcher()
    threading.Thread(target=submit_all, args=(batcher, runner, [_Body("first")])).start()
    wait_for(lambda: runner.calls, 10, 0.005, "the first call")
    waiter = threading.Thread(target=submit_all, args=(
        batcher, runner, [_Body("a", rows=3), _Body("b", rows=2), _Body("huge", rows=9), _Body("c", rows=1)]))
    waiter.start()
    wait_for(lambda: len(batcher._waiting) >= 4, 10, 0.005, "4 items waiting")
    hold.set()
    waiter.join(20)
    assert runner.calls[1:] == [["a", "c"], ["b"], ["huge"]]


def queue_behind_a_running_call(runner: ListRunner, hold: threading.Event, bodies: list[_Body]) -> list[Any]:
    """Start a call that waits for `hold`, queue `bodies` behind it, then let it go; the bodies'
    outcomes, once every call is done."""
    batcher, done = Batcher(), []
    first = threading.Thread(target=submit_all, args=(batcher, runner, [_Body("first")]))
    first.start()
    wait_for(lambda: runner.calls, 10, 0.005, "the first call")
    waiter = threading.Thread(target=lambda: done.extend(submit_all(batcher, runner, bodies)))
    waiter.start()
    wait_for(lambda: len(batcher._waiting) >= len(bodies), 10, 0.005, f"{len(bodies)} items waiting")
    hold.set()
    first.join(20)
    waiter.join(20)
    return done


def test_a_full_group_of_another_key_goes_before_the_oldest_items_partial_one() -> None:
    """A shuffled mix (images of two sizes, say): the oldest item's key has 2 rows waiting, the
    other key 5, so that key's full batch runs first instead of a half-empty one."""
    hold = threading.Event()
    runner = ListRunner(max_batch_size=4, hold=hold)
    keys = ["a", "b", "a", "b", "b", "b", "b"]
    bodies = [_Body(f"{key}{i}", key=key) for i, key in enumerate(keys)]
    done = queue_behind_a_running_call(runner, hold, bodies)
    assert runner.calls[1:] == [["b1", "b3", "b4", "b5"], ["a0", "a2"], ["b6"]]
    assert done == [{"echo": b.value} for b in bodies]


def test_the_oldest_item_is_passed_over_by_a_bounded_number_of_batches() -> None:
    """However many full batches of other keys wait, the oldest item's own runs after OVERTAKES
    of them."""
    hold = threading.Event()
    runner = ListRunner(max_batch_size=2, hold=hold)
    others = [_Body(f"b{i}", key="b") for i in range(2 * (OVERTAKES + 2))]
    done = queue_behind_a_running_call(runner, hold, [_Body("rare", key="a"), *others])
    full = [[f"b{i}", f"b{i + 1}"] for i in range(0, len(others), 2)]
    assert runner.calls[1:] == [*full[:OVERTAKES], ["rare"], *full[OVERTAKES:]]
    assert done[0] == {"echo": "rare"}


def test_a_lone_job_is_not_held_back_by_the_max_wait() -> None:
    runner, batcher = ListRunner(max_batch_size=8, max_wait_ms=30_000), Batcher()
    started = time.monotonic()
    assert submit_all(batcher, runner, [_Body("alone")]) == [{"echo": "alone"}]
    assert time.monotonic() - started < 10  # nothing else was arriving: no 30 s wait


def test_a_batch_waits_for_a_job_on_its_way_in() -> None:
    runner, batcher = ListRunner(max_batch_size=8, max_wait_ms=30_000), Batcher()
    arrival = batcher.arrival().__enter__()  # another job is being claimed
    first = threading.Thread(target=submit_all, args=(batcher, runner, [_Body("early")]))
    first.start()
    wait_for(lambda: batcher._waiting, 10, 0.005, "an item waiting")
    assert not runner.calls  # held for the arriving job
    out = batcher.submit("m", runner, BatchItem(_Body("late"), RunContext()), arrival)  # type: ignore[arg-type]
    first.join(20)
    assert out == {"echo": "late"} and runner.calls == [["early", "late"]]


def test_the_max_wait_bounds_the_wait_for_arrivals() -> None:
    runner, batcher = ListRunner(max_batch_size=8, max_wait_ms=100), Batcher()
    with batcher.arrival():  # a job that never arrives
        assert submit_all(batcher, runner, [_Body("waited")]) == [{"echo": "waited"}]


def test_a_failing_job_fails_alone_and_the_batch_mates_finish() -> None:
    hold = threading.Event()
    runner, batcher = ListRunner(max_batch_size=8, hold=hold), Batcher()
    threading.Thread(target=submit_all, args=(batcher, runner, [_Body("first")])).start()
    wait_for(lambda: runner.calls, 10, 0.005, "the first call")
    bodies = [_Body(v) for v in ("a", "b", "bad", "c", "d")]
    results: list[Any] = []
    waiter = threading.Thread(target=lambda: results.extend(submit_all(batcher, runner, bodies)))
    waiter.start()
    wait_for(lambda: len(batcher._waiting) >= 5, 10, 0.005, "5 items waiting")
    hold.set()
    waiter.join(20)
    assert [r if isinstance(r, dict) else str(r) for r in results] == [
        {"echo": "a"}, {"echo": "b"}, "bad alone", {"echo": "c"}, {"echo": "d"}]
    assert runner.calls[1] == ["a", "b", "bad", "c", "d"]  # tried together first
    assert batcher.stats["m"].splits >= 1


# --- model cache -----------------------------------------------------------------------------------

class SizedRunner:
    def __init__(self, spec: ModelSpec, log: list[str]) -> None:
        self.spec, self.log, self.loaded = spec, log, False

    def load(self) -> None:
        self.loaded = True
        self.log.append(f"load {self.spec.name}")

    def unload(self) -> None:
        self.loaded = False
        self.log.append(f"unload {self.spec.name}")

    def memory_bytes(self) -> int:
        return SIZE if self.loaded else 0


def _cache(budget: int, log: list[str], pin_wait_s: float = 10) -> ModelCache:
    specs = {n: model_spec(n, "echo", "none") for n in ("a", "b", "c")}
    return ModelCache(specs, lambda spec: SizedRunner(spec, log), budget_bytes=budget, pin_wait_s=pin_wait_s)


def test_cache_evicts_the_least_recently_used_model_to_fit_the_budget() -> None:
    log: list[str] = []
    cache = _cache(250, log)
    for model in ("a", "b", "a", "c"):  # c needs room: b is the least recently used
        cache.acquire(model)
        cache.release(model)
    # c's size is unknown until it has loaded once (no weight files here), so b goes right after.
    assert log == ["load a", "load b", "load c", "unload b"]
    assert cache.resident() == ["a", "c"]
    cache.acquire("b")
    cache.release("b")
    assert log[-2:] == ["unload a", "load b"]  # b's size is known now: room is made before the load
    assert (cache.stats["b"].loads, cache.stats["b"].evictions, cache.stats["a"].evictions) == (2, 1, 1)
    assert all(cache.stats[m].load_seconds >= 0 for m in "abc") and cache.stats["c"].bytes == 100


def test_cache_waits_for_a_model_in_use_before_evicting_it() -> None:
    log: list[str] = []
    cache = _cache(150, log)
    cache.acquire("b")
    cache.release("b")
    cache.acquire("a")  # pinned from now on: a job is using it (b is evicted to make room)
    assert log == ["load b", "load a", "unload b"]
    loaded = threading.Thread(target=cache.acquire, args=("b",))
    loaded.start()
    loaded.join(0.3)
    assert loaded.is_alive() and log[-1] == "unload b"  # b waits while a is busy
    cache.release("a")
    loaded.join(10)
    assert log[-2:] == ["unload a", "load b"] and cache.resident() == ["b"]


def test_cache_goes_over_budget_when_the_busy_model_stays_busy() -> None:
    log: list[str] = []
    cache = _cache(150, log, pin_wait_s=0.2)
    cache.acquire("a")
    cache.acquire("b")  # a never frees up: after the wait, b loads over the budget
    assert cache.resident() == ["a", "b"] and "unload a" not in log


def test_cache_without_budget_keeps_everything() -> None:
    log: list[str] = []
    cache = _cache(0, log)
    for model in "abcabc":
        cache.acquire(model)
        cache.release(model)
    assert log == ["load a", "load b", "load c"]


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("512MiB", 512 * 2**20), ("20GiB", 20 * 2**30),
                                             ("1.5g", 1_500_000_000), ("100 kb", 100_000)])
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["lots", "-1GiB", "12XB", ""])
def test_parse_bytes_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="size like"):
        parse_bytes(text)


class StreamRunner(ListRunner):
    """A continuous runner: each step ends its oldest running item and takes in whatever waits;
    `fail_after` makes serve raise once that many items were delivered."""

    def __init__(self, name: str = "m", fail_after: int | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.spec = model_spec(name, "echo", "none", max_batch_size=self.spec.options.max_batch_size,
                               max_wait_ms=self.spec.options.max_wait_ms, batch=True)
        self.fail_after, self.served, self.retried, self.sessions = fail_after, [], [], 0

    def run_batch(self, items: list[BatchItem]) -> list[Outcome]:
        self.retried += [it.body.value for it in items]  # type: ignore[attr-defined]
        return super().run_batch(items)

    def serve(self, items: list[BatchItem], pull: Any, deliver: Any) -> None:
        self.sessions += 1
        running = list(items)
        self.calls.append([it.body.value for it in items])  # type: ignore[attr-defined]
        while running:
            time.sleep(0.002)  # one decoding step's work
            if self.fail_after is not None and len(self.served) >= self.fail_after:
                raise RuntimeError("the device failed mid-batch")
            item = running.pop(0)
            self.served.append(item.body.value)  # type: ignore[attr-defined]
            deliver(item, {"echo": item.body.value})  # type: ignore[attr-defined]
            room = 4 - len(running)
            taken = pull(lambda offered, room=room: [it for it, _ in offered][:room])
            self.calls.append([it.body.value for it in taken])
            running += taken


def test_a_running_continuous_batch_takes_in_waiting_items_and_delivers_each_at_once() -> None:
    runner, batcher = StreamRunner(max_batch_size=4, max_wait_ms=10), Batcher()
    results = submit_all(batcher, runner, [_Body(f"v{i}") for i in range(12)])  # type: ignore[arg-type]
    assert results == [{"echo": f"v{i}"} for i in range(12)]
    assert runner.sessions < 12 and sorted(runner.served) == sorted(f"v{i}" for i in range(12))
    batcher.stop()


def test_a_failed_continuous_batch_retries_only_its_undelivered_items() -> None:
    runner, batcher = StreamRunner(max_batch_size=4, max_wait_ms=10, fail_after=2), Batcher()
    results = submit_all(batcher, runner, [_Body(f"v{i}") for i in range(4)])  # type: ignore[arg-type]
    assert results == [{"echo": f"v{i}"} for i in range(4)]
    assert len(runner.served) == 2  # the other two went through run_batch
    assert sorted(runner.retried) == sorted({f"v{i}" for i in range(4)} - set(runner.served))
    batcher.stop()


def test_another_models_job_is_not_starved_by_a_busy_continuous_batch() -> None:
    """While a continuous batch of model m has work pouring in, a job of model b waits about its
    max_wait_ms: then m stops taking new items, drains, and b runs."""
    busy, other, batcher = StreamRunner(max_batch_size=4, max_wait_ms=60_000), ListRunner(max_wait_ms=20), Batcher()
    other.spec = model_spec("b", "echo", "none", max_batch_size=4, max_wait_ms=20, batch=True)
    stop = threading.Event()

    def feed(k: int) -> None:
        n = 0
        while not stop.is_set():
            batcher.submit("m", busy, BatchItem(_Body(f"f{k}-{n}"), RunContext()))  # type: ignore[arg-type]
            n += 1

    feeders = [threading.Thread(target=feed, args=(k,), daemon=True) for k in range(6)]
    for t in feeders:
        t.start()
    wait_for(lambda: len(busy.served) > 20, 10, 0.001, "the continuous batch running")
    answer: list[Any] = []
    waiter = threading.Thread(target=lambda: answer.append(
        batcher.submit("b", other, BatchItem(_Body("other"), RunContext()))))  # type: ignore[arg-type]
    waiter.start()
    waiter.join(10)
    stop.set()
    assert answer == [{"echo": "other"}]
    assert busy.sessions >= 2  # m's batch drained for it, and m went on afterwards
    for t in feeders:
        t.join(10)
    batcher.stop()
