"""Text generation with a Hugging Face causal LM: OpenAI `/v1/completions` and
`/v1/chat/completions` requests, batched together at the iteration level.

A chat request's prompt is its conversation rendered by the model's own chat template
(`apply_chat_template` with `add_generation_prompt`; the registry's `chat_template` replaces the
tokenizer's), tokenized as the template wrote it; from there on it is one more prompt.

Each prompt x n is one row. The worker's batcher hands `serve` the first jobs and lets it pull
more while it runs: text_engine.py keeps up to `max_batch_size` rows decoding in one KV cache,
prefills joining rows in chunks, and hands a job's result back as soon as its rows end. Rows differ
freely in sampling parameters: sampling.py applies each row's penalties, logit bias, grammar,
temperature, top-k and top-p and draws the row's token from the row's own random generator. A row
ends at its own max_tokens, an end token, one of its stop strings, or when its job is cancelled.

Reproducibility: row i of a request with seed s draws from a generator seeded with s + i, so its
random stream does not depend on what shares its batch or when it joined, and choice i equals the
n=1 request with seed s + i. Greedy rows (temperature 0) take the argmax. Either way a row's logits
can move in the last float bits with the batch's shape (padding, kernel choice), so a near-tie can
in rare cases go the other way; on the tiny test models greedy and seeded text were identical alone,
in mixed batches and joining running ones (tests/unit/test_text_batching.py, test_text_engine.py).

LoRA adapters (peft, text_adapters.py) load onto the resident model without reloading it and stay
in an LRU of `max_adapters`. Rows of different adapters, or none, decode together as one peft
mixed-adapter batch; a job whose adapter would evict one that running rows use waits for them.
Cutting rows and formatting logprobs live in text_output.py; there `text_offset` counts from the
start of the returned `text` (so with `echo` the prompt starts at 0).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from genq.shared.chat import ChatBody
from genq.shared.options import TextOptions
from genq.shared.registry import ModelSpec
from genq.shared.schemas import CompletionBody, SamplingBody
from genq.workers.runners.base import (
    BatchItem,
    Deferred,
    Deliver,
    InvalidRequest,
    LocalAdapter,
    Outcome,
    Pull,
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
from genq.workers.runners.sampling import RowParams, RowState, StepSampler, row_params
from genq.workers.runners.text_adapters import BASE_ADAPTER, PeftAdapters
from genq.workers.runners.text_engine import Engine, EngineHooks, EngineJob, Sequence
from genq.workers.runners.text_output import RowStream, TokenText, join_logprobs


@dataclass
class _Prepared:
    prompt_ids: list[list[int]]
    max_tokens: int  # what each choice may generate
    rows: list[RowParams] = field(default_factory=list)
    row_prompt: list[int] = field(default_factory=list)  # the prompt index of each row


ADAPTER_PATIENCE_S = 5.0  # how long a job waits behind jobs whose adapter is loaded, at most


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
        """Serve exactly these items together (the batcher's retry path, tests and direct use)."""
        outcomes: dict[int, Outcome] = {}
        self.serve(items, lambda choose: [], lambda item, outcome: outcomes.__setitem__(id(item), outcome))
        return [outcomes[id(item)] for item in items]

    def serve(self, items: list[BatchItem], pull: Pull, deliver: Deliver) -> None:
        """Continuous batching (text_engine.py): these items, then whatever `pull` gives as rows free up."""
        with self._lock, torch.inference_mode():
            if self.model is None:
                self.load()
            hooks = EngineHooks(
                forward=lambda **inputs: self.model(**inputs), pad_id=self.tokenizer.pad_token_id, device=self.device,
                max_rows=self.options.max_batch_size, prefill_tokens=self.options.prefill_chunk_tokens,
                sampler=lambda rows: StepSampler(rows, self.device, self.formats),
                start=self._start, result=self._result, deliver=deliver, pull=pull, choose=self._choose,
                scope=self.peft.scope, is_end=lambda token: token in self.text.end_ids,  # type: ignore[union-attr]
                stop_hit=self._stop_hit)
            Engine(hooks).run(items)

    def _choose(self, offered: list[tuple[BatchItem, float]], room: int, in_use: set[str]) -> list[BatchItem]:
        """The waiting jobs to admit into `room` free rows: oldest first, but those whose adapter is
        loaded (or none) before those that would load one, unless they waited ADAPTER_PATIENCE_S; and
        none whose adapter would evict one that running rows use."""
        planned, loaded = set(in_use), set(self.adapters.ids())

        def later(entry: tuple[BatchItem, float]) -> bool:
            name = self.peft.name(entry[0])
            return name not in planned and name not in loaded and name != BASE_ADAPTER \
                and entry[1] < ADAPTER_PATIENCE_S

        taken = []
        for item, _ in sorted(offered, key=later):  # stable: oldest first within each group
            rows = len(item.prepared.rows)
            if rows > room and not (room == self.options.max_batch_size and not taken):
                continue  # (a job larger than the batch runs alone)
            if self._admissible(item, planned):
                taken.append(item)
                room -= rows
        return taken

    def _admissible(self, item: BatchItem, planned: set[str]) -> bool:
        """Whether an item may join rows using the `planned` adapters without evicting one of them."""
        name = self.peft.name(item)
        if name == BASE_ADAPTER or name in planned:
            return True
        if len(planned - {BASE_ADAPTER}) >= self.options.max_adapters:
            return False
        planned.add(name)
        return True

    def _start(self, item: BatchItem, in_use: set[str]) -> EngineJob:
        """An admitted item's rows (its adapter loaded first: a load failure fails it alone)."""
        failure = self.peft.ensure([item], in_use).get(0)
        if failure is not None:
            raise failure
        prepared = item.prepared
        job = EngineJob(item, self.peft.name(item), limit=max(1, prepared.max_tokens))
        assert self.text is not None
        for row, (params, p) in enumerate(zip(prepared.rows, prepared.row_prompt, strict=True)):
            seq = Sequence(job, row, RowState(params, prepared.prompt_ids[p]))
            if item.ctx.emit is not None:
                seq.stream = RowStream(self.text, params.stops, params.max_tokens)
            if params.stops:
                seq.stop_window = max(len(stop) for stop in params.stops) + 2
            job.rows.append(seq)
        return job

    def _stop_hit(self, row: Sequence) -> bool:
        assert self.text is not None
        tail = self.text.decode(row.state.generated[-row.stop_window:])
        return any(stop in tail for stop in row.state.params.stops)

    def _result(self, job: EngineJob) -> Outcome:
        """A finished job's outcome: cutting, decoding and the response are left to its own thread."""
        try:
            prompt_lp = self.echo_logprobs(job.item)  # needs the model: here, on the device thread
        except Exception as exc:  # noqa: BLE001 - this request's failure only
            return exc
        rows = [s.state for s in job.rows]
        return Deferred(partial(self.respond, job.item, [r.generated for r in rows], [r.records for r in rows],
                                prompt_lp))

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
