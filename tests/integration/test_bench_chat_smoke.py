"""The chat batching benchmark still runs end to end (tiny model, a few requests, CPU), so it cannot
rot unnoticed. It checks that every arm ran every request to its max tokens and that the ratios
follow from the arms' rates; not that the goal is met (that depends on the machine's load)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.bench import run_benchmark

BENCH = Path(__file__).resolve().parents[2] / "bench"
ARMS = ("a_naive_loop", "b_batched", "c_genq")


@pytest.mark.integration
def test_chat_batching_bench_reports_three_arms_of_equal_work(tmp_path: Path) -> None:
    requests, mix = 6, (4, 8)
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH / "chat_batching.py"), "--small", "--requests", str(requests),
           "--batch-size", "4", "--token-mix", ",".join(map(str, mix)), "--naive-sample", "2", "--threads", "1",
           "--models-dir", str(tmp_path / "models"), "--lock-wait", "20", "--out", str(out)]
    result = run_benchmark(cmd, out, 240, "another batching benchmark run holds the lock")

    work = result["workload"]
    assert result["model"]["eos"] == "<|im_end|>" and result["model"]["eos_muted"] is True
    assert work["requests"] == requests and set(work["max_completion_tokens"]) <= {str(t) for t in mix}
    assert sum(work["messages"].values()) == requests and set(work["messages"]) <= {str(k) for k in range(1, 7)}
    assert work["prompt_tokens"]["min"] > 0 and work["rows"] == sum(int(n) * k for n, k in work["n"].items())
    billed = work["completion_tokens_billed"]
    assert min(mix) * requests <= billed <= 2 * max(mix) * requests
    for arm in ARMS:
        # EOS is muted, so every choice in every arm runs to its own max tokens.
        assert result[arm]["requests"] == requests, arm
        assert result[arm]["completion_tokens"] == billed, arm
        assert result[arm]["seconds"] > 0 and result[arm]["tokens_per_s"] > 0, arm
    a, b, c = (result[arm] for arm in ARMS)
    assert a["extrapolated"] is True and a["requests_timed"] == 2 and len(a["runs"]) == 2
    assert a["seconds_timed"] == min(run["seconds"] for run in a["runs"])
    assert len(b["runs"]) == 2 and b["seconds"] == min(run["seconds"] for run in b["runs"])
    assert b["rows"] == work["rows"] and b["decode_slots"]["billed"] == billed <= b["decode_slots"]["computed"]
    assert work["prompt_tokens"]["total"] <= b["prefill_slots"]["real"] <= b["prefill_slots"]["computed"]
    assert c["succeeded"] == requests and c["failed"] == 0
    assert c["finish_reasons"] == {"length": work["rows"], "stop": 0}
    assert c["prompt_tokens"] == work["prompt_tokens"]["total"]  # genq templated them as the bench did
    assert c["stack"]["omp_num_threads"] == "1" and result["machine"]["torch_threads"] == 1
    ratios = result["ratios"]
    assert ratios["unit"] == "tokens_per_s"
    for name, value in (("c_over_b", c["tokens_per_s"] / b["tokens_per_s"]),
                        ("c_over_a", c["tokens_per_s"] / a["tokens_per_s"]),
                        ("b_over_a", b["tokens_per_s"] / a["tokens_per_s"])):
        assert ratios[name] == pytest.approx(value, rel=0.01), name
    assert result["goals"]["c_over_b"] == {"goal": 0.85, "value": ratios["c_over_b"],
                                           "met": ratios["c_over_b"] >= 0.85}
    assert result["same_tokens_per_request"] is True
    assert 0 <= result["chat_overhead"]["share_of_c_seconds"] < 1
