"""Token losses for genq.workers.training: summed cross-entropy over the trained tokens of a batch,
with the output layer computed only where a token is trained on when that gives the model's own loss."""

from __future__ import annotations

import math
from typing import Any

from genq.workers.training_data import IGNORE, EncodedSet, collate


def mean_token_loss(model: Any, data: EncodedSet, batch_size: int, pad_id: int, device: str = "cpu", *,
                    trained_only: bool = False) -> float:
    """Mean cross-entropy over every trained token of `data`, without gradients (validation).
    `trained_only`: compute the output layer at trained positions only (see head_at_trained_only)."""
    import torch

    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = collate(data.examples[start:start + batch_size], pad_id)
            batch_loss, n = token_loss(model, batch, device, trained_only=trained_only)
            loss_sum, tokens = loss_sum + float(batch_loss), tokens + n
    model.train(was_training)
    return loss_sum / max(tokens, 1)


def token_loss(model: Any, batch: dict[str, Any], device: str, *, trained_only: bool) -> tuple[Any, int]:
    """Summed token cross-entropy of a batch and its number of trained tokens.

    With `trained_only` the model's body runs on the whole batch but its output layer only where a
    token is trained on: the (tokens x vocabulary) logits are most of a small model's compute, and
    on chat data about half the tokens are prompt (measured on the docstring chats with a 6 x 512
    gpt2 and GPT-2's 50k vocabulary: 1.5-1.7x the trained tokens/s of the full logits)."""
    import torch

    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    if trained_only:
        body, head = _body_and_head(model)  # type: ignore[misc]
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        keep = labels != IGNORE
        logits = head(hidden[:, :-1][keep]).float()
        return torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum"), int(keep.sum())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    # Shift the labels left rather than slicing the logits, which would copy them all.
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), shifted.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


def _body_and_head(model: Any) -> tuple[Any, Any] | None:
    """The transformer body (returning hidden states) and output layer of a (peft-wrapped) causal LM."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, head = getattr(inner, "base_model", inner), inner.get_output_embeddings()
    return (body, head) if head is not None and body is not inner else None


def head_at_trained_only(model: Any, batch: dict[str, Any], device: str) -> bool:
    """Whether the output layer applied to the body's hidden states gives this model's own loss on
    `batch`. Some architectures change the logits after it (Gemma 2 caps them, Cohere scales them):
    for those, and for any model this cannot split, the loss takes the model's full logits."""
    import torch

    if _body_and_head(model) is None:
        return False
    was_training = model.training
    model.eval()  # no dropout: both passes see the same weights
    with torch.no_grad():
        full, tokens = token_loss(model, batch, device, trained_only=False)
        part, _ = token_loss(model, batch, device, trained_only=True)
    model.train(was_training)
    return tokens > 0 and math.isclose(float(full), float(part), rel_tol=1e-4)
