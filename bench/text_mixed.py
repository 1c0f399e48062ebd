"""Mixed-length text: genq end to end against one `generate` per prompt, static batches (in input
order and sorted by max_tokens) and transformers' continuous batching, in one run (issue 14, part 5).

The model is gpt2-shaped, 6 layers 512 wide (bench/gpu_models.py's build_gpt2 with random weights
and a 50257-token byte-level BPE), built once and cached under --models-dir. Its EOS is muted
(gpu_models.mute_token), so every completion runs to its own max_tokens in every arm: with random
weights EOS comes 1 step in 50257 at random, and the arms (continuous batching draws from one
generator for all requests) would stop different rows early and do different work. Tokens are still
counted as genq bills them, up to and including a first EOS.

The workload is deterministic from --seed: --requests completion bodies, prompts of 5-60 tokens from
workers.tiny.CORPUS, max_tokens 16 / 64 / 192 (--max-tokens) for 60 / 25 / 15 % of them (exact shares,
shuffled; --uniform N gives all of them max_tokens N), temperature 0.8, top_p 0.9, top_k 0, request i seed i.
The arms run one after another, never overlapping:
  a_naive_loop        in this process, one `model.generate` per prompt (text_batching.TextModel, loaded
                      as genq's text runner loads the model); --naive-sample requests spread evenly
                      over the set are timed and extrapolated to all (`extrapolated` says so).
  b_static_input      batches of --batch-size in input order, left-padded, one `generate` each run to
                      the batch's longest max_tokens; each row is billed up to its own max_tokens, so
                      `useful_share` = billed tokens / rows x steps computed.
  s_static_sorted     the same, the requests sorted by max_tokens first (stable).
  c_continuous        transformers' ContinuousBatchingManager (the engine of `generate_batch`, used
                      directly because generate_batch takes one max_new_tokens for all requests):
                      --batch-size requests per step (max_requests_per_batch), a paged KV cache sized
                      to hold that many requests at the longest length, SDPA (auto_switch_to_flash
                      off, as in b and s), EOS as genq's runner sees it. It samples with ONE
                      generator seeded by --seed: per-request seeds are not honoured.
  d_genq              the genq API and ONE `genq worker --models gpt2-mixed-bench` (Postgres, Redis,
                      file:// storage), warmed up by one job; the requests go in as one NDJSON batch
                      to /v1/completions; seconds = POST sent -> batch `completed`.
tokens/s is the unit of every ratio: d_over_a, d_over_b, d_over_s, d_over_c (and c_over_b, s_over_b).

Staggered arrivals (`staggered`): the first --staggered-requests requests arrive one by one at Poisson
times (seed --seed) at --rate-factor x b's measured requests/s. In d each is a synchronous
POST /v1/completions from its own client thread (start_timeout and timeout 3600, the tenant's sync
wait cap off), latency = request sent -> answer; in c each is added to a running manager at its
arrival time, latency = added -> result. Both report p50/p95 latency per max_tokens class and
`p95_d_over_c` for the shortest class. Absolute rates depend on the machine and its load: compare
numbers only within one output.

Run: .venv/bin/python bench/text_mixed.py [--requests 200] [--batch-size 32] [--naive-sample 32]
     [--staggered-requests 60] [--rate-factor 0.7] [--max-tokens 16,64,192] [--uniform N]
     [--skip-arms a,b,s,c,d,staggered] [--out FILE]
Needs Redis (GENQ_BENCH_REDIS; flushes db GENQ_BENCH_TEXT_MIXED_REDIS_DB, default 10) and Postgres
(GENQ_BENCH_PG_ADMIN; a temporary database is dropped at the end); takes turns with the other batching
benchmarks on one file lock (exit status 75: waited too long). `--in-process SPEC.json` runs arms b, s
and c alone for gpu_check.py and writes the workload for its arm d (see in_process_main).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, however this file is run
from common import (
    ROOT,
    Procs,
    bench_machine,
    latency_stats,
    naive_sample,
    run_batch,
    run_on_services,
    start_genq,
)
from text_batching import (
    LOCK_FILE,
    PG_ADMIN,
    REDIS_HOST,
    TextModel,
    arm_batched,
    arm_naive,
    cached_model,
    make_prompts,
    rates,
)

sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import genq's own modules

REDIS_DB = int(os.environ.get("GENQ_BENCH_TEXT_MIXED_REDIS_DB", "10"))
BROKER = f"{REDIS_HOST}/{REDIS_DB}"
DB_PREFIX = "genq_textmixed_"
MODEL = "gpt2-mixed-bench"
URL = "/v1/completions"
SHAPE = {"n_layer": 6, "n_embd": 512, "n_head": 8}
CLASSES = (16, 64, 192)  # the max_tokens classes (--max-tokens) ...
SHARES = (0.60, 0.25, 0.15)  # ... and their shares of the requests
PROMPT_TOKENS = (5, 60)
ARMS = {"a": "a_naive_loop", "b": "b_static_input", "s": "s_static_sorted", "c": "c_continuous", "d": "d_genq"}
PAGE_SIZE = 64  # tokens per KV-cache page of the continuous batching arm


# --- the workload ------------------------------------------------------------------------------------

def workload(tokenizer: Any, n: int, seed: int, classes: tuple[int, ...] = CLASSES, uniform: int | None = None,
             temperature: float = 0.8, top_p: float = 0.9) -> list[dict[str, Any]]:
    """n completion bodies: prompts of 5-60 tokens, max_tokens `classes` in SHARES (or all `uniform`)
    shuffled by `seed`, request i with seed i."""
    prompts = make_prompts(tokenizer, n, *PROMPT_TOKENS, seed=seed)
    if uniform:
        lengths = [uniform] * n
    else:
        counts = [round(n * share) for share in SHARES]
        counts[0] += n - sum(counts)
        lengths = [m for m, c in zip(classes, counts, strict=True) for _ in range(c)]
    random.Random(seed).shuffle(lengths)
    return [{"model": MODEL, "prompt": p, "max_tokens": m, "temperature": temperature, "top_p": top_p, "seed": i}
            for i, (p, m) in enumerate(zip(prompts, lengths, strict=True))]


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """n arrival offsets in seconds (the first at 0) of a Poisson process of `rate` per second."""
    rng, at, times = random.Random(seed), 0.0, []
    for _ in range(n):
        times.append(at)
        at += rng.expovariate(rate)
    return times


def longest_sequence(lm: TextModel, bodies: list[dict[str, Any]]) -> int:
    """The longest prompt plus the largest max_tokens: what a KV cache must hold for any request."""
    return max(len(lm.tokenizer(b["prompt"])["input_ids"]) for b in bodies) + max(b["max_tokens"] for b in bodies)


def by_class(bodies: list[dict[str, Any]], latencies: list[float]) -> dict[str, dict[str, Any]]:
    """Latency stats (common.latency_stats: p50/p95/p99/max in ms) per max_tokens class."""
    classes: dict[int, list[float]] = {}
    for body, seconds in zip(bodies, latencies, strict=True):
        classes.setdefault(body["max_tokens"], []).append(seconds * 1000)
    return {str(m): latency_stats(ms) for m, ms in sorted(classes.items())}


# --- the in-process arms -----------------------------------------------------------------------------

def arm_static(lm: TextModel, bodies: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """Static batches in the order given, with the share of computed rows x steps that is billed."""
    computed = sum(len(chunk) * max(b["max_tokens"] for b in chunk)
                   for chunk in (bodies[at:at + batch_size] for at in range(0, len(bodies), batch_size)))
    result = arm_batched([lm.batched(bodies, batch_size)], len(bodies), batch_size)
    return {**result, "useful_share": round(result["completion_tokens"] / computed, 4)}


class Continuous:
    """transformers' ContinuousBatchingManager on the model: `batch_size` requests per step, a paged
    KV cache for that many requests of `longest` tokens, one sampling generator seeded by `seed`."""

    def __init__(self, lm: TextModel, bodies: list[dict[str, Any]], batch_size: int, longest: int,
                 seed: int) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        self.lm = lm
        body = bodies[0]
        self.generation = GenerationConfig(do_sample=True, temperature=body["temperature"], top_p=body["top_p"],
                                           top_k=0, eos_token_id=sorted(lm.end_ids),
                                           pad_token_id=lm.tokenizer.pad_token_id)
        self.batch_size = batch_size
        # The manager resolves its config in place: each run gets a fresh one.
        self.config = functools.partial(ContinuousBatchingConfig, max_requests_per_batch=batch_size,
                                        page_size=PAGE_SIZE, num_blocks=batch_size * -(-longest // PAGE_SIZE),
                                        auto_switch_to_flash=False, seed=seed)

    def settings(self, manager: Any) -> dict[str, Any]:
        cfg = manager.continuous_batching_config
        return {"max_requests_per_batch": cfg.max_requests_per_batch, "num_blocks": cfg.num_blocks,
                "page_size": cfg.page_size, "max_batch_tokens": cfg.max_batch_tokens,
                "attn_implementation": self.lm.model.config._attn_implementation, "seed": cfg.seed,
                "per_request_seeds": False}

    def run(self, bodies: list[dict[str, Any]], arrivals: list[float] | None = None) -> dict[str, Any]:
        """Warm up on a few 2-token requests, then add each request at its arrival offset (all at once
        without `arrivals`); seconds from the first add to the last result, and each one's latency."""
        with self.lm.torch.inference_mode(), self.lm.model.continuous_batching_context_manager(
                generation_config=self.generation, continuous_batching_config=self.config(), block=True) as manager:
            self._drive(manager, [{**b, "max_tokens": 2} for b in bodies[:self.batch_size]], None, "warm-up")
            seconds, tokens, latencies = self._drive(manager, bodies, arrivals)
            settings = self.settings(manager)
        return {**rates(seconds, len(bodies), tokens), "latencies": latencies, "settings": settings}

    def _drive(self, manager: Any, bodies: list[dict[str, Any]],
               arrivals: list[float] | None, prefix: str = "r") -> tuple[float, int, list[float]]:
        arrivals = arrivals or [0.0] * len(bodies)
        added: dict[str, float] = {}
        done: dict[str, tuple[float, list[int]]] = {}
        started = time.perf_counter()
        while len(done) < len(bodies):
            while len(added) < len(bodies) and arrivals[len(added)] <= time.perf_counter() - started:
                i = len(added)
                ids = self.lm.tokenizer(bodies[i]["prompt"])["input_ids"]
                added[f"{prefix}{i}"] = time.perf_counter()
                manager.add_request(ids, request_id=f"{prefix}{i}", max_new_tokens=bodies[i]["max_tokens"],
                                    eos_token_id=sorted(self.lm.end_ids))
            wait = arrivals[len(added)] - (time.perf_counter() - started) if len(added) < len(bodies) else 1.0
            out = manager.get_result(timeout=max(wait, 0.001))
            if out is not None and out.is_finished():
                if out.error is not None:
                    raise RuntimeError(f"continuous batching request {out.request_id} failed: {out.error}")
                done[out.request_id] = (time.perf_counter(), out.generated_tokens)
            elif out is None and not manager.is_running():
                raise RuntimeError("the continuous batching manager stopped with requests unanswered")
        seconds = max(t for t, _ in done.values()) - started
        tokens = sum(self.lm.billed(row) for _, row in done.values())
        return seconds, tokens, [done[f"{prefix}{i}"][0] - added[f"{prefix}{i}"] for i in range(len(bodies))]


