"""TextRunner on the tiny random GPT-2: the OpenAI completion semantics a user sees."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from genq.shared.registry import model_spec
from genq.shared.schemas import CompletionBody
from genq.workers.runners import make_runner
from genq.workers.runners import text_engine as text_module
from genq.workers.runners.base import InvalidRequest, JobCancelled, RunContext
from genq.workers.runners.sampling import RowParams, RowState, StepSampler, penalize_row
from genq.workers.runners.text import TextRunner

PROMPT = "The train left the station"


def complete(runner: TextRunner, ctx: RunContext | None = None, **fields: Any) -> dict[str, Any]:
    body = CompletionBody.model_validate({"model": "tiny-gpt2", "prompt": PROMPT, **fields})
    return runner.run(body, ctx or RunContext())


def texts(result: dict[str, Any]) -> list[str]:
    return [c["text"] for c in result["choices"]]


def test_response_shape_and_registry_kind(text_runner: TextRunner) -> None:
    assert isinstance(make_runner(text_runner.spec, device="cpu"), TextRunner)
    result = complete(text_runner, max_tokens=5, seed=1)
    assert result["object"] == "text_completion" and result["id"].startswith("cmpl-")
    assert result["model"] == "tiny-gpt2" and isinstance(result["created"], int)
    assert result["choices"][0].keys() == {"text", "index", "logprobs", "finish_reason"}
    assert result["choices"][0]["logprobs"] is None


def test_seed_makes_sampling_repeatable(text_runner: TextRunner) -> None:
    first = texts(complete(text_runner, max_tokens=20, seed=7, n=2))
    assert texts(complete(text_runner, max_tokens=20, seed=7, n=2)) == first
    assert texts(complete(text_runner, max_tokens=20, seed=8, n=2)) != first
    assert first[0] != first[1]  # the n samples of one request differ
    unseeded = [texts(complete(text_runner, max_tokens=20)) for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_temperature_zero_is_greedy_whatever_the_seed(text_runner: TextRunner) -> None:
    greedy = {tuple(texts(complete(text_runner, max_tokens=12, temperature=0, seed=s, n=2))) for s in (1, 2)}
    assert len(greedy) == 1
    (pair,) = greedy
    assert pair[0] == pair[1]
    assert texts(complete(text_runner, max_tokens=12, do_sample=False))[0] == pair[0]


def test_choices_are_indexed_by_prompt_then_sample(text_runner: TextRunner) -> None:
    result = complete(text_runner, prompt=["Hello", "A job queue lets many users"], n=3, max_tokens=4,
                      echo=True, seed=3)
    assert [c["index"] for c in result["choices"]] == list(range(6))
    for i, choice in enumerate(result["choices"]):
        assert choice["text"].startswith(["Hello", "A job queue lets many users"][i // 3])


def test_batched_prompts_match_each_prompt_alone(text_runner: TextRunner) -> None:
    # Left padding with an attention mask must not change what a shorter prompt generates.
    prompts = ["Hi", "The bells of the church rang nine times", "Numbers"]
    batched = texts(complete(text_runner, prompt=prompts, max_tokens=8, temperature=0))
    alone = [texts(complete(text_runner, prompt=p, max_tokens=8, temperature=0))[0] for p in prompts]
    assert batched == alone


def test_max_tokens_and_usage(text_runner: TextRunner) -> None:
    result = complete(text_runner, prompt=["one", "two words"], n=2, max_tokens=9, temperature=0)
    prompt_tokens = sum(len(text_runner.tokenizer(p)["input_ids"]) for p in ["one", "two words"])
    assert [c["finish_reason"] for c in result["choices"]] == ["length"] * 4
    assert result["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 4 * 9,
                               "total_tokens": prompt_tokens + 36}


def test_stop_string_cuts_text_and_generation(text_runner: TextRunner) -> None:
    other = "Numbers and dates"
    runs = complete(text_runner, prompt=[PROMPT, other], max_tokens=40, temperature=0, logprobs=0)["choices"]
    full, lp = runs[0]["text"], runs[0]["logprobs"]
    stop = full[12:15]
    assert stop not in runs[1]["text"]
    end = full.find(stop) + len(stop)
    tokens_to_stop = sum(1 for offset in lp["text_offset"] if offset < end)

    result = complete(text_runner, prompt=[PROMPT, other], max_tokens=40, temperature=0,
                      stop=["never-there", stop])
    cut, uncut = result["choices"]
    assert cut["finish_reason"] == "stop" and uncut["finish_reason"] == "length"
    assert cut["text"] == full[:full.find(stop)] and uncut["text"] == runs[1]["text"]
    # Tokens after the stop string (padding while the other row went on) are not billed.
    assert result["usage"]["completion_tokens"] == tokens_to_stop + 40


def test_eos_stops_and_is_the_last_counted_token(text_runner: TextRunner) -> None:
    prompts = [PROMPT, "Good software"]
    full = texts(complete(text_runner, prompt=prompts, max_tokens=10, temperature=0, logprobs=0))
    calls = 0

    def force_eos_in_row_0_on_fourth_token(module: Any, inputs: Any, logits: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 4:
            logits = logits.clone()
            logits[0, ..., text_runner.tokenizer.eos_token_id] += 1000.0
        return logits

    handle = text_runner.model.lm_head.register_forward_hook(force_eos_in_row_0_on_fourth_token)
    try:
        result = complete(text_runner, prompt=prompts, max_tokens=10, temperature=0, logprobs=0)
    finally:
        handle.remove()
    ended, went_on = result["choices"]
    assert (ended["finish_reason"], went_on["finish_reason"]) == ("stop", "length")
    assert len(ended["logprobs"]["tokens"]) == 3 and full[0].startswith(ended["text"])
    assert went_on["text"] == full[1]
    assert result["usage"]["completion_tokens"] == 4 + 10  # three tokens of text plus the EOS


def test_logprobs_are_the_models_own(text_runner: TextRunner) -> None:
    k = 5
    result = complete(text_runner, max_tokens=12, temperature=0, logprobs=k)
    choice = result["choices"][0]
    lp = choice["logprobs"]
    n = len(lp["tokens"])
    assert n == 12 == result["usage"]["completion_tokens"]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert all(1 <= len(top) <= k for top in lp["top_logprobs"]) and max(map(len, lp["top_logprobs"])) == k
    assert all(x <= 0 for x in lp["token_logprobs"])
    # Greedy picks the most likely token, so its logprob is the best alternative's.
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=False):
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)
    for token, offset in zip(lp["tokens"], lp["text_offset"], strict=False):
        assert "\ufffd" in token or choice["text"][offset:].startswith(token)
    # A plain greedy loop over the model gives the same tokens and numbers.
    ids = text_runner.tokenizer(PROMPT)["input_ids"]
    expected = []
    with torch.inference_mode():
        for _ in range(n):
            logprobs = torch.log_softmax(text_runner.model(torch.tensor([ids])).logits[0, -1].float(), -1)
            ids.append(int(logprobs.argmax()))
            expected.append(float(logprobs[ids[-1]]))
    assert lp["tokens"] == [text_runner.tokenizer.decode([i]) for i in ids[-n:]]
    assert lp["token_logprobs"] == pytest.approx(expected, abs=1e-4)


def test_echo_prepends_prompt_and_scores_its_tokens(text_runner: TextRunner) -> None:
    plain = complete(text_runner, max_tokens=6, temperature=0)
    result = complete(text_runner, max_tokens=6, temperature=0, echo=True, logprobs=2)
    choice = result["choices"][0]
    assert choice["text"] == PROMPT + plain["choices"][0]["text"]
    lp = choice["logprobs"]
    n_prompt = result["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == n_prompt + 6
    assert "".join(lp["tokens"][:n_prompt]) == PROMPT
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x is not None and x <= 0 for x in lp["token_logprobs"][1:])
    assert lp["text_offset"][n_prompt] == len(PROMPT)
    ids = text_runner.tokenizer(PROMPT)["input_ids"]
    with torch.inference_mode():
        ref = torch.log_softmax(text_runner.model(torch.tensor([ids])).logits[0].float(), -1)
    expected = [float(ref[t - 1, ids[t]]) for t in range(1, n_prompt)]
    assert lp["token_logprobs"][1:n_prompt] == pytest.approx(expected, abs=1e-4)
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_requests_that_do_not_fit_are_refused(text_runner: TextRunner) -> None:
    with pytest.raises(InvalidRequest) as too_long:
        complete(text_runner, prompt="word " * 600, max_tokens=1)
    assert too_long.value.param == "body.prompt"
    with pytest.raises(InvalidRequest) as overflow:
        complete(text_runner, prompt=["short", "word " * 300], max_tokens=250)
    assert overflow.value.param == "body.max_tokens" and "prompt 1" in str(overflow.value)
    with pytest.raises(InvalidRequest) as over_limit:
        complete(text_runner, max_tokens=257)  # the registry allows 256
    assert over_limit.value.param == "body.max_tokens"


def test_cancel_stops_generation(text_runner: TextRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(JobCancelled):
        complete(text_runner, RunContext(is_cancelled=lambda: True), max_tokens=50)

    monkeypatch.setattr(text_module, "POLL_SECONDS", 0.0)
    polls: list[int] = []
    progress: list[float] = []

    def cancelled_on_fifth_poll() -> bool:
        polls.append(1)
        return len(polls) >= 5

    ctx = RunContext(is_cancelled=cancelled_on_fifth_poll, set_progress=progress.append)
    with pytest.raises(JobCancelled):
        complete(text_runner, ctx, max_tokens=200, temperature=0)
    assert len(polls) == 5  # no polling (or generating) after the cancel was seen
    # Polls follow each decoding step; the first step also made the prefill's token: 6 tokens at most.
    assert progress == sorted(progress) and 0 < progress[0] and progress[-1] <= 6 / 200


def test_presence_and_frequency_penalties(text_runner: TextRunner) -> None:
    def params(presence: float, frequency: float) -> RowParams:
        return RowParams(greedy=True, temperature=1.0, top_k=0, top_p=1.0, repetition=1.0, presence=presence,
                       frequency=frequency, max_tokens=4, seed=0, logprobs=-1, stops=[])

    # Penalized (presence 0.5, frequency 0.25) or not, after prompt [3] and tokens 1, 1, 2.
    penalized, plain = RowState(params(0.5, 0.25), [3]), RowState(params(0.0, 0.0), [3])
    penalized.generated = [1, 1, 2]
    plain.generated = [0, 0, 0]
    assert penalize_row(penalized, torch.zeros(4)).tolist() == [0.0, -1.0, -0.75, 0.0]
    assert penalize_row(plain, torch.zeros(4)).tolist() == [0.0, 0.0, 0.0, 0.0]

    def distinct(**fields: Any) -> int:
        tokens = complete(text_runner, max_tokens=30, temperature=0, logprobs=0, **fields)
        return len(set(tokens["choices"][0]["logprobs"]["tokens"]))

    assert distinct(frequency_penalty=2.0) > distinct()
    assert distinct(presence_penalty=2.0) > distinct()


@pytest.mark.parametrize("scale", [0.5, 4.0, 12.0], ids=["flat", "peaked", "sharp"])
def test_the_scanned_nucleus_is_the_sorted_one(scale: float) -> None:
    """Top-k/top-p masks from the partial scan equal those from sorting every row, whether the
    nucleus fits in the scanned tokens (peaked logits) or not (flat ones fall back to the sort)."""
    def params(top_k: int, top_p: float) -> RowParams:
        return RowParams(greedy=False, temperature=1.0, top_k=top_k, top_p=top_p, repetition=1.0, presence=0.0,
                         frequency=0.0, max_tokens=4, seed=0, logprobs=-1, stops=[])

    settings = [(0, 0.9), (0, 0.5), (40, 1.0), (2000, 0.95), (0, 0.999), (5, 0.3), (1, 1.0)]
    sampler = StepSampler([RowState(params(k, p), [0]) for k, p in settings], "cpu")
    torch.manual_seed(1)
    scores = torch.randn(len(settings), 50257) * scale
    fast = ~sampler._filter(scores.clone(), list(range(len(settings)))).isinf()
    k = torch.where(sampler.top_k > 0, sampler.top_k, scores.shape[1])
    full = scores >= sampler._full_threshold(scores, k, sampler.top_p)
    # The same tokens, but for one at the nucleus's edge when the two sums round apart.
    assert ((fast ^ full).sum(dim=1) <= 1).all() and (fast ^ full).sum() <= 1
    kept = fast.sum(dim=1).tolist()
    assert kept[6] == 1 and kept[2] == 40


def test_device_and_dtype_policy() -> None:
    spec = model_spec("m", "text", "unused", dtype="bfloat16", device="cpu")
    assert TextRunner(spec).dtype == torch.bfloat16 and TextRunner(spec).device == "cpu"
    auto = TextRunner(model_spec("m", "text", "unused"), device="cpu")
    assert auto.dtype == torch.float32
    with pytest.raises(ValueError):
        TextRunner(model_spec("m", "text", "unused", dtype="int3"))
