"""Image throughput: genq end to end against the diffusers pipeline called directly, in one run.

What it measures (all on this machine, one after another, never overlapping), with `tiny-sd`
(build_tiny's random-weight Stable Diffusion) at --size, --steps, guidance 7.5, PNDM:
  direct   StableDiffusionPipeline.from_pretrained(tiny-sd) in this process on the CPU, progress bar
           off; N requests one at a time (one image each, prompt i, seed i through its own CPU
           generator, exactly what genq's image runner passes), timed after one warm-up call.
           It runs twice, before the genq stack starts and after it has stopped; `direct` reports
           both runs and their mean, so drift of the machine over the run shows up.
  genq     The genq API plus ONE `genq worker --models tiny-sd` (Postgres, Redis db 10, file
           storage). A warm-up job is run first, so model load and the first call are excluded as
           for direct. Then the same N requests go in as one NDJSON batch to /v1/images/generations;
           seconds = POST sent -> batch status `completed` (claiming, generating, PNG encoding and
           storing, recording each job, finalizing the batch).

How to read it: ratio_genq_to_direct = genq images/s / mean direct images/s, the share of the bare
pipeline's throughput genq keeps; the goal is 0.85. pixels_identical says whether every genq image
(downloaded through the API as a PNG) has exactly the pixels of the direct image for the same
prompt and seed; if not, max_abs_diff gives the largest difference of one channel (0-255).
Absolute rates depend on the machine and its load; compare numbers only within one output.

Run: .venv/bin/python bench/image_throughput.py [--images N] [--steps S] [--size WxH] [--out FILE]
Needs Redis (GENQ_BENCH_REDIS, default 127.0.0.1:6379; flushes db 10) and Postgres
(GENQ_BENCH_PG_ADMIN, default user postgres on 127.0.0.1:5432; a temporary database is dropped at the end).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, however this file is run
from common import ROOT, Procs, free_port, package_versions, print_result, server_versions, wait_for

sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import genq's own modules

REDIS_HOST = os.environ.get("GENQ_BENCH_REDIS", "redis://127.0.0.1:6379")
PG_ADMIN = os.environ.get("GENQ_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
GENQ_BROKER = f"{REDIS_HOST}/10"
MODEL = "tiny-sd"
IMAGE_URL = "/v1/images/generations"
GUIDANCE = 7.5
GOAL = 0.85
WARMUP_SEED = 1_000_003
NDJSON = {"Content-Type": "application/x-ndjson"}
SUBJECTS = ["a lighthouse at dusk", "a red cube on a table", "a cat in the snow", "an old map of a city",
            "a bowl of cherries", "a train crossing a bridge", "a forest after rain", "a robot reading a book"]


def prompt(i: int) -> str:
    return f"{SUBJECTS[i % len(SUBJECTS)]}, picture {i}"


# --- direct: the pipeline in this process -------------------------------------------------------

class Direct:
    """The pipeline loaded the way genq's ImageRunner loads it on the CPU, called the same way."""

    def __init__(self, model_dir: Path, width: int, height: int, steps: int) -> None:
        from diffusers import StableDiffusionPipeline

        self.width, self.height, self.steps = width, height, steps
        self.pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                            requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to("cpu")

    def generate(self, text: str, seed: int) -> Any:
        import torch

        # A list of one generator per image, as genq's runner passes it (same noise, same pixels).
        return self.pipe(prompt=text, height=self.height, width=self.width, num_images_per_prompt=1,
                         num_inference_steps=self.steps, guidance_scale=GUIDANCE,
                         generator=[torch.Generator(device="cpu").manual_seed(seed)]).images[0]

    def run(self, n: int) -> tuple[dict[str, Any], list[Any]]:
        self.generate("warm-up", WARMUP_SEED)
        started = time.perf_counter()
        images = [self.generate(prompt(i), i) for i in range(n)]
        seconds = time.perf_counter() - started
        return {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 3)}, images


# --- genq: API + one worker ---------------------------------------------------------------------

def image_body(text: str, seed: int, size: str, steps: int) -> dict[str, Any]:
    return {"model": MODEL, "prompt": text, "n": 1, "size": size, "num_inference_steps": steps,
            "guidance_scale": GUIDANCE, "seed": seed}


