"""The GPU check still runs end to end (tiny sizes, CPU), so it cannot rot unnoticed on machines
without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


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
    b = result["batching"]
    assert b["text"]["genq"]["requests"] == 16 and b["text"]["genq"]["completion_tokens"] == 16 * 8
    assert b["text"]["in_process"]["completion_tokens"] == 16 * 8 and b["image"]["genq"]["images"] == 4
    assert all(v["ratio_genq_to_in_process"] > 0 and v["met"] == (v["ratio_genq_to_in_process"] >= 0.85)
               for v in b.values())
    # The mixed-length workload in process: static batches and continuous batching did the same work.
    mixed = result["mixed"]
    assert mixed["requests"] == 8 and mixed["max_tokens_classes"] == [4, 8, 16] and mixed["dtype"] == "float32"
    arms = [mixed[arm] for arm in ("b_static_input", "s_static_sorted", "c_continuous")]
    assert len({arm["completion_tokens"] for arm in arms}) == 1 and all(arm["tokens_per_s"] > 0 for arm in arms)
    assert mixed["c_over_b"] == pytest.approx(arms[2]["tokens_per_s"] / arms[0]["tokens_per_s"], rel=0.01)
    # ... and genq end to end (arm d) did the same work, its ratios following from the arms' rates.
    d = mixed["d_genq"]
    assert d["model"] == "gpt2-mixed" and d["requests"] == 8 and d["tokens_per_s"] > 0
    assert d["completion_tokens"] == arms[0]["completion_tokens"]
    for name, arm in (("d_over_b", arms[0]), ("d_over_s", arms[1]), ("d_over_c", arms[2])):
        assert mixed[name] == pytest.approx(d["tokens_per_s"] / arm["tokens_per_s"], rel=0.01), name
