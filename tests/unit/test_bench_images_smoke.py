"""The image benchmark and the GPU check still run end to end (tiny sizes, CPU), so neither can rot
unnoticed on machines without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.integration
def test_image_throughput_bench_reports_positive_rates_and_same_pixels(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH / "image_throughput.py"), "--images", "4", "--steps", "2",
                           "--out", str(out)], check=False, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert result == json.loads(out.read_text())
    for side in ("direct", "genq"):
        assert result[side]["images"] == 4
        assert result[side]["seconds"] > 0 and result[side]["images_per_s"] > 0
    assert [run["images"] for run in result["direct"]["runs"]] == [4, 4]
    assert result["ratio_genq_to_direct"] > 0 and result["goal"] == 0.85
    assert result["meets_goal"] == (result["ratio_genq_to_direct"] >= 0.85)
    # Both sides draw each image from its own CPU generator with the request's seed.
    assert result["pixels_identical"] is True and result["images_compared"] == 4
    assert result["machine"]["cpus"] >= 1


@pytest.mark.integration
def test_gpu_check_cpu_small_path_reports_rates(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--cpu", "--small", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert result == json.loads(out.read_text())
    assert result["mode"] == "cpu" and result["small"] is True
    text, image = result["text"], result["image"]
    assert text["requests"] == 8 and text["completion_tokens"] > 0
    assert text["tokens_per_s"] > 0 and text["requests_per_s"] > 0
    assert image["images"] == 2 and image["images_per_s"] > 0 and image["it_per_s"] > 0
    assert result["device"]["torch"] and result["total_s"] > 0
