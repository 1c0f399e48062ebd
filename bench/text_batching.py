"""Text batching: genq end to end against one `generate` per prompt and against batched `generate`, in one run.

The model is gpt2-small-shaped (124M parameters, bench/gpu_models.py's build_gpt2: random weights,
a real byte-level BPE tokenizer with GPT-2's 50257-token vocabulary), its EOS muted
(gpu_models.mute_token) so that every completion runs to max_tokens in every arm. It is built once
and cached under --models-dir. The same --requests completion bodies (prompts of 5-40 tokens from
workers.tiny.CORPUS, max_tokens 32, temperature 0.8, top_p 0.9, top_k 0, request i with seed i) go
through, one after another on this machine, never overlapping:
  a_naive_loop      in this process, one `model.generate(**tokenizer(prompt), do_sample=True, ...)`
                    per prompt, the model and tokenizer loaded as genq's text runner loads them. To
                    save time only --naive-sample requests (spread evenly over the set) are timed and
                    the time per request is extrapolated to all of them (`extrapolated` says so).
  b_batched         in this process, the requests in input order in batches of --batch-size (the
                    registry's max_batch_size), left-padded with an attention mask, one `generate` per
                    batch seeded with its first request's seed.
  c_genq            the genq API and ONE `genq worker --models gpt2-bench` (Postgres, Redis, file://
                    storage), warmed up by one job; the requests go in as one NDJSON batch to
                    /v1/completions; seconds = POST sent -> batch `completed`. Every request must
                    succeed; completion tokens are summed from the results' usage. The worker's
                    `genq_worker*` /metrics samples (its batching counters) are reported when present.
a and b run twice, before c and after it, and report their faster run (`runs` has both): other
work on a shared machine can only slow a run down, so the faster run is the better estimate, and the
stricter baseline for genq. Each arm reports seconds, requests/s, completion tokens and tokens/s;
tokens are counted as genq bills them (up to and including a first EOS). The ratios use tokens/s:
c_over_a (goal >= 4), c_over_b (goal >= 0.85) and b_over_a. Absolute rates depend on the machine
and its load: compare numbers only within one output.

Run: .venv/bin/python bench/text_batching.py [--requests 256] [--batch-size 32] [--naive-sample 32] [--out FILE]
Needs Redis (GENQ_BENCH_REDIS; flushes db GENQ_BENCH_TEXT_BATCHING_REDIS_DB, default 6, and refuses it
while other clients use it) and Postgres (GENQ_BENCH_PG_ADMIN; a temporary database is dropped at the
end). Runs of this and bench/image_batching.py take turns on one file lock; exit status 75: waited
too long for it. `--in-process SPEC.json` runs only arm b for gpu_check.py (see in_process_main).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, however this file is run
from common import (
    ROOT,
    Procs,
    bench_machine,
    measured_batch,
    naive_sample,
    run_on_services,
    start_genq,
    worker_flags,
)

sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import genq's own modules

REDIS_HOST = os.environ.get("GENQ_BENCH_REDIS", "redis://127.0.0.1:6379")
PG_ADMIN = os.environ.get("GENQ_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_DB = int(os.environ.get("GENQ_BENCH_TEXT_BATCHING_REDIS_DB", "6"))
BROKER = f"{REDIS_HOST}/{REDIS_DB}"
LOCK_FILE = Path(tempfile.gettempdir()) / "genq-batching-bench.lock"  # shared with image_batching.py
DB_PREFIX = "genq_textbatch_"
MODEL = "gpt2-bench"
URL = "/v1/completions"
GOALS = {"c_over_a": 4.0, "c_over_b": 0.85}
MODEL_STAMP = {"builder": "bench/gpu_models.py build_gpt2", "mute_eos": True, "seed": 0, "version": 1}


# --- the model and the requests --------------------------------------------------------------------

def cached_model(models_dir: Path, small: bool, shape: dict[str, int] | None = None) -> tuple[Path, bool]:
    """The gpt2-shaped model with EOS muted under models_dir (tiny with `small`, else of `shape`'s
    GPT2Config sizes, else gpt2-small), built unless an identical build is there; returns its
    directory and whether it was built now. Call it holding the lock."""
    from gpu_models import build_gpt2

    shape = None if small else shape
    name = "tiny" if small else f"{shape['n_layer']}x{shape['n_embd']}" if shape else "small"
    target = models_dir / f"gpt2-{name}-noeos"
    stamp = {**MODEL_STAMP, "small": small, **({"shape": shape} if shape else {})}
    stamp_file = target / "bench-model.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return target, False
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    build_gpt2(building, small=small, device="cpu", mute_eos=True, shape=shape)
    (building / "bench-model.json").write_text(json.dumps(stamp))
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)
    return target, True


def make_prompts(tokenizer: Any, n: int, shortest: int = 5, longest: int = 40, seed: int = 0) -> list[str]:
    """n prompts of running English text (workers.tiny.CORPUS), each cut to a length drawn evenly
    from shortest..longest tokens of this tokenizer."""
    from genq.workers.tiny import CORPUS

    words = CORPUS.split()
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        target, start = rng.randint(shortest, longest), rng.randrange(len(words))
        text, k = words[start], start + 1
        while len(tokenizer(text)["input_ids"]) < target:
            text, k = f"{text} {words[k % len(words)]}", k + 1
        prompt = tokenizer.decode(tokenizer(text)["input_ids"][:target]).strip()
        while len(tokenizer(prompt)["input_ids"]) < shortest:  # the cut may re-encode shorter
            prompt, k = f"{prompt} {words[k % len(words)]}", k + 1
        prompts.append(prompt)
    return prompts


def request_bodies(prompts: list[str], model: str, max_tokens: int, temperature: float, top_p: float) -> list[
        dict[str, Any]]:
    """The genq /v1/completions bodies; the in-process arms read the same fields."""
    return [{"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
             "seed": i} for i, p in enumerate(prompts)]


class TextModel:
    """The model and tokenizer loaded as genq's TextRunner loads them: pad = EOS, left padding,
    the registry dtype resolved for the device (auto: fp32 on the CPU, fp16 on CUDA)."""

    def __init__(self, source: Path, device: str = "auto", dtype: str = "auto") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from genq.workers.runners.device import resolve_device, resolve_dtype

        self.torch = torch
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=self.dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.end_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def _sampling(self, body: dict[str, Any]) -> dict[str, Any]:
        # What genq's runner passes for a sampling request with default penalties and no stop.
        # Missing fields take CompletionBody's defaults.
        return {"do_sample": True, "max_new_tokens": body.get("max_tokens", 16),
                "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
                "top_k": body.get("top_k", 0), "pad_token_id": self.tokenizer.pad_token_id}

    def billed(self, row: list[int]) -> int:
        """Completion tokens genq reports for a generated row: up to and including the first EOS."""
        return next((i + 1 for i, t in enumerate(row) if t in self.end_ids), len(row))

    def naive(self, bodies: list[dict[str, Any]]) -> tuple[float, int]:
        """One generate per request, unpadded, seeded with its seed; (seconds, completion tokens)."""
        tokens = 0
        started = time.perf_counter()
        with self.torch.inference_mode():
            for body in bodies:
                self.torch.manual_seed(body["seed"])
                enc = self.tokenizer(body["prompt"], return_tensors="pt").to(self.device)
                out = self.model.generate(**enc, **self._sampling(body))
                tokens += self.billed(out[0, enc["input_ids"].shape[1]:].tolist())
        return time.perf_counter() - started, tokens

    def batched(self, bodies: list[dict[str, Any]], batch_size: int) -> tuple[float, int]:
        """Batches of batch_size in the order given, one generate each, run to the batch's longest
        max_tokens; each row is billed up to its own max_tokens. (seconds, completion tokens)"""
        tokens = 0
        started = time.perf_counter()
        with self.torch.inference_mode():
            for at in range(0, len(bodies), batch_size):
                chunk = bodies[at:at + batch_size]
                self.torch.manual_seed(chunk[0]["seed"])
                enc = self.tokenizer([b["prompt"] for b in chunk], return_tensors="pt", padding=True).to(self.device)
                limits = [self._sampling(b)["max_new_tokens"] for b in chunk]
                out = self.model.generate(**enc, **{**self._sampling(chunk[0]), "max_new_tokens": max(limits)})
                rows = out[:, enc["input_ids"].shape[1]:].tolist()
                tokens += sum(self.billed(row[:limit]) for row, limit in zip(rows, limits, strict=True))
        return time.perf_counter() - started, tokens

    def warm_up(self, bodies: list[dict[str, Any]], batch_size: int) -> None:
        """One short batch of full width and one single prompt: first-call costs are not timed."""
        short = [{**b, "max_tokens": 2} for b in bodies[:batch_size]]
        self.batched(short, batch_size)
        self.naive(short[:1])


def rates(seconds: float, requests: int, tokens: int) -> dict[str, Any]:
    return {"requests": requests, "completion_tokens": tokens, "seconds": round(seconds, 3),
            "requests_per_s": round(requests / seconds, 3), "tokens_per_s": round(tokens / seconds, 2)}


# --- arms --------------------------------------------------------------------------------------------

def arm_naive(runs: list[tuple[float, int]], timed: int, requests: int) -> dict[str, Any]:
    """Arm a from its runs over `timed` requests (seconds, tokens), the faster extrapolated to all."""
    seconds, tokens = min(runs)
    scale = requests / timed
    return {**rates(seconds * scale, requests, round(tokens * scale)), "extrapolated": scale != 1,
            "requests_timed": timed, "seconds_timed": round(seconds, 3), "completion_tokens_timed": tokens,
            "runs": [rates(s, timed, t) for s, t in runs]}


def arm_batched(runs: list[tuple[float, int]], requests: int, batch_size: int) -> dict[str, Any]:
    """Arm b from its runs (seconds, tokens): the faster one."""
    seconds, tokens = min(runs)
    return {**rates(seconds, requests, tokens), "batch_size": batch_size, "batches": -(-requests // batch_size),
            "runs": [rates(s, requests, t) for s, t in runs]}


def arm_genq(procs: Procs, tmp: Path, db_url: str, registry: Path, bodies: list[dict[str, Any]],
             args: argparse.Namespace) -> dict[str, Any]:
    client, stack = start_genq(procs, tmp, db_url=db_url, registry=registry, broker_url=BROKER, model=MODEL, url=URL,
                               warm_up={**bodies[0], "seed": 10**9}, flags=worker_flags(args))
    got, report = measured_batch(client, procs, URL, bodies, log_file=tmp / "worker.log")
    client.close()
    tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in got["results"])
    return {**rates(got["seconds"], len(bodies), tokens), **report, "stack": stack}


def machine() -> dict[str, Any]:
    return bench_machine(REDIS_HOST, PG_ADMIN, "transformers", "tokenizers", "celery", "sqlalchemy")


def ratios(a: dict[str, Any], b: dict[str, Any], c: dict[str, Any], unit: str) -> dict[str, Any]:
    values = {"c_over_a": c[unit] / a[unit], "c_over_b": c[unit] / b[unit], "b_over_a": b[unit] / a[unit]}
    return {k: round(v, 4) for k, v in values.items()}


def measure(args: argparse.Namespace, tmp: Path, admin: Any, db_name: str) -> dict[str, Any]:
    from genq.workers.tiny import write_registry

    facts = machine()  # before anything of ours runs: the load average is the machine's own
    source, built = cached_model(args.models_dir, args.small)
    registry = write_registry(tmp, {MODEL: {"kind": "text", "source": str(source), "max_batch_size": args.batch_size,
                                            "max_tokens": max(256, args.max_tokens)}})
    lm = TextModel(source)
    prompts = make_prompts(lm.tokenizer, args.requests)
    bodies = request_bodies(prompts, MODEL, args.max_tokens, args.temperature, args.top_p)
    lengths = [len(lm.tokenizer(p)["input_ids"]) for p in prompts]
    result: dict[str, Any] = {
        "model": {"name": MODEL, "shape": "gpt2 tiny (2 layers, 64 wide)" if args.small else "gpt2-small",
                  "parameters": lm.parameters, "dtype": str(lm.dtype).removeprefix("torch."), "device": lm.device,
                  "eos_muted": True, "cached_at": str(source), "built_now": built},
        "requests": args.requests, "max_batch_size": args.batch_size,
        "sampling": {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                     "top_k": 0, "seeds": "request i: seed i (b: each batch its first request's seed)"},
        "prompt_tokens": {"min": min(lengths), "mean": round(statistics.mean(lengths), 1), "max": max(lengths),
                          "total": sum(lengths)},
        "machine": facts,
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
    # 3. b and a again, after the stack is gone.
    b_runs.append(lm.batched(bodies, args.batch_size))
    a_runs.append(lm.naive(timed))
    a, b = arm_naive(a_runs, len(timed), len(bodies)), arm_batched(b_runs, len(bodies), args.batch_size)
    result.update(a_naive_loop=a, b_batched=b, c_genq=c)
    result["ratios"] = {"unit": "tokens_per_s", **ratios(a, b, c, "tokens_per_s")}
    result["ratios_requests_per_s"] = ratios(a, b, c, "requests_per_s")
    result["goals"] = {k: {"goal": g, "value": result["ratios"][k], "met": result["ratios"][k] >= g}
                       for k, g in GOALS.items()}
    result["same_tokens_per_request"] = len({round(arm["completion_tokens"] / arm["requests"], 6)
                                             for arm in (a, b, c)}) == 1
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return result


# --- gpu_check's in-process baseline -----------------------------------------------------------------

def in_process_main(spec_file: Path) -> None:
    """Arm b alone, for bench/gpu_check.py: SPEC is {"source", "device", "dtype", "batch_size",
    "bodies"} (the bodies gpu_check sends to genq). Prints the arm's JSON after one warm-up."""
    spec = json.loads(spec_file.read_text())
    started = time.perf_counter()
    lm = TextModel(Path(spec["source"]), spec.get("device", "auto"), spec.get("dtype", "auto"))
    load_s = time.perf_counter() - started
    bodies, size = spec["bodies"], int(spec["batch_size"])
    lm.warm_up(bodies, size)
    result = arm_batched([lm.batched(bodies, size)], len(bodies), size)
    result.update(load_s=round(load_s, 2), device=lm.device, dtype=str(lm.dtype).removeprefix("torch."))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=256, help="completion requests in every arm")
    parser.add_argument("--batch-size", type=int, default=32, help="max_batch_size in the registry; b's batch")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--naive-sample", type=int, default=32,
                        help="requests a times, extrapolated to --requests (0: all of them)")
    parser.add_argument("--small", action="store_true", help="a 2-layer, 64-wide gpt2 (same tokenizer), for tests")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "var" / "bench-models",
                        help="where the model is built once and reused")
    parser.add_argument("--worker-concurrency", type=int, default=None,
                        help="pass --concurrency to the worker (default: the worker's own default)")
    parser.add_argument("--worker-log-level", default="info",
                        help="the worker's log level (debug also logs each batch's size)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--lock-wait", type=float, default=900, help="seconds to wait for another run")
    parser.add_argument("--in-process", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.in_process:
        return in_process_main(args.in_process)
    if min(args.requests, args.batch_size, args.max_tokens) < 1:
        parser.error("--requests, --batch-size and --max-tokens must be at least 1")
    run_on_services(lock_file=LOCK_FILE, lock_wait=args.lock_wait, redis_host=REDIS_HOST, redis_db=REDIS_DB,
                    redis_env_hint="GENQ_BENCH_TEXT_BATCHING_REDIS_DB", pg_admin=PG_ADMIN, db_prefix=DB_PREFIX,
                    measure=lambda tmp, admin, db_name: measure(args, tmp, admin, db_name), out=args.out)


if __name__ == "__main__":
    main()
