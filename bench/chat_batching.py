"""Chat batching: genq's /v1/chat/completions end to end against in-process batched `generate`, in one run.

The model is a gpt2-small-shaped chat model (124M parameters, bench/gpu_models.py's build_gpt2 with
chat=True: random weights, GPT-2's 50257-token BPE plus ChatML's <|im_start|> and <|im_end|>, genq's
CHAT_TEMPLATE), its EOS <|im_end|> muted so that every choice runs to its max tokens in every arm.
It is built once and cached under --models-dir. The workload (seeded, the same in every arm):
  conversations  1-6 messages, evenly: odd counts are user/assistant turns ending with a user
                 turn, even counts the same after a system message; the text is consecutive
                 sentences of workers.tiny.CORPUS (system 1, user 1-2, assistant 1-3 sentences)
  parameters     max_completion_tokens 16, 32 or 64 evenly (--token-mix); a quarter greedy
                 (temperature 0), the rest temperature 0.7-1.0 with top_p 1, 0.95 or 0.9; 15% of
                 the sampled requests n=2; top_k 0; request i has seed i
The requests go through, one after another on this machine, never overlapping:
  a_naive_loop   in this process, one `generate` per request with its own parameters (greedy or
                 sampled, num_return_sequences=n). Only --naive-sample requests (spread evenly) are
                 timed, and the time extrapolated by tokens to all of them (`extrapolated` says so).
  b_batched      in this process, each request's n rows packed into batches of --batch-size rows
                 as genq's batcher packs them (first fit in input order, no sorting), left-padded,
                 one `generate` per batch up to its longest row's max tokens (as genq runs a batch;
                 a row is billed to its own limit). Stock `generate` takes one sampling setting per
                 call: each batch samples every row with its first sampled request's temperature
                 and top_p and seed (greedy only when all its rows are). Per-row sampling is what
                 genq adds, and its cost is part of what c_over_b measures.
  c_genq         the genq API and ONE `genq worker` (Postgres, Redis, file:// storage), warmed up by
                 one job; the requests go in as one NDJSON batch to /v1/chat/completions; seconds =
                 POST sent -> batch `completed`. Every request must succeed; tokens come from usage.
Every arm renders each conversation as genq's TextRunner does (ChatBody, apply_chat_template with
add_generation_prompt, tokenized without added special tokens), inside its timing. a and b run
before c and after it and report their faster run (`runs` has both). Each arm reports seconds,
requests/s, completion tokens and tokens/s (billed as genq bills them); the ratios use tokens/s:
c_over_b (goal >= 0.85), c_over_a, b_over_a. `chat_overhead` is the in-process cost of what only a
chat request needs (validating its ChatBody, once in the API and once in the worker, and rendering
the template) as a share of c's seconds. b's `prefill_slots` and `decode_slots` say how much of
its batches' work was real: a batch pads its prompts to the longest and runs every row to its
longest max tokens, which costs both batched arms alike (genq's worker forms the same batches).

Run: .venv/bin/python bench/chat_batching.py [--requests 96] [--batch-size 16] [--naive-sample 16] [--threads N]
     [--out FILE]
On a CPU that other work shares, --threads 1 (for this process and the worker alike) keeps torch's
thread team from spinning against that work: with 2 threads on 2 busy cores, one generate ran 10x
slower than with 1.
Needs Redis (GENQ_BENCH_REDIS; flushes db GENQ_BENCH_CHAT_BATCHING_REDIS_DB, default 9, and refuses it
while other clients use it) and Postgres (GENQ_BENCH_PG_ADMIN; a temporary database is dropped at the
end). Runs of this, text_batching.py and image_batching.py take turns on one file lock; exit status
75: waited too long for it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, however this file is run
from common import (
    ROOT,
    Procs,
    measured_batch,
    naive_sample,
    run_on_services,
    start_genq,
    worker_flags,
)
from text_batching import LOCK_FILE, PG_ADMIN, REDIS_HOST, TextModel, machine, rates

sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import genq's own modules

REDIS_DB = int(os.environ.get("GENQ_BENCH_CHAT_BATCHING_REDIS_DB", "9"))
BROKER = f"{REDIS_HOST}/{REDIS_DB}"
DB_PREFIX = "genq_chatbatch_"
MODEL = "gpt2-chat-bench"
URL = "/v1/chat/completions"
GOALS = {"c_over_b": 0.85}
MODEL_STAMP = {"builder": "bench/gpu_models.py build_gpt2 chat", "mute_eos": True, "seed": 0, "version": 1}


# --- the model and the requests --------------------------------------------------------------------

def cached_model(models_dir: Path, small: bool) -> tuple[Path, bool]:
    """The gpt2-shaped chat model with EOS muted under models_dir, built unless an identical build
    is there; returns its directory and whether it was built now. Call it holding the lock."""
    from gpu_models import build_gpt2

    target = models_dir / ("gpt2-chat-tiny-noeos" if small else "gpt2-chat-small-noeos")
    stamp = {**MODEL_STAMP, "small": small}
    stamp_file = target / "bench-model.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return target, False
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    build_gpt2(building, small=small, device="cpu", mute_eos=True, chat=True)
    (building / "bench-model.json").write_text(json.dumps(stamp))
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)
    return target, True


def conversation(rng: random.Random, sentences: list[str]) -> list[dict[str, str]]:
    """1-6 messages: user/assistant turns ending with a user turn, after a system message when even."""
    count = rng.randint(1, 6)
    roles = ["system"] * (count % 2 == 0) + ["user", "assistant"] * 3
    longest = {"system": 1, "user": 2, "assistant": 3}
    messages = []
    for role in roles[:count]:
        start, length = rng.randrange(len(sentences)), rng.randint(1, longest[role])
        text = " ".join(sentences[(start + k) % len(sentences)] for k in range(length))
        messages.append({"role": role, "content": text})
    return messages


def request_bodies(n: int, model: str, token_mix: list[int], seed: int = 0) -> list[dict[str, Any]]:
    """The /v1/chat/completions bodies (the mix in the module docstring); every arm reads these."""
    from genq.workers.tiny import CORPUS

    sentences = re.split(r"(?<=[.?!])\s+", " ".join(CORPUS.split()))
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        greedy = rng.random() < 0.25
        body = {"model": model, "messages": conversation(rng, sentences),
                "max_completion_tokens": rng.choice(token_mix),
                "temperature": 0.0 if greedy else round(rng.uniform(0.7, 1.0), 2),
                "top_p": 1.0 if greedy else rng.choice((1.0, 0.95, 0.9)),
                "n": 2 if not greedy and rng.random() < 0.15 else 1, "seed": i}
        bodies.append(body)
    return bodies


def expected_tokens(bodies: list[dict[str, Any]]) -> int:
    """What the requests bill with EOS muted: every choice runs to its max tokens."""
    return sum(b["max_completion_tokens"] * b["n"] for b in bodies)


def pack(bodies: list[dict[str, Any]], limit: int) -> list[list[dict[str, Any]]]:
    """Batches of at most `limit` rows (n each), as genq's Batcher._gather fills them: the oldest
    request first, then each later one that still fits."""
    waiting, batches = list(bodies), []
    while waiting:
        group, rows = [waiting[0]], waiting[0]["n"]
        for body in waiting[1:]:
            if rows >= limit:
                break
            if rows + body["n"] <= limit:
                group.append(body)
                rows += body["n"]
        batches.append(group)
        waiting = [b for b in waiting if all(b is not g for g in group)]
    return batches


class ChatModel(TextModel):
    """TextModel (loaded as genq's TextRunner loads it), fed conversations as genq feeds them."""

    def render(self, body: dict[str, Any]) -> str:
        from genq.shared.chat import ChatBody

        messages = ChatBody.model_validate(body).template_messages()
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str)  # tokenize=False: the rendered conversation
        return text

    def encode(self, body: dict[str, Any]) -> list[int]:
        """The templated prompt's ids, as TextRunner.encode makes them."""
        ids: list[int] = self.tokenizer(self.render(body), add_special_tokens=False)["input_ids"]
        return ids

    def _decoding(self, body: dict[str, Any]) -> dict[str, Any]:
        if body["temperature"] == 0:
            return {"do_sample": False, "pad_token_id": self.tokenizer.pad_token_id}
        return {"do_sample": True, "temperature": body["temperature"], "top_p": body["top_p"], "top_k": 0,
                "pad_token_id": self.tokenizer.pad_token_id}

    def naive(self, bodies: list[dict[str, Any]]) -> tuple[float, int]:
        """One generate per request, unpadded, its own parameters and seed; (seconds, tokens)."""
        tokens = 0
        started = time.perf_counter()
        with self.torch.inference_mode():
            for body in bodies:
                self.torch.manual_seed(body["seed"])
                ids = self.torch.tensor([self.encode(body)], device=self.device)
                out = self.model.generate(input_ids=ids, attention_mask=self.torch.ones_like(ids),
                                          max_new_tokens=body["max_completion_tokens"],
                                          num_return_sequences=body["n"], **self._decoding(body))
                tokens += sum(map(self.billed, out[:, ids.shape[1]:].tolist()))
        return time.perf_counter() - started, tokens

    def batched(self, bodies: list[dict[str, Any]], batch_size: int) -> tuple[float, int]:
        """pack()ed batches, one left-padded generate each; (seconds, tokens)."""
        tokens = 0
        started = time.perf_counter()
        with self.torch.inference_mode():
            for batch in pack(bodies, batch_size):
                ids, limits = [], []
                for body in batch:
                    ids += [self.encode(body)] * body["n"]
                    limits += [body["max_completion_tokens"]] * body["n"]
                enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
                first = next((b for b in batch if b["temperature"] > 0), batch[0])
                self.torch.manual_seed(first["seed"])
                out = self.model.generate(**enc, max_new_tokens=max(limits), **self._decoding(first))
                rows = out[:, enc["input_ids"].shape[1]:].tolist()
                tokens += sum(self.billed(row[:limit]) for row, limit in zip(rows, limits, strict=True))
        return time.perf_counter() - started, tokens

    def warm_up(self, bodies: list[dict[str, Any]], batch_size: int) -> None:
        """One short batch of full width and one single request: first-call costs are not timed."""
        short = [{**b, "max_completion_tokens": 2} for b in bodies[:batch_size]]
        self.batched(short, batch_size)
        self.naive(short[:1])

    def chat_costs(self, bodies: list[dict[str, Any]], repeats: int = 3) -> dict[str, float]:
        """Seconds (best of `repeats`) to validate every body as a ChatBody, to render every
        conversation with the chat template, and to tokenize the rendered text."""
        from genq.shared.chat import ChatBody

        best = {"validate_s": float("inf"), "render_s": float("inf"), "tokenize_s": float("inf")}
        for _ in range(repeats):
            t0 = time.perf_counter()
            parsed = [ChatBody.model_validate(b).template_messages() for b in bodies]
            t1 = time.perf_counter()
            texts = [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                     for m in parsed]
            t2 = time.perf_counter()
            for text in texts:
                self.tokenizer(text, add_special_tokens=False)
            t3 = time.perf_counter()
            for key, seconds in (("validate_s", t1 - t0), ("render_s", t2 - t1), ("tokenize_s", t3 - t2)):
                best[key] = min(best[key], seconds)
        return best


