"""Text encoders for the embedding runner: token ids in, one vector per input out.

Two loaders, picked by the registry's `loader` option (`auto`: the first when the model has
`modules.json`, else the second):
- `SentenceTransformerEncoder`: the model as sentence-transformers builds it from its own module
  files (pooling, Dense layers, Normalize), called on padded token ids; nothing is re-implemented.
- `TransformersEncoder`: transformers' AutoModel, then the pooling and normalisation that the
  model's sentence-transformers files name (`1_Pooling/config.json`, a Normalize module), or mean
  pooling when it has none. It serves plain encoders and refuses module stacks it cannot follow
  (Dense layers, weighted pooling), which need the first loader.

Both tokenize with the model's own tokenizer and read its `max_seq_length` (from
`sentence_bert_config.json`, else the tokenizer's and the position embeddings' limits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

# The pooling modes TransformersEncoder follows, by their name in a 1_Pooling/config.json.
POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "lasttoken"}
_NO_LIMIT = 10**6  # transformers' model_max_length for "no limit" is a huge number


@dataclass(frozen=True)
class ModuleFiles:
    """What a model's sentence-transformers files say: its module types in order (the names'
    last part: Transformer, Pooling, Normalize, Dense, ...), the Transformer's folder, the pooling
    config and max_seq_length. None of it for a model without modules.json."""

    types: tuple[str, ...]
    transformer_path: str = ""
    pooling: dict[str, Any] | None = None
    max_seq_length: int | None = None

    @property
    def normalizes(self) -> bool:
        return "Normalize" in self.types


def model_file(source: str, name: str, revision: str | None = None) -> Path | None:
    """A file of the model (a local directory, or a hub id through the hub cache), None if it has none."""
    local = Path(source)
    if local.is_dir():
        path = local / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(source, name, revision=revision))
    except EntryNotFoundError:  # also LocalEntryNotFoundError: offline, not cached
        return None


def _json(source: str, name: str, revision: str | None) -> Any:
    path = model_file(source, name, revision)
    return None if path is None else json.loads(path.read_text())


def read_module_files(source: str, revision: str | None = None) -> ModuleFiles | None:
    modules = _json(source, "modules.json", revision)
    if modules is None:
        return None
    types, transformer, pooling = [], "", None
    for module in modules:
        kind = str(module["type"]).rsplit(".", 1)[-1]
        types.append(kind)
        folder = str(module.get("path", "")).strip("/")
        if kind == "Transformer":
            transformer = folder
        elif kind == "Pooling":
            pooling = _json(source, f"{folder}/config.json" if folder else "config.json", revision)
    config = _json(source, f"{transformer}/sentence_bert_config.json" if transformer else "sentence_bert_config.json",
                   revision) or {}
    length = config.get("max_seq_length")
    return ModuleFiles(tuple(types), transformer, pooling, length if isinstance(length, int) else None)


def normalizes(files: ModuleFiles | None, option: bool | None) -> bool:
    """Whether the embeddings are L2-normalised: the registry's `normalize` when set, else what the
    model's module files say (a Normalize module), else true (a model without those files)."""
    own = files is not None and files.normalizes
    if option is False and own:
        raise ValueError("its modules.json normalises the embeddings (a Normalize module), so the registry's "
                         "normalize = false cannot be honoured; remove it")
    if option is None:
        return own if files is not None else True
    return option


def max_length(configured: int | None, tokenizer: Any, config: Any) -> int | None:
    """The most tokens an input may have: the smallest of the configured max_seq_length, the
    tokenizer's model_max_length and the model's position embeddings."""
    limits = [configured, tokenizer.model_max_length, getattr(config, "max_position_embeddings", None)]
    found = [n for n in limits if isinstance(n, int) and 0 < n < _NO_LIMIT]
    return min(found) if found else None