# --- genq end to end ---------------------------------------------------------------------------------

def staggered_genq(base_url: str, bodies: list[dict[str, Any]], arrivals: list[float]) -> list[float]:
    """Each body as a synchronous POST /v1/completions from its own thread at its arrival offset;
    the seconds each took. Fails if any does not succeed."""
    import httpx

    started = time.perf_counter()
    with httpx.Client(base_url=base_url, timeout=3700, limits=httpx.Limits(max_connections=len(bodies))) as client:
        def one(i: int) -> float:
            time.sleep(max(0.0, started + arrivals[i] - time.perf_counter()))  # until its arrival time
            sent = time.perf_counter()
            resp = client.post(URL, params={"start_timeout": 3600, "timeout": 3600}, json=bodies[i])
            if resp.status_code != 200:
                raise RuntimeError(f"staggered request {i}: {resp.status_code} {resp.text[:2000]}")
            return time.perf_counter() - sent

        with ThreadPoolExecutor(len(bodies)) as pool:
            return list(pool.map(one, range(len(bodies))))


def genq_arms(tmp: Path, db_url: str, registry: Path, bodies: list[dict[str, Any]], staggered: list[dict[str, Any]],
              arrivals: list[float] | None, run_d: bool) -> tuple[dict[str, Any] | None, list[float] | None]:
    """One stack for arm d's batch (if run_d) and then the staggered requests (if arrivals)."""
    result, latencies = None, None
    with Procs(tmp / "logs") as procs:  # on an error, the logs' tails to stderr; then the processes are stopped
        client, stack = start_genq(procs, tmp, db_url=db_url, registry=registry, broker_url=BROKER, model=MODEL,
                                   url=URL, warm_up={**bodies[0], "seed": 10**9}, flags=["--log-level", "info"],
                                   # every staggered request may wait at once
                                   extra_env={"GENQ_MAX_SYNC_WAITS_PER_TENANT": "0"})
        if run_d:
            got = run_batch(client, procs, URL, bodies, 3600)
            tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in got["results"])
            result = {**rates(got["seconds"], len(bodies), tokens), "accept_s": round(got["accept_s"], 3),
                      "succeeded": got["request_counts"]["completed"], "failed": got["request_counts"]["failed"],
                      "stack": stack}
        if arrivals is not None:
            latencies = staggered_genq(str(client.base_url), staggered, arrivals)
        client.close()
    return result, latencies


