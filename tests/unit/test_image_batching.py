"""ImageRunner's batch interface on the tiny Stable Diffusion pipeline (real diffusers and peft code on
the CPU): batched requests keep their own images, per-item cancellation, LoRA adapters, unload."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from genq.shared.registry import ModelSpec, load_registry
from genq.shared.schemas import ImageBody
from genq.workers.batching import Batcher
from genq.workers.runners.base import BatchItem, InvalidRequest, JobCancelled, LocalAdapter, Outcome, RunContext, finish
from genq.workers.runners.image import ImageRunner
from genq.workers.runners.png import read_png_parameters
from genq.workers.tiny_lora import build_image_lora
from tests.support.waiting import wait_for


def run_batch(runner: ImageRunner, items: list[BatchItem]) -> list[Outcome]:
    """The runner's batch with each outcome finished, as the worker's job threads finish them."""
    return [finish(o) for o in runner.run_batch(items)]

# Measured (see the workers/runners/image.py docstring): alone vs in a batch, at most one level
# of 255 in a small share of the pixel values for every scheduler but ddim.
MAX_LEVELS, MAX_SHARE = 1, 0.01


@pytest.fixture(scope="module")
def spec(tiny_dir: Path) -> ModelSpec:
    spec = load_registry(tiny_dir / "models.toml").get("tiny-sd")
    assert spec is not None and spec.options.max_batch_size == 8
    return spec


@pytest.fixture(scope="module")
def runner(spec: ModelSpec) -> ImageRunner:
    """A runner these tests share; the adapter tests make their own."""
    runner = ImageRunner(spec, device="cpu")
    runner.load()
    return runner


@pytest.fixture(scope="module")
def loras(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, LocalAdapter]:
    """Two working LoRAs for tiny-sd and two broken ones: garbage bytes, and one weight of the wrong shape."""
    root = tmp_path_factory.mktemp("loras")
    good = {name: build_image_lora(tiny_dir / "tiny-sd", root / name, seed=seed) for name, seed in (("A", 1), ("B", 2))}
    garbage = root / "garbage"
    garbage.mkdir()
    (garbage / "pytorch_lora_weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    weights = load_file(good["A"] / "pytorch_lora_weights.safetensors")
    first_a = next(key for key in sorted(weights) if "lora_A" in key)
    weights[first_a] = weights[first_a][:, :-1].contiguous()  # one input feature short of the UNet's
    misshapen = root / "misshapen"
    misshapen.mkdir()
    save_file(weights, misshapen / "pytorch_lora_weights.safetensors")
    empty = root / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_text("{}")
    paths = {**good, "garbage": garbage, "misshapen": misshapen, "empty": empty}
    return {name: LocalAdapter(id=f"adapter-{name}", path=path) for name, path in paths.items()}


def item(adapter: LocalAdapter | None = None, ctx: RunContext | None = None, **fields: Any) -> BatchItem:
    fields = {"model": "tiny-sd", "prompt": "a red apple on a table", "size": "64x64",
              "num_inference_steps": 3, "seed": 7, **fields}
    if adapter is not None:
        fields["adapter"] = adapter.id
    return BatchItem(body=ImageBody.model_validate(fields), ctx=ctx or RunContext(), adapter=adapter)


def pixels(done: BatchItem, k: int = 0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(done.ctx.outputs[f"{k}.png"])).convert("RGB")).astype(int)


def served(runner: ImageRunner, *items: BatchItem) -> list[BatchItem]:
    """Prepare and run the items as one batch; fail unless every outcome is a response."""
    for it in items:
        runner.prepare(it)
    outcomes = run_batch(runner, list(items))
    assert all(isinstance(o, dict) for o in outcomes), outcomes
    return list(items)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    diff = np.abs(a - b)
    return bool(diff.max() <= MAX_LEVELS and (diff > 0).mean() < MAX_SHARE)


@pytest.fixture
def pipeline_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of images (rows) in each pipeline call."""
    calls: list[int] = []
    original = StableDiffusionPipeline.__call__

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(kwargs["prompt"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counting)
    return calls


# --- batching ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", [None, "euler_ancestral"])
def test_batched_requests_get_the_images_they_get_alone(
    runner: ImageRunner, pipeline_calls: list[int], scheduler: str | None
) -> None:
    requests = [
        {"prompt": "a red apple on a table", "seed": 1, "n": 1},
        {"prompt": "a lighthouse at night", "seed": 50, "n": 2, "negative_prompt": "blurry"},
        {"prompt": "", "seed": 9, "n": 3},
    ]
    alone = [served(runner, item(scheduler=scheduler, **r))[0] for r in requests]
    pipeline_calls.clear()
    batch = served(runner, *(item(scheduler=scheduler, **r) for r in requests))
    assert pipeline_calls == [6]  # one call for the six images
    for single, batched, request in zip(alone, batch, requests, strict=True):
        assert sorted(batched.ctx.outputs) == [f"{k}.png" for k in range(request["n"])]
        for k in range(request["n"]):
            assert close(pixels(single, k), pixels(batched, k))
            params = read_png_parameters(batched.ctx.outputs[f"{k}.png"])
            assert params["prompt"] == request["prompt"] and params["seed"] == request["seed"] + k
            assert params["negative_prompt"] == request.get("negative_prompt")
    # Different requests really made different images (the comparison above can fail).
    assert np.abs(pixels(batch[0]) - pixels(batch[1])).mean() > 5


def test_rows_beyond_the_batch_limit_take_more_calls(spec: ModelSpec, pipeline_calls: list[int]) -> None:
    small = ImageRunner(spec.with_options(max_batch_size=4), device="cpu")
    small.load()
    alone = [served(small, item(seed=seed, n=3, size="32x32"))[0] for seed in (30, 60)]
    pipeline_calls.clear()
    batch = served(small, item(seed=30, n=3, size="32x32"), item(seed=60, n=3, size="32x32"))
    assert pipeline_calls == [4, 2]
    for single, batched in zip(alone, batch, strict=True):
        assert all(close(pixels(single, k), pixels(batched, k)) for k in range(3))


def test_a_missing_negative_prompt_is_the_empty_one(runner: ImageRunner) -> None:
    # A batch mate with a negative prompt makes the runner send "" for this one: same image.
    none, empty = served(runner, item(seed=3)), served(runner, item(seed=3, negative_prompt=""))
    assert np.array_equal(pixels(none[0]), pixels(empty[0]))


def test_batch_key_groups_only_what_can_share_a_call(runner: ImageRunner, loras: dict[str, LocalAdapter]) -> None:
    base = item()
    same = [item(prompt="another", negative_prompt="ugly", seed=99, n=4), item(seed=None, n=2)]
    assert all(runner.batch_key(it) == runner.batch_key(base) for it in same)
    different = [item(size="64x32"), item(size="32x64"), item(num_inference_steps=4), item(guidance_scale=3.0),
                 item(scheduler="euler"), item(adapter=loras["A"]), item(adapter=loras["B"])]
    keys = {runner.batch_key(it) for it in [base, *different]}
    assert len(keys) == 1 + len(different)
    assert [runner.rows(it) for it in same] == [4, 2]
    assert runner.spec.options.batches() and not runner.spec.with_options(max_batch_size=1).options.batches()


def test_a_mixed_queue_fills_one_call_per_size(runner: ImageRunner, pipeline_calls: list[int]) -> None:
    """Requests of two sizes queued, shuffled, behind a running call: the size with more waiting
    images runs first, each size in one call, and an image is the one it is alone."""
    started, hold = threading.Event(), threading.Event()

    def held() -> bool:  # the first request's call waits here while the others queue up
        started.set()
        return not hold.wait(20)

    batcher = Batcher()
    sizes = ["32x32", "40x32", "32x32", "40x32", "40x32", "40x32"]
    items = [item(size=size, seed=i, num_inference_steps=2) for i, size in enumerate(sizes)]
    results: list[Any] = [None] * len(items)

    def submit(i: int, it: BatchItem) -> None:
        results[i] = batcher.submit("tiny-sd", runner, it)

    first = threading.Thread(target=batcher.submit, args=(
        "tiny-sd", runner, item(size="48x32", num_inference_steps=2, ctx=RunContext(is_cancelled=held))))
    first.start()
    assert started.wait(20)
    threads = []
    for i, it in enumerate(items):
        runner.prepare(it)
        threads.append(threading.Thread(target=submit, args=(i, it)))
        threads[-1].start()
        wait_for(lambda i=i: len(batcher._waiting) > i, 10, 0.005, f"request {i} waiting")
    hold.set()
    for t in [first, *threads]:
        t.join(60)
    assert pipeline_calls == [1, 4, 2]  # the held call, all 40x32 images, then both 32x32
    assert all(isinstance(r, dict) for r in results), results
    alone = served(runner, item(size="40x32", seed=5, num_inference_steps=2))[0]
    assert close(pixels(alone), pixels(items[5]))


def test_prepare_chooses_the_seeds_once(runner: ImageRunner) -> None:
    chosen = item(seed=None, n=3)
    runner.prepare(chosen)
    [result] = run_batch(runner, [chosen])
    assert isinstance(result, dict)
    seed = result["parameters"]["seed"]
    assert [d["seed"] for d in result["data"]] == [seed, seed + 1, seed + 2]


def test_one_bad_request_fails_alone(runner: ImageRunner) -> None:
    good, bad = item(), item(num_inference_steps=151)
    outcomes = run_batch(runner, [good, bad])  # run_batch prepares what was not prepared
    assert isinstance(outcomes[0], dict) and good.ctx.outputs
    assert isinstance(outcomes[1], InvalidRequest) and outcomes[1].param == "body.num_inference_steps"


def test_a_storage_error_fails_only_its_item(runner: ImageRunner) -> None:
    def broken(name: str, data: bytes, content_type: str) -> str:
        raise OSError("bucket unavailable")

    ok, failing = item(seed=1), item(seed=2, ctx=RunContext(put_output=broken))
    for it in (ok, failing):
        runner.prepare(it)
    outcomes = run_batch(runner, [ok, failing])
    assert isinstance(outcomes[0], dict) and ok.ctx.outputs
    assert isinstance(outcomes[1], OSError)


# --- cancellation ------------------------------------------------------------------------------


def cancel_after(steps: int, seen: list[float]) -> Callable[[], bool]:
    return lambda: len(seen) >= steps


def test_a_cancelled_item_stores_nothing_and_its_mates_finish(runner: ImageRunner) -> None:
    progress: list[list[float]] = [[], [], []]
    ctxs = [RunContext(job_id=f"job{i}", set_progress=progress[i].append) for i in range(3)]
    ctxs[1].is_cancelled = cancel_after(2, progress[1])
    items = [item(ctx=ctx, seed=i, n=2, num_inference_steps=6) for i, ctx in enumerate(ctxs)]
    for it in items:
        runner.prepare(it)
    outcomes = run_batch(runner, items)
    assert isinstance(outcomes[1], JobCancelled) and str(outcomes[1]) == "job1"
    assert ctxs[1].outputs == {} and len(progress[1]) == 2  # no progress once cancelled
    for i in (0, 2):
        assert isinstance(outcomes[i], dict) and sorted(ctxs[i].outputs) == ["0.png", "1.png"]
        assert progress[i][-1] == 1.0 and len(progress[i]) >= 6


def test_when_every_item_is_cancelled_the_call_stops_early(runner: ImageRunner) -> None:
    progress: list[list[float]] = [[], []]
    ctxs = [RunContext(set_progress=p.append) for p in progress]
    for ctx, p in zip(ctxs, progress, strict=True):
        ctx.is_cancelled = cancel_after(2, p)
    items = [item(ctx=ctx, seed=i, num_inference_steps=20) for i, ctx in enumerate(ctxs)]
    for it in items:
        runner.prepare(it)
    unet_calls: list[int] = []
    hook = runner.pipe.unet.register_forward_hook(lambda *args: unet_calls.append(1))
    try:
        outcomes = run_batch(runner, items)
    finally:
        hook.remove()
    assert all(isinstance(o, JobCancelled) for o in outcomes)
    assert len(unet_calls) == 2 and [len(p) for p in progress] == [2, 2]  # 18 of 20 steps skipped
    assert all(ctx.outputs == {} for ctx in ctxs)
    assert served(runner, item())[0].ctx.outputs  # the pipeline is not left interrupted


def test_items_cancelled_before_their_call_take_no_rows(runner: ImageRunner, pipeline_calls: list[int]) -> None:
    gone = item(ctx=RunContext(is_cancelled=lambda: True), n=3)
    kept = item(n=2)
    for it in (gone, kept):
        runner.prepare(it)
    outcomes = run_batch(runner, [gone, kept])
    assert isinstance(outcomes[0], JobCancelled) and isinstance(outcomes[1], dict)
    assert pipeline_calls == [2]


# --- adapters -----------------------------------------------------------------------------------


def fresh(spec: ModelSpec, **options: Any) -> ImageRunner:
    runner = ImageRunner(spec.with_options(**options), device="cpu")
    runner.load()
    return runner


def test_an_adapter_changes_the_image_and_leaves_other_requests_alone(
    spec: ModelSpec, loras: dict[str, LocalAdapter]
) -> None:
    runner = fresh(spec)
    before = pixels(served(runner, item())[0])  # no adapter ever loaded
    adapted = served(runner, item(adapter=loras["A"]))[0]
    assert np.abs(pixels(adapted) - before).mean() > 5
    params = read_png_parameters(adapted.ctx.outputs["0.png"])
    assert params["adapter"] == "adapter-A"
    # The base model is back for the next request, bit for bit, and in a mixed batch too.
    assert np.array_equal(pixels(served(runner, item())[0]), before)
    plain, again = served(runner, item(), item(adapter=loras["A"]))
    assert np.array_equal(pixels(plain), before)
    assert np.array_equal(pixels(again), pixels(adapted))
    assert "adapter" not in read_png_parameters(plain.ctx.outputs["0.png"])
    assert runner.adapters.ids() == ["adapter-A"] and runner.adapters.stats.loads == 1


def test_the_adapter_lru_evicts_and_reloads(spec: ModelSpec, loras: dict[str, LocalAdapter]) -> None:
    runner = fresh(spec, max_adapters=1)
    first_a = pixels(served(runner, item(adapter=loras["A"]))[0])
    b = pixels(served(runner, item(adapter=loras["B"]))[0])
    assert runner.adapters.ids() == ["adapter-B"]
    again_a = pixels(served(runner, item(adapter=loras["A"]))[0])
    assert runner.adapters.ids() == ["adapter-A"]
    stats = runner.adapters.stats
    assert (stats.loads, stats.evictions) == (3, 2) and stats.load_seconds > 0
    assert np.array_equal(again_a, first_a)
    assert np.abs(b - first_a).mean() > 5


def test_the_least_recently_used_adapter_goes_first(spec: ModelSpec, loras: dict[str, LocalAdapter]) -> None:
    runner = fresh(spec, max_adapters=2)
    extra = LocalAdapter(id="adapter-A2", path=loras["A"].path)  # another id: another adapter
    for adapter in (loras["A"], loras["B"], loras["A"], extra):
        served(runner, item(adapter=adapter, num_inference_steps=1, size="32x32"))
    assert runner.adapters.ids() == ["adapter-A", "adapter-A2"]
    assert runner.adapters.stats.evictions == 1


@pytest.mark.parametrize("broken", ["garbage", "misshapen", "empty"])
def test_an_adapter_that_cannot_load_fails_only_its_items(
    spec: ModelSpec, loras: dict[str, LocalAdapter], broken: str
) -> None:
    runner = fresh(spec)
    base, adapted = served(runner, item(), item(adapter=loras["A"]))
    held = runner.memory_bytes()
    items = [item(), item(adapter=loras[broken], seed=1), item(adapter=loras[broken], seed=2, n=2),
             item(adapter=loras["A"])]
    for it in items:
        runner.prepare(it)
    outcomes = run_batch(runner, items)
    for failed in outcomes[1:3]:
        assert isinstance(failed, InvalidRequest) and failed.param == "body.adapter"
        assert f"adapter-{broken}" in str(failed)
    assert items[1].ctx.outputs == items[2].ctx.outputs == {}
    # The other requests, and the ones after, get exactly the images they got before.
    assert isinstance(outcomes[0], dict) and isinstance(outcomes[3], dict)
    assert np.array_equal(pixels(items[0]), pixels(base))
    assert np.array_equal(pixels(items[3]), pixels(adapted))
    assert np.array_equal(pixels(served(runner, item())[0]), pixels(base))
    assert runner.adapters.ids() == ["adapter-A"] and runner.adapters.stats.load_failures == 1
    assert runner.memory_bytes() == held  # nothing of the failed load is left in the modules


def test_an_adapter_the_worker_did_not_provide_is_refused(runner: ImageRunner) -> None:
    with pytest.raises(InvalidRequest) as info:
        runner.prepare(BatchItem(body=item().body.model_copy(update={"adapter": "not-here"})))  # no LocalAdapter
    assert info.value.param == "body.adapter"


# --- load, unload, memory ------------------------------------------------------------------------


def test_unload_frees_the_pipeline_and_the_runner_loads_again(spec: ModelSpec, loras: dict[str, LocalAdapter]) -> None:
    runner = fresh(spec)
    before = pixels(served(runner, item())[0])
    adapted = pixels(served(runner, item(adapter=loras["A"]))[0])
    loaded = runner.memory_bytes()
    assert loaded > 1_000_000  # tiny-sd's fp32 UNet, VAE and text encoder
    runner.unload()
    assert runner.pipe is None and runner.memory_bytes() == 0 and runner.adapters.ids() == []
    assert np.array_equal(pixels(served(runner, item())[0]), before)  # run_batch loads it again
    assert 0 < runner.memory_bytes() < loaded  # without the adapter's LoRA weights
    assert np.array_equal(pixels(served(runner, item(adapter=loras["A"]))[0]), adapted)
    assert runner.adapters.stats.loads == 2
    runner.unload()
    runner.load()
    assert runner.memory_bytes() > 0
