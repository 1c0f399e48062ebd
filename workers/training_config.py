"""What a fine-tuning job asks for, and how its "auto" hyperparameters resolve (OpenAI's names:
n_epochs, batch_size, learning_rate_multiplier), for genq.workers.training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# LoRA trains well at 1e-4..3e-4 with AdamW (the peft and QLoRA papers' range); OpenAI's
# learning_rate_multiplier scales this base: lr = BASE_LR * multiplier.
BASE_LR = 2e-4
# OpenAI's cookbook rule for n_epochs "auto": 3 epochs, more for small sets and fewer for large ones,
# so that a job sees between MIN_TARGET_EXAMPLES and MAX_TARGET_EXAMPLES examples in all.
DEFAULT_EPOCHS, MIN_EPOCHS, MAX_EPOCHS = 3, 1, 25
MIN_TARGET_EXAMPLES, MAX_TARGET_EXAMPLES = 100, 25_000
DEFAULT_BATCH_SIZE = 8  # "auto": 8 examples, or all when there are fewer
Auto = Literal["auto"]


@dataclass(frozen=True)
class TrainingConfig:
    """What a fine-tuning job asks for. Step counts of 0 mean "only at the end"."""

    n_epochs: int | Auto = "auto"
    batch_size: int | Auto = "auto"
    learning_rate_multiplier: float | Auto = "auto"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] | str | None = None  # None: peft's default for the architecture
    seed: int = 0
    max_length: int | None = None  # None: the model's context length
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    checkpoint_every: int = 0
    eval_every: int = 0
    log_every: int = 1

    def __post_init__(self) -> None:
        problems = [f"{name} must be at least {low}, got {getattr(self, name)}" for name, low in
                    (("lora_r", 1), ("warmup_steps", 0), ("checkpoint_every", 0), ("eval_every", 0),
                     ("log_every", 0)) if getattr(self, name) < low]
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.max_length is not None and self.max_length < 2:
            problems.append(f"max_length must be at least 2 (one token to predict), got {self.max_length}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Hyperparameters:
    """The resolved values a job reports back (OpenAI shows these on the job once it starts)."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float

    @property
    def learning_rate(self) -> float:
        return BASE_LR * self.learning_rate_multiplier


def resolve_hyperparameters(config: TrainingConfig, n_examples: int) -> Hyperparameters:
    """Replace "auto": n_epochs by OpenAI's cookbook rule (3, raised to see >= 100 examples and
    lowered to see <= 25,000, within 1..25), batch_size 8 (at most n_examples), multiplier 1."""
    if n_examples < 1:
        raise ValueError("fine-tuning needs at least one training example")
    n_epochs = config.n_epochs
    if n_epochs == "auto":
        n_epochs = DEFAULT_EPOCHS
        if n_examples * n_epochs < MIN_TARGET_EXAMPLES:
            n_epochs = min(MAX_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n_examples))
        elif n_examples * n_epochs > MAX_TARGET_EXAMPLES:
            n_epochs = max(MIN_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    batch_size = min(DEFAULT_BATCH_SIZE, n_examples) if config.batch_size == "auto" else config.batch_size
    multiplier = 1.0 if config.learning_rate_multiplier == "auto" else float(config.learning_rate_multiplier)
    if n_epochs < 1 or batch_size < 1 or not multiplier > 0:
        raise ValueError(f"invalid hyperparameters: n_epochs={n_epochs}, batch_size={batch_size}, "
                         f"learning_rate_multiplier={multiplier}")
    return Hyperparameters(int(n_epochs), int(batch_size), multiplier)
