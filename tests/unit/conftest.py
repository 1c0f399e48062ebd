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
