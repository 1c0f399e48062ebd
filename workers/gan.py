"""A DCGAN-style generator defined in genq, and its on-disk format (config.json + model.safetensors).

The network maps a latent z ~ N(0, I) (plus, for class-conditional models, a learned embedding of
the class) to one image in a single forward pass: a 4x4 transposed convolution, then stride-2
transposed convolutions doubling the side up to `image_size`, BatchNorm + ReLU between them and
tanh at the end, so pixels come out in [-1, 1].

Weights are only ever read from safetensors; a pickle checkpoint (.bin, .pt, ...) is refused rather
than unpickled, because unpickling runs arbitrary code from the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

ARCHITECTURE = "DCGANGenerator"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class GANFormatError(ValueError):
    """A generator directory that genq will not load (missing, malformed, or a pickle checkpoint)."""


@dataclass(frozen=True)
class GANConfig:
    """Shape of a DCGANGenerator. Conditional when `num_classes > 0`; `class_labels[i]` names class i
    and is what a request's prompt must say to pick it."""

    z_dim: int = 100
    base_channels: int = 64
    image_size: int = 64  # a power of two >= 8: the generator's only output size
    channels: int = 3  # 3 (RGB) or 1 (greyscale, served as RGB)
    num_classes: int = 0
    class_labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("z_dim", "base_channels", "image_size", "channels", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise GANFormatError(f"GANConfig.{name} must be a non-negative integer, got {value!r}")
        if self.z_dim < 1 or self.base_channels < 1:
            raise GANFormatError("GANConfig.z_dim and base_channels must be at least 1")
        size = self.image_size
        if size < 8 or size & (size - 1):
            raise GANFormatError(f"GANConfig.image_size must be a power of two >= 8, got {size}")
        if self.channels not in (1, 3):
            raise GANFormatError(f"GANConfig.channels must be 1 or 3, got {self.channels}")
        labels = self.class_labels
        if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
            raise GANFormatError("GANConfig.class_labels must be a list of non-empty strings")
        if len(labels) != self.num_classes:
            raise GANFormatError(
                f"GANConfig.class_labels names {len(labels)} classes but num_classes is {self.num_classes}")
        if len({normalize_label(x) for x in labels}) != len(labels):
            raise GANFormatError("GANConfig.class_labels must differ ignoring case and surrounding spaces")

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def size(self) -> str:
        """The request `size` this generator serves, e.g. "64x64"."""
        return f"{self.image_size}x{self.image_size}"

    def label_index(self, label: str) -> int | None:
        """Class index of `label` (case-insensitive, trimmed), or None when it names no class."""
        wanted = normalize_label(label)
        return next((i for i, x in enumerate(self.class_labels) if normalize_label(x) == wanted), None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GANConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"architecture"})
        if unknown:
            raise GANFormatError(f"unknown GANConfig keys: {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def normalize_label(label: str) -> str:
    return label.strip().casefold()


class DCGANGenerator(nn.Module):
    """z (batch, z_dim) [+ class ids (batch,)] -> images (batch, channels, size, size) in [-1, 1]."""

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.config = config
        # The class embedding has the latent's width and is concatenated to it.
        self.embed = nn.Embedding(config.num_classes, config.z_dim) if config.conditional else None
        in_channels = config.z_dim * (2 if config.conditional else 1)
        doublings = config.image_size.bit_length() - 3  # 4x4 -> image_size in stride-2 steps
        width = config.base_channels * 2 ** (doublings - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(in_channels, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
        ]
        for _ in range(doublings - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(width // 2), nn.ReLU(True)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, config.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if labels is None:
                raise ValueError("a conditional generator needs class labels")
            z = torch.cat([z, self.embed(labels).to(z.dtype)], dim=1)
        return self.net(z[:, :, None, None])  # type: ignore[no-any-return]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(batch, channels, H, W) in [-1, 1] -> RGB PIL images."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return [Image.fromarray(p.permute(1, 2, 0).contiguous().numpy()) for p in pixels]


def save_generator(model: DCGANGenerator, config: GANConfig, directory: Path | str) -> Path:
    """Write `config.json` and `model.safetensors` into `directory`; return it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = {"architecture": ARCHITECTURE, **asdict(config)}
    (directory / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def load_generator(
    path: Path | str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> tuple[DCGANGenerator, GANConfig]:
    """Read a directory written by `save_generator` (or its config.json / model.safetensors path).

    Returns the generator in eval mode on `device` in `dtype`. Raises GANFormatError for anything
    else: a hub id, a missing file, a pickle checkpoint, foreign config keys or mismatched weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = _model_dir(Path(path))
    config = _read_config(directory / CONFIG_NAME)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise GANFormatError(
                f"{directory} holds {', '.join(pickles)} but no {WEIGHTS_NAME}: genq loads GAN weights "
                "from safetensors only (pickle checkpoints can run code); convert them first")
        raise GANFormatError(f"{directory} has no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise GANFormatError(f"{weights} is not a readable safetensors file: {exc}") from exc
    model = DCGANGenerator(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise GANFormatError(f"{weights} does not match {CONFIG_NAME}: {exc}") from exc
    return model.to(device=device, dtype=dtype).eval(), config


def _model_dir(path: Path) -> Path:
    if path.is_file():
        if path.name != CONFIG_NAME and path.suffix != ".safetensors":
            raise GANFormatError(f"{path}: genq loads a GAN from {CONFIG_NAME} + {WEIGHTS_NAME} only")
        path = path.parent
    if not path.is_dir():
        raise GANFormatError(f"{path} is not a local directory (GAN models load from disk, not a hub)")
    return path


def _read_config(path: Path) -> GANConfig:
    if not path.is_file():
        raise GANFormatError(f"{path.parent} has no {CONFIG_NAME}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GANFormatError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("architecture") != ARCHITECTURE:
        raise GANFormatError(f'{path} must be a JSON object with "architecture": "{ARCHITECTURE}"')
    try:
        return GANConfig.from_dict(data)
    except TypeError as exc:
        raise GANFormatError(f"{path}: {exc}") from exc
