"""GPU check: full-size random-weight gpt2 and SD 1.5 served by genq on one GPU, measured through the API.

The measurement driver behind bench/gpu_check.sh (which adds a hard time limit and cleanup). In order:
  1. models   bench/gpu_models.py writes gpt2-random (its EOS muted: every completion runs to
              max_tokens) and sd15-random (fp16) and their models.toml into the work directory
              (skipped with --models-dir).
  1b. baseline the in-process batched baselines, each in its own process on the GPU before any
              worker starts: `bench/text_batching.py --in-process` runs the batched text requests
              of step 5 through gpt2-random's `generate` in batches of its max_batch_size (64), and
              `bench/image_batching.py --in-process` the batched images through sd15-random's
              pipeline in calls of its max_batch_size (8), both loaded as genq's runners load them
              and timed after a warm-up call.
  1c. mixed   `bench/text_mixed.py --in-process` runs --mixed-requests completions of the mixed-length
              workload (max_tokens 16/64/192 for 60/25/15 %) through gpt2-random in bf16 with SDPA, in
              its own process on the idle GPU: static batches of 32 in input order and sorted by
              max_tokens, and transformers' continuous batching (32 requests per step); `mixed`
              reports their tokens/s and c_over_b, s_over_b, c_over_s, and the bodies are kept for
              5b. The registry the stack reads is a copy of models.toml (in the work directory) that
              also has gpt2-mixed: gpt2-random's weights with max_batch_size 32 and dtype bfloat16
              (auto on the CPU). Skipped with --no-mixed, as is 5b.
  2. stack    the embedded defaults, no server needed: SQLite results DB, SQLite broker, file
              storage; `python -m genq api` and three workers on the same GPU, `--models gpt2-random
              --gpu G`, `--models sd15-random --gpu G` and `--models gpt2-mixed --gpu G`. gpt2-mixed
              has a worker of its own, as text_mixed.py's arm d has: it holds the default 2 x 32
              jobs, not gpt2-random's 2 x 64, and sits idle until 5b. One warm-up job per model
              (the batch's shapes) runs first, so loading and first-call costs are not measured.
  3. text     one NDJSON batch of --text-requests completions (max_tokens, temperature 0.8, seed i);
              seconds = POST -> batch `completed`; tokens_per_s counts the completion tokens that
              the results report (usage), requests_per_s the requests.
  4. image    one batch of --image-requests images (--size, --steps, guidance 7.5, fp16, seed i);
              images_per_s, and it_per_s = steps x images / seconds.
  5. batching --batch-text-requests completions (max_tokens --batch-max-tokens, temperature 0.8,
              seed i) and --batch-image-requests images (--size, --steps) through genq, each as one
              batch, against the same requests in step 1b: `batching` reports both sides and
              ratio_genq_to_in_process (tokens/s, images/s; goal 0.85). Skipped with --no-batching.
  5b. mixed   step 1c's bodies through genq as text_mixed.py's arm d: one NDJSON batch to gpt2-mixed,
              seconds = POST -> batch `completed`, tokens as the results bill them; `mixed` adds
              d_genq and d_over_b, d_over_s, d_over_c (tokens/s). Unlike text_mixed.py's d, the
              stack is SQLite and file storage, not Postgres and Redis.
  6. memory   while 2-5b run, `nvidia-smi` is sampled every 0.5 s: the largest memory.used of the GPU
              (MiB, every process on it) and, where nvidia-smi can see them, each worker's own
              figure (--query-compute-apps; includes its CUDA context and the caching allocator's
              reserve, which is what the GPU can no longer give to others).
It prints one JSON object; every wait has a deadline inside --budget-s, so it never hangs.
On a GPU, 1b and 5 run at the sizes the issue asks for: gpt2-small at batch 64, the SD 1.5 UNet at
batch 8, 512x512, fp16.

--cpu runs the same steps with the workers on the CPU (registry dtype auto: fp32) and no GPU
sampling; --small uses tiny models of the same formats and few, small requests. `--cpu --small`
is the path the tests run, in about a minute on 2 cores.

Run: python bench/gpu_check.py [--cpu] [--small] [--gpu N] [--workdir DIR] [--models-dir DIR] [--no-batching]
     [--no-mixed] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, however this file is run
from common import ROOT, Procs, free_port, print_result, run_job, wait_for
from common import run_batch as common_run_batch

sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import genq's own modules (no torch)

TEXT_MODEL, IMAGE_MODEL, MIXED_MODEL = "gpt2-random", "sd15-random", "gpt2-mixed"
TEXT_URL, IMAGE_URL = "/v1/completions", "/v1/images/generations"
NDJSON = {"Content-Type": "application/x-ndjson"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
PROMPTS = ["Explain transformer attention in simple terms", "Write a short poem about the sea",
           "List three facts about the moon", "The history of the printing press began",
           "Once upon a time in a small village", "How does a job queue work?"]
IMAGE_PROMPTS = ["a futuristic AI developer workspace, cinematic lighting", "a lighthouse at dusk",
                 "a bowl of cherries on a wooden table", "a red cube in the snow"]


class Deadline:
    """The run's time budget: every wait takes the smaller of its own limit and what is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, cap: float) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the run's time budget is spent")
        return min(cap, left)


