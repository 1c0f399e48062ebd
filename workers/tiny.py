"""Small random-weight models in Hugging Face format, written offline in seconds.

`genq models build-tiny` and the tests use them: a GPT-2-shaped text model whose tokenizer is a
real byte-level BPE trained here on a built-in corpus, plus a `models.toml` registry naming them.
The weights are random (the text is gibberish) but every code path of a real model is exercised.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

TINY_TEXT_NAME = "tiny-gpt2"
EOS = "<|endoftext|>"
VOCAB_SIZE = 1024

# A few paragraphs of plain English: enough byte pairs for a ~1000-token vocabulary.
CORPUS = """\
A job queue lets many users ask for work that takes a while, and lets a pool of workers do that
work in the order it arrived. Each request is written down first, so nothing is lost when a
machine restarts. The queue hands one job to one worker at a time, and the worker reports back
when the job is finished, failed, or was cancelled by the person who asked for it.

Language models write text one token at a time. A token is a short piece of a word: common words
are a single token, while rare words are split into several pieces. The model reads the prompt,
predicts a score for every token in its vocabulary, and the generator picks the next token from
those scores, either the most likely one or a random one drawn with some temperature.

The weather was mild that morning. She walked along the river to the old market, where people
were selling bread, apples, cheese and flowers. A small dog followed her for a while and then ran
back to the baker, who laughed and gave it a piece of crust. The bells of the church rang nine
times, and the boats on the water moved slowly towards the bridge.

Good software is easy to read from top to bottom. Functions are short and have clear names, tests
check what a user would see, and errors say exactly what went wrong and where. When two parts of a
system must agree on a message, the shape of that message is written down in one place and both
sides use it. Small, honest interfaces make it easy to swap one storage system for another.

In the evening the children played in the garden until the light faded. Their parents sat at the
long wooden table, talking about the harvest, the price of wheat, the new school and the road that
would soon connect the village to the city. Somebody brought out a guitar, and for an hour nobody
spoke about work at all. The stars came out one by one above the hills.

Numbers and dates appear in text too: 1, 2, 3, 10, 42, 100, 2024 and 3.14 are all written with
digits. Questions end with a question mark? Exclamations end with an exclamation mark! Quotes use
"double" or 'single' marks, and lists are separated by commas; sometimes by semicolons. Email
addresses like user@example.com and paths like /var/data/file.txt mix letters with symbols.

Scientists measure everything twice. They record the temperature of the lake every hour, compare
the readings with last year, and publish a short report with tables and figures. When a result
looks surprising, another team repeats the experiment in a different laboratory, with different
equipment, to make sure the effect is real and not an accident of one particular instrument.

The train left the station just after midnight. Through the window the passengers could see the
lights of small towns, empty platforms, factories and farms, and once a fox crossing a frozen
field. A conductor checked tickets and answered questions about connections, delays and the
dining car, which would open again at six o'clock with coffee, tea, eggs, toast and fresh juice.
"""


def build_tiny(out_dir: Path, seed: int = 0) -> Path:
    """Write `out_dir/tiny-gpt2/` and `out_dir/models.toml`; return the registry path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tiny_text(out_dir / TINY_TEXT_NAME, seed=seed)
    entry = {"kind": "text", "source": f"./{TINY_TEXT_NAME}", "max_batch_size": 16, "max_tokens": 256}
    return write_registry(out_dir, {TINY_TEXT_NAME: entry})


def build_tiny_text(model_dir: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 with random weights and a trained byte-level BPE tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=eos_id, eos_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> Any:
    """Train a GPT-2-style byte-level BPE on CORPUS and wrap it as a transformers tokenizer.

    BPE training is deterministic for a given corpus, so no seed is needed here.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    # Loading from vocab.json + merges.txt gives the stock GPT-2 tokenizer class on transformers
    # 4.x and 5.x alike (in 5.x GPT2TokenizerFast is an alias of GPT2Tokenizer).
    with tempfile.TemporaryDirectory() as tmp:
        bpe.model.save(tmp)
        return GPT2TokenizerFast.from_pretrained(
            tmp, bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=512,
        )


def write_registry(out_dir: Path, entries: dict[str, dict[str, Any]]) -> Path:
    """Write or extend `out_dir/models.toml` with `[models.<name>]` tables; return its path.

    An existing file is kept and the new tables appended (a table of the same name is replaced),
    so the image builder can add `tiny-sd` next to `tiny-gpt2`.
    """
    path = Path(out_dir) / "models.toml"
    tables = _read_tables(path)
    tables.update(entries)
    lines: list[str] = ["# Written by genq models build-tiny: small random-weight models for offline use.\n"]
    for name, fields in tables.items():
        lines.append(f"\n[models.{_toml_key(name)}]\n")
        lines.extend(f"{key} = {_toml_value(value)}\n" for key, value in fields.items())
    path.write_text("".join(lines))
    return path


def _read_tables(path: Path) -> dict[str, dict[str, Any]]:
    import tomllib

    if not path.exists():
        return {}
    return dict(tomllib.loads(path.read_text()).get("models", {}))


def _toml_key(name: str) -> str:
    # Registry names may hold '.', which a bare TOML key would read as a nested table.
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _toml_value(value: Any) -> str:
    # Booleans before ints: bool is a subclass of int. JSON string escapes are valid TOML.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"unsupported registry value {value!r}")
