"""`workers.training`: loss masks, LoRA training through real peft, exact resume, hooks, and evidence
that a tiny chat model learns from a small real corpus (Python's docstrings)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from genq.workers.tiny import EOS, IM_END, build_tiny_chat, build_tiny_text
from genq.workers.tiny_chats import python_doc_chats
from genq.workers.training import (
    BASE_LR,
    Checkpoint,
    TrainingConfig,
    TrainingHooks,
    default_target_modules,
    epoch_order,
    head_at_trained_only,
    lr_factor,
    mean_token_loss,
    resolve_hyperparameters,
    token_loss,
    train,
)
from genq.workers.training_data import IGNORE, ExampleError, collate, encode_example, encode_examples

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is a queue?"},
    {"role": "assistant", "content": "A line of jobs."},
    {"role": "user", "content": "And a worker?"},
    {"role": "assistant", "content": "It runs them.", "weight": 0},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome."},
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Run these tests on one torch thread: a 64-wide model gains nothing from two, and when other
    work shares the two cores, two spinning OpenMP threads made a step ~20x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny-chat/` and `tiny-gpt2/` only (the other tiny models are not needed here)."""
    out = tmp_path_factory.mktemp("train-models")
    build_tiny_chat(out / "tiny-chat", seed=0)
    build_tiny_text(out / "tiny-gpt2", seed=0)
    return out


@pytest.fixture(scope="module")
def chat_tokenizer(models: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models / "tiny-chat")


