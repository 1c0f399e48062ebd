"""Image batching: genq end to end against one pipeline call per image and against batched calls, in one run.

With `tiny-sd` (workers.tiny.build_tiny's random-weight Stable Diffusion, max_batch_size --batch-size)
the same --images requests (one image each, prompt i, seed i) go through, one after another on this
machine, never overlapping. The uniform workload asks for --size, --steps, guidance 7.5, PNDM in every
request; with --mix a mixed workload follows: sizes, steps and guidance from MIX's profiles (weights
3:2:2:1), in a shuffled order as users' batch files come, reported under `mixed`.
  a_naive_loop   in this process, one StableDiffusionPipeline call per image (one CPU generator
                 seeded with the request's seed, as genq's image runner makes it), the pipeline loaded
                 as the runner loads it. With --naive-sample N only N requests (spread evenly) are
                 timed and the time per image is extrapolated (`extrapolated` says so).
  b_batched      in this process, the best a user could do there: the requests grouped by what can
                 share a call (size, steps, guidance; a uniform workload is one group, in input order),
                 each group in calls of --batch-size images: a list of prompts and a list of one
                 generator per image.
  c_genq         the genq API and ONE `genq worker --models tiny-sd` (Postgres, Redis, file://
                 storage), warmed up by a full batch of each shape; each workload's requests go in as one
                 NDJSON batch to /v1/images/generations; seconds = POST sent -> batch `completed`
                 (generating, PNG encoding and storing, recording, finalizing). Every request must
                 succeed. The worker's `genq_worker*` /metrics samples are reported when present.
a and b run twice, before c and after it, and report their faster run (`runs` has both): other
work on a shared machine can only slow a run down, so the faster run is the better estimate, and the
stricter baseline for genq.
How to read it: images/s per arm; c_over_b (goal >= 0.95) is the share of in-process batched
throughput that genq keeps, c_over_a and b_over_a the gains over one call per image; `c_over_b` at
the top names each workload's. pixels_identical_to_b says whether each genq image (downloaded as a
PNG) has exactly the pixels of b's image for the same request; max_abs_diff is the largest difference
of one channel (0-255).
Absolute rates depend on the machine and its load: compare numbers only within one output.

Run: .venv/bin/python bench/image_batching.py [--images 64] [--batch-size 8] [--steps 10] [--size 64x64] [--mix]
     [--out FILE]
Needs Redis (GENQ_BENCH_REDIS; flushes db GENQ_BENCH_IMAGE_BATCHING_REDIS_DB, default 7, and refuses
it while other clients use it) and Postgres (GENQ_BENCH_PG_ADMIN; a temporary database is dropped at
the end). Runs of this and bench/text_batching.py take turns on one file lock; exit status 75:
waited too long for it. `--in-process SPEC.json` runs only arm b for gpu_check.py (see in_process_main).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
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
    run_batch,
    run_on_services,
    start_genq,
    worker_flags,
)

sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import genq's own modules

REDIS_HOST = os.environ.get("GENQ_BENCH_REDIS", "redis://127.0.0.1:6379")
PG_ADMIN = os.environ.get("GENQ_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_DB = int(os.environ.get("GENQ_BENCH_IMAGE_BATCHING_REDIS_DB", "7"))
BROKER = f"{REDIS_HOST}/{REDIS_DB}"
LOCK_FILE = Path(tempfile.gettempdir()) / "genq-batching-bench.lock"  # shared with text_batching.py
DB_PREFIX = "genq_imgbatch_"
MODEL = "tiny-sd"
URL = "/v1/images/generations"
GUIDANCE = 7.5
GOALS = {"c_over_b": 0.95}
SUBJECTS = ["a lighthouse at dusk", "a red cube on a table", "a cat in the snow", "an old map of a city",
            "a bowl of cherries", "a train crossing a bridge", "a forest after rain", "a robot reading a book"]


def request_bodies(n: int, model: str, size: str, steps: int) -> list[dict[str, Any]]:
    """The genq /v1/images/generations bodies; the in-process arms read the same fields."""
    return [{"model": model, "prompt": f"{SUBJECTS[i % len(SUBJECTS)]}, picture {i}", "n": 1, "size": size,
             "num_inference_steps": steps, "guidance_scale": GUIDANCE, "seed": i} for i in range(n)]


# The mixed workload's profiles: (size, steps, guidance, weight). Each pair of profiles differs in
# something that keeps them out of one call (a size, steps or guidance).
MIX = [("64x64", 10, 7.5, 3), ("96x64", 6, 7.5, 2), ("64x96", 14, 5.0, 2), ("64x64", 6, 5.0, 1)]


def mixed_bodies(n: int, model: str) -> list[dict[str, Any]]:
    """n requests whose profiles follow MIX's weights, in a shuffled (seeded) order."""
    cycle = [profile for profile in MIX for _ in range(profile[3])]
    profiles = [cycle[i % len(cycle)] for i in range(n)]
    random.Random(14).shuffle(profiles)
    bodies = request_bodies(n, model, "64x64", 1)
    for body, (size, steps, guidance, _) in zip(bodies, profiles, strict=True):
        body.update(size=size, num_inference_steps=steps, guidance_scale=guidance)
    return bodies