def start_genq(procs: Procs, tmp: Path, registry: Path, db_url: str, size: str, steps: int) -> httpx.Client:
    """The API and one tiny-sd worker; returns a client once a warm-up job has gone through."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(GENQ_DATABASE_URL=db_url, GENQ_BROKER_URL=GENQ_BROKER, PYTHONUNBUFFERED="1",
               GENQ_STORAGE_URL=f"file://{tmp / 'objects'}", GENQ_MODELS_FILE=str(registry),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    redis.Redis.from_url(GENQ_BROKER).flushdb()
    port = free_port()
    procs.start("api", ["-m", "genq", "api", "--port", str(port), "--log-level", "warning"], env)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    wait_for(lambda: client.get("/readyz").status_code == 200, 60, "genq API /readyz", 0.05)
    procs.start("worker", ["-m", "genq", "worker", "--models", MODEL, "--log-level", "warning"], env)
    warm = client.post("/v1/jobs", json={"url": IMAGE_URL, "body": image_body("warm-up", WARMUP_SEED, size, steps)})
    warm.raise_for_status()

    def warmed() -> bool:
        job = client.get(f"/v1/jobs/{warm.json()['id']}").json()
        if job["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"warm-up job {job['status']}: {job['error']}")
        return job["status"] == "succeeded"

    wait_for(warmed, 180, "genq worker (warm-up job)", 0.05)
    return client


def bench_genq(client: httpx.Client, n: int, size: str, steps: int) -> tuple[dict[str, Any], str]:
    body = b"".join(json.dumps({"custom_id": f"img-{i}", "method": "POST", "url": IMAGE_URL,
                                "body": image_body(prompt(i), i, size, steps)}).encode() + b"\n"
                    for i in range(n))
    t0 = time.perf_counter()
    resp = client.post("/v1/batches", content=body, headers=NDJSON)
    accepted = time.perf_counter()
    assert resp.status_code == 202, resp.text
    batch_id = resp.json()["id"]
    remaining = [n]

    def completed() -> dict[str, Any] | None:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("failed", "cancelled", "expired"):
            raise RuntimeError(f"batch ended {batch['status']}: {batch['request_counts']}")
        counts = batch["request_counts"]
        remaining[0] = counts["total"] - counts["completed"] - counts["failed"]
        return batch if batch["status"] == "completed" else None

    # Each poll costs the API and Postgres a few ms of CPU that the worker would otherwise use:
    # poll rarely while many images remain, often near the end so the finish is timed closely.
    batch = wait_for(completed, 900, f"batch of {n} images", lambda: 0.5 if remaining[0] > 2 else 0.02)
    seconds = time.perf_counter() - t0
    counts = batch["request_counts"]
    assert counts["completed"] == n, counts
    return {"images": n, "accept_s": round(accepted - t0, 3), "seconds": round(seconds, 3),
            "images_per_s": round(n / seconds, 3)}, batch_id


def genq_images(client: httpx.Client, batch_id: str) -> dict[str, Any]:
    """custom_id -> PIL image, downloaded through the API from the batch's results."""
    from PIL import Image

    images: dict[str, Any] = {}
    lines = client.get(f"/v1/batches/{batch_id}/results").text.splitlines()
    for line in map(json.loads, lines):
        url = line["response"]["body"]["data"][0]["url"]
        img = Image.open(io.BytesIO(client.get(url).content))
        img.load()
        images[line["custom_id"]] = img
    return images


def compare(direct: list[Any], genq: dict[str, Any]) -> dict[str, Any]:
    """Pixel equality of genq's image i against the direct image i (same prompt, same seed)."""
    import numpy as np

    diffs = []
    for i, want in enumerate(direct):
        got = genq[f"img-{i}"]
        a, b = np.asarray(want.convert("RGB"), dtype=np.int16), np.asarray(got.convert("RGB"), dtype=np.int16)
        diffs.append(int(np.abs(a - b).max()) if a.shape == b.shape else 255)
    return {"pixels_identical": all(d == 0 for d in diffs), "images_compared": len(diffs),
            "images_differing": sum(d > 0 for d in diffs), "max_abs_diff": max(diffs, default=0)}


def machine() -> dict[str, Any]:
    import torch

    servers = server_versions(REDIS_HOST, PG_ADMIN)
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            # Other work on the machine slows both sides unevenly: a high load makes the ratio noisy.
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2), "platform": platform.platform(),
            "python": platform.python_version(), "processor": platform.processor() or platform.machine(),
            **servers, **package_versions("torch", "diffusers", "transformers", "celery", "sqlalchemy")}


def measure(args: argparse.Namespace, tmp: Path, admin: psycopg.Connection[Any], db_name: str) -> dict[str, Any]:
    from workers.tiny import build_tiny

    width, height = (int(v) for v in args.size.split("x"))
    registry = build_tiny(tmp / "models")
    procs = Procs(tmp)
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    result: dict[str, Any] = {"model": MODEL, "size": args.size, "steps": args.steps, "guidance_scale": GUIDANCE,
                              "machine": machine()}
    # 1. Direct, before anything else of ours runs.
    direct = Direct(tmp / "models" / MODEL, width, height, args.steps)
    before, direct_images = direct.run(args.images)
    # 2. genq end to end, with this process idle apart from polling.
    with procs:  # on an error, the logs' tails to stderr; then the processes are stopped
        admin.execute(f'CREATE DATABASE "{db_name}"')
        client = start_genq(procs, tmp, registry, f"{base}/{db_name}", args.size, args.steps)
        genq, batch_id = bench_genq(client, args.images, args.size, args.steps)
        images = genq_images(client, batch_id)
        client.close()
    # 3. Direct again, after the stack is gone.
    after, again = direct.run(args.images)
    mean_s = (before["seconds"] + after["seconds"]) / 2
    result["direct"] = {"images": args.images, "seconds": round(mean_s, 3),
                        "images_per_s": round(args.images / mean_s, 3), "runs": [before, after]}
    result["genq"] = genq
    ratio = genq["images_per_s"] / result["direct"]["images_per_s"]
    result.update(ratio_genq_to_direct=round(ratio, 4), goal=GOAL, meets_goal=ratio >= GOAL)
    result.update(compare(direct_images, images))
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    result["direct_runs_identical"] = compare(direct_images, {f"img-{i}": im for i, im in enumerate(again)})[
        "pixels_identical"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48, help="images (one per request) for each measurement")
    parser.add_argument("--steps", type=int, default=10, help="num_inference_steps of every request")
    parser.add_argument("--size", default="64x64", help="WIDTHxHEIGHT (multiples of 8, at most 256)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    # Turn SIGTERM into SystemExit so the cleanup below still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    db_name = f"genq_bench_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="genq-bench-img-") as tmpdir, \
            psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        try:
            result = measure(args, Path(tmpdir), admin, db_name)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            redis.Redis.from_url(GENQ_BROKER).flushdb()
    print_result(result, args.out)


if __name__ == "__main__":
    main()