# --- the run -----------------------------------------------------------------------------------------

def ratio(x: dict[str, Any] | None, y: dict[str, Any] | None) -> float | None:
    return round(x["tokens_per_s"] / y["tokens_per_s"], 4) if x and y else None


def measure(args: argparse.Namespace, tmp: Path, admin: Any, db_name: str) -> dict[str, Any]:
    from genq.workers.tiny import write_registry

    facts = bench_machine(REDIS_HOST, PG_ADMIN, "transformers", "tokenizers", "celery", "sqlalchemy")
    source, built = cached_model(args.models_dir, args.small, SHAPE)
    lm = TextModel(source)
    bodies = workload(lm.tokenizer, args.requests, args.seed, args.max_tokens, args.uniform)
    longest = longest_sequence(lm, bodies)
    registry = write_registry(tmp, {MODEL: {"kind": "text", "source": str(source), "max_batch_size": args.batch_size,
                                            "max_tokens": max(256, longest)}})
    lengths = [len(lm.tokenizer(b["prompt"])["input_ids"]) for b in bodies]
    result: dict[str, Any] = {
        "model": {"name": MODEL, "shape": "gpt2 tiny (2 layers, 64 wide)" if args.small else "gpt2 6 layers, 512 wide",
                  "parameters": lm.parameters, "dtype": str(lm.dtype).removeprefix("torch."), "device": lm.device,
                  "eos_muted": True, "cached_at": str(source), "built_now": built},
        "workload": {"requests": args.requests, "seed": args.seed, "uniform": args.uniform,
                     "max_tokens_counts": {str(m): sum(b["max_tokens"] == m for b in bodies)
                                           for m in sorted({b["max_tokens"] for b in bodies})},
                     "prompt_tokens": {"min": min(lengths), "mean": round(statistics.mean(lengths), 1),
                                       "max": max(lengths), "total": sum(lengths)},
                     "sampling": {"temperature": 0.8, "top_p": 0.9, "top_k": 0, "seeds": "request i: seed i"}},
        "max_batch_size": args.batch_size, "skipped_arms": sorted(args.skip), "machine": facts,
    }
    arms: dict[str, dict[str, Any] | None] = dict.fromkeys(ARMS.values())
    cont = Continuous(lm, bodies, args.batch_size, longest, args.seed)
    # 1. The in-process arms, before anything else of ours runs.
    lm.warm_up(bodies, args.batch_size)
    if "a" not in args.skip:
        timed = naive_sample(bodies, args.naive_sample)
        arms["a_naive_loop"] = arm_naive([lm.naive(timed)], len(timed), len(bodies))
    if "b" not in args.skip:
        arms["b_static_input"] = arm_static(lm, bodies, args.batch_size)
    if "s" not in args.skip:
        arms["s_static_sorted"] = arm_static(lm, sorted(bodies, key=lambda b: b["max_tokens"]), args.batch_size)
    if "c" not in args.skip:
        c = cont.run(bodies)
        del c["latencies"]
        arms["c_continuous"] = c
    # 2. genq end to end (batch, then staggered), with this process idle apart from polling.
    stagger, staggered = None, bodies[:args.staggered_requests]
    if "staggered" not in args.skip:
        b = arms["b_static_input"]
        assert b is not None  # main() refuses staggered without b
        rate = args.rate_factor * b["requests_per_s"]
        stagger = {"requests": len(staggered), "rate_factor": args.rate_factor, "rate_per_s": round(rate, 4),
                   "arrivals": poisson_arrivals(len(staggered), rate, args.seed)}
    if "d" not in args.skip or stagger:
        admin.execute(f'CREATE DATABASE "{db_name}"')
        base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        arms["d_genq"], d_latencies = genq_arms(tmp, f"{base}/{db_name}", registry, bodies, staggered,
                                                stagger["arrivals"] if stagger else None, "d" not in args.skip)
    # 3. Continuous batching with the same arrivals, after the stack is gone.
    if stagger:
        c_run = cont.run(staggered, stagger["arrivals"])
        arrivals = stagger.pop("arrivals")
        stagger["last_arrival_s"] = round(arrivals[-1], 2)
        stagger["c_continuous"] = by_class(staggered, c_run["latencies"])
        stagger["d_genq"] = by_class(staggered, d_latencies or [])
        shortest = min(stagger["c_continuous"], key=int)
        c95, d95 = stagger["c_continuous"][shortest]["p95_ms"], stagger["d_genq"][shortest]["p95_ms"]
        stagger.update(shortest_class=int(shortest), p95_d_over_c=round(d95 / c95, 3) if c95 else None)
    result.update(arms)
    a, b, s, c, d = (arms[name] for name in ARMS.values())
    result["ratios"] = {"unit": "tokens_per_s", "d_over_a": ratio(d, a), "d_over_b": ratio(d, b),
                        "d_over_s": ratio(d, s), "d_over_c": ratio(d, c), "c_over_b": ratio(c, b),
                        "s_over_b": ratio(s, b),
                        "staggered_p95_d_over_c": stagger["p95_d_over_c"] if stagger else None}
    result["staggered"] = stagger
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return result


