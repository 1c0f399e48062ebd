"""The status load benchmark still runs end to end (a small batch, a few clients, two API
processes), so it cannot rot unnoticed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.bench import run_benchmark

BENCH = Path(__file__).resolve().parents[2] / "bench" / "status_load.py"
JOBS = 600  # enough that the drain outlasts a few client periods: workers now finish ~500 echo jobs/s


@pytest.mark.integration
def test_status_load_bench_reports_sane_numbers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--jobs", str(JOBS), "--workers", "1", "--api-workers", "2",
           "--clients", "4", "--poll-ms", "20", "--idle-reads", "30", "--max-seconds", "180", "--lock-wait", "20",
           "--out", str(out)]
    result = run_benchmark(cmd, out, 240, "another status load benchmark run holds the lock")

    assert result["capped"] is False and result["progress"]["status"] == "completed"
    assert result["progress"]["request_counts"]["completed"] == JOBS
    assert (result["jobs"], result["api_workers"], result["clients"]) == (JOBS, 2, 4)
    idle, loaded = result["batch_read_idle"], result["batch_read_loaded"]
    assert idle["count"] == 30 and loaded["count"] >= 1
    for stats in (idle, loaded, result["clients_reads"]["job"], result["clients_reads"]["batch"]):
        assert 0 < stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    reads = result["clients_reads"]["job"]["count"] + result["clients_reads"]["batch"]["count"]
    # A rare dropped keep-alive connection is counted, not fatal; more than that is a fault.
    assert result["clients_reads"]["errors"] <= max(1, reads // 100), result["clients_reads"]["errors_sample"]
    assert 0 < result["clients_reads"]["cpu_share"]
    assert result["p95_ratio_loaded_to_idle"] == round(loaded["p95_ms"] / idle["p95_ms"], 2)
    assert result["goal_ratio"] == 5 and isinstance(result["meets_goal"], bool)
