"""The fine-tuning benchmark still runs end to end (a 2-layer model, a few steps, CPU), so it cannot
rot unnoticed: every arm trains the same steps on the same tokens, the job through genq included,
and the ratios follow from the arms' rates; not that any figure is met (that depends on the machine)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.bench import run_benchmark

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fine_tuning.py"


@pytest.mark.integration
def test_fine_tuning_bench_trains_the_same_job_in_every_arm(tmp_path: Path) -> None:
    steps = 3
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--shape", "tiny", "--steps", str(steps), "--batch-size", "2",
           "--warmup", "1", "--out", str(out)]
    result = run_benchmark(cmd, out, 300, "the fine-tuning benchmark's Redis db is in use")

    arms = result["arms"]
    assert set(arms) == {"train", "bare", "trainer", "genq"}
    assert all(arm["steps"] == steps and arm["steady_tokens_per_s"] > 0 for arm in arms.values())
    assert arms["genq"]["trained_tokens"] == arms["train"]["trained_tokens"] > 0  # the same examples, masked alike
    ratios = result["ratios"]
    assert ratios["genq_over_train"] == pytest.approx(
        arms["genq"]["steady_tokens_per_s"] / arms["train"]["steady_tokens_per_s"], rel=0.01)
    assert ratios["genq_job_over_train_job"] == pytest.approx(
        arms["genq"]["job_tokens_per_s"] / arms["train"]["job_tokens_per_s"], rel=0.01)
