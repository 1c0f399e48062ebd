#!/usr/bin/env bash
# genq GPU check: full-size random-weight gpt2 (124M) and Stable Diffusion 1.5 served by genq on one
# NVIDIA GPU, measured through the API; prints one JSON object. For a GPU machine with NO internet.
#
#   bash bench/gpu_check.sh                  # GPU 0: 64 completions x 64 tokens, 8 images 512x512 x 30 steps,
#                                            # then batching: 256 completions x 32 tokens (batch 64) and
#                                            # 16 images 512x512 fp16 (batch 8), genq vs in-process;
#                                            # and 200 mixed-length completions in bf16: static
#                                            # batches of 32 and continuous batching in process,
#                                            # and the same bodies through genq
#   bash bench/gpu_check.sh --gpu 1          # another GPU (both workers share it)
#   bash bench/gpu_check.sh --cpu --small    # the same code path on a CPU with tiny models (~1 min)
#   bash bench/gpu_check.sh --out result.json
# Other flags go to bench/gpu_check.py (see its --help): --text-requests, --max-tokens,
# --image-requests, --size, --steps, --batch-text-requests, --batch-max-tokens, --batch-image-requests,
# --no-batching, --mixed-requests, --no-mixed, --models-dir, --budget-s.
#
# What it does (bench/gpu_check.py has the details): writes the models with bench/gpu_models.py into
# a temporary directory (gpt2's EOS muted, so every completion runs to max_tokens); runs the in-process
# batched baselines (gpt2 `generate` at batch 64, the SD pipeline at batch 8), each in its own process
# on the idle GPU, and the mixed-length workload (bench/text_mixed.py --in-process: static batches
# in input order and sorted by max_tokens, and transformers' continuous batching, bf16 with SDPA);
# starts `python3 -m genq api` and three workers (`--models gpt2-random --gpu N`, `--models sd15-random
# --gpu N`, and `--models gpt2-mixed --gpu N`: gpt2-random's weights at batch 32 in bf16) on the
# embedded defaults (SQLite DB and broker, file storage: no
# server needed); runs a text batch and an image batch through the API; reports tokens/s, requests/s,
# images/s, it/s, the peak GPU memory (nvidia-smi every 0.5 s), the GPU and the torch/CUDA versions;
# then sends the baselines' requests through genq and reports `batching`: both sides and genq's share
# of the in-process throughput (goal 0.85); and sends the mixed-length bodies through genq as one
# batch, adding to `mixed` genq's tokens/s (d_genq) and d_over_b, d_over_s, d_over_c.
# It stops by itself within GENQ_CHECK_TIMEOUT seconds (default 420) and stops every process it
# started on exit, even when killed by the limit.
#
# Python: $PYTHON if set, else ./.venv/bin/python if present, else python3. It needs torch with CUDA
# plus genq's dependencies importable:
#   - where there is internet:  pip install -e .     (after a CUDA build of torch)
#   - with no internet: on a machine that has it, download cp312 wheels of what the GPU machine's
#     python lacks. Against this workplace's H200 image (2026-11) that was, at the versions genq is
#     tested with (`pip freeze` of a working genq venv has them):
#       alembic amqp annotated-types argon2-cffi argon2-cffi-bindings billiard celery cffi
#       click-didyoumean click-plugins click-repl diffusers fastapi httpcore2 httpx2 importlib-metadata
#       kombu lazy-importer mako minio opentelemetry-api prompt-toolkit psycopg psycopg-binary
#       pycparser pycryptodome pydantic pydantic-core pydantic-settings python-dotenv redis sqlalchemy
#       starlette truststore typing-inspection tzlocal uvicorn vine wcwidth
#     (if diffusers or transformers then fail to import, also carry transformers, tokenizers and
#     huggingface-hub at genq's versions):
#       pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#           --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#           --platform manylinux2014_x86_64 -d .whl NAME==VERSION ...
#     carry .whl/ to the GPU machine and, in the repository root there:
#       pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#       export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1

cpu=0
for arg in "$@"; do [[ $arg == --cpu ]] && cpu=1; done
if [[ $cpu == 0 ]]; then
    if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_check: nvidia-smi finds no GPU here; run with --cpu --small to check the code path" >&2
        exit 2
    fi
    nvidia-smi -L >&2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/genq-gpu-check.XXXXXX")
driver=""
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n $driver ]] && kill -0 "$driver" 2>/dev/null; then
        kill -TERM "$driver" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$driver" 2>/dev/null || break; sleep 0.2; done
    fi
    # The driver's API and workers run in their own process groups, listed in $work/pids.
    if [[ -f $work/pids ]]; then
        while read -r pid; do kill -TERM -- "-$pid" 2>/dev/null || true; done <"$work/pids"
        sleep 1
        while read -r pid; do kill -KILL -- "-$pid" 2>/dev/null || true; done <"$work/pids"
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

limit=${GENQ_CHECK_TIMEOUT:-420}
# The driver's own budget ends before the hard limit, so it can report what failed and clean up.
timeout --signal=TERM --kill-after=15 "$limit" \
    "$PY" bench/gpu_check.py --workdir "$work" --budget-s "$((limit - 20))" "$@" &
driver=$!
wait "$driver"
