"""Constrained decoding on the CPU: llguidance, xgrammar and outlines-core, measured side by side.

For each library and each tokenizer (the project's tiny byte-level BPE, vocab 1024, and a bigger
one trained here on the Python standard library's sources, vocab --big-vocab) it measures, in a
process of its own (so that imports and threads of one never touch another; --lib-timeout bounds it):
  tokenizer_info_s  the one-off cost of building the library's tokenizer data from the HF tokenizer
                    (outlines-core: building its Vocabulary from the byte-level token table here)
  compile_*_s       compiling `{"type":"object"}` (OpenAI json_object) and NESTED_SCHEMA, cold
                    (xgrammar's compiler cache off): the first compile and the best of --repeats
  first_mask_ms     the first mask of a fresh matcher of NESTED_SCHEMA (lazy libraries pay here)
  step              per decoding step for a batch of --batch rows, each its own NESTED_SCHEMA
                    matcher, on random logits [batch, model vocab] (seeded, the same for every
                    library): fill_ms (all rows' bitmasks, the library's batch call where it has
                    one), apply_ms (the library's own apply kernel, after its first call, whose cost
                    is apply_first_call_s), accept_ms (each row accepts its masked argmax); median
                    and p90 over --steps steps. A row that finishes gets a new matcher (new_matcher_ms).
                    rejected counts argmax tokens a matcher refused (must be 0).
`genq` is genq.workers.runners.constrained itself (llguidance, a plain-torch apply on the CPU),
its fill and apply both inside mask_scores (reported as apply_ms).
The model vocab is the tokenizer's size plus --pad ids (logits wider than the tokenizer, as in
models whose lm_head is padded). A `probe` per library, also in its own process, compiles the
schemas without any tokenizer and reports whether that imported torch, how long the import took,
and the error it gives for each of BAD_SCHEMAS (what the API would answer 400 with; null: accepted).
`torch_eager_apply_ms` is a plain-torch apply (unpack bits, masked_fill), to compare with the kernels.

llguidance is a genq dependency; the others are not: `pip install xgrammar==0.2.9 outlines-core==0.2.14`
first (xgrammar brings triton, about 1 GB), or leave them out with --libraries.

Run: .venv/bin/python bench/constrained_decoding.py [--libraries llguidance xgrammar outlines_core]
     [--big-vocab 32000] [--pad 64] [--batch 16] [--steps 64] [--repeats 3] [--threads 1] [--lib-timeout 300]
     [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, however this file is run
from common import ROOT, package_versions, print_result
from constrained_backends import BACKENDS

sys.path.insert(0, str(ROOT))

LIBRARIES = ("llguidance", "xgrammar", "outlines_core", "genq")
DISTRIBUTIONS = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines_core": "outlines-core", "genq": "genq"}
JSON_OBJECT: dict[str, Any] = {"type": "object"}
NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "status": {"enum": ["active", "inactive", "banned"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                    "properties": {"city": {"type": "string", "maxLength": 20},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
    },
    "required": ["name", "age", "status", "tags", "address"],
    "additionalProperties": False,
}
# Schemas an API should refuse: a misspelt type, a bad regex, a keyword a library may not implement.
BAD_SCHEMAS: dict[str, dict[str, Any]] = {
    "misspelt_type": {"type": "object", "properties": {"n": {"type": "integr"}}, "required": ["n"]},
    "bad_pattern": {"type": "object", "properties": {"s": {"type": "string", "pattern": "(("}}, "required": ["s"]},
    "unsupported_not": {"type": "object", "properties": {"s": {"not": {"type": "string"}}}, "required": ["s"]},
}


# --- tokenizers -------------------------------------------------------------------------------------

def train_big_tokenizer(vocab_size: int, out: Path) -> None:
    """A GPT-2-style byte-level BPE of `vocab_size` trained on the standard library's .py files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    from genq.workers.tiny import EOS

    texts = [p.read_text(errors="replace") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        bpe.model.save(tmp)
        GPT2TokenizerFast.from_pretrained(tmp, bos_token=EOS, eos_token=EOS, unk_token=EOS).save_pretrained(out)


# --- one library in its own process ------------------------------------------------------------------

def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def _stats(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {"median": round(statistics.median(ms), 3), "p90": round(ms[int(0.9 * (len(ms) - 1))], 3)}


def probe(lib: str) -> dict[str, Any]:
    """Compile the schemas with no tokenizer, as the API would: torch imported? the error for a bad one."""
    start = time.perf_counter()
    backend = BACKENDS[lib](probe=True)
    import_s = time.perf_counter() - start
    return {"import_s": round(import_s, 3), "nested_schema_error": backend.probe(NESTED_SCHEMA),
            "bad_schema_errors": {name: backend.probe(schema)[:160] or None for name, schema in BAD_SCHEMAS.items()},
            "imports_torch": "torch" in sys.modules}


def measure(lib: str, tokenizer_dir: Path, vocab: int, batch: int, steps: int, repeats: int,
            threads: int) -> dict[str, Any]:
    """Everything but the probe, for one library and one tokenizer (see the module docstring)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    backend = BACKENDS[lib](threads)
    eos = [tokenizer.eos_token_id]
    info, first_info = _timed(backend.info, tokenizer, vocab, eos)
    out: dict[str, Any] = {"tokenizer_info_s": round(first_info, 4)}
    compiled = {}
    for name, schema in (("json_object", JSON_OBJECT), ("nested_schema", NESTED_SCHEMA)):
        times = []
        for _ in range(max(1, repeats)):
            compiled[name], seconds = _timed(backend.compile, info, schema)
            times.append(seconds)
        out[f"compile_{name}_s"] = {"first": round(times[0], 4), "best": round(min(times), 4)}
    grammar = compiled["nested_schema"]
    words = (vocab + 31) // 32
    bitmask = torch.full((batch, words), -1, dtype=torch.int32)
    one = backend.matcher(grammar)
    _, first_mask = _timed(backend.fill, [one], bitmask[:1])
    out["first_mask_ms"] = round(first_mask * 1e3, 3)
    rows = [backend.matcher(grammar) for _ in range(batch)]
    backend.fill(rows, bitmask)
    _, out["apply_first_call_s"] = _timed(backend.apply, torch.zeros(batch, vocab), bitmask)
    gen = torch.Generator().manual_seed(0)
    fill_ms, apply_ms, accept_ms, new_ms = [], [], [], []
    rejected = finished = 0
    for _ in range(steps):
        logits = torch.randn(batch, vocab, generator=gen)
        _, t_fill = _timed(backend.fill, rows, bitmask)
        _, t_apply = _timed(backend.apply, logits, bitmask)
        chosen = logits.argmax(dim=-1).tolist()
        start = time.perf_counter()
        refused = [i for i, (m, token) in enumerate(zip(rows, chosen, strict=True)) if not backend.accept(m, token)]
        accept_ms.append((time.perf_counter() - start) * 1e3)
        rejected += len(refused)
        for i in {*refused, *(i for i, m in enumerate(rows) if backend.done(m))}:
            finished += 1
            rows[i], t_new = _timed(backend.matcher, grammar)
            new_ms.append(t_new * 1e3)
        fill_ms.append(t_fill * 1e3)
        apply_ms.append(t_apply * 1e3)
    out["apply_first_call_s"] = round(out["apply_first_call_s"], 3)
    out["step"] = {"fill_ms": _stats(fill_ms), "apply_ms": _stats(apply_ms), "accept_ms": _stats(accept_ms),
                   "new_matcher_ms": _stats(new_ms) if new_ms else None, "rows_finished": finished,
                   "rejected": rejected}
    return out


def child(args: argparse.Namespace) -> None:
    if args.probe:
        result = probe(args.child)
    else:
        import torch

        torch.set_num_threads(args.threads)
        result = measure(args.child, Path(args.tokenizer), args.model_vocab, args.batch, args.steps, args.repeats,
                         args.threads)
    print(json.dumps(result))


def run_child(extra: list[str], timeout: float) -> dict[str, Any]:
    """This script with `extra` in a fresh process: its JSON, or what went wrong."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def eager_apply_ms(batch: int, vocab: int, runs: int = 20) -> float:
    """A plain-torch apply (unpack the bits, masked_fill), median ms, for comparison."""
    import torch

    words = (vocab + 31) // 32
    mask = torch.randint(-(2**31), 2**31 - 1, (batch, words), dtype=torch.int32)
    shifts = torch.arange(32, dtype=torch.int32)
    times = []
    for _ in range(runs):
        logits = torch.randn(batch, vocab)
        start = time.perf_counter()
        allowed = ((mask.unsqueeze(-1) >> shifts) & 1).bool().view(batch, -1)[:, :vocab]
        logits.masked_fill_(~allowed, float("-inf"))
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    ap.add_argument("--big-vocab", type=int, default=32000)
    ap.add_argument("--pad", type=int, default=64, help="model vocab = tokenizer size + pad")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch's and each library's threads")
    ap.add_argument("--lib-timeout", type=float, default=300)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", choices=LIBRARIES, help=argparse.SUPPRESS)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--model-vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import torch
    from transformers import AutoTokenizer

    from genq.workers.tiny import train_tokenizer

    torch.set_num_threads(args.threads)  # for torch_eager_apply_ms, as in the children
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_avg_1m_at_start": round(os.getloadavg()[0], 2), "platform": platform.platform(),
                    "python": platform.python_version(),
                    **package_versions("torch", "transformers", *(DISTRIBUTIONS[x] for x in args.libraries))},
        "settings": {"batch": args.batch, "steps": args.steps, "pad": args.pad, "repeats": args.repeats,
                     "threads": args.threads},
        "probe": {lib: run_child(["--child", lib, "--probe"], args.lib_timeout) for lib in args.libraries},
        "vocabs": {},
    }
    with tempfile.TemporaryDirectory(prefix="genq-constrained-") as tmp:
        tiny_dir, big_dir = Path(tmp, "tiny"), Path(tmp, "big")
        train_tokenizer().save_pretrained(tiny_dir)
        train_big_tokenizer(args.big_vocab, big_dir)
        for label, path in (("tiny", tiny_dir), ("big", big_dir)):
            size = len(AutoTokenizer.from_pretrained(path))
            vocab = size + args.pad
            entry: dict[str, Any] = {"tokenizer_size": size, "model_vocab": vocab,
                                     "torch_eager_apply_ms": eager_apply_ms(args.batch, vocab)}
            for lib in args.libraries:
                entry[lib] = run_child(["--child", lib, "--tokenizer", str(path), "--model-vocab", str(vocab),
                                        "--batch", str(args.batch), "--steps", str(args.steps),
                                        "--threads", str(args.threads),
                                        "--repeats", str(args.repeats)], args.lib_timeout)
            result["vocabs"][label] = entry
    print_result(result, args.out)


if __name__ == "__main__":
    main()
