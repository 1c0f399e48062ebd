"""`build_tiny`: offline, deterministic tiny models (GPT-2 with a real BPE tokenizer, Stable
Diffusion, a DCGAN, a sentence-transformers BERT) plus their registry."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from genq.shared.registry import load_registry
from genq.workers.tiny import build_tiny, write_registry


def test_registry_points_at_the_model(tiny_dir: Path) -> None:
    registry = load_registry(tiny_dir / "models.toml")
    spec = registry.get("tiny-gpt2")
    assert spec is not None and registry.names() == ["tiny-gpt2", "tiny-chat", "tiny-sd", "tiny-gan", "tiny-embed"]
    assert spec.kind == "text"
    assert Path(spec.source) == (tiny_dir / "tiny-gpt2").resolve()
    assert (Path(spec.source) / "model.safetensors").is_file()
    assert (spec.options.max_batch_size, spec.options.max_tokens) == (16, 256)


def test_tokenizer_round_trips_text_and_matches_the_model(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "tiny-gpt2")
    config = AutoConfig.from_pretrained(tiny_dir / "tiny-gpt2")
    for text in ["The queue hands one job to one worker.", "  odd   spacing\n\ttabs", "naïve café 😀 ∑ 42"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # Trained merges: common English words are single tokens, not bytes.
    assert len(tokenizer(" the")["input_ids"]) == 1
    assert len(tokenizer("The weather was mild")["input_ids"]) <= 6
    assert 1000 <= len(tokenizer) <= 2000
    assert config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert config.eos_token_id == config.bos_token_id == tokenizer.eos_token_id
    assert tokenizer("<|endoftext|>")["input_ids"] == [tokenizer.eos_token_id]


def test_build_is_deterministic_and_offline(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("build_tiny tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    build_tiny(tmp_path / "same", seed=0)
    build_tiny(tmp_path / "other", seed=1)

    def files(root: Path) -> dict[str, bytes]:
        return {name: (root / "tiny-gpt2" / name).read_bytes() for name in ("model.safetensors", "tokenizer.json")}

    first, same, other = files(tiny_dir), files(tmp_path / "same"), files(tmp_path / "other")
    assert same == first
    assert other["tokenizer.json"] == first["tokenizer.json"]
    assert other["model.safetensors"] != first["model.safetensors"]


def test_write_registry_appends_entries(tmp_path: Path) -> None:
    build_tiny(tmp_path)
    path = write_registry(tmp_path, {"tiny-sd": {"kind": "image", "source": "./tiny-sd", "max_batch_size": 4}})
    write_registry(tmp_path, {"v1.5": {"kind": "text", "source": "echo", "revision": 'say "hi"', "max_tokens": 8}})
    registry = load_registry(path)
    assert registry.names() == ["tiny-gpt2", "tiny-chat", "tiny-sd", "tiny-gan", "tiny-embed", "v1.5"]
    assert registry.get("tiny-sd").source == str((tmp_path / "tiny-sd").resolve())
    assert registry.get("tiny-sd").options.max_batch_size == 4
    assert registry.get("tiny-gpt2").options.max_tokens == 256
    assert registry.get("v1.5").options.revision == 'say "hi"' and registry.get("v1.5").options.max_tokens == 8


def test_saved_config_is_small_gpt2(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "tiny-gpt2" / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["n_positions"]) == (2, 4, 64, 512)
    assert not (tiny_dir / "tiny-gpt2" / "pytorch_model.bin").exists()
