"""Fine-tuning examples as token ids with loss masks, for `genq.workers.training`.

An example is an already validated dict in one of OpenAI's two fine-tuning formats:

- chat: `{"messages": [{"role": ..., "content": str, "weight"?: 0 | 1}, ...]}`, rendered through the
  tokenizer's chat template; the loss covers every assistant turn (its content and whatever the
  template closes a turn with, e.g. ChatML's `<|im_end|>`), except turns with `weight: 0`;
- prompt/completion: `{"prompt": str, "completion": str}`; the loss covers the completion and EOS.

Labels hold the token id where the model is trained to predict that token and IGNORE elsewhere,
aligned with input_ids (the shift by one happens in the loss). Sequences longer than `max_length`
keep their first `max_length` tokens and are counted as truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IGNORE = -100  # the label torch's cross_entropy skips by default


class ExampleError(ValueError):
    """An example cannot be turned into tokens; the message says which and why."""


@dataclass(frozen=True)
class Encoded:
    """One example's tokens and labels (IGNORE where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        """Tokens that carry loss. The first position is never predicted (nothing precedes it)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


@dataclass(frozen=True)
class EncodedSet:
    """A data set ready to batch, and how many of its examples were cut to max_length."""

    examples: list[Encoded]
    truncated: int
    max_length: int

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def trained_tokens(self) -> int:
        return sum(e.trained_tokens for e in self.examples)


def encode_examples(tokenizer: Any, examples: Sequence[dict[str, Any]], max_length: int) -> EncodedSet:
    """Encode every example; fail naming the first one that cannot be encoded or trains nothing."""
    encoded = []
    for i, example in enumerate(examples):
        try:
            item = encode_example(tokenizer, example, max_length)
        except ExampleError as exc:
            raise ExampleError(f"example {i}: {exc}") from None
        encoded.append(item)
    if encoded and not any(e.trained_tokens for e in encoded):
        raise ExampleError(f"no example has a token to train on within max_length {max_length}")
    return EncodedSet(encoded, sum(e.truncated for e in encoded), max_length)


def encode_example(tokenizer: Any, example: dict[str, Any], max_length: int) -> Encoded:
    """One example in either format, truncated to max_length."""
    if "messages" in example:
        ids, labels = encode_chat(tokenizer, example["messages"])
    elif "prompt" in example and "completion" in example:
        ids, labels = encode_prompt_completion(tokenizer, example["prompt"], example["completion"])
    else:
        raise ExampleError("neither chat ('messages') nor prompt/completion format")
    if len(ids) > max_length:
        return Encoded(ids[:max_length], labels[:max_length], truncated=True)
    return Encoded(ids, labels)


def encode_prompt_completion(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Prompt tokens then completion tokens and EOS; loss on the completion and EOS only.

    The two parts are tokenized apart, so the prompt's tokens are exactly those the model sees
    when it is later asked to complete that prompt (genq's text runner tokenizes it alone too)."""
    if tokenizer.eos_token_id is None:
        raise ExampleError("the tokenizer has no EOS token to end a completion with")
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    completion_ids = [*tokenizer(completion, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """The conversation through the chat template; loss on the assistant turns with weight 1.

    An assistant turn's tokens are the difference between the conversation rendered up to it with
    the generation prompt (what the model sees when asked to answer) and rendered with it. That
    holds only if each rendering is a prefix of the next, which is checked: a template that
    rewrites earlier turns would otherwise silently train on the wrong tokens."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ExampleError("chat examples need a tokenizer with a chat template, and this one has none")
    ids = _render(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or message.get("weight", 1) == 0:
            continue
        start = _render(tokenizer, messages[:i], generation_prompt=True)
        end = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        _check_prefix(start, end, f"the prompt before message {i}", f"the conversation up to message {i}")
        _check_prefix(end, ids, f"the conversation up to message {i}", "the whole conversation")
        labels[len(start):len(end)] = end[len(start):]
    return ids, labels


def _render(tokenizer: Any, messages: list[dict[str, Any]], *, generation_prompt: bool) -> list[int]:
    # The template writes any special tokens itself (BOS included), so none are added here.
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # noqa: BLE001 - a template's own error (jinja's, or raise_exception's)
        raise ExampleError(f"the chat template cannot render the first {len(messages)} message(s): "
                           f"{type(exc).__name__}: {exc}") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_prefix(prefix: list[int], whole: list[int], prefix_name: str, whole_name: str) -> None:
    if whole[: len(prefix)] == prefix:
        return
    at = next((k for k, (a, b) in enumerate(zip(prefix, whole, strict=False)) if a != b), min(len(prefix), len(whole)))
    raise ExampleError(f"the chat template breaks the prefix property: {prefix_name} ({len(prefix)} tokens) is not "
                       f"a prefix of {whole_name} ({len(whole)} tokens; they differ at token {at}), so the "
                       "assistant's tokens cannot be told apart")


def default_max_length(model_config: Any, tokenizer: Any) -> int:
    """The model's context length (its position embeddings), else the tokenizer's, else 1024."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    return value if isinstance(value, int) and 0 < value < 1_000_000 else 1024


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch to its longest example: input_ids, attention_mask and labels tensors."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