# --- arms --------------------------------------------------------------------------------------------

def arm_naive(runs: list[tuple[float, int]], timed: list[dict[str, Any]], bodies: list[dict[str, Any]]) -> dict[
        str, Any]:
    """Arm a from its runs over `timed` (seconds, tokens): the faster, extrapolated to all the
    requests by their share of the billed tokens (max tokens differ from request to request)."""
    seconds, tokens = min(runs)
    scale = expected_tokens(bodies) / expected_tokens(timed)
    return {**rates(seconds * scale, len(bodies), round(tokens * scale)), "extrapolated": len(timed) != len(bodies),
            "requests_timed": len(timed), "seconds_timed": round(seconds, 3), "completion_tokens_timed": tokens,
            "runs": [rates(s, len(timed), t) for s, t in runs]}


def arm_batched(runs: list[tuple[float, int]], bodies: list[dict[str, Any]], batch_size: int,
                lengths: list[int]) -> dict[str, Any]:
    """Arm b from its runs (seconds, tokens): the faster one; with how much of its batches' work
    was real, given each request's prompt length."""
    seconds, tokens = min(runs)
    batches = pack(bodies, batch_size)
    return {**rates(seconds, len(bodies), tokens), "batch_size": batch_size, "batches": len(batches),
            "rows": sum(b["n"] for b in bodies), **slots(bodies, batches, lengths),
            "runs": [rates(s, len(bodies), t) for s, t in runs]}