# --- gpu_check's in-process arms ---------------------------------------------------------------------

def in_process_main(spec_file: Path) -> None:
    """Arms b, s and c alone, for bench/gpu_check.py: SPEC is {"source", "device", "dtype",
    "batch_size", "requests", "seed", "max_tokens" (the classes; default CLASSES), "bodies_out"
    (optional: a file to write the workload's bodies to, for gpu_check's own arm d)}; the workload is
    built here with the model's tokenizer. Prints the arms' JSON."""
    spec = json.loads(spec_file.read_text())
    started = time.perf_counter()
    lm = TextModel(Path(spec["source"]), spec.get("device", "auto"), spec.get("dtype", "auto"))
    load_s = time.perf_counter() - started
    classes = tuple(spec.get("max_tokens", CLASSES))
    bodies = workload(lm.tokenizer, int(spec["requests"]), int(spec.get("seed", 0)), classes)
    if spec.get("bodies_out"):
        Path(spec["bodies_out"]).write_text(json.dumps(bodies))
    size = int(spec["batch_size"])
    lm.warm_up(bodies, size)
    b = arm_static(lm, bodies, size)
    s = arm_static(lm, sorted(bodies, key=lambda body: body["max_tokens"]), size)
    c = Continuous(lm, bodies, size, longest_sequence(lm, bodies), int(spec.get("seed", 0))).run(bodies)
    del c["latencies"]
    print(json.dumps({"requests": len(bodies), "max_tokens_classes": classes, "b_static_input": b,
                      "s_static_sorted": s, "c_continuous": c,
                      "c_over_b": ratio(c, b), "s_over_b": ratio(s, b), "c_over_s": ratio(c, s),
                      "load_s": round(load_s, 2), "device": lm.device, "dtype": str(lm.dtype).removeprefix("torch."),
                      "attn_implementation": lm.model.config._attn_implementation}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="completion requests in every arm")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="max_batch_size in the registry; b's and s's batch; c's requests per step")
    parser.add_argument("--naive-sample", type=int, default=32,
                        help="requests a times, extrapolated to --requests (0: all of them)")
    parser.add_argument("--staggered-requests", type=int, default=60, help="requests of the staggered arrivals")
    parser.add_argument("--rate-factor", type=float, default=0.7, help="staggered arrival rate / b's requests/s")
    parser.add_argument("--max-tokens", default=",".join(map(str, CLASSES)), metavar="A,B,C",
                        help="the three max_tokens classes, for 60, 25 and 15 %% of the requests")
    parser.add_argument("--uniform", type=int, default=None, metavar="N", help="every request with max_tokens N")
    parser.add_argument("--skip-arms", default="", help="comma-separated arms not to run: a,b,s,c,d,staggered")
    parser.add_argument("--seed", type=int, default=0, help="the workload's and the arrivals' seed")
    parser.add_argument("--small", action="store_true", help="a 2-layer, 64-wide gpt2 (same tokenizer), for tests")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "var" / "bench-models",
                        help="where the model is built once and reused")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--lock-wait", type=float, default=900, help="seconds to wait for another run")
    parser.add_argument("--in-process", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.in_process:
        return in_process_main(args.in_process)
    args.skip = {arm for arm in args.skip_arms.split(",") if arm}
    if unknown := args.skip - {*ARMS, "staggered"}:
        parser.error(f"--skip-arms: unknown arm(s) {', '.join(sorted(unknown))} (a, b, s, c, d, staggered)")
    if "staggered" not in args.skip and "b" in args.skip:
        parser.error("the staggered arrivals are paced by arm b's rate: skip staggered too, or do not skip b")
    try:
        args.max_tokens = tuple(int(m) for m in args.max_tokens.split(","))
    except ValueError:
        args.max_tokens = ()
    if len(args.max_tokens) != len(SHARES) or min(args.max_tokens) < 1:
        parser.error(f"--max-tokens must be {len(SHARES)} comma-separated counts of at least 1, e.g. 16,64,192")
    if min(args.requests, args.batch_size, args.staggered_requests) < 1 or (args.uniform or 1) < 1:
        parser.error("--requests, --batch-size, --staggered-requests and --uniform must be at least 1")
    if args.rate_factor <= 0:
        parser.error("--rate-factor must be more than 0")
    run_on_services(lock_file=LOCK_FILE, lock_wait=args.lock_wait, redis_host=REDIS_HOST, redis_db=REDIS_DB,
                    redis_env_hint="GENQ_BENCH_TEXT_MIXED_REDIS_DB", pg_admin=PG_ADMIN, db_prefix=DB_PREFIX,
                    measure=lambda tmp, admin, db_name: measure(args, tmp, admin, db_name), out=args.out)


if __name__ == "__main__":
    main()
