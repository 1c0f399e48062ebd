"""Fine-tuning throughput: trained tokens/s of genq's LoRA `train()` against a bare torch loop and
transformers' Trainer on the same model, data and LoRA, in one run (issue 15, in-process arms).

The model is gpt2-shaped with random weights (bench/gpu_models.py's build_gpt2 with chat=True:
ChatML tokens and genq's chat template, a 50259-token vocabulary), 6 layers 512 wide by default
(`--shape small` for gpt2-small's 12 x 768), loaded in fp32. The data are the chat pairs of
genq.workers.tiny_chats (Python's docstrings), --steps batches of --batch-size examples, one
epoch, LoRA r 8 on peft's default targets (GPT-2: c_attn), dropout 0.05.
  train     genq.workers.training.train(): `steady_tokens_per_s` from its progress events after
            the first --warmup steps (training steps only), `job_tokens_per_s` over the whole call
            (loading, tokenizing, the final adapter), as a job would see it.
  bare      the same batches (train's own encoding, order and collation) through the least a LoRA
            loop does: forward with labels (the model's own loss on its full logits), backward,
            AdamW, scheduler; no hooks, no checkpoints. train() computes the output layer only at
            trained positions, so train_over_bare > 1 is that saving.
  trainer   transformers' Trainer (needs accelerate, which peft depends on) on the same encoded
            examples, the same batch size, lr and schedule, logging and saving off.
  genq      the same job through the queue: the genq API and one `genq worker --work training`
            (Postgres, Redis, file:// storage) with as many torch threads; the chats uploaded as a
            fine-tune file and trained by a job with the same hyperparameters, LoRA and seed.
            `steady_tokens_per_s` from the job's metrics events after the first --warmup steps,
            `job_tokens_per_s` over the job's wall time (POST -> `succeeded`, as a client sees it:
            the worker loads the base model for the job, tokenizes, checkpoints and registers the
            adapter), to compare with train's job_tokens_per_s.
Ratios: train_over_bare, trainer_over_train and genq_over_train (steady rates, the first --warmup
steps excluded in every arm), and genq_job_over_train_job (whole jobs). Absolute rates depend on the
machine and its load: compare numbers within one output. The default run (8 steps, 6x512, one CPU
thread) takes about 2.5 minutes on 2 shared cores. The genq arm needs Redis (GENQ_BENCH_REDIS; flushes
db GENQ_BENCH_FINE_TUNING_REDIS_DB, default 13, and refuses it while other clients use it) and
Postgres (GENQ_BENCH_PG_ADMIN; a temporary database is dropped at the end).

Run: .venv/bin/python bench/fine_tuning.py [--steps 8] [--batch-size 8] [--shape 6x512|small|tiny]
     [--threads 1] [--skip-arms trainer,genq] [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Procs,
    check_redis_dbs_unused,
    drop_stale_databases,
    package_versions,
    print_result,
    stack_env,
    start_api,
    wait_for,
)

REDIS_HOST = os.environ.get("GENQ_BENCH_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("GENQ_BENCH_FINE_TUNING_REDIS_DB", "13"))
PG_ADMIN = os.environ.get("GENQ_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
DB_PREFIX = "genq_ftbench_"
MODEL = "bench-chat"
# None: gpt2-small's defaults; tiny (2 layers, 64 wide) only checks that the benchmark runs.
SHAPES = {"6x512": {"n_layer": 6, "n_embd": 512, "n_head": 8}, "small": None,
          "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2}}


def build_model(tmp: Path, shape: str) -> Path:
    from gpu_models import build_gpt2

    return build_gpt2(tmp / f"gpt2-{shape}-chat", small=False, device="cpu", chat=True, shape=SHAPES[shape])


def workload(args: argparse.Namespace) -> list[dict[str, Any]]:
    from genq.workers.tiny_chats import python_doc_chats

    chats = python_doc_chats(args.steps * args.batch_size)
    if len(chats) < args.steps * args.batch_size:
        raise SystemExit(f"only {len(chats)} doc chats: lower --steps or --batch-size")
    return chats


def arm_train(model_dir: Path, chats: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    from genq.workers.training import TrainingConfig, TrainingHooks, train

    events: list[dict[str, Any]] = []
    started = time.perf_counter()
    result = train(model_dir, chats, config=TrainingConfig(n_epochs=1, batch_size=args.batch_size),
                   hooks=TrainingHooks(progress=events.append), device=args.device)
    seconds = time.perf_counter() - started
    rate = steady_rate(events, args.warmup)
    return {"steps": result.step, "trained_tokens": result.trained_tokens, "seconds": round(seconds, 2),
            "job_tokens_per_s": round(result.trained_tokens / seconds, 1), "steady_tokens_per_s": round(rate, 1),
            "final_train_loss": round(result.train_loss or 0.0, 4)}


def _encoded(model_dir: Path, chats: list[dict[str, Any]], args: argparse.Namespace) -> tuple[Any, Any, list[Any]]:
    """The tokenizer, the encoded set and train()'s own batches for epoch 0 (same encoding, order and
    padding)."""
    from transformers import AutoTokenizer

    from genq.workers.training import epoch_order
    from genq.workers.training_data import collate, encode_examples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = encode_examples(tokenizer, chats, 1024)
    order = epoch_order(0, 0, len(data))
    batches = [collate([data.examples[i] for i in order[k:k + args.batch_size]], tokenizer.eos_token_id)
               for k in range(0, len(order), args.batch_size)]
    return tokenizer, data, batches


def _lora_model(model_dir: Path, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from genq.workers.training import TrainingConfig, add_lora

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return add_lora(base, TrainingConfig()).to(device)


def arm_bare(model_dir: Path, chats: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from genq.workers.training import BASE_LR

    _, _, batches = _encoded(model_dir, chats, args)
    model = _lora_model(model_dir, args.device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=BASE_LR, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / len(batches))
    tokens = seconds = 0.0
    for k, batch in enumerate(batches):
        batch = {key: value.to(args.device) for key, value in batch.items()}
        started = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if k >= args.warmup:
            seconds += time.perf_counter() - started
            tokens += int((batch["labels"][:, 1:] != -100).sum())
    return {"steps": len(batches), "steady_tokens_per_s": round(tokens / seconds, 1)}


def arm_trainer(model_dir: Path, chats: list[dict[str, Any]], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from genq.workers.training import BASE_LR
    from genq.workers.training_data import Encoded, collate

    tokenizer, data, _ = _encoded(model_dir, chats, args)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in data.examples]

    def pad(batch: list[dict[str, Any]]) -> dict[str, Any]:  # train()'s own padding
        return collate([Encoded(r["input_ids"], r["labels"]) for r in batch], tokenizer.eos_token_id)

    class StepClock(TrainerCallback):  # type: ignore[misc]
        """Training-step seconds and trained tokens after the warm-up steps."""

        def __init__(self) -> None:
            self.started, self.seconds, self.step = 0.0, 0.0, 0

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if self.step >= args.warmup:
                self.seconds += time.perf_counter() - self.started
            self.step += 1

    clock = StepClock()
    training_args = TrainingArguments(
        output_dir=str(tmp / "trainer"), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=BASE_LR, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
        logging_strategy="no", save_strategy="no", report_to=[], seed=0, data_seed=0, dataloader_num_workers=0,
        remove_unused_columns=False, use_cpu=args.device == "cpu")
    trainer = Trainer(model=_lora_model(model_dir, args.device), args=training_args, train_dataset=rows,
                      data_collator=pad, callbacks=[clock])
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its summary; stdout is the JSON
        trainer.train()
    # Trainer shuffles with its own sampler (the same examples in another order): count the tokens
    # of all but the mean warm-up share.
    share = (clock.step - args.warmup) / clock.step
    return {"steps": clock.step, "steady_tokens_per_s": round(data.trained_tokens * share / clock.seconds, 1)}


def steady_rate(events: list[dict[str, Any]], warmup: int) -> float:
    """Trained tokens/s over the steps after the first `warmup`, from progress events that each
    cover the steps since the one before (one step in train(); a worker writes at most one a second):
    an event's tokens are the growth of trained_tokens, its seconds tokens / its rate."""
    steps = [(e["trained_tokens"] - p["trained_tokens"], e["tokens_per_s"])
             for p, e in zip(events, events[1:], strict=False) if p["step"] >= warmup]
    return sum(tokens for tokens, _ in steps) / sum(tokens / per_s for tokens, per_s in steps)


