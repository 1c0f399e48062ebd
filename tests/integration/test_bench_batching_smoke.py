"""The batching benchmarks still run end to end (tiny sizes, CPU), so neither can rot unnoticed.

They check that every arm ran every request and that the ratios follow from the arms' rates; not
that the goals are met (that depends on the worker and on the machine's load)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.bench import run_benchmark

BENCH = Path(__file__).resolve().parents[2] / "bench"
BUSY = "another batching benchmark run holds the lock"
ARMS = ("a_naive_loop", "b_batched", "c_genq")


def check_ratios(result: dict[str, Any], unit: str, goals: dict[str, float]) -> None:
    a, b, c = (result[arm][unit] for arm in ARMS)
    ratios = result["ratios"]
    assert ratios["unit"] == unit
    for name, value in (("c_over_a", c / a), ("c_over_b", c / b), ("b_over_a", b / a)):
        assert ratios[name] == pytest.approx(value, rel=0.01), name
    assert {k: v["goal"] for k, v in result["goals"].items()} == goals
    for name, goal in result["goals"].items():
        assert goal["value"] == ratios[name] and goal["met"] == (ratios[name] >= goal["goal"])


@pytest.mark.integration
def test_text_batching_bench_reports_three_arms_of_equal_work(tmp_path: Path) -> None:
    requests, max_tokens = 12, 6
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH / "text_batching.py"), "--small", "--requests", str(requests),
           "--batch-size", "4", "--max-tokens", str(max_tokens), "--naive-sample", "3",
           "--models-dir", str(tmp_path / "models"), "--lock-wait", "20", "--out", str(out)]
    result = run_benchmark(cmd, out, 240, BUSY)

    assert result["model"]["eos_muted"] is True and result["max_batch_size"] == 4
    assert 5 <= result["prompt_tokens"]["min"] <= result["prompt_tokens"]["max"] <= 45
    for arm in ARMS:
        # EOS is muted, so every arm generates exactly max_tokens per request.
        assert result[arm]["requests"] == requests
        assert result[arm]["completion_tokens"] == requests * max_tokens, arm
        assert result[arm]["seconds"] > 0 and result[arm]["tokens_per_s"] > 0 and result[arm]["requests_per_s"] > 0
    a, b, c = (result[arm] for arm in ARMS)
    assert a["extrapolated"] is True and a["requests_timed"] == 3 and a["completion_tokens_timed"] == 3 * max_tokens
    # a and b report the faster of their runs before and after c.
    assert len(a["runs"]) == 2 and a["seconds_timed"] == min(run["seconds"] for run in a["runs"])
    assert b["batches"] == 3 and len(b["runs"]) == 2 and b["seconds"] == min(run["seconds"] for run in b["runs"])
    assert c["succeeded"] == requests and c["failed"] == 0 and c["stack"]["storage"] == "file://"
    assert result["same_tokens_per_request"] is True
    check_ratios(result, "tokens_per_s", {"c_over_a": 4.0, "c_over_b": 0.85})
    assert result["machine"]["cpus"] >= 1


@pytest.mark.integration
def test_image_batching_bench_reports_three_arms_and_same_pictures_per_workload(tmp_path: Path) -> None:
    images = 8  # the mixed workload: one round of its profiles' weights (3, 2, 2 and 1 images)
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH / "image_batching.py"), "--images", str(images), "--batch-size", "2",
           "--steps", "2", "--naive-sample", "4", "--mix", "--lock-wait", "20", "--out", str(out)]
    result = run_benchmark(cmd, out, 300, BUSY)

    assert result["max_batch_size"] == 2 and result["size"] == "64x64"
    mixed = result["mixed"]
    assert [(p["size"], p["steps"], p["images"]) for p in mixed["profiles"]] == [
        ("64x64", 10, 3), ("96x64", 6, 2), ("64x96", 14, 2), ("64x64", 6, 1)]
    # b groups the mix by shape: ceil(3/2) + 1 + 1 + 1 calls; the uniform workload is one group.
    for workload, calls in ((result, images // 2), (mixed, 5)):
        for arm in ARMS:
            assert workload[arm]["images"] == images, arm
            assert workload[arm]["seconds"] > 0 and workload[arm]["images_per_s"] > 0
        a, b = workload["a_naive_loop"], workload["b_batched"]
        assert a["extrapolated"] is True and a["images_timed"] == 4
        assert a["seconds_timed"] == min(run["seconds"] for run in a["runs"])
        assert b["calls"] == calls and len(b["runs"]) == 2 and b["seconds"] == min(run["seconds"] for run in b["runs"])
        assert workload["c_genq"]["succeeded"] == images and workload["c_genq"]["failed"] == 0
        check_ratios(workload, "images_per_s", {"c_over_b": 0.95})
        # Same prompt and seed, same image: batching may move a pixel by a rounding level, no more.
        assert workload["max_abs_diff"] <= 2, workload
    assert result["c_over_b"] == {"uniform": result["ratios"]["c_over_b"], "mixed": mixed["ratios"]["c_over_b"]}