def shape(body: dict[str, Any]) -> tuple[Any, ...]:
    """What requests must share to share a pipeline call."""
    return body["size"], body["num_inference_steps"], body["guidance_scale"]


def groups(bodies: list[dict[str, Any]]) -> list[list[int]]:
    """Request indices by shape, each group in input order, groups in order of first appearance."""
    by_shape: dict[tuple[Any, ...], list[int]] = {}
    for i, body in enumerate(bodies):
        by_shape.setdefault(shape(body), []).append(i)
    return list(by_shape.values())


class Pipeline:
    """The pipeline loaded as genq's ImageRunner loads it (registry dtype resolved for the device,
    no safety checker), called with one CPU generator per image as the runner calls it."""

    def __init__(self, source: Path, device: str = "auto", dtype: str = "auto") -> None:
        import torch
        from diffusers import StableDiffusionPipeline

        from genq.workers.runners.device import resolve_device, resolve_dtype

        self.torch = torch
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        pipe = StableDiffusionPipeline.from_pretrained(source, dtype=self.dtype, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)

    def call(self, bodies: list[dict[str, Any]]) -> list[Any]:
        """One pipeline call for these requests (equal size, steps and guidance), one image each."""
        first = bodies[0]
        width, height = (int(v) for v in first["size"].split("x"))
        out = self.pipe(prompt=[b["prompt"] for b in bodies], height=height, width=width, num_images_per_prompt=1,
                        num_inference_steps=first["num_inference_steps"], guidance_scale=first["guidance_scale"],
                        generator=[self.torch.Generator(device="cpu").manual_seed(b["seed"]) for b in bodies])
        return list(out.images)

    def naive(self, bodies: list[dict[str, Any]]) -> float:
        started = time.perf_counter()
        for body in bodies:
            self.call([body])
        return time.perf_counter() - started

    def batched(self, bodies: list[dict[str, Any]], batch_size: int) -> tuple[float, list[Any]]:
        """Each shape's requests in calls of batch_size; the images in input order."""
        images: list[Any] = [None] * len(bodies)
        started = time.perf_counter()
        for group in groups(bodies):
            for at in range(0, len(group), batch_size):
                chunk = group[at:at + batch_size]
                for i, image in zip(chunk, self.call([bodies[i] for i in chunk]), strict=True):
                    images[i] = image
        return time.perf_counter() - started, images

    def warm_up(self, bodies: list[dict[str, Any]], batch_size: int) -> None:
        """For each shape, one 1-step call of full width and one single image: first-call costs are
        not timed."""
        for group in groups(bodies):
            short = [{**bodies[i], "num_inference_steps": 1} for i in group[:batch_size]]
            self.call(short)
            self.call(short[:1])


def rates(seconds: float, images: int) -> dict[str, Any]:
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 3)}


# --- arms --------------------------------------------------------------------------------------------

def arm_naive(runs: list[float], timed: int, images: int) -> dict[str, Any]:
    """Arm a from its runs over `timed` images (seconds), the faster extrapolated to all."""
    seconds, scale = min(runs), images / timed
    return {**rates(seconds * scale, images), "extrapolated": scale != 1, "images_timed": timed,
            "seconds_timed": round(seconds, 3), "runs": [rates(s, timed) for s in runs]}