def pad(ids: list[list[int]], pad_id: int, left: bool, device: str) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of a padded batch (on the tokenizer's padding side)."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


class Encoder(Protocol):
    """What the embedding runner needs of a loaded model."""

    tokenizer: Any
    model: Any  # the torch module(s), for memory accounting
    max_length: int | None
    normalizes: bool  # whether encode() returns unit vectors (so a truncated one is normalised again)

    def encode(self, ids: list[list[int]]) -> torch.Tensor:
        """One forward pass: a float32 tensor of one embedding per row, on the model's device."""


class SentenceTransformerEncoder:
    def __init__(self, source: str, files: ModuleFiles | None, *, device: str, dtype: torch.dtype,
                 revision: str | None, normalize: bool | None) -> None:
        from sentence_transformers import SentenceTransformer

        self.normalizes = normalizes(files, normalize)  # before loading: a conflict fails fast
        # Normalise here what the modules leave unnormalised (no Normalize module, normalize = true).
        self._extra_norm = self.normalizes and not (files is not None and files.normalizes)
        self.model = SentenceTransformer(source, device=device, revision=revision, trust_remote_code=False)
        self.model.to(dtype).eval()
        self.tokenizer = self.model.tokenizer
        self.device = device
        self.max_length = max_length(self.model.max_seq_length, self.tokenizer, None)
        self._pad = (self.tokenizer.pad_token_id or 0, self.tokenizer.padding_side == "left")

    def encode(self, ids: list[list[int]]) -> torch.Tensor:
        out = self.model(pad(ids, *self._pad, self.device))["sentence_embedding"].float()
        return torch.nn.functional.normalize(out, dim=-1) if self._extra_norm else out


class TransformersEncoder:
    def __init__(self, source: str, files: ModuleFiles | None, *, device: str, dtype: torch.dtype,
                 revision: str | None, normalize: bool | None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.normalizes = normalizes(files, normalize)  # these checks before loading: they fail fast
        self.pooling = self._pooling(files.pooling if files is not None else None)
        if files is not None:
            unknown = [t for t in files.types if t not in ("Transformer", "Pooling", "Normalize")]
            if unknown:
                raise ValueError(f"its modules.json has {', '.join(unknown)} modules, which only the "
                                 'sentence-transformers loader runs (loader = "auto" or "sentence-transformers")')
        sub = {"subfolder": files.transformer_path} if files is not None and files.transformer_path else {}
        rev = {"revision": revision} if revision else {}
        self.tokenizer = AutoTokenizer.from_pretrained(source, **sub, **rev)
        self.model = AutoModel.from_pretrained(source, dtype=dtype, **sub, **rev).to(device).eval()
        self.device = device
        configured = files.max_seq_length if files is not None else None
        self.max_length = max_length(configured, self.tokenizer, self.model.config)
        self._pad = (self.tokenizer.pad_token_id or 0, self.tokenizer.padding_side == "left")

    @staticmethod
    def _pooling(config: dict[str, Any] | None) -> str:
        if config is None:
            return "mean"
        modes = [mode for key, mode in POOLING_KEYS.items() if config.get(key)]
        others = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in POOLING_KEYS]
        if len(modes) != 1 or others:
            raise ValueError(f"its pooling ({', '.join(modes + others) or 'none'}) is not one of "
                             f"{', '.join(POOLING_KEYS.values())}; use the sentence-transformers loader")
        return modes[0]

    def encode(self, ids: list[list[int]]) -> torch.Tensor:
        batch = pad(ids, *self._pad, self.device)
        hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "mean":
            out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        elif self.pooling == "max":
            out = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
        elif self.pooling == "cls":
            out = hidden[:, 0]
        else:  # lasttoken: the last position the mask keeps, on either padding side
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            last = (batch["attention_mask"] * positions).argmax(1)
            out = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return torch.nn.functional.normalize(out, dim=-1) if self.normalizes else out


def load_encoder(source: str, *, loader: str, device: str, dtype: torch.dtype, revision: str | None,
                 normalize: bool | None) -> Encoder:
    files = read_module_files(source, revision)
    use_st = loader == "sentence-transformers" or (loader == "auto" and files is not None)
    cls = SentenceTransformerEncoder if use_st else TransformersEncoder
    return cls(source, files, device=device, dtype=dtype, revision=revision, normalize=normalize)
