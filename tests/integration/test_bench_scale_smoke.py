"""The batch scale benchmark still runs end to end (a tiny batch), so it cannot rot unnoticed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.bench import run_benchmark

BENCH = Path(__file__).resolve().parents[2] / "bench" / "batch_scale.py"
LINES = 300


@pytest.mark.integration
def test_batch_scale_bench_reports_sane_numbers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--lines", str(LINES), "--max-seconds", "180", "--lock-wait", "20",
           "--out", str(out)]
    result = run_benchmark(cmd, out, 240, "another batch scale benchmark run holds the lock")

    assert result["lines"] == LINES and result["capped"] is False
    assert result["progress"]["status"] == "completed"
    assert result["progress"]["request_counts"]["completed"] == LINES
    assert 0 < result["upload_s"] < 60
    assert 0 < result["validated_s"] <= result["enqueued_s"] < 120
    assert result["goal_enqueue_s"] == 30 and isinstance(result["meets_enqueue_goal"], bool)

    poll = result["poll"]
    assert poll["count_violations"] == 0, result.get("violations_sample")
    assert poll["count"] >= 1
    assert 0 < poll["p50_ms"] <= poll["p95_ms"] <= poll["p99_ms"] <= poll["max_ms"]
    assert poll["goal_p95_ms"] == 50 and isinstance(poll["meets_goal"], bool)

    drain = result["drain"]
    assert drain["seconds"] > 0 and drain["jobs"] == LINES and drain["jobs_per_s"] > 0
    assert result["machine"]["cpus"] >= 1
