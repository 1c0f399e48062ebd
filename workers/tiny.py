"""Small random-weight models in Hugging Face format, written offline in seconds.

`genq models build-tiny` and the tests use them: a GPT-2-shaped text model whose tokenizer is a
real byte-level BPE trained here on a built-in corpus, plus a `models.toml` registry naming them.
The weights are random (the text is gibberish) but every code path of a real model is exercised.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
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
    """Write `tiny-gpt2/`, `tiny-chat/`, `tiny-sd/`, `tiny-gan/` and `tiny-embed/` under `out_dir`,
    registered in `out_dir/models.toml`; return the registry path."""
    from genq.workers.tiny_embed import TINY_EMBED_ENTRY, TINY_EMBED_NAME, build_tiny_embed

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tiny_text(out_dir / TINY_TEXT_NAME, seed=seed)
    build_tiny_chat(out_dir / TINY_CHAT_NAME, seed=seed)
    entry = {"kind": "text", "source": f"./{TINY_TEXT_NAME}", "max_batch_size": 16, "max_tokens": 256}
    write_registry(out_dir, {TINY_TEXT_NAME: entry,
                             TINY_CHAT_NAME: {**entry, "source": f"./{TINY_CHAT_NAME}"}})
    build_tiny_sd(out_dir / TINY_SD_NAME, seed=seed)
    write_registry(out_dir, {TINY_SD_NAME: TINY_SD_ENTRY})
    build_tiny_gan(out_dir / TINY_GAN_NAME, seed=seed)
    write_registry(out_dir, {TINY_GAN_NAME: TINY_GAN_ENTRY})
    build_tiny_embed(out_dir / TINY_EMBED_NAME, CORPUS, seed=seed)
    return write_registry(out_dir, {TINY_EMBED_NAME: TINY_EMBED_ENTRY})


def build_tiny_text(model_dir: Path, seed: int = 0, tokenizer: Any = None) -> Path:
    """A 2-layer GPT-2 with random weights and a trained byte-level BPE tokenizer (or `tokenizer`,
    whose end-of-sequence token ends generation)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tokenizer or train_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=tokenizer.convert_tokens_to_ids(EOS), eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return model_dir


TINY_CHAT_NAME = "tiny-chat"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, as many open chat models write it: each message between <|im_start|>role and <|im_end|>,
# earlier tool calls as JSON in <tool_call> tags, and an open assistant turn to generate into.
CHAT_TEMPLATE = (
    r"{% for message in messages %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' }}"
    r"{% for call in message.get('tool_calls') or [] %}"
    r"{{ '<tool_call>' + (call['function'] | tojson) + '</tool_call>\n' }}"
    r"{% endfor %}"
    r"{{ (message['content'] or '') + '<|im_end|>\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_chat(model_dir: Path, seed: int = 0) -> Path:
    """The tiny GPT-2 as a chat model: ChatML special tokens, `<|im_end|>` as its end-of-sequence
    token, and a real chat template in its tokenizer files."""
    from tokenizers import AddedToken

    tokenizer = train_tokenizer()
    tokenizer.add_tokens([AddedToken(t, special=True) for t in (IM_START, IM_END)], special_tokens=True)
    tokenizer.eos_token = IM_END
    tokenizer.chat_template = CHAT_TEMPLATE
    return build_tiny_text(model_dir, seed=seed, tokenizer=tokenizer)


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


TINY_GAN_NAME = "tiny-gan"
TINY_GAN_ENTRY: dict[str, Any] = {"kind": "gan", "source": f"./{TINY_GAN_NAME}", "max_batch_size": 16}
TINY_GAN_LABELS = ["cat", "dog", "car"]


def build_tiny_gan(model_dir: Path, seed: int = 0) -> Path:
    """A class-conditional 32x32 DCGAN with random weights; the prompt picks "cat", "dog" or "car".

    BatchNorm statistics are measured on one batch of random latents, so that the untrained
    network's output spans the pixel range instead of sitting at mid-grey (the images are still
    noise, but different seeds and labels visibly give different images).
    """
    import torch

    from genq.workers.gan import DCGANGenerator, GANConfig, save_generator

    config = GANConfig(z_dim=32, base_channels=16, image_size=32, channels=3,
                       num_classes=len(TINY_GAN_LABELS), class_labels=list(TINY_GAN_LABELS))
    torch.manual_seed(seed)
    model = DCGANGenerator(config)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = None  # running stats = this batch's stats
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.train()(torch.randn(64, config.z_dim, generator=generator),
                      torch.randint(0, config.num_classes, (64,), generator=generator))
    for norm in norms:
        norm.momentum = 0.1
    return save_generator(model.eval(), config, model_dir)


TINY_SD_NAME = "tiny-sd"
TINY_SD_ENTRY: dict[str, Any] = {
    "kind": "image", "source": f"./{TINY_SD_NAME}", "max_batch_size": 8, "max_size": 256, "safety_checker": False,
}
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer split (as in transformers' CLIPTokenizer): words, single digits, punctuation runs.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def build_tiny_sd(model_dir: Path, seed: int = 0) -> Path:
    """A Stable Diffusion pipeline in diffusers format, shaped like diffusers' own test components.

    UNet, VAE and CLIP text encoder are tiny with random weights (images are coloured noise); the
    tokenizer is a real CLIP-style BPE trained on CORPUS; PNDM is the default scheduler as in SD 1.5.
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    model_dir = Path(model_dir)
    tokenizer_dir = model_dir / "tokenizer"
    write_clip_tokenizer_files(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    eos_id = tokenizer.convert_tokens_to_ids(CLIP_EOS)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.convert_tokens_to_ids(CLIP_BOS), eos_token_id=eos_id, pad_token_id=eos_id,
    ))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    scheduler = PNDMScheduler(  # SD 1.5's scheduler config
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(model_dir, safe_serialization=True)
    return model_dir


def write_clip_tokenizer_files(tokenizer_dir: Path, num_merges: int = 486) -> Path:
    """Train a CLIP-style BPE on CORPUS and write it as CLIP's `vocab.json` + `merges.txt`.

    CLIP lowercases, splits words with its own regex and marks word ends with `</w>`; its vocabulary
    is the 256 byte symbols, the same with `</w>`, one token per merge, then the two specials (here
    about 1000 tokens). The few hundred merges are learnt here in plain Python rather than with
    `tokenizers`' trainer, whose tie-breaking between equally frequent pairs varies from run to run.
    """
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    words = Counter(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(CORPUS)))
    pieces = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(pieces[word], pieces[word][1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))  # most frequent, ties by name
        merges.append(best)
        pieces = {w: _merge_pair(p, best) for w, p in pieces.items()}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges), CLIP_BOS, CLIP_EOS]:
        vocab.setdefault(token, len(vocab))
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return tokenizer_dir


def _merge_pair(pieces: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    for piece in pieces:
        if out and (out[-1], piece) == pair:
            out[-1] += piece
        else:
            out.append(piece)
    return out
