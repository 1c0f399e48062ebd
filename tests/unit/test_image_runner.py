"""ImageRunner on the tiny Stable Diffusion pipeline: the real diffusers code path on the CPU."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from genq.shared.schemas import ImageBody
from genq.workers.runners.base import InvalidRequest, JobCancelled, RunContext
from genq.workers.runners.image import SCHEDULER_CLASSES, ImageRunner
from genq.workers.runners.png import read_png_parameters


def body(**fields: Any) -> ImageBody:
    fields = {"model": "tiny-sd", "prompt": "a red apple on a table", "size": "64x64",
              "num_inference_steps": 3, "seed": 7, **fields}
    return ImageBody.model_validate(fields)


def generate(runner: ImageRunner, **fields: Any) -> tuple[dict[str, Any], RunContext]:
    ctx = RunContext()
    return runner.run(body(**fields), ctx), ctx


def pixels(ctx: RunContext, item: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(ctx.outputs[f"{item['index']}.png"])).convert("RGB")).astype(int)


def test_images_are_pngs_of_the_requested_size(image_runner: ImageRunner) -> None:
    for size, shape in (("64x64", (64, 64, 3)), ("64x32", (32, 64, 3))):
        result, ctx = generate(image_runner, size=size, n=2)
        assert [item["index"] for item in result["data"]] == [0, 1]
        assert sorted(ctx.outputs) == ["0.png", "1.png"]
        assert result["output_keys"] == ["0.png", "1.png"]
        for item in result["data"]:
            assert ctx.outputs[f"{item['index']}.png"].startswith(b"\x89PNG\r\n\x1a\n")
            assert pixels(ctx, item).shape == shape
            assert item["revised_prompt"] is None and "url" not in item and "b64_json" not in item
        assert isinstance(result["created"], int)


def test_png_text_chunks_and_result_carry_the_parameters(image_runner: ImageRunner) -> None:
    result, ctx = generate(image_runner, n=2, seed=100, negative_prompt="blurry", guidance_scale=5.0,
                           scheduler="euler")
    params = read_png_parameters(ctx.outputs[result["output_keys"][1]])
    assert params == {
        "model": "tiny-sd", "prompt": "a red apple on a table", "negative_prompt": "blurry", "seed": 101,
        "num_inference_steps": 3, "guidance_scale": 5.0, "scheduler": "euler", "size": "64x64", "index": 1,
    }
    assert [item["seed"] for item in result["data"]] == [100, 101]
    assert result["parameters"]["seed"] == 100 and result["parameters"]["n"] == 2
    # No scheduler asked for: the model's own (PNDM for the tiny SD 1.5-shaped model) is named.
    default, ctx = generate(image_runner)
    assert read_png_parameters(ctx.outputs["0.png"])["scheduler"] == "PNDMScheduler"
    assert default["parameters"]["scheduler"] == "PNDMScheduler"


def test_seed_decides_the_pixels(image_runner: ImageRunner) -> None:
    first, ctx1 = generate(image_runner, seed=11)
    again, ctx2 = generate(image_runner, seed=11)
    other, ctx3 = generate(image_runner, seed=12)
    a, b, c = (pixels(ctx, r["data"][0]) for ctx, r in ((ctx1, first), (ctx2, again), (ctx3, other)))
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 5


def test_a_random_seed_is_reported_and_reproduces_the_image(image_runner: ImageRunner) -> None:
    result, ctx = generate(image_runner, seed=None)
    seed = result["data"][0]["seed"]
    assert 0 <= seed < 2**31 and result["parameters"]["seed"] == seed
    again, ctx2 = generate(image_runner, seed=seed)
    assert np.array_equal(pixels(ctx, result["data"][0]), pixels(ctx2, again["data"][0]))


@pytest.mark.parametrize("scheduler", [None, "euler_ancestral"])
def test_image_k_of_n_is_the_single_image_with_seed_plus_k(image_runner: ImageRunner, scheduler: str | None) -> None:
    batch, ctx = generate(image_runner, n=3, seed=40, size="64x32", scheduler=scheduler)
    for k in range(3):
        alone, ctx_k = generate(image_runner, n=1, seed=40 + k, size="64x32", scheduler=scheduler)
        diff = np.abs(pixels(ctx, batch["data"][k]) - pixels(ctx_k, alone["data"][0]))
        # Same noise, same steps; only float rounding differs between a batch of 3 and of 1
        # (different matrix kernels), which can move a rare pixel by one level.
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_more_images_than_the_batch_limit_come_in_several_batches(image_runner: ImageRunner) -> None:
    # max_batch_size is 8 for tiny-sd; 10 images take two pipeline calls and keep their seeds.
    result, ctx = generate(image_runner, n=10, seed=3, size="32x32", num_inference_steps=2)
    assert [item["seed"] for item in result["data"]] == list(range(3, 13))
    alone, ctx9 = generate(image_runner, seed=12, size="32x32", num_inference_steps=2)
    diff = np.abs(pixels(ctx, result["data"][9]) - pixels(ctx9, alone["data"][0]))
    assert diff.max() <= 1


@pytest.mark.parametrize("scheduler", sorted(SCHEDULER_CLASSES))
def test_every_scheduler_runs(image_runner: ImageRunner, scheduler: str) -> None:
    result, ctx = generate(image_runner, scheduler=scheduler, num_inference_steps=2, size="32x32")
    assert read_png_parameters(ctx.outputs[result["output_keys"][0]])["scheduler"] == scheduler
    assert pixels(ctx, result["data"][0]).std() > 0


@pytest.mark.parametrize("scheduler", [None, "heun"])
def test_progress_rises_to_one(image_runner: ImageRunner, scheduler: str | None) -> None:
    seen: list[float] = []
    image_runner.run(body(num_inference_steps=4, scheduler=scheduler), RunContext(set_progress=seen.append))
    assert seen == sorted(seen) and len(seen) >= 4
    assert 0 < seen[0] < 1 and seen[-1] == 1.0


def test_cancel_mid_run_stores_nothing(image_runner: ImageRunner) -> None:
    steps: list[float] = []
    ctx = RunContext(set_progress=steps.append, is_cancelled=lambda: len(steps) >= 2)
    with pytest.raises(JobCancelled):
        image_runner.run(body(n=2, num_inference_steps=10), ctx)
    assert ctx.outputs == {}
    assert len(steps) == 2  # the remaining steps were skipped
    # The shared pipeline is not left interrupted: the next job runs normally.
    result, ctx = generate(image_runner)
    assert len(result["data"]) == 1 and ctx.outputs


@pytest.mark.parametrize(("fields", "param"), [
    ({"size": "264x64"}, "body.size"),  # max_size is 256 for tiny-sd
    ({"size": "64x512"}, "body.size"),
    ({"num_inference_steps": 151}, "body.num_inference_steps"),
    ({"adapter": "style"}, "body.adapter"),  # named, but the worker gave it no adapter files
])
def test_requests_beyond_the_model_limits_are_refused(
    image_runner: ImageRunner, fields: dict[str, Any], param: str
) -> None:
    ctx = RunContext()
    with pytest.raises(InvalidRequest) as info:
        image_runner.run(body(**fields), ctx)
    assert info.value.param == param
    assert ctx.outputs == {}


def test_sizes_not_multiple_of_8_are_refused(image_runner: ImageRunner) -> None:
    # The schema refuses them first; the runner checks again for bodies built another way.
    too_odd = body().model_copy(update={"size": "60x64"})
    with pytest.raises(InvalidRequest) as info:
        image_runner.run(too_odd, RunContext())
    assert info.value.param == "body.size"


class _FlagSecondImage:
    """Stands in for diffusers' safety checker: flags image 1 of each batch and blacks it out."""

    def __call__(self, images: Any, clip_input: Any) -> tuple[Any, list[bool]]:
        flags = [i == 1 for i in range(len(images))]
        images = images.clone()
        images[1] = 0
        return images, flags


class _FeatureExtractor:
    def __call__(self, images: Any, return_tensors: str) -> Any:
        import torch

        class Features:
            pixel_values = torch.zeros(len(images), 3, 8, 8)

            def to(self, device: Any) -> Any:
                return self

        return Features()


def test_flagged_images_are_kept_black_and_marked(tiny_dir: Any) -> None:
    from genq.shared.registry import load_registry

    runner = ImageRunner(load_registry(tiny_dir / "models.toml").get("tiny-sd"), device="cpu")
    runner.load()
    runner.pipe.safety_checker, runner.pipe.feature_extractor = _FlagSecondImage(), _FeatureExtractor()
    result, ctx = generate(runner, n=2)
    assert "nsfw_content_detected" not in result["data"][0]
    assert result["data"][1]["nsfw_content_detected"] is True
    assert pixels(ctx, result["data"][0]).max() > 0 and pixels(ctx, result["data"][1]).max() == 0