# --- GPU facts and memory sampling -----------------------------------------------------------------

def nvidia_smi(*args: str, timeout: float = 10) -> list[list[str]]:
    """Rows of an `nvidia-smi --format=csv,noheader,nounits` query ([] when it fails)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, *args, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=timeout, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]


def gpus() -> list[dict[str, Any]]:
    rows = nvidia_smi("--query-gpu=index,name,memory.total,driver_version")
    return [{"index": int(r[0]), "name": r[1], "memory_total_mib": int(float(r[2])), "driver": r[3]}
            for r in rows if len(r) >= 4 and r[0].isdigit()]


class MemorySampler:
    """Every `interval` s in a thread: the GPU's memory.used and each compute process's used_memory."""

    def __init__(self, gpu: int, interval: float = 0.5) -> None:
        self.gpu, self.interval = gpu, interval
        self.peak_mib = 0
        self.per_pid: dict[int, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-memory", daemon=True)

    def sample(self) -> int:
        """Take one sample now; return the memory used on the GPU (MiB)."""
        used = [int(float(r[0])) for r in nvidia_smi("--query-gpu=memory.used", f"--id={self.gpu}", timeout=5)
                if r and r[0].replace(".", "", 1).isdigit()]
        for row in nvidia_smi("--query-compute-apps=pid,used_memory", f"--id={self.gpu}", timeout=5):
            if len(row) >= 2 and row[0].isdigit() and row[1].replace(".", "", 1).isdigit():
                pid, mib = int(row[0]), int(float(row[1]))
                self.per_pid[pid] = max(self.per_pid.get(pid, 0), mib)
        if used:
            self.samples += 1
            self.peak_mib = max(self.peak_mib, max(used))
            return max(used)
        return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def torch_facts(env: dict[str, str], timeout: float) -> dict[str, Any]:
    """torch and CUDA versions, read in a short-lived subprocess (this one never imports torch)."""
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version() if c else None, "
            "'cuda_available': c, 'device_count': torch.cuda.device_count() if c else 0}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# --- the stack -------------------------------------------------------------------------------------

def stack_env(workdir: Path, registry: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(OFFLINE)
    env.update(GENQ_DATABASE_URL=f"sqlite:///{workdir / 'genq.db'}",
               GENQ_BROKER_URL=f"sqla+sqlite:///{workdir / 'broker.db'}",
               GENQ_STORAGE_URL=f"file://{workdir / 'objects'}", GENQ_MODELS_FILE=str(registry))
    return env


def text_body(i: int, max_tokens: int) -> dict[str, Any]:
    return {"model": TEXT_MODEL, "prompt": f"{PROMPTS[i % len(PROMPTS)]} ({i})", "max_tokens": max_tokens,
            "temperature": 0.8, "seed": i}


def image_body(i: int, size: str, steps: int) -> dict[str, Any]:
    return {"model": IMAGE_MODEL, "prompt": IMAGE_PROMPTS[i % len(IMAGE_PROMPTS)], "n": 1, "size": size,
            "num_inference_steps": steps, "guidance_scale": 7.5, "seed": i}


def run_batch(client: httpx.Client, procs: Procs, url: str, bodies: list[dict[str, Any]],
              timeout: float) -> tuple[float, list[dict[str, Any]]]:
    """One NDJSON batch (common.run_batch): seconds from POST to `completed`, and the result lines."""
    done = common_run_batch(client, procs, url, bodies, timeout)
    return done["seconds"], done["results"]


# --- batching: genq against the in-process batched baselines ---------------------------------------

BATCH_GOAL = 0.85  # genq's share of the in-process batched throughput
MIXED_BATCH = 32  # the mixed workload's static batch and continuous batching's requests per step


def registry_entry(registry: Path, model: str) -> dict[str, Any]:
    """A model's table in a models.toml, its relative source resolved as genq resolves it."""
    entry: dict[str, Any] = dict(tomllib.loads(registry.read_text())["models"][model])
    if entry["source"].startswith(("./", "../")):
        entry["source"] = str((registry.parent / entry["source"]).resolve())
    return entry


