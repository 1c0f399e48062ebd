"""Fixtures for the text runner and tiny-model tests: one tiny model per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding `tiny-gpt2/` and `models.toml`, built offline once per session."""
    from genq.workers.tiny import build_tiny

    out = tmp_path_factory.mktemp("tiny")
    build_tiny(out, seed=0)
    return out


@pytest.fixture(scope="session")
def text_runner(tiny_dir: Path):
    """A loaded TextRunner for `tiny-gpt2` on the CPU, shared by the tests (it is thread-safe)."""
    from genq.shared.registry import load_registry
    from genq.workers.runners.text import TextRunner

    spec = load_registry(tiny_dir / "models.toml").get("tiny-gpt2")
    runner = TextRunner(spec, device="cpu")
    runner.load()
    return runner


@pytest.fixture(scope="session")
def image_runner(tiny_dir: Path):
    """A loaded ImageRunner for `tiny-sd` (built by build_tiny into tiny_dir) on the CPU."""
    from genq.shared.registry import load_registry
    from genq.workers.runners.image import ImageRunner

    spec = load_registry(tiny_dir / "models.toml").get("tiny-sd")
    runner = ImageRunner(spec, device="cpu")
    runner.load()
    return runner


@pytest.fixture(scope="session")
def adapters(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two real peft LoRA adapters of tiny-gpt2, `lora-a` and `lora-b`, as LocalAdapters."""
    from genq.workers.runners.base import LocalAdapter
    from genq.workers.tiny_lora import build_text_lora

    out = tmp_path_factory.mktemp("loras")
    return {name: LocalAdapter(name, build_text_lora(tiny_dir / "tiny-gpt2", out / name, seed=seed))
            for name, seed in (("lora-a", 1), ("lora-b", 2))}
