"""GANRunner with the tiny conditional DCGAN: seeds, sizes, class-label prompts, cancellation, format."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from genq.shared.registry import model_spec
from genq.shared.schemas import ImageBody
from genq.workers.gan import DCGANGenerator, GANConfig, GANFormatError, load_generator, save_generator
from genq.workers.runners import runner_class
from genq.workers.runners.base import InvalidRequest, JobCancelled, RunContext
from genq.workers.runners.gan import GANRunner
from genq.workers.runners.png import read_png_parameters
from genq.workers.tiny import build_tiny_gan


@pytest.fixture(scope="module")
def gan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gan(tmp_path_factory.mktemp("gan") / "tiny-gan", seed=0)


@pytest.fixture(scope="module")
def runner(gan_dir: Path) -> GANRunner:
    spec = model_spec("tiny-gan", "gan", str(gan_dir), max_batch_size=16)
    gan = GANRunner(spec, device="cpu")
    gan.load()
    return gan


def generate(runner: GANRunner, **fields: Any) -> tuple[dict[str, Any], RunContext]:
    body = ImageBody.model_validate({"model": "tiny-gan", "prompt": "cat", "size": "32x32", **fields})
    ctx = RunContext()
    return runner.run(body, ctx), ctx


def pixels(ctx: RunContext, index: int = 0) -> np.ndarray:
    with Image.open(io.BytesIO(ctx.outputs[f"{index}.png"])) as img:
        return np.asarray(img.convert("RGB"))


def test_registered_kind() -> None:
    assert runner_class("gan") is GANRunner


def test_png_of_native_size_with_parameters(runner: GANRunner) -> None:
    result, ctx = generate(runner, prompt="  Dog ", seed=5, n=2, num_inference_steps=50, guidance_scale=9.0)
    assert result["output_keys"] == ["0.png", "1.png"] and all("output_key" not in d for d in result["data"])
    assert [(d["seed"], d["index"], d["revised_prompt"]) for d in result["data"]] == [(5, 0, None), (6, 1, None)]
    with Image.open(io.BytesIO(ctx.outputs["1.png"])) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (32, 32))
        assert img.text["genq:class_label"] == "dog"
    params = read_png_parameters(ctx.outputs["1.png"])
    assert params == {"model": "tiny-gan", "prompt": "  Dog ", "size": "32x32", "kind": "gan",
                      "class_label": "dog", "seed": 6, "index": 1}
    request = result["parameters"]
    assert request["seed"] == 5 and request["class_label"] == "dog" and request["n"] == 2
    assert request["num_inference_steps"] is request["guidance_scale"] is None
    assert request["scheduler"] is request["negative_prompt"] is None
    assert pixels(ctx).std() > 10  # not a flat grey image


def test_same_seed_same_pixels_and_different_seed_differs(runner: GANRunner) -> None:
    _, first = generate(runner, seed=11)
    _, again = generate(runner, seed=11)
    _, other = generate(runner, seed=12)
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def test_image_k_is_reproduced_alone(runner: GANRunner) -> None:
    _, batch = generate(runner, seed=100, n=3)
    for k in range(3):
        _, single = generate(runner, seed=100 + k, n=1)
        assert np.array_equal(pixels(batch, k), pixels(single))
    assert not np.array_equal(pixels(batch, 0), pixels(batch, 1))


def test_random_seed_is_reported_and_reproduces(runner: GANRunner) -> None:
    result, ctx = generate(runner)
    seed = result["parameters"]["seed"]
    assert isinstance(seed, int) and result["data"][0]["seed"] == seed
    _, again = generate(runner, seed=seed)
    assert np.array_equal(pixels(ctx), pixels(again))


def test_size_must_be_native(runner: GANRunner) -> None:
    with pytest.raises(InvalidRequest) as info:
        generate(runner, size="64x64")
    assert info.value.param == "body.size" and "32x32" in str(info.value)
    # Left out, size means the generator's own (the ImageBody default is a diffusion size).
    body = ImageBody(model="tiny-gan", prompt="car", seed=1)
    ctx = RunContext()
    assert runner.run(body, ctx)["parameters"]["size"] == "32x32"
    assert pixels(ctx).shape == (32, 32, 3)


@pytest.mark.parametrize("prompt", ["a cat on a sofa", "", "bird"])
def test_unknown_label_is_refused(runner: GANRunner, prompt: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        generate(runner, prompt=prompt)
    assert info.value.param == "body.prompt"
    assert all(label in str(info.value) for label in ("'cat'", "'dog'", "'car'"))


def test_labels_are_case_insensitive_and_change_the_image(runner: GANRunner) -> None:
    _, cat = generate(runner, prompt="cat", seed=3)
    _, cat_upper = generate(runner, prompt=" CAT", seed=3)
    _, dog = generate(runner, prompt="dog", seed=3)
    assert np.array_equal(pixels(cat), pixels(cat_upper))
    assert not np.array_equal(pixels(cat), pixels(dog))


def test_cancelled_before_start(runner: GANRunner) -> None:
    body = ImageBody(model="tiny-gan", prompt="cat", size="32x32", n=2, seed=1)
    progress: list[float] = []
    ctx = RunContext(is_cancelled=lambda: True, set_progress=progress.append)
    with pytest.raises(JobCancelled):
        runner.run(body, ctx)
    assert ctx.outputs == {} and progress == []


def test_progress_ends_at_one(runner: GANRunner) -> None:
    progress: list[float] = []
    body = ImageBody(model="tiny-gan", prompt="car", size="32x32", n=2, seed=1)
    runner.run(body, RunContext(set_progress=progress.append))
    assert progress[-1] == 1.0 and progress == sorted(progress)


def test_adapter_is_refused(runner: GANRunner) -> None:
    with pytest.raises(InvalidRequest) as info:
        generate(runner, adapter="style")
    assert info.value.param == "body.adapter"


def test_unconditional_model_ignores_the_prompt(tmp_path: Path) -> None:
    config = GANConfig(z_dim=8, base_channels=4, image_size=16)
    torch.manual_seed(0)
    save_generator(DCGANGenerator(config), config, tmp_path / "plain")
    gan = GANRunner(model_spec("plain", "gan", str(tmp_path / "plain")), device="cpu")
    a = RunContext()
    result = gan.run(ImageBody(model="plain", prompt="anything at all", size="16x16", seed=4), a)
    b = RunContext()
    gan.run(ImageBody(model="plain", size="16x16", seed=4), b)
    assert "class_label" not in result["parameters"]
    assert np.array_equal(pixels(a), pixels(b)) and pixels(a).shape == (16, 16, 3)


def test_save_load_round_trip(runner: GANRunner, gan_dir: Path, tmp_path: Path) -> None:
    model, config = load_generator(gan_dir)
    assert config.class_labels == ["cat", "dog", "car"] and config.size == "32x32"
    save_generator(model, config, tmp_path / "copy")
    copy = GANRunner(model_spec("tiny-gan", "gan", str(tmp_path / "copy")), device="cpu")
    body = ImageBody(model="tiny-gan", prompt="dog", size="32x32", n=2, seed=9)
    a, b = RunContext(), RunContext()
    runner.run(body, a)
    copy.run(body, b)
    assert all(np.array_equal(pixels(a, k), pixels(b, k)) for k in range(2))
    # The config.json or weights path of a model names its directory too.
    assert load_generator(gan_dir / "config.json")[1] == config


@pytest.mark.parametrize("name", ["pytorch_model.bin", "generator.pt"])
def test_pickle_checkpoint_is_refused(gan_dir: Path, tmp_path: Path, name: str) -> None:
    model, config = load_generator(gan_dir)
    target = tmp_path / "pickled"
    save_generator(model, config, target)
    (target / "model.safetensors").unlink()
    torch.save(model.state_dict(), target / name)
    with pytest.raises(GANFormatError, match="safetensors only"):
        load_generator(target)
    with pytest.raises(GANFormatError):
        load_generator(target / name)


def test_other_sources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(GANFormatError, match="not a local directory"):
        load_generator("someorg/some-gan")
    (tmp_path / "config.json").write_text('{"architecture": "Other", "z_dim": 8}')
    with pytest.raises(GANFormatError, match="architecture"):
        load_generator(tmp_path)
    with pytest.raises(GANFormatError, match="power of two"):
        GANConfig(image_size=48)
    with pytest.raises(GANFormatError, match="class_labels"):
        GANConfig(num_classes=2, class_labels=["a"])


def test_unload_frees_the_generator_and_load_restores_it(gan_dir: Path) -> None:
    spec = model_spec("tiny-gan", "gan", str(gan_dir), max_batch_size=16)
    gan = GANRunner(spec, device="cpu")
    gan.load()
    assert gan.memory_bytes() == sum(p.numel() * p.element_size() for p in gan.model.parameters()) + sum(
        b.numel() * b.element_size() for b in gan.model.buffers())
    _, before = generate(gan, seed=3)
    gan.unload()
    assert gan.model is None and gan.memory_bytes() == 0
    _, after = generate(gan, seed=3)  # run() loads it again
    assert np.array_equal(pixels(before), pixels(after)) and gan.memory_bytes() > 0