def in_process(script: str, spec: dict[str, Any], workdir: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """`bench/SCRIPT --in-process SPEC` in its own process (this one never imports torch): the
    batched in-process baseline of those requests; its JSON."""
    name = script.removesuffix(".py")
    spec_file, log_path = workdir / f"{name}-spec.json", workdir / f"{name}-in-process.log"
    spec_file.write_text(json.dumps(spec))
    cmd = [sys.executable, str(ROOT / "bench" / script), "--in-process", str(spec_file)]
    try:
        with log_path.open("wb") as log:
            out = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, timeout=timeout,
                                 check=True).stdout
    except subprocess.SubprocessError as exc:
        raise RuntimeError(f"the in-process baseline {script} failed ({exc}):\n"
                           f"{log_path.read_text(errors='replace')[-3000:]}") from None
    return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def mixed_dtype(args: argparse.Namespace) -> str:
    return "auto" if args.cpu else "bfloat16"


def with_mixed_model(registry: Path, workdir: Path, args: argparse.Namespace) -> Path:
    """A copy of the registry (in workdir/stack, sources resolved, so --models-dir stays untouched)
    that also registers gpt2-mixed: gpt2-random's weights with the mixed workload's max_batch_size
    and dtype. Its max_tokens (256) holds the workload's longest sequence (60 + 192 tokens)."""
    from genq.workers.tiny import write_registry

    names = tomllib.loads(registry.read_text())["models"]
    entries = {name: registry_entry(registry, name) for name in names}
    entries[MIXED_MODEL] = {**entries[TEXT_MODEL], "max_batch_size": MIXED_BATCH, "dtype": mixed_dtype(args)}
    (workdir / "stack").mkdir(exist_ok=True)
    return write_registry(workdir / "stack", entries)


