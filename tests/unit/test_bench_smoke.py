"""The queue throughput benchmark still runs end to end (tiny sizes), so it cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "queue_throughput.py"
EX_TEMPFAIL = 75  # the benchmark's "another run held the lock" status


@pytest.mark.integration
def test_queue_throughput_bench_reports_positive_rates(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--jobs", "50", "--batch-lines", "200", "--lock-wait", "20", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM, not SIGKILL: the benchmark then stops its processes and drops its database
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"benchmark took over 55s:\n{stderr[-4000:]}")
    if proc.returncode == EX_TEMPFAIL:
        pytest.skip("another queue benchmark run is using the Redis dbs")
    assert proc.returncode == 0, stderr[-4000:]
    result = json.loads(stdout)
    assert result == json.loads(out.read_text())
    assert result["raw_celery"]["tasks"] == 50 and result["raw_celery"]["tasks_per_s"] > 0
    assert result["genq_e2e"]["jobs"] == 50 and result["genq_e2e"]["jobs_per_s"] > 0
    assert result["genq_e2e"]["accept_s"] > 0
    assert result["ratio_genq_to_raw"] > 0
    assert result["batch_accept"]["lines"] == 200 and result["batch_accept"]["lines_per_s"] > 0
