"""`workers.tiny_lora`: random-weight LoRA adapters for the tiny models, through real peft and
diffusers loading paths, that visibly change what the model produces."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from genq.client import archive_adapter
from genq.shared.registry import load_registry
from genq.workers.tiny_lora import build_image_lora, build_text_lora, build_tiny_adapters

PROMPTS = ["The queue hands one job", "The weather was mild", "Numbers and dates"]


@pytest.fixture(scope="module")
def adapters(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models' directory copied with adapters built next to them (tiny_dir stays as it was)."""
    import shutil

    out = tmp_path_factory.mktemp("lora")
    for name in ("tiny-gpt2", "tiny-chat", "tiny-sd", "tiny-gan", "models.toml"):
        src = tiny_dir / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, out / name)
    build_tiny_adapters(out)
    return out


def _greedy(model: torch.nn.Module, tokenizer: object, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # type: ignore[operator]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False,  # type: ignore[operator]
                             pad_token_id=tokenizer.eos_token_id)  # type: ignore[attr-defined]
    return str(tokenizer.decode(out[0, ids.shape[1]:]))  # type: ignore[attr-defined]


def test_text_adapter_holds_only_peft_files_and_no_hub_id(adapters: Path) -> None:
    lora = adapters / "tiny-gpt2-lora"
    assert sorted(p.name for p in lora.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((lora / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["base_model_name_or_path"] is None


def test_text_adapter_changes_greedy_output(adapters: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = adapters / "tiny-gpt2"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    plain = [_greedy(base, tokenizer, p) for p in PROMPTS]
    outputs = {}
    for name in ("tiny-gpt2-lora", "tiny-gpt2-lora-b"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapters / name).eval()
        outputs[name] = [_greedy(model, tokenizer, p) for p in PROMPTS]
        assert all(a != b for a, b in zip(outputs[name], plain, strict=True)), (name, outputs[name], plain)
    # Two seeds, two different adapters.
    assert outputs["tiny-gpt2-lora"] != outputs["tiny-gpt2-lora-b"]


def test_text_adapter_is_deterministic_per_seed(adapters: Path, tmp_path: Path) -> None:
    again = build_text_lora(adapters / "tiny-gpt2", tmp_path / "again", seed=1)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (again / name).read_bytes() == (adapters / "tiny-gpt2-lora" / name).read_bytes()


def _image(pipe: object) -> np.ndarray:
    result = pipe("a cat by the river", num_inference_steps=2, height=64, width=64,  # type: ignore[operator]
                  generator=torch.Generator().manual_seed(0), output_type="np")
    return np.asarray(result.images[0])


def test_image_adapter_loads_through_diffusers_and_changes_the_image(adapters: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    lora = build_image_lora(adapters / "tiny-sd", tmp_path / "sd-lora", seed=3)
    assert [p.name for p in lora.iterdir()] == ["pytorch_lora_weights.safetensors"]
    pipe = StableDiffusionPipeline.from_pretrained(adapters / "tiny-sd", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    plain = _image(pipe)
    assert np.array_equal(plain, _image(pipe))  # a fixed seed gives the same image
    pipe.load_lora_weights(lora, adapter_name="x")
    assert pipe.get_active_adapters() == ["x"]
    adapted = _image(pipe)
    assert np.abs(adapted - plain).mean() > 0.02  # visibly different, not float noise
    pipe.disable_lora()
    assert np.array_equal(_image(pipe), plain)


def test_build_tiny_adapters_registers_them(adapters: Path) -> None:
    registry = load_registry(adapters / "models.toml")
    assert registry.names() == ["tiny-gpt2", "tiny-chat", "tiny-sd", "tiny-gan", "tiny-embed"]
    assert {n: (a.model, Path(a.source)) for n, a in registry.adapters.items()} == {
        "tiny-gpt2-lora": ("tiny-gpt2", (adapters / "tiny-gpt2-lora").resolve()),
        "tiny-gpt2-lora-b": ("tiny-gpt2", (adapters / "tiny-gpt2-lora-b").resolve()),
        "tiny-sd-lora": ("tiny-sd", (adapters / "tiny-sd-lora").resolve()),
    }
    # Building again replaces the tables instead of repeating them.
    text = (adapters / "models.toml").read_text()
    from genq.workers.tiny_lora import write_adapter_tables

    write_adapter_tables(adapters / "models.toml", {"tiny-sd-lora": {"model": "tiny-sd", "source": "./tiny-sd-lora"}})
    assert (adapters / "models.toml").read_text().count("[adapters.tiny-sd-lora]") == 1
    assert load_registry(adapters / "models.toml").adapters == registry.adapters
    assert text.count("[adapters.") == 3


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_archive_adapter_packs_files_flat(adapters: Path, fmt: str) -> None:
    data = archive_adapter(adapters / "tiny-gpt2-lora", fmt)
    if fmt == "zip":
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    else:
        names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    assert sorted(names) == ["adapter_config.json", "adapter_model.safetensors"]