def mixed_spec(registry: Path, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The spec of `text_mixed.py --in-process`: gpt2-random in bf16 (fp32 on the CPU), batch 32;
    --small: max_tokens classes 4/8/16 instead of the workload's 16/64/192. The workload's bodies
    go to workdir/mixed-bodies.json for arm d."""
    return {"source": registry_entry(registry, TEXT_MODEL)["source"], "device": "cpu" if args.cpu else "cuda",
            "dtype": mixed_dtype(args), "batch_size": MIXED_BATCH, "requests": args.mixed_requests,
            "seed": 0, "bodies_out": str(workdir / "mixed-bodies.json"),
            **({"max_tokens": [4, 8, 16]} if args.small else {})}


def mixed_bodies(workdir: Path) -> list[dict[str, Any]]:
    """The bodies the in-process arms ran (mixed_spec's bodies_out), addressed to gpt2-mixed."""
    return [{**body, "model": MIXED_MODEL} for body in json.loads((workdir / "mixed-bodies.json").read_text())]


def ratio(x: dict[str, Any], y: dict[str, Any]) -> float:
    return round(x["tokens_per_s"] / y["tokens_per_s"], 4)


def mixed_genq(client: httpx.Client, procs: Procs, bodies: list[dict[str, Any]], mixed: dict[str, Any],
               deadline: Deadline) -> dict[str, Any]:
    """Arm d of text_mixed.py: the bodies as one NDJSON batch, POST -> `completed`, tokens as billed;
    `mixed` (the in-process arms) with d_genq and its ratios to b, s and c added."""
    seconds, lines = run_batch(client, procs, TEXT_URL, bodies, deadline.left(300))
    tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines)
    d = {"requests": len(lines), "completion_tokens": tokens, "seconds": round(seconds, 3),
         "requests_per_s": round(len(lines) / seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
         "model": MIXED_MODEL, "worker": f"genq worker --models {MIXED_MODEL}"}
    return {**mixed, "d_genq": d, "d_over_b": ratio(d, mixed["b_static_input"]),
            "d_over_s": ratio(d, mixed["s_static_sorted"]), "d_over_c": ratio(d, mixed["c_continuous"])}


def compared(genq: dict[str, Any], base: dict[str, Any], unit: str) -> dict[str, Any]:
    ratio = genq[unit] / base[unit]
    return {"genq": genq, "in_process": base, "ratio_genq_to_in_process": round(ratio, 4), "unit": unit,
            "goal": BATCH_GOAL, "met": ratio >= BATCH_GOAL}


def batched_text(client: httpx.Client, procs: Procs, bodies: list[dict[str, Any]], base: dict[str, Any],
                 deadline: Deadline) -> dict[str, Any]:
    seconds, lines = run_batch(client, procs, TEXT_URL, bodies, deadline.left(300))
    tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines)
    genq = {"requests": len(lines), "completion_tokens": tokens, "seconds": round(seconds, 3),
            "requests_per_s": round(len(lines) / seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}
    return {"model": TEXT_MODEL, "max_tokens": bodies[0]["max_tokens"], **compared(genq, base, "tokens_per_s")}


def batched_images(client: httpx.Client, procs: Procs, bodies: list[dict[str, Any]], base: dict[str, Any],
                   deadline: Deadline, args: argparse.Namespace) -> dict[str, Any]:
    seconds, lines = run_batch(client, procs, IMAGE_URL, bodies, deadline.left(300))
    images = sum(len(line["response"]["body"]["data"]) for line in lines)
    genq = {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 3),
            "it_per_s": round(args.steps * images / seconds, 2)}
    return {"model": IMAGE_MODEL, "size": args.size, "steps": args.steps, **compared(genq, base, "images_per_s")}


def measure(args: argparse.Namespace, workdir: Path, deadline: Deadline) -> dict[str, Any]:
    t0 = time.perf_counter()
    env = {**os.environ, **OFFLINE}
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a machine with GPUs
    result: dict[str, Any] = {"mode": "cpu" if args.cpu else "gpu", "small": args.small}
    gpu_list = [] if args.cpu else gpus()
    if not args.cpu and not any(g["index"] == args.gpu for g in gpu_list):
        raise RuntimeError(f"GPU {args.gpu} not found by nvidia-smi (saw {gpu_list}); use --cpu to run without one")
    facts = torch_facts(env, deadline.left(120))
    if not args.cpu and not facts["cuda_available"]:
        raise RuntimeError(f"this python's torch cannot use CUDA: {facts}")
    gpu = next((g for g in gpu_list if g["index"] == args.gpu), None)
    result["device"] = {"gpu": gpu, "gpus": len(gpu_list), **facts, "python": sys.version.split()[0]}

    # 1. Models.
    if args.models_dir:
        registry = Path(args.models_dir) / "models.toml"
    else:
        build = [sys.executable, str(ROOT / "bench" / "gpu_models.py"), "--out", str(workdir / "models"),
                 "--dtype", "auto" if args.cpu else "float16", "--device", "cpu" if args.cpu else "cuda",
                 "--mute-eos"]
        started = time.perf_counter()
        build_env = env if args.cpu else {**env, "CUDA_VISIBLE_DEVICES": str(args.gpu)}
        log_path = workdir / "build-models.log"
        try:
            with log_path.open("wb") as log:
                subprocess.run(build + (["--small"] if args.small else []), env=build_env, cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, timeout=deadline.left(240), check=True)
        except subprocess.SubprocessError as exc:
            raise RuntimeError(f"building the models failed ({exc}):\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}") from None
        result["build_models_s"] = round(time.perf_counter() - started, 2)
        registry = workdir / "models" / "models.toml"
    if not args.no_mixed:
        registry = with_mixed_model(registry, workdir, args)

    # 1b. The in-process batched baselines, alone on the GPU.
    text_batch = [text_body(i, args.batch_max_tokens) for i in range(args.batch_text_requests)]
    image_batch = [image_body(i, args.size, args.steps) for i in range(args.batch_image_requests)]
    baselines: dict[str, dict[str, Any]] = {}
    base_env = env if args.cpu else {**env, "CUDA_VISIBLE_DEVICES": str(args.gpu)}
    if not args.no_batching:
        for script, model, bodies in (("text_batching.py", TEXT_MODEL, text_batch),
                                      ("image_batching.py", IMAGE_MODEL, image_batch)):
            entry = registry_entry(registry, model)
            spec = {"source": entry["source"], "device": "cpu" if args.cpu else "cuda",
                    "dtype": entry.get("dtype", "auto"), "batch_size": entry.get("max_batch_size", 8),
                    "bodies": bodies}
            baselines[model] = in_process(script, spec, workdir, base_env, deadline.left(300))

    # 1c. The mixed-length workload in process: static and continuous batching, bf16 with SDPA.
    if not args.no_mixed:
        result["mixed"] = in_process("text_mixed.py", mixed_spec(registry, workdir, args), workdir, base_env,
                                     deadline.left(300))

    # 2. The stack, then one warm-up job per model.
    sampler = None if args.cpu else MemorySampler(args.gpu).start()
    # Their ids go to `pids` so that gpu_check.sh can still stop them if this process is killed.
    procs = Procs(workdir / "logs", pidfile=workdir / "pids", stop_timeout=20)
    with procs:  # on an error, the logs' tails to stderr; then the processes are stopped
        try:
            started = time.perf_counter()
            senv = stack_env(workdir, registry)
            if args.cpu:
                senv["CUDA_VISIBLE_DEVICES"] = ""
            port = free_port()
            procs.start("api", ["-m", "genq", "api", "--port", str(port), "--log-level", "warning"], senv)
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

            def api_ready() -> bool:
                procs.check_alive()
                return client.get("/readyz").status_code == 200

            wait_for(api_ready, deadline.left(60), "genq API /readyz", 0.1)  # migrations done before workers start
            gpu_flag = [] if args.cpu else ["--gpu", str(args.gpu)]
            for model in (TEXT_MODEL, IMAGE_MODEL, *([] if args.no_mixed else [MIXED_MODEL])):
                procs.start(f"worker-{model}", ["-m", "genq", "worker", "--models", model, *gpu_flag,
                                                "--log-level", "warning"], senv)
            run_job(client, procs, TEXT_URL, text_body(10_000, args.max_tokens), deadline.left(180))
            run_job(client, procs, IMAGE_URL, image_body(10_000, args.size, args.steps), deadline.left(180))
            mixed = [] if args.no_mixed else mixed_bodies(workdir)
            if mixed:
                run_job(client, procs, TEXT_URL, {**mixed[0], "seed": 10**9}, deadline.left(180))
            result["startup_s"] = round(time.perf_counter() - started, 2)
            if sampler:
                result["gpu_memory_after_warmup_mib"] = sampler.sample()

            # 3. Text.
            seconds, lines = run_batch(client, procs, TEXT_URL,
                                       [text_body(i, args.max_tokens) for i in range(args.text_requests)],
                                       deadline.left(240))
            tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines)
            result["text"] = {"model": TEXT_MODEL, "requests": len(lines), "max_tokens": args.max_tokens,
                              "completion_tokens": tokens, "seconds": round(seconds, 3),
                              "tokens_per_s": round(tokens / seconds, 1),
                              "requests_per_s": round(len(lines) / seconds, 3)}

            # 4. Images.
            seconds, lines = run_batch(client, procs, IMAGE_URL,
                                       [image_body(i, args.size, args.steps) for i in range(args.image_requests)],
                                       deadline.left(240))
            images = sum(len(line["response"]["body"]["data"]) for line in lines)
            result["image"] = {"model": IMAGE_MODEL, "images": images, "size": args.size, "steps": args.steps,
                               "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 3),
                               "it_per_s": round(args.steps * images / seconds, 2)}

            # 5. Batching: the baselines' requests through genq.
            if baselines:
                result["batching"] = {
                    "text": batched_text(client, procs, text_batch, baselines[TEXT_MODEL], deadline),
                    "image": batched_images(client, procs, image_batch, baselines[IMAGE_MODEL], deadline, args),
                }

            # 5b. Mixed: step 1c's requests through genq.
            if mixed:
                result["mixed"] = mixed_genq(client, procs, mixed, result["mixed"], deadline)
            client.close()
        finally:
            if sampler:
                sampler.stop()
            worker_pids = {p.pid: name.removeprefix("worker-") for name, p in procs.procs.items()}

    # 6. Memory.
    if sampler:
        result["memory"] = {
            "peak_gpu_memory_used_mib": sampler.peak_mib, "samples": sampler.samples, "interval_s": sampler.interval,
            # Inside containers nvidia-smi may show other pids (or none) than ours.
            "per_process_peak_mib": {worker_pids.get(pid, str(pid)): mib for pid, mib in sampler.per_pid.items()},
        }
    else:
        result["memory"] = None
    result["total_s"] = round(time.perf_counter() - t0, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the workers on the CPU (no GPU needed)")
    parser.add_argument("--small", action="store_true", help="tiny models and few, small requests")
    parser.add_argument("--gpu", type=int, default=0, help="the GPU both workers use")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--models-dir", type=Path, default=None, help="use models already written by gpu_models.py")
    parser.add_argument("--text-requests", type=int, default=None, help="default 64 (--small: 8)")
    parser.add_argument("--max-tokens", type=int, default=None, help="default 64 (--small: 16)")
    parser.add_argument("--image-requests", type=int, default=None, help="default 8 (--small: 2)")
    parser.add_argument("--size", default=None, help="default 512x512 (--small: 64x64)")
    parser.add_argument("--steps", type=int, default=None, help="default 30 (--small: 4)")
    parser.add_argument("--batch-text-requests", type=int, default=None,
                        help="batched text comparison: completions (default 256; --small: 16)")
    parser.add_argument("--batch-max-tokens", type=int, default=None, help="their max_tokens (default 32; --small: 8)")
    parser.add_argument("--batch-image-requests", type=int, default=None,
                        help="batched image comparison: images at --size and --steps (default 16; --small: 4)")
    parser.add_argument("--no-batching", action="store_true", help="skip the batched comparisons (1b and 5)")
    parser.add_argument("--mixed-requests", type=int, default=None,
                        help="mixed-length workload (in process and genq): completions (default 200; --small: 8)")
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed-length workload (1c and 5b)")
    parser.add_argument("--budget-s", type=float, default=400.0, help="fail rather than run longer than this")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    small = args.small
    for name, full, tiny in (("text_requests", 64, 8), ("max_tokens", 64, 16), ("image_requests", 8, 2),
                             ("size", "512x512", "64x64"), ("steps", 30, 4), ("batch_text_requests", 256, 16),
                             ("batch_max_tokens", 32, 8), ("batch_image_requests", 16, 4),
                             ("mixed_requests", 200, 8)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else full)
    # Turn SIGTERM (gpu_check.sh's time limit) into SystemExit so the cleanup still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    deadline = Deadline(args.budget_s)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = measure(args, args.workdir, deadline)
    else:
        with tempfile.TemporaryDirectory(prefix="genq-gpu-check-") as tmp:
            result = measure(args, Path(tmp), deadline)
    print_result(result, args.out)


if __name__ == "__main__":
    main()
