"""Text generation with a Hugging Face causal LM: OpenAI `/v1/completions` and
`/v1/chat/completions` requests, batched together.

A chat request's prompt is its conversation rendered by the model's own chat template
(`apply_chat_template` with `add_generation_prompt`; the registry's `chat_template` replaces the
tokenizer's), tokenized as the template wrote it; from there on it is one more prompt in the batch.

The worker's batcher hands `run_batch` any number of requests at once; their prompts x n rows go
through one left-padded `generate` call. Rows differ freely in sampling parameters: one logits
processor (`RowSampler`) applies each row's penalties, temperature, top-k and top-p and draws
the row's token from the row's own random generator, then hands generate a distribution with all
its mass on that token, so generate's greedy step takes it. Per-row stopping criteria end a row
at its own max_tokens, at one of its stop strings, or when its job is cancelled.

Reproducibility: row i of a request with seed s draws from a generator seeded with s + i, so its
random stream does not depend on what shares its batch, and choice i equals the n=1 request with
seed s + i. Greedy rows (temperature 0) take the argmax. Either way a row's logits can move in
the last float bits with the batch's shape (padding, kernel choice), so a near-tie can in rare
cases go the other way; on the tiny test models greedy and seeded text were identical alone and in
mixed batches (tests/unit/test_text_batching.py).

LoRA adapters (peft, text_adapters.py) load onto the resident model without reloading it and stay
in an LRU of `max_adapters`. A batch whose rows use different adapters, or some none, runs as one
peft mixed-adapter batch. Cutting rows and formatting logprobs live in text_output.py; there
`text_offset` counts from the start of the returned `text` (so with `echo` the prompt starts at 0).
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from genq.shared.chat import ChatBody
from genq.shared.options import TextOptions
from genq.shared.registry import ModelSpec
from genq.shared.schemas import CompletionBody, SamplingBody
from genq.workers.runners.base import (
    BatchItem,
    Deferred,
    InvalidRequest,
    JobCancelled,
    LocalAdapter,
    Outcome,
    RunContext,
    chat_completion,
    finish,
    module_bytes,
    random_seed,
    text_completion,
    typed_options,
)
from genq.workers.runners.constrained import CompiledFormat, ResponseFormats
from genq.workers.runners.device import resolve_device, resolve_dtype
from genq.workers.runners.lora import AdapterLRU
from genq.workers.runners.sampling import RowParams, RowSampler, row_params
from genq.workers.runners.text_adapters import PeftAdapters
from genq.workers.runners.text_output import RowStream, TokenText, join_logprobs

POLL_SECONDS = 0.2  # how often generation reports progress and asks whether jobs were cancelled


class _RowWatch(StoppingCriteria):
    """Between tokens, per row: its max_tokens, its stop strings, and its job's cancellation; and
    the new text of streaming rows, handed to their jobs' `emit` each step. Progress is reported
    and cancellation asked at most every POLL_SECONDS."""

    def __init__(self, runner: TextRunner, items: list[BatchItem], owner: list[int], rows: list[RowParams],
                 width: int) -> None:
        self.runner, self.items, self.rows, self.width = runner, items, rows, width
        assert runner.text is not None
        self.text = runner.text
        self.cancelled: set[int] = set()  # item indexes
        self._next_poll = 0.0
        device = runner.device
        self._limit = torch.tensor([r.max_tokens for r in rows], device=device)
        self._stop_rows = [i for i, r in enumerate(rows) if r.stops]
        self._window = {i: max(len(s) for s in rows[i].stops) + 2 for i in self._stop_rows}
        self._owner = torch.tensor(owner, device=device)
        # Streaming rows: batch row -> (item index, choice index within the item, its text so far).
        self._streams: dict[int, tuple[int, int, RowStream]] = {}
        for row, (r, j) in enumerate(zip(rows, owner, strict=True)):
            if items[j].ctx.emit is not None:
                self._streams[row] = (j, row - owner.index(j), RowStream(self.text, r.stops, r.max_tokens))
        self._item_limit: dict[int, int] = {}  # the items with rows in this batch -> their max_tokens
        for r, j in zip(rows, owner, strict=True):
            self._item_limit[j] = max(self._item_limit.get(j, 0), r.max_tokens)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        made = input_ids.shape[1] - self.width
        done = self._limit <= made
        for i in self._stop_rows:
            tail = self.text.decode(input_ids[i, max(self.width, input_ids.shape[1] - self._window[i]):].tolist())
            if any(stop in tail for stop in self.rows[i].stops):
                done[i] = True
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + POLL_SECONDS
            for j, limit in self._item_limit.items():
                if j in self.cancelled:
                    continue
                self.items[j].ctx.set_progress(min(1.0, made / limit))
                if self.items[j].ctx.is_cancelled():
                    self.cancelled.add(j)
        if self.cancelled:
            done |= torch.isin(self._owner, torch.tensor(sorted(self.cancelled), device=self._owner.device))
        if self._streams:
            self._stream(input_ids[:, -1].tolist())
        return done

    def _stream(self, tokens: list[int]) -> None:
        pieces: dict[int, list[tuple[int, str]]] = {}
        for row, (j, choice, stream) in self._streams.items():
            if j not in self.cancelled and (piece := stream.push(tokens[row])):
                pieces.setdefault(j, []).append((choice, piece))
        for j, deltas in pieces.items():
            emit = self.items[j].ctx.emit
            assert emit is not None
            emit(deltas)


@dataclass
class _Prepared:
    prompt_ids: list[list[int]]
    max_tokens: int  # what each choice may generate
    rows: list[RowParams] = field(default_factory=list)
    row_prompt: list[int] = field(default_factory=list)  # the prompt index of each row


class TextRunner:
    kind: ClassVar[str] = "text"

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        self.spec = spec
        self.device = resolve_device(device or spec.device)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.options = typed_options(spec, TextOptions)
        self.tokenizer: Any = None
        self.text: TokenText | None = None  # decoding, set at load
        self.formats: ResponseFormats | None = None  # response_format grammars, set at load
        self.fingerprint = spec.fingerprint
        self.peft = PeftAdapters(spec.name, self.options.max_adapters)
        self.adapters: AdapterLRU[LocalAdapter] = self.peft.lru
        self._lock = threading.Lock()  # one batch at a time on this model

    # --- weights -------------------------------------------------------------------------------

    def load(self) -> None:
        revision = {"revision": self.options.revision} if self.options.revision else {}
        tokenizer = AutoTokenizer.from_pretrained(self.spec.source, **revision)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # decoder-only batches grow on the right
        if self.options.chat_template:
            tokenizer.chat_template = self.options.chat_template
        model = AutoModelForCausalLM.from_pretrained(self.spec.source, dtype=self.dtype, **revision)
        self.peft.attach(model.to(self.device).eval())
        self.tokenizer = tokenizer
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id, tokenizer.pad_token_id}
        self.text = TokenText(tokenizer, {i for i in eos_ids if i is not None})
        # Grammars for response_format, over the logits' width (which may exceed the tokenizer's).
        self.formats = ResponseFormats(tokenizer, model.get_output_embeddings().weight.shape[0], self.text.end_ids)

    def unload(self) -> None:
        self.peft.attach(None)
        self.tokenizer = self.text = self.formats = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    @property
    def model(self) -> Any:
        """The causal LM, or a peft PeftModel around it once an adapter is loaded; None unloaded."""
        return self.peft.model

    def memory_bytes(self) -> int:
        return module_bytes(self.model)

    @property
    def context_length(self) -> int | None:
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(self.model.config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    # --- the batch interface ---------------------------------------------------------------------

    def run(self, body: BaseModel, ctx: RunContext, adapter: LocalAdapter | None = None) -> dict[str, Any]:
        """Serve one request on its own (tests and direct use)."""
        item = BatchItem(body, ctx, adapter)
        self.prepare(item)
        outcome = finish(self.run_batch([item])[0])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def prepare(self, item: BatchItem) -> None:
        body = item.body
        assert isinstance(body, SamplingBody)
        if self.model is None:
            self.load()
        if body.adapter is not None and item.adapter is None:
            raise InvalidRequest(f"adapter {body.adapter!r} is not available to this worker", "body.adapter")
        prompt_ids = self.encode(body)
        max_tokens = self.check_inputs(body, prompt_ids)
        seed = body.seed if body.seed is not None else random_seed()
        prepared = _Prepared(prompt_ids, max_tokens)
        grammar = self.response_format(body)
        for p in range(len(prompt_ids)):
            for k in range(body.n):
                prepared.rows.append(row_params(body, seed, p * body.n + k, max_tokens, grammar))
                prepared.row_prompt.append(p)
        item.prepared = prepared

    def response_format(self, body: SamplingBody) -> CompiledFormat | None:
        """The compiled grammar a chat's response_format asks for (InvalidRequest if it cannot be)."""
        if not isinstance(body, ChatBody) or not body.constrained:
            return None
        assert self.formats is not None and body.response_format is not None
        return self.formats.compile(body.response_format.model_dump(exclude_none=True))

    def encode(self, body: SamplingBody) -> list[list[int]]:
        """The token ids of each prompt: a completion's prompts, or a chat's templated conversation."""
        if isinstance(body, CompletionBody):
            return [self.tokenizer(p)["input_ids"] for p in body.prompts]
        assert isinstance(body, ChatBody)
        if not self.tokenizer.chat_template:
            raise InvalidRequest(f"model {self.spec.name} has no chat template; send its prompts to "
                                 "/v1/completions instead", "body.model")
        try:
            text = self.tokenizer.apply_chat_template(body.template_messages(), tokenize=False,
                                                      add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - jinja's TemplateError, or raise_exception() in the template
            raise InvalidRequest(f"model {self.spec.name}'s chat template cannot render these messages: {exc}",
                                 "body.messages") from None
        # The template writes the special tokens itself, so none are added around it.
        return [self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def batch_key(self, item: BatchItem) -> Hashable:
        return "text"  # any requests share a batch: parameters and adapters are per row

    def rows(self, item: BatchItem) -> int:
        return len(item.prepared.rows)

    def run_batch(self, items: list[BatchItem]) -> list[Outcome]:
        with self._lock, torch.inference_mode():
            if self.model is None:
                self.load()
            outcomes: list[Outcome | None] = [None] * len(items)
            # 1. Load the adapters the batch names; an adapter that fails fails only its jobs.
            for j, failure in self.peft.ensure(items).items():
                outcomes[j] = failure
            live = [j for j in range(len(items)) if outcomes[j] is None]
            if not live:
                return outcomes  # type: ignore[return-value]
            # 2. One left-padded batch of every row of every live request.
            rows, owner, ids = [], [], []
            for j in live:
                prepared = items[j].prepared
                rows += prepared.rows
                owner += [j] * len(prepared.rows)
                ids += [prepared.prompt_ids[p] for p in prepared.row_prompt]
            batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
            width = batch["input_ids"].shape[1]
            pad = [width - len(r) for r in ids]
            # 3. Generate, each row decoded and stopped by its own parameters.
            sampler = RowSampler(rows, pad, width, self.device, self.formats)
            watch = _RowWatch(self, items, owner, rows, width)
            names = [self.peft.name(items[j]) for j in owner]
            with self.peft.scope(names) as extra:
                out = self.model.generate(
                    **batch, **extra, max_new_tokens=max(r.max_tokens for r in rows), do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id, logits_processor=LogitsProcessorList([sampler]),
                    stopping_criteria=StoppingCriteriaList([watch]), return_dict_in_generate=True)
            generated = out.sequences[:, width:].tolist()
            steps = sampler.cpu_records()  # logprobs, copied off the device once for the batch
            where = {r: i for i, r in enumerate(sampler.lp_rows)}  # batch row -> its place in `steps`
            # 4. Each request's rows and logprobs; the echoed prompts' logprobs need the model here.
            start = 0
            for j in live:
                item, count = items[j], len(items[j].prepared.rows)
                span = range(start, start + count)
                start += count
                if j in watch.cancelled:
                    outcomes[j] = JobCancelled(item.ctx.job_id)
                    continue
                try:
                    prompt_lp = self.echo_logprobs(item)
                except Exception as exc:  # noqa: BLE001 - this request's failure only
                    outcomes[j] = exc
                    continue
                row_lp = [[(c[where[r]], v[where[r]], t[where[r]]) for c, v, t in steps] if r in where else []
                          for r in span]
                # 5. Cutting, decoding and the response: in the job's own thread (base.Deferred).
                outcomes[j] = Deferred(partial(self.respond, item, [generated[r] for r in span], row_lp, prompt_lp))
        return outcomes  # type: ignore[return-value]

    def echo_logprobs(self, item: BatchItem) -> list[dict[str, Any]] | None:
        body, prepared = item.body, item.prepared
        if not isinstance(body, CompletionBody) or body.logprobs is None or not body.echo:
            return None
        with self.peft.scope([self.peft.name(item)]) as extra:
            return [self.prompt_logprobs(ids, body.logprobs, extra) for ids in prepared.prompt_ids]

    def respond(self, item: BatchItem, generated: list[list[int]], row_lp: list[list[tuple[float, Any, Any]]],
                prompt_lp: list[dict[str, Any]] | None) -> dict[str, Any]:
        body, prepared = item.body, item.prepared
        assert isinstance(body, SamplingBody) and self.text is not None
        # 1. Cut each row at its max_tokens, EOS or first stop string.
        cut = [self.text.cut_row(ids[:prepared.max_tokens], body.stop_list) for ids in generated]
        usage = {"prompt_tokens": sum(len(ids) for ids in prepared.prompt_ids),
                 "completion_tokens": sum(row.counted for row in cut)}
        k = body.top_logprob_count
        if isinstance(body, ChatBody):
            # 2. The OpenAI chat.completion, with logprobs of the kept tokens from the raw logits.
            choices = [{"index": i, "message": {"role": "assistant", "content": row.text, "refusal": None},
                        "logprobs": None if k is None else {"content": self.text.chat_logprobs(steps, row, k),
                                                            "refusal": None},
                        "finish_reason": row.finish_reason}
                       for i, (row, steps) in enumerate(zip(cut, row_lp, strict=True))]
            return chat_completion(self.spec.name, choices, fingerprint=self.fingerprint, job_id=item.ctx.job_id,
                                   **usage)
        assert isinstance(body, CompletionBody)
        # 2. Logprobs of the kept tokens, from the raw logits; echoed prompts' logprobs go first.
        prompts = [body.prompts[p] for p in prepared.row_prompt]
        logprobs: list[dict[str, Any] | None] = [None] * len(cut)
        if k is not None:
            logprobs = [self.text.completion_logprobs(steps, row, k) for steps, row in zip(row_lp, cut, strict=True)]
            if prompt_lp is not None:
                logprobs = [join_logprobs(prompt_lp[prepared.row_prompt[i]], lp, len(prompts[i]))  # type: ignore[arg-type]
                            for i, lp in enumerate(logprobs)]
        # 3. The OpenAI text_completion.
        choices = [
            {"text": (prompts[i] if body.echo else "") + row.text, "index": i,
             "logprobs": logprobs[i], "finish_reason": row.finish_reason}
            for i, row in enumerate(cut)
        ]
        return text_completion(self.spec.name, choices, job_id=item.ctx.job_id, **usage)

    def check_inputs(self, body: SamplingBody, prompt_ids: list[list[int]]) -> int:
        """Check the prompts and token bounds against the model; return each choice's max tokens
        (a chat that names none may fill the context, up to the registry's max_tokens)."""
        asked = body.token_limit
        field = "body.max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "body.max_tokens"
        if asked is not None and asked > self.options.max_tokens:
            raise InvalidRequest(f"{field.removeprefix('body.')} is {asked}; model {self.spec.name} allows at most "
                                 f"{self.options.max_tokens}", field)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        if any(token >= vocab for token in body.token_bias):
            raise InvalidRequest(f"logit_bias names a token id outside model {self.spec.name}'s vocabulary "
                                 f"of {vocab}", "body.logit_bias")
        limit = self.context_length
        chat = isinstance(body, ChatBody)
        prompt_field = "body.messages" if chat else "body.prompt"
        max_tokens = asked or self.options.max_tokens
        for i, ids in enumerate(prompt_ids):
            which = ("the templated conversation" if chat else
                     f"prompt {i}" if isinstance(getattr(body, "prompt", None), list) else "the prompt")
            if not ids:
                raise InvalidRequest(f"{which} encodes to no tokens", prompt_field)
            if limit is None:
                continue
            if len(ids) >= limit:
                raise InvalidRequest(
                    f"{which} is {len(ids)} tokens; model {self.spec.name} has a context of {limit} tokens",
                    prompt_field)
            if asked is None:
                max_tokens = min(max_tokens, limit - len(ids))
            elif len(ids) + asked > limit:
                raise InvalidRequest(
                    f"{which} ({len(ids)} tokens) plus {field.removeprefix('body.')} ({asked}) exceeds the "
                    f"context of {limit} tokens; use {field.removeprefix('body.')} <= {limit - len(ids)}", field)
        return max_tokens

    def prompt_logprobs(self, ids: list[int], k: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """One forward pass over the prompt: token t is scored by the logits at t - 1."""
        logits = self.model(input_ids=torch.tensor([ids], device=self.device), **(extra or {})).logits[0, :-1]
        lp = torch.log_softmax(logits.float(), dim=-1)
        values, indices = lp.topk(k, dim=-1)
        chosen = lp.gather(1, torch.tensor(ids[1:], device=self.device)[:, None]).squeeze(1).tolist()
        assert self.text is not None
        tops = [self.text.top(i, v) for i, v in zip(indices.tolist(), values.tolist(), strict=False)]
        return self.text.format_logprobs(ids, [None, *chosen], [None, *tops])
