"""A small random-weight embedding model, written offline in about a second: `tiny-embed`.

A 2-layer BERT with a WordPiece tokenizer whose vocabulary is made here from the tiny models'
corpus (genq.workers.tiny passes it in), saved as a sentence-transformers model directory: the
transformers files plus the sentence-transformers module files a hub model ships (`modules.json`:
Transformer, mean Pooling, Normalize; `sentence_bert_config.json` with `max_seq_length`). The
vectors mean nothing, but both of the embedding runner's loaders read every file a real model has.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

TINY_EMBED_NAME = "tiny-embed"
TINY_EMBED_ENTRY: dict[str, Any] = {
    # A small token budget, so that mixed-length requests really run in several forward passes; and
    # truncatable (Matryoshka) so that `dimensions` requests are served.
    "kind": "embedding", "source": f"./{TINY_EMBED_NAME}", "max_batch_size": 32, "max_batch_tokens": 1024,
    "matryoshka": True,
}
TINY_EMBED_DIM = 64
TINY_EMBED_MAX_SEQ = 128  # sentence_bert_config.json's max_seq_length: longer inputs are refused
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Every printable ASCII character is a token (alone and as a ## continuation), so ASCII text never
# becomes [UNK]; other characters do.
_ALPHABET = [chr(c) for c in range(33, 127)]


def wordpiece_vocab(corpus: str, size: int = 768) -> list[str]:
    """A WordPiece vocabulary: the special tokens, the alphabet with its ## continuations, then the
    corpus's most frequent words (ties by spelling), so that it is the same on every run (the
    `tokenizers` trainer breaks ties between equally frequent pairs differently from run to run)."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    words = Counter(w for w, _ in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(normalizer.normalize_str(corpus)))
    vocab = [*SPECIAL_TOKENS, *_ALPHABET, *(f"##{c}" for c in _ALPHABET)]
    known = set(vocab)
    for word, _ in sorted(words.items(), key=lambda wc: (-wc[1], wc[0])):
        if len(vocab) >= size:
            break
        if word not in known:
            vocab.append(word)
            known.add(word)
    return vocab


def build_tiny_embed(model_dir: Path, corpus: str, seed: int = 0) -> Path:
    """Write `model_dir` as a sentence-transformers model: BERT (64 wide, 2 layers) with mean pooling
    and L2 normalisation, its vocabulary made from `corpus`."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("".join(f"{t}\n" for t in wordpiece_vocab(corpus)))
        tokenizer = BertTokenizerFast.from_pretrained(tmp, do_lower_case=True, model_max_length=512)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=TINY_EMBED_DIM, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=512,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = BertModel(config)  # with its pooler, as BERT checkpoints are (sentence-transformers does not use it)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    write_sentence_transformers_files(model_dir, TINY_EMBED_DIM, TINY_EMBED_MAX_SEQ)
    return model_dir


def write_sentence_transformers_files(model_dir: Path, dimension: int, max_seq_length: int, *,
                                      pooling: str = "mean", normalize: bool = True) -> None:
    """The module files sentence-transformers reads, in the layout hub models use: the Transformer
    at the root, `1_Pooling/config.json`, and an empty `2_Normalize/` when `normalize`."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (model_dir / "2_Normalize").mkdir(exist_ok=True)
    modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
    chosen = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens", "lasttoken": "lasttoken"}[pooling]
    pool = {"word_embedding_dimension": dimension, **{f"pooling_mode_{m}": m == chosen for m in modes},
            "include_prompt": True}
    (model_dir / "1_Pooling").mkdir(exist_ok=True)
    _write_json(model_dir / "1_Pooling" / "config.json", pool)
    _write_json(model_dir / "modules.json", modules)
    _write_json(model_dir / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