def arm_batched(runs: list[float], bodies: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """Arm b from its runs (seconds): the faster one."""
    calls = sum(-(-len(group) // batch_size) for group in groups(bodies))
    return {**rates(min(runs), len(bodies)), "batch_size": batch_size, "calls": calls,
            "runs": [rates(s, len(bodies)) for s in runs]}


def arm_genq(procs: Procs, tmp: Path, db_url: str, registry: Path, workloads: dict[str, list[dict[str, Any]]],
             args: argparse.Namespace) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Arm c of each workload, one after another on one stack; also genq's images by custom_id,
    downloaded through the API."""
    everyone = [body for bodies in workloads.values() for body in bodies]
    shapes = [everyone[group[0]] for group in groups(everyone)]
    client, stack = start_genq(procs, tmp, db_url=db_url, registry=registry, broker_url=BROKER, model=MODEL, url=URL,
                               warm_up={**shapes[0], "seed": 10**9}, flags=worker_flags(args))
    # As b's warm-up: each shape's first calls, of a full batch, before the clock starts.
    warm = [{**body, "num_inference_steps": 1, "seed": 10**9 + k} for body in shapes for k in range(args.batch_size)]
    run_batch(client, procs, URL, warm, 600)
    warm_ups = 1 + len(warm)
    out = {}
    for name, bodies in workloads.items():
        out[name] = genq_batch(client, procs, tmp, bodies, warm_ups)
        out[name][0]["stack"] = stack
        warm_ups = 0  # the counters were read after the last batch
    client.close()
    return out


def genq_batch(client: Any, procs: Procs, tmp: Path, bodies: list[dict[str, Any]],
               jobs_before: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One workload through genq as one batch: its arm c and its images by custom_id."""
    from PIL import Image

    got, report = measured_batch(client, procs, URL, bodies, log_file=tmp / "worker.log", jobs_before=jobs_before)
    images = sum(len(line["response"]["body"]["data"]) for line in got["results"])
    pictures: dict[str, Any] = {}
    for line in got["results"]:
        img = Image.open(io.BytesIO(client.get(line["response"]["body"]["data"][0]["url"]).content))
        img.load()
        pictures[line["custom_id"]] = img
    return {**rates(got["seconds"], images), **report}, pictures


def compare(ours: list[Any], genq: dict[str, Any]) -> dict[str, Any]:
    """Pixel equality of genq's image for request i against b's."""
    import numpy as np

    diffs = []
    for i, want in enumerate(ours):
        a = np.asarray(want.convert("RGB"), dtype=np.int16)
        b = np.asarray(genq[f"r{i}"].convert("RGB"), dtype=np.int16)
        diffs.append(int(np.abs(a - b).max()) if a.shape == b.shape else 255)
    return {"pixels_identical_to_b": all(d == 0 for d in diffs), "images_differing": sum(d > 0 for d in diffs),
            "max_abs_diff": max(diffs, default=0)}


def machine() -> dict[str, Any]:
    return bench_machine(REDIS_HOST, PG_ADMIN, "diffusers", "transformers", "celery", "sqlalchemy")


def outcome(a: dict[str, Any], b: dict[str, Any], c: dict[str, Any], ours: list[Any],
            pictures: dict[str, Any]) -> dict[str, Any]:
    """One workload's arms, ratios, goals and pixel comparison."""
    unit = "images_per_s"
    ratios = {"unit": unit, "c_over_a": round(c[unit] / a[unit], 4), "c_over_b": round(c[unit] / b[unit], 4),
              "b_over_a": round(b[unit] / a[unit], 4)}
    goals = {k: {"goal": g, "value": ratios[k], "met": ratios[k] >= g} for k, g in GOALS.items()}
    return {"a_naive_loop": a, "b_batched": b, "c_genq": c, "ratios": ratios, "goals": goals,
            **compare(ours, pictures)}


def measure(args: argparse.Namespace, tmp: Path, admin: Any, db_name: str) -> dict[str, Any]:
    from genq.workers.tiny import TINY_SD_ENTRY, build_tiny_sd, write_registry

    facts = machine()  # before anything of ours runs: the load average is the machine's own
    source = build_tiny_sd(tmp / "models" / MODEL)
    registry = write_registry(tmp, {MODEL: {**TINY_SD_ENTRY, "source": str(source),
                                            "max_batch_size": args.batch_size}})
    pipe = Pipeline(source)
    workloads = {"uniform": request_bodies(args.images, MODEL, args.size, args.steps)}
    if args.mix:
        workloads["mixed"] = mixed_bodies(args.images, MODEL)
    result: dict[str, Any] = {
        "model": {"name": MODEL, "dtype": str(pipe.dtype).removeprefix("torch."), "device": pipe.device},
        "images": args.images, "max_batch_size": args.batch_size, "size": args.size, "steps": args.steps,
        "guidance_scale": GUIDANCE, "machine": facts,
    }
    # 1. a and b in this process, before anything else of ours runs.
    a_runs: dict[str, list[float]] = {}
    b_runs: dict[str, list[float]] = {}
    ours: dict[str, list[Any]] = {}
    timed = {name: naive_sample(bodies, args.naive_sample) for name, bodies in workloads.items()}
    for name, bodies in workloads.items():
        pipe.warm_up(bodies, args.batch_size)
        a_runs[name] = [pipe.naive(timed[name])]
        seconds, ours[name] = pipe.batched(bodies, args.batch_size)
        b_runs[name] = [seconds]
    # 2. genq end to end, with this process idle apart from polling.
    with Procs(tmp) as procs:  # on an error, the logs' tails to stderr; then the processes are stopped
        admin.execute(f'CREATE DATABASE "{db_name}"')
        base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        c = arm_genq(procs, tmp, f"{base}/{db_name}", registry, workloads, args)
    # 3. b and a again, after the stack is gone (in reverse order: each workload's two runs are as
    # far from genq's as the other's).
    for name, bodies in reversed(workloads.items()):
        b_runs[name].append(pipe.batched(bodies, args.batch_size)[0])
        a_runs[name].append(pipe.naive(timed[name]))
    for name, bodies in workloads.items():
        a = arm_naive(a_runs[name], len(timed[name]), len(bodies))
        b = arm_batched(b_runs[name], bodies, args.batch_size)
        arms = outcome(a, b, c[name][0], ours[name], c[name][1])
        if name == "uniform":
            result.update(arms)
        else:
            result[name] = {"profiles": [{"size": size, "steps": steps, "guidance_scale": guidance,
                                          "images": sum(shape(body) == (size, steps, guidance) for body in bodies)}
                                         for size, steps, guidance, _ in MIX], **arms}
    if args.mix:
        result["c_over_b"] = {name: (result if name == "uniform" else result[name])["ratios"]["c_over_b"]
                              for name in workloads}
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return result


# --- gpu_check's in-process baseline -----------------------------------------------------------------

def in_process_main(spec_file: Path) -> None:
    """Arm b alone, for bench/gpu_check.py: SPEC is {"source", "device", "dtype", "batch_size",
    "bodies"} (the bodies gpu_check sends to genq). Prints the arm's JSON after one warm-up."""
    spec = json.loads(spec_file.read_text())
    started = time.perf_counter()
    pipe = Pipeline(Path(spec["source"]), spec.get("device", "auto"), spec.get("dtype", "auto"))
    load_s = time.perf_counter() - started
    bodies, size = spec["bodies"], int(spec["batch_size"])
    pipe.warm_up(bodies, size)
    seconds, _ = pipe.batched(bodies, size)
    result = arm_batched([seconds], bodies, size)
    steps = bodies[0]["num_inference_steps"]
    result.update(it_per_s=round(steps * len(bodies) / seconds, 2), load_s=round(load_s, 2), device=pipe.device,
                  dtype=str(pipe.dtype).removeprefix("torch."))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="requests (one image each) in every arm")
    parser.add_argument("--batch-size", type=int, default=8, help="max_batch_size in the registry; b's batch")
    parser.add_argument("--steps", type=int, default=10, help="num_inference_steps of every request")
    parser.add_argument("--size", default="64x64", help="WIDTHxHEIGHT (multiples of 8, at most 256)")
    parser.add_argument("--mix", action="store_true",
                        help="also run the mixed workload (sizes, steps and guidance from MIX, shuffled)")
    parser.add_argument("--naive-sample", type=int, default=0,
                        help="images a times, extrapolated to --images (0: all of them)")
    parser.add_argument("--worker-concurrency", type=int, default=None,
                        help="pass --concurrency to the worker (default: the worker's own default)")
    parser.add_argument("--worker-log-level", default="info",
                        help="the worker's log level (debug also logs each batch's size)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--lock-wait", type=float, default=900, help="seconds to wait for another run")
    parser.add_argument("--in-process", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.in_process:
        return in_process_main(args.in_process)
    if min(args.images, args.batch_size, args.steps) < 1:
        parser.error("--images, --batch-size and --steps must be at least 1")
    run_on_services(lock_file=LOCK_FILE, lock_wait=args.lock_wait, redis_host=REDIS_HOST, redis_db=REDIS_DB,
                    redis_env_hint="GENQ_BENCH_IMAGE_BATCHING_REDIS_DB", pg_admin=PG_ADMIN, db_prefix=DB_PREFIX,
                    measure=lambda tmp, admin, db_name: measure(args, tmp, admin, db_name), out=args.out)


if __name__ == "__main__":
    main()