def _trained_spans(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of consecutive trained tokens; each trained label must equal its token."""
    spans: list[list[int]] = []
    for k, (token, label) in enumerate(zip(ids, labels, strict=True)):
        if label == IGNORE:
            continue
        assert label == token
        if k and labels[k - 1] != IGNORE:
            spans[-1].append(token)
        else:
            spans.append([token])
    return [tokenizer.decode(s) for s in spans]


# --- data -> tokens and masks -----------------------------------------------------------------------

def test_chat_trains_exactly_the_assistant_turns_with_weight(chat_tokenizer: Any) -> None:
    encoded = encode_example(chat_tokenizer, {"messages": CHAT}, max_length=512)
    rendered = chat_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert encoded.input_ids == chat_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # The weight-0 turn is not trained; each trained turn is its content and the template's turn end.
    assert _trained_spans(chat_tokenizer, encoded.input_ids, encoded.labels) == [
        f"A line of jobs.{IM_END}\n", f"You are welcome.{IM_END}\n"]
    # Everything before the first answer, the generation prompt included, carries no loss.
    prompt = chat_tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    n_prompt = len(chat_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert set(encoded.labels[:n_prompt]) == {IGNORE} and encoded.labels[n_prompt] != IGNORE
    assert not encoded.truncated


def test_prompt_completion_trains_completion_and_eos(models: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models / "tiny-gpt2")
    encoded = encode_example(tokenizer, {"prompt": "The weather was", "completion": " mild that morning."}, 512)
    prompt_ids = tokenizer("The weather was")["input_ids"]
    assert encoded.input_ids[:len(prompt_ids)] == prompt_ids
    assert encoded.labels[:len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert _trained_spans(tokenizer, encoded.input_ids, encoded.labels) == [f" mild that morning.{EOS}"]
    assert encoded.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_keeps_the_start_and_is_counted(chat_tokenizer: Any) -> None:
    short = {"messages": CHAT[1:3]}
    full = encode_example(chat_tokenizer, {"messages": CHAT}, 512)
    limit = len(encode_example(chat_tokenizer, short, 512).input_ids)  # the short one just fits
    data = encode_examples(chat_tokenizer, [{"messages": CHAT}, short], max_length=limit)
    assert data.truncated == 1 and data.examples[0].truncated and not data.examples[1].truncated
    assert data.examples[0].input_ids == full.input_ids[:limit] and data.examples[0].labels == full.labels[:limit]


def test_nothing_to_train_within_max_length_is_refused(chat_tokenizer: Any) -> None:
    with pytest.raises(ExampleError, match="no example has a token to train on within max_length 5"):
        encode_examples(chat_tokenizer, [{"messages": CHAT}], max_length=5)


def test_a_template_that_breaks_the_prefix_property_is_refused(chat_tokenizer: Any) -> None:
    import copy

    broken = copy.deepcopy(chat_tokenizer)
    # The generation prompt names a role the rendered turn does not: "bot" versus "assistant".
    broken.chat_template = chat_tokenizer.chat_template.replace("'<|im_start|>assistant\\n'", "'<|im_start|>bot\\n'")
    assert broken.chat_template != chat_tokenizer.chat_template
    with pytest.raises(ExampleError, match=r"example 0: the chat template breaks the prefix property: the prompt "
                                           r"before message 2 .* is not a prefix of the conversation up to message 2"):
        encode_examples(broken, [{"messages": CHAT}], 512)


def test_a_template_error_is_reported_as_the_examples_error(chat_tokenizer: Any) -> None:
    import copy

    strict = copy.deepcopy(chat_tokenizer)
    strict.chat_template = "{% if not messages %}{{ raise_exception('empty conversation') }}{% endif %}" + \
        chat_tokenizer.chat_template
    answer_first = {"messages": [{"role": "assistant", "content": "Hello."}]}
    with pytest.raises(ExampleError, match="example 1: the chat template cannot render the first 0 message.*: "
                                           ".*empty conversation"):
        encode_examples(strict, [{"messages": CHAT}, answer_first], 512)


def test_chat_needs_a_chat_template(models: Path) -> None:
    from transformers import AutoTokenizer

    with pytest.raises(ExampleError, match="chat examples need a tokenizer with a chat template"):
        encode_example(AutoTokenizer.from_pretrained(models / "tiny-gpt2"), {"messages": CHAT}, 512)


def test_collate_pads_right_with_no_loss_on_padding(chat_tokenizer: Any) -> None:
    data = encode_examples(chat_tokenizer, [{"messages": CHAT}, {"messages": CHAT[1:3]}], 512)
    batch = collate(data.examples, pad_id=0)
    n_short = len(data.examples[1].input_ids)
    assert batch["input_ids"].shape == (2, len(data.examples[0].input_ids))
    assert batch["attention_mask"][1].tolist() == [1] * n_short + [0] * (batch["input_ids"].shape[1] - n_short)
    assert (batch["labels"][1, n_short:] == IGNORE).all()


# --- hyperparameters ---------------------------------------------------------------------------------

def test_auto_hyperparameters_follow_the_documented_rule() -> None:
    auto = TrainingConfig()
    assert resolve_hyperparameters(auto, 10).n_epochs == 10  # 3 epochs would see 30 < 100 examples
    assert resolve_hyperparameters(auto, 2).n_epochs == 25  # capped
    assert resolve_hyperparameters(auto, 200).n_epochs == 3
    assert resolve_hyperparameters(auto, 20_000).n_epochs == 1  # 25,000 examples at most
    assert resolve_hyperparameters(auto, 5).batch_size == 5 and resolve_hyperparameters(auto, 50).batch_size == 8
    hp = resolve_hyperparameters(TrainingConfig(n_epochs=2, batch_size=3, learning_rate_multiplier=0.5), 50)
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate) == (2, 3, BASE_LR * 0.5)
    with pytest.raises(ValueError, match="at least one training example"):
        resolve_hyperparameters(auto, 0)


def test_a_bad_config_is_refused_naming_each_problem() -> None:
    with pytest.raises(ValueError, match=r"lora_r must be at least 1, got 0; lora_dropout must be in \[0, 1\)"):
        TrainingConfig(lora_r=0, lora_dropout=1.0)


def test_learning_rate_warms_up_then_decays_linearly_to_zero() -> None:
    factors = [lr_factor(step, warmup=2, total=6) for step in range(6)]
    assert factors == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])
    assert [lr_factor(step, warmup=0, total=4) for step in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_default_targets_are_peft_defaults_else_all_linear() -> None:
    assert default_target_modules("gpt2") == ["c_attn"]
    assert default_target_modules("llama") == ["q_proj", "v_proj"]
    assert default_target_modules("no-such-architecture") == "all-linear"


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    assert epoch_order(3, 1, 20) == epoch_order(3, 1, 20)
    assert sorted(epoch_order(3, 1, 20)) == list(range(20))
    assert epoch_order(3, 1, 20) != epoch_order(3, 2, 20) and epoch_order(3, 1, 20) != epoch_order(4, 1, 20)


# --- the loop: resume, hooks, cancel ---------------------------------------------------------------

SMALL = TrainingConfig(n_epochs=3, batch_size=4, learning_rate_multiplier=20, lora_dropout=0.1,
                       checkpoint_every=4, eval_every=3, seed=7)  # 12 examples: 3 steps an epoch, 9 in all


class _Crash(Exception):
    pass


def _adapter_tensors(files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(files["adapter_model.safetensors"])


def _run(models: Path, config: TrainingConfig, **kwargs: Any) -> Any:
    chats = python_doc_chats(16)
    return train(models / "tiny-chat", chats[:12], valid_examples=chats[12:], config=config, **kwargs)


def test_resume_after_a_crash_ends_with_the_same_adapter(models: Path) -> None:
    events: list[dict[str, Any]] = []
    checkpoints: list[Checkpoint] = []
    whole = _run(models, SMALL, hooks=TrainingHooks(progress=events.append, save_checkpoint=checkpoints.append))
    assert (whole.step, whole.total_steps, whole.cancelled) == (9, 9, False)
    assert [c.step for c in checkpoints] == [4, 8, 9]
    assert [(c.epoch, c.position) for c in checkpoints] == [(1, 1), (2, 2), (2, 3)]

    def crash_at_6(event: dict[str, Any]) -> None:
        if event["step"] == 6:
            raise _Crash
    first: list[Checkpoint] = []
    with pytest.raises(_Crash):
        _run(models, SMALL, hooks=TrainingHooks(progress=crash_at_6, save_checkpoint=first.append))
    assert [c.step for c in first] == [4]

    resumed_events: list[dict[str, Any]] = []
    resumed = _run(models, SMALL, resume=first[-1],
                   hooks=TrainingHooks(progress=resumed_events.append))
    assert [e["step"] for e in resumed_events] == [5, 6, 7, 8, 9]  # steps 1-4 are not run again
    a, b = _adapter_tensors(whole.adapter_files), _adapter_tensors(resumed.adapter_files)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.adapter_files == whole.adapter_files
    assert (resumed.trained_tokens, resumed.train_loss, resumed.valid_loss) == (
        whole.trained_tokens, whole.train_loss, whole.valid_loss)
    assert resumed_events == [{**e, "tokens_per_s": r["tokens_per_s"]} for e, r in zip(events[4:], resumed_events,
                                                                                          strict=True)]


def test_progress_events_and_validation(models: Path) -> None:
    events: list[dict[str, Any]] = []
    result = _run(models, SMALL, hooks=TrainingHooks(progress=events.append))
    assert [e["step"] for e in events] == list(range(1, 10))
    assert [e["step"] for e in events if "valid_loss" in e] == [3, 6, 9]
    assert {e["epoch"] for e in events} == {0, 1, 2}
    for e in events:
        assert e["total_steps"] == 9 and e["tokens_per_s"] > 0 and e["train_loss"] > 0
    assert events[-1]["trained_tokens"] == result.trained_tokens
    assert result.valid_loss == events[-1]["valid_loss"]
    # Over the three epochs every training token was trained on three times.
    assert result.trained_tokens > 0 and result.trained_tokens % 3 == 0


def test_log_every_thins_the_events(models: Path) -> None:
    events: list[dict[str, Any]] = []
    _run(models, TrainingConfig(n_epochs=3, batch_size=4, log_every=4), hooks=TrainingHooks(progress=events.append))
    assert [e["step"] for e in events] == [4, 8, 9]


def test_cancel_stops_at_once_after_a_checkpoint(models: Path) -> None:
    events: list[dict[str, Any]] = []
    checkpoints: list[Checkpoint] = []
    hooks = TrainingHooks(progress=events.append, save_checkpoint=checkpoints.append,
                          cancelled=lambda: len(events) >= 2)
    result = _run(models, SMALL, hooks=hooks)
    assert result.cancelled and result.step == 2 and len(events) == 2
    assert [c.step for c in checkpoints] == [2]
    assert checkpoints[-1].adapter_files == result.adapter_files


def test_same_seed_same_adapter_other_seed_other_adapter(models: Path) -> None:
    config = TrainingConfig(n_epochs=1, batch_size=4, learning_rate_multiplier=20)
    one, two = _run(models, config), _run(models, config)
    other = _run(models, TrainingConfig(n_epochs=1, batch_size=4, learning_rate_multiplier=20, seed=1))
    assert one.adapter_files == two.adapter_files
    assert one.adapter_files["adapter_model.safetensors"] != other.adapter_files["adapter_model.safetensors"]


def test_a_checkpoint_of_another_job_is_refused(models: Path) -> None:
    checkpoints: list[Checkpoint] = []
    _run(models, SMALL, hooks=TrainingHooks(save_checkpoint=checkpoints.append))
    with pytest.raises(ValueError, match="checkpoint at step 4 is from a different job or data set"):
        _run(models, TrainingConfig(n_epochs=3, batch_size=4, seed=8), resume=checkpoints[0])


def test_trainer_state_loads_without_pickle(models: Path) -> None:
    checkpoints: list[Checkpoint] = []
    _run(models, SMALL, hooks=TrainingHooks(save_checkpoint=checkpoints.append))
    state = torch.load(io.BytesIO(checkpoints[0].trainer_state), weights_only=True)
    assert {"optimizer", "scheduler", "rng", "metrics"} <= state.keys()


def test_prompt_completion_adapter_passes_genqs_upload_check(models: Path) -> None:
    """The plain tiny text model trains on prompt/completion pairs, and its adapter is what genq's
    adapter upload accepts: the two peft files, rank and peft's default GPT-2 target."""
    import zipfile

    from genq.services.adapter_archive import check_archive
    from genq.shared.registry import model_spec
    from genq.workers.tiny import CORPUS

    sentences = [s.strip() for s in CORPUS.replace("\n", " ").split(". ") if len(s.split()) > 6][:12]
    pairs = [{"prompt": " ".join(s.split()[:4]), "completion": " " + " ".join(s.split()[4:])} for s in sentences]
    result = train(models / "tiny-gpt2", pairs, config=TrainingConfig(n_epochs=2, batch_size=4, lora_r=4))
    assert result.step == 6 and result.trained_tokens > 0
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in result.adapter_files.items():
            archive.writestr(name, data)
    with check_archive(buffer.getvalue(), model=model_spec("tiny-gpt2", "text", "x"), max_bytes=1 << 24) as checked:
        assert sorted(checked.files) == ["adapter_config.json", "adapter_model.safetensors"]
        assert (checked.rank, checked.target_modules) == (4, ["c_attn"])


def _scaled_gpt2() -> type:
    """A GPT-2 that changes its logits after the output layer, as Cohere's logit_scale does."""
    from transformers import GPT2LMHeadModel

    class ScaledGPT2(GPT2LMHeadModel):  # type: ignore[misc]
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            out.logits = 4.0 * out.logits
            return out

    return ScaledGPT2


def test_output_layer_runs_only_at_trained_positions_when_that_is_the_models_own_loss(
        models: Path, chat_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    batch = collate(encode_examples(chat_tokenizer, python_doc_chats(4), 512).examples, chat_tokenizer.eos_token_id)
    plain = AutoModelForCausalLM.from_pretrained(models / "tiny-chat", dtype=torch.float32)
    assert head_at_trained_only(plain, batch, "cpu")
    with torch.no_grad():
        (full, n_full), (part, n_part) = (token_loss(plain, batch, "cpu", trained_only=flag) for flag in (False, True))
    assert n_full == n_part > 0 and float(part) == pytest.approx(float(full), rel=1e-5)
    scaled = _scaled_gpt2().from_pretrained(models / "tiny-chat", dtype=torch.float32)
    assert not head_at_trained_only(scaled, batch, "cpu")


# --- evidence: a tiny chat model learns Python's docstrings ---------------------------------------

def _greedy(model: Any, tokenizer: Any, messages: list[dict[str, str]]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return str(tokenizer.decode(out[0, ids.shape[1]:]))


def test_tiny_chat_learns_python_docstrings(models: Path, chat_tokenizer: Any, tmp_path: Path) -> None:
    """Measured here: first-step loss 6.96, last-epoch mean 4.85 (0.70x); held-out loss 4.97 against
    the base model's 6.94 (0.72x), in 5 s. Asserted with a margin: 0.8x and 0.85x."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    chats = python_doc_chats()
    held_out, training = chats[::5][:40], [c for i, c in enumerate(chats) if i % 5][:160]
    events: list[dict[str, Any]] = []
    # The random tiny model's tied embeddings are tiny (std 0.02), which caps its logits unless the
    # output projection adapts too: lm_head is trained by LoRA along with attention and MLP.
    config = TrainingConfig(n_epochs=3, batch_size=16, learning_rate_multiplier=50, lora_r=8,
                            target_modules=["c_attn", "c_proj", "c_fc", "lm_head"])
    started = time.perf_counter()
    result = train(models / "tiny-chat", training, config=config, hooks=TrainingHooks(progress=events.append))
    seconds = time.perf_counter() - started
    assert result.step == 30 and not result.cancelled
    assert result.train_loss is not None and result.train_loss < 0.8 * events[0]["train_loss"], (
        events[0]["train_loss"], result.train_loss, seconds)

    for name, data in result.adapter_files.items():
        (tmp_path / name).write_bytes(data)
    assert json.loads(result.adapter_files["adapter_config.json"])["base_model_name_or_path"] is None
    base = AutoModelForCausalLM.from_pretrained(models / "tiny-chat", dtype=torch.float32).eval()
    held = encode_examples(chat_tokenizer, held_out, 512)
    base_loss = mean_token_loss(base, held, 16, chat_tokenizer.eos_token_id)
    question = held_out[0]["messages"][:1]
    base_answer = _greedy(base, chat_tokenizer, question)
    tuned = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    tuned_loss = mean_token_loss(tuned, held, 16, chat_tokenizer.eos_token_id)
    assert tuned_loss < 0.85 * base_loss, (base_loss, tuned_loss)
    assert _greedy(tuned, chat_tokenizer, question) != base_answer
