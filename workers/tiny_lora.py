"""Small random-weight LoRA adapters for the tiny models, written offline through peft and diffusers.

`genq models build-tiny` and the tests use them: a peft adapter for `tiny-gpt2` (adapter_config.json
plus adapter_model.safetensors) and a diffusers LoRA for `tiny-sd` (pytorch_lora_weights.safetensors).
The LoRA weights are seeded random values, large enough that the adapted model's output visibly
differs from the base model's, so a test can tell whether an adapter was applied.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

TINY_TEXT_LORAS = {"tiny-gpt2-lora": 1, "tiny-gpt2-lora-b": 2}  # name -> seed
TINY_IMAGE_LORA = "tiny-sd-lora"
TEXT_TARGETS = ["c_attn", "c_proj", "c_fc"]  # GPT-2's attention and MLP projections (Conv1D)
IMAGE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_text_lora(base_dir: Path, out_dir: Path, *, seed: int = 0, rank: int = 4, scale: float = 0.5) -> Path:
    """A peft LoRA for the causal LM at `base_dir`, written to `out_dir` as exactly
    adapter_config.json + adapter_model.safetensors; `scale` is the std of the random LoRA weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TEXT_TARGETS, lora_dropout=0.0,
                        fan_in_fan_out=True, task_type="CAUSAL_LM")  # GPT-2 uses Conv1D (in x out)
    peft_model = get_peft_model(model, config)
    _randomize_lora(peft_model, seed, scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    _keep_only(out_dir, {"adapter_config.json", "adapter_model.safetensors"})
    # No hub id in the config: the base is whatever registered model the adapter is attached to.
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = None
    cfg["target_modules"] = sorted(cfg["target_modules"])  # peft keeps a set: fix the order
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out_dir


def build_image_lora(base_dir: Path, out_dir: Path, *, seed: int = 0, rank: int = 4, scale: float = 0.5) -> Path:
    """A diffusers LoRA for the UNet of the Stable Diffusion pipeline at `base_dir`, written to
    `out_dir/pytorch_lora_weights.safetensors` (the format `load_lora_weights` reads)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=IMAGE_TARGETS, init_lora_weights=True))
    _randomize_lora(unet, seed, scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    _keep_only(out_dir, {"pytorch_lora_weights.safetensors"})
    return out_dir


def _randomize_lora(model: Any, seed: int, scale: float) -> None:
    """Set every lora_A / lora_B weight to seeded normal values (peft starts lora_B at zero, a no-op)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def _keep_only(out_dir: Path, names: set[str]) -> None:
    """Remove what else the writers put there (peft's README.md): an adapter directory holds only
    the files the API accepts."""
    for path in out_dir.iterdir():
        if path.name not in names and path.is_file():
            path.unlink()
    missing = names - {p.name for p in out_dir.iterdir()}
    if missing:
        raise RuntimeError(f"adapter writer did not produce {sorted(missing)} in {out_dir}")


def build_tiny_adapters(out_dir: Path) -> Path:
    """After `workers.tiny.build_tiny(out_dir)`: write the tiny adapters next to the tiny models and
    register them as `[adapters.<name>]` tables in `out_dir/models.toml`; return the registry path."""
    from genq.workers.tiny import TINY_SD_NAME, TINY_TEXT_NAME

    out_dir = Path(out_dir)
    entries: dict[str, dict[str, str]] = {}
    for name, seed in TINY_TEXT_LORAS.items():
        build_text_lora(out_dir / TINY_TEXT_NAME, out_dir / name, seed=seed)
        entries[name] = {"model": TINY_TEXT_NAME, "source": f"./{name}"}
    build_image_lora(out_dir / TINY_SD_NAME, out_dir / TINY_IMAGE_LORA, seed=1)
    entries[TINY_IMAGE_LORA] = {"model": TINY_SD_NAME, "source": f"./{TINY_IMAGE_LORA}"}
    return write_adapter_tables(out_dir / "models.toml", entries)


def write_adapter_tables(path: Path, entries: dict[str, dict[str, str]]) -> Path:
    """Append `[adapters.<name>]` tables to a registry file, replacing tables of the same name."""
    text = path.read_text() if path.exists() else ""
    for name in entries:
        # Drop an earlier table of this name (up to the next table header or the end).
        header = re.escape(f"[adapters.{_key(name)}]")
        text = re.sub(rf"\n*{header}\n(?:(?!\[).*\n?)*", "\n", text)
    lines = [text.rstrip("\n") + "\n"] if text.strip() else []
    for name, fields in entries.items():
        lines.append(f"\n[adapters.{_key(name)}]\n")
        lines.extend(f"{key} = {json.dumps(value)}\n" for key, value in fields.items())
    path.write_text("".join(lines))
    return path


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)