def slots(bodies: list[dict[str, Any]], batches: list[list[dict[str, Any]]], lengths: list[int]) -> dict[str, Any]:
    """Real against computed row-positions of the batches, in the prompts (left padding to the
    longest prompt) and in generation (every row runs to the batch's longest max tokens)."""
    length = {id(b): n for b, n in zip(bodies, lengths, strict=True)}
    rows = [sum(b["n"] for b in batch) for batch in batches]
    prompt_real = sum(length[id(b)] * b["n"] for b in bodies)
    prompt_padded = sum(r * max(length[id(b)] for b in batch) for r, batch in zip(rows, batches, strict=True))
    decode = sum(r * max(b["max_completion_tokens"] for b in batch) for r, batch in zip(rows, batches, strict=True))
    return {"prefill_slots": {"real": prompt_real, "computed": prompt_padded,
                              "real_share": round(prompt_real / prompt_padded, 4)},
            "decode_slots": {"billed": expected_tokens(bodies), "computed": decode,
                             "billed_share": round(expected_tokens(bodies) / decode, 4)}}


def arm_genq(procs: Procs, tmp: Path, db_url: str, registry: Path, bodies: list[dict[str, Any]],
             args: argparse.Namespace) -> dict[str, Any]:
    client, stack = start_genq(procs, tmp, db_url=db_url, registry=registry, broker_url=BROKER, model=MODEL, url=URL,
                               warm_up={**bodies[0], "seed": 10**9}, flags=worker_flags(args))
    got, report = measured_batch(client, procs, URL, bodies, log_file=tmp / "worker.log")
    client.close()
    answers = [line["response"]["body"] for line in got["results"]]
    short = [i for i, (a, b) in enumerate(zip(answers, bodies, strict=True)) if len(a["choices"]) != b["n"]]
    if short:
        raise RuntimeError(f"requests {short[:10]} answered with fewer choices than their n")
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    return {**rates(got["seconds"], len(bodies), tokens), **report,
            "prompt_tokens": sum(a["usage"]["prompt_tokens"] for a in answers),
            "finish_reasons": {r: sum(c["finish_reason"] == r for a in answers for c in a["choices"])
                               for r in ("length", "stop")},
            "stack": {**stack, "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "torch's default")}}


def ratios(a: dict[str, Any], b: dict[str, Any], c: dict[str, Any], unit: str) -> dict[str, Any]:
    values = {"c_over_b": c[unit] / b[unit], "c_over_a": c[unit] / a[unit], "b_over_a": b[unit] / a[unit]}
    return {k: round(v, 4) for k, v in values.items()}


def workload(bodies: list[dict[str, Any]], lengths: list[int], token_mix: list[int]) -> dict[str, Any]:
    """What the requests are: messages, parameters and templated prompt lengths."""
    count = lambda values: {str(v): values.count(v) for v in sorted(set(values))}  # noqa: E731
    return {"requests": len(bodies), "rows": sum(b["n"] for b in bodies),
            "messages": count([len(b["messages"]) for b in bodies]),
            "max_completion_tokens": count([b["max_completion_tokens"] for b in bodies]), "token_mix": token_mix,
            "greedy": sum(b["temperature"] == 0 for b in bodies), "n": count([b["n"] for b in bodies]),
            "top_p": count([b["top_p"] for b in bodies]), "top_k": 0, "seeds": "request i: seed i",
            "prompt_tokens": {"min": min(lengths), "mean": round(statistics.mean(lengths), 1), "max": max(lengths),
                              "total": sum(lengths)},
            "completion_tokens_billed": expected_tokens(bodies)}


def measure(args: argparse.Namespace, tmp: Path, admin: Any, db_name: str) -> dict[str, Any]:
    from genq.workers.tiny import write_registry

    facts = machine()  # before anything of ours runs: the load average is the machine's own
    source, built = cached_model(args.models_dir, args.small)
    registry = write_registry(tmp, {MODEL: {"kind": "text", "source": str(source), "max_batch_size": args.batch_size,
                                            "max_tokens": max(256, *args.token_mix)}})
    lm = ChatModel(source)
    bodies = request_bodies(args.requests, MODEL, args.token_mix)
    lengths = [len(lm.encode(b)) for b in bodies]
    result: dict[str, Any] = {
        "model": {"name": MODEL, "shape": "gpt2 tiny (2 layers, 64 wide)" if args.small else "gpt2-small",
                  "parameters": lm.parameters, "dtype": str(lm.dtype).removeprefix("torch."), "device": lm.device,
                  "chat_template": "ChatML (genq.workers.tiny.CHAT_TEMPLATE)", "eos": lm.tokenizer.eos_token,
                  "eos_muted": True, "cached_at": str(source), "built_now": built},
        "max_batch_size": args.batch_size, "workload": workload(bodies, lengths, args.token_mix), "machine": facts,
    }
    # 1. a and b in this process, before anything else of ours runs.
    lm.warm_up(bodies, args.batch_size)
    timed = naive_sample(bodies, args.naive_sample)
    a_runs, b_runs = [lm.naive(timed)], [lm.batched(bodies, args.batch_size)]
    # 2. genq end to end, with this process idle apart from polling.
    with Procs(tmp) as procs:  # on an error, the logs' tails to stderr; then the processes are stopped
        admin.execute(f'CREATE DATABASE "{db_name}"')
        base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        c = arm_genq(procs, tmp, f"{base}/{db_name}", registry, bodies, args)
    # 3. b and a again, after the stack is gone; then what only chat requests cost, in this process.
    b_runs.append(lm.batched(bodies, args.batch_size))
    a_runs.append(lm.naive(timed))
    costs = lm.chat_costs(bodies)
    a, b = arm_naive(a_runs, timed, bodies), arm_batched(b_runs, bodies, args.batch_size, lengths)
    result.update(a_naive_loop=a, b_batched=b, c_genq=c)
    result["ratios"] = {"unit": "tokens_per_s", **ratios(a, b, c, "tokens_per_s")}
    result["ratios_requests_per_s"] = ratios(a, b, c, "requests_per_s")
    result["goals"] = {k: {"goal": g, "value": result["ratios"][k], "met": result["ratios"][k] >= g}
                       for k, g in GOALS.items()}
    chat_s = 2 * costs["validate_s"] + costs["render_s"]
    result["chat_overhead"] = {**{k: round(v, 6) for k, v in costs.items()},
                               "per_request_ms": round(1000 * chat_s / len(bodies), 3),
                               "share_of_c_seconds": round(chat_s / c["seconds"], 5)}
    result["same_tokens_per_request"] = len({round(arm["completion_tokens"] / arm["requests"], 6)
                                             for arm in (a, b, c)}) == 1
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=96, help="chat requests in every arm")
    parser.add_argument("--batch-size", type=int, default=16, help="max_batch_size (rows) in the registry; b's batch")
    parser.add_argument("--token-mix", type=lambda s: [int(v) for v in s.split(",")], default=[16, 32, 64],
                        help="max_completion_tokens drawn evenly from these (comma-separated)")
    parser.add_argument("--naive-sample", type=int, default=16,
                        help="requests a times, extrapolated to --requests (0: all of them)")
    parser.add_argument("--small", action="store_true", help="a 2-layer, 64-wide gpt2 (same tokenizer), for tests")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "var" / "bench-models",
                        help="where the model is built once and reused")
    parser.add_argument("--worker-concurrency", type=int, default=None,
                        help="pass --concurrency to the worker (default: the worker's own default)")
    parser.add_argument("--worker-log-level", default="info",
                        help="the worker's log level (debug also logs each batch's size)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for this process and the worker alike (default: torch's own)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--lock-wait", type=float, default=900, help="seconds to wait for another run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.threads is not None:  # before torch is imported here; the worker inherits it
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    if min(args.requests, args.batch_size, *args.token_mix) < 1:
        parser.error("--requests, --batch-size and --token-mix must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2: some requests have n=2")
    run_on_services(lock_file=LOCK_FILE, lock_wait=args.lock_wait, redis_host=REDIS_HOST, redis_db=REDIS_DB,
                    redis_env_hint="GENQ_BENCH_CHAT_BATCHING_REDIS_DB", pg_admin=PG_ADMIN, db_prefix=DB_PREFIX,
                    measure=lambda tmp, admin, db_name: measure(args, tmp, admin, db_name), out=args.out)


if __name__ == "__main__":
    main()
