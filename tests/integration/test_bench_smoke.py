"""The queue throughput benchmark still runs end to end (tiny sizes), so it cannot rot unnoticed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.bench import run_benchmark

BENCH = Path(__file__).resolve().parents[2] / "bench" / "queue_throughput.py"


@pytest.mark.integration
def test_queue_throughput_bench_reports_positive_rates(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--jobs", "50", "--batch-lines", "200", "--workers", "2",
           "--lock-wait", "20", "--out", str(out)]
    result = run_benchmark(cmd, out, 240, "another queue benchmark run is using the Redis dbs")
    assert result["workers"] == 2
    assert result["raw_celery"]["tasks"] == 50 and result["raw_celery"]["tasks_per_s"] > 0
    assert result["genq_e2e"]["jobs"] == 50 and result["genq_e2e"]["jobs_per_s"] > 0
    assert 0 < result["genq_e2e"]["accept_s"] < result["genq_e2e"]["seconds"]
    assert result["ratio_genq_to_raw"] > 0
    assert result["batch_accept"]["lines"] == 200 and result["batch_accept"]["lines_per_s"] > 0