def arm_genq(model_dir: Path, chats: list[dict[str, Any]], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import uuid

    import psycopg
    import redis

    from genq.workers.tiny import write_registry

    check_redis_dbs_unused(REDIS_HOST, (REDIS_DB,), "GENQ_BENCH_FINE_TUNING_REDIS_DB")
    broker = f"{REDIS_HOST}/{REDIS_DB}"
    registry = write_registry(tmp, {MODEL: {"kind": "text", "source": str(model_dir)}})
    db_name = f"{DB_PREFIX}{uuid.uuid4().hex[:10]}"
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        drop_stale_databases(admin, DB_PREFIX)
        admin.execute(f'CREATE DATABASE "{db_name}"')
        try:
            with Procs(tmp / "logs") as procs:
                env = stack_env(db_url=f"{base}/{db_name}", broker_url=broker, storage_url=f"file://{tmp / 'objects'}",
                                registry=registry)
                if args.threads:
                    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
                redis.Redis.from_url(broker).flushdb()
                client = start_api(procs, env)
                procs.start("worker", ["-m", "genq", "worker", "--models", MODEL, "--work", "training",
                                       "--checkpoint-every", str(args.steps), "--log-level", "info"], env)
                log = tmp / "logs" / "worker.log"
                wait_for(lambda: procs.check_alive() or (log.exists() and b"ready." in log.read_bytes()), 120,
                         "genq worker ready", 0.2)
                return _genq_job(client, procs, chats, args)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            redis.Redis.from_url(broker).flushdb()


def _genq_job(client: Any, procs: Procs, chats: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    import json

    data = "".join(json.dumps(c) + "\n" for c in chats).encode()
    upload = client.post("/v1/files", files={"file": ("chats.jsonl", data)}, data={"purpose": "fine-tune"})
    upload.raise_for_status()
    file_id = upload.json()["id"]
    started = time.perf_counter()
    resp = client.post("/v1/fine_tuning/jobs", json={
        "model": MODEL, "training_file": file_id, "seed": 0,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "batch_size": args.batch_size, "learning_rate_multiplier": 1.0}}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05}})
    resp.raise_for_status()
    job_id = resp.json()["id"]

    def ended() -> dict[str, Any] | None:
        procs.check_alive()
        job: dict[str, Any] = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"fine-tuning job {job['status']}: {job['error']}")
        return job if job["status"] == "succeeded" else None

    job = wait_for(ended, 3600, "fine-tuning job succeeded", 0.2)
    seconds = time.perf_counter() - started
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"][::-1]
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    if metrics[-1]["step"] != args.steps:
        raise RuntimeError(f"the job's last metrics event is of step {metrics[-1]['step']}, not {args.steps}")
    return {"steps": metrics[-1]["step"], "trained_tokens": job["trained_tokens"], "seconds": round(seconds, 2),
            "job_tokens_per_s": round(job["trained_tokens"] / seconds, 1),
            "steady_tokens_per_s": round(steady_rate(metrics, args.warmup), 1),
            "final_train_loss": round(metrics[-1]["train_loss"], 4),
            "stack": "genq api + genq worker --work training (postgres, redis, file://)"}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="genq-bench-ft-") as tmpdir:
        tmp = Path(tmpdir)
        started = time.perf_counter()
        model_dir = build_model(tmp, args.shape)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        chats = workload(args)
        arms: dict[str, Any] = {}
        skip = set(filter(None, args.skip_arms.split(",")))
        for name in ("train", "bare", "trainer", "genq"):
            if name in skip:
                continue
            if name == "trainer":
                arms[name] = arm_trainer(model_dir, chats, args, tmp)
            elif name == "genq":
                arms[name] = arm_genq(model_dir, chats, args, tmp)
            else:
                arms[name] = (arm_train if name == "train" else arm_bare)(model_dir, chats, args)
            arms[name]["arm_s"] = round(time.perf_counter() - started, 1)
            started = time.perf_counter()
    rates = {name: arm["steady_tokens_per_s"] for name, arm in arms.items()}
    ratios = {"train_over_bare": rates["train"] / rates["bare"] if {"train", "bare"} <= rates.keys() else None,
              "trainer_over_train": rates["trainer"] / rates["train"] if {"train", "trainer"} <= rates.keys() else None,
              "genq_over_train": rates["genq"] / rates["train"] if {"train", "genq"} <= rates.keys() else None,
              "genq_job_over_train_job": arms["genq"]["job_tokens_per_s"] / arms["train"]["job_tokens_per_s"]
              if {"train", "genq"} <= arms.keys() else None}
    return {"benchmark": "fine_tuning", "shape": args.shape, "device": args.device, "steps": args.steps,
            "batch_size": args.batch_size, "warmup_steps_excluded": args.warmup, "model_build_s": round(build_s, 1),
            "arms": arms, "ratios": {k: round(v, 3) if v else None for k, v in ratios.items()},
            "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "platform": platform.platform(),
                        "python": platform.python_version(),
                        **package_versions("torch", "transformers", "peft", "accelerate")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps in every arm (one epoch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the steady rates")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="6x512")
    # One thread by default: on a 2-core machine shared with other work, torch's two spinning OpenMP
    # threads made steps many times slower and the arms' rates noisy.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--skip-arms", default="", help="comma-separated arms not to run: bare,trainer,genq")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    print_result(measure(args), args.out)


if __name__ == "__main__":
    main()
