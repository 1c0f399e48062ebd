"""The mixed-length text benchmark still runs end to end (tiny sizes, CPU), so it cannot rot unnoticed.

It checks that every arm ran every request with the same work, that the ratios follow from the arms'
rates and that the staggered arrivals report latencies per max_tokens class; not how fast genq is
(that depends on the worker and on the machine's load)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.bench import run_benchmark

BENCH = Path(__file__).resolve().parents[2] / "bench" / "text_mixed.py"
ARMS = {"a": "a_naive_loop", "b": "b_static_input", "s": "s_static_sorted", "c": "c_continuous", "d": "d_genq"}


@pytest.mark.integration
def test_text_mixed_bench_reports_every_arm_ratio_and_staggered_latency(tmp_path: Path) -> None:
    requests, classes, staggered = 8, (2, 4, 8), 4
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--small", "--requests", str(requests), "--batch-size", "4",
           "--naive-sample", "2", "--max-tokens", ",".join(map(str, classes)), "--staggered-requests",
           str(staggered), "--models-dir", str(tmp_path / "models"), "--lock-wait", "20", "--out", str(out)]
    result = run_benchmark(cmd, out, 120, "another batching benchmark run holds the lock")

    # 60 / 25 / 15 % of 8 requests, EOS muted: every arm bills exactly the requests' max_tokens.
    counts = result["workload"]["max_tokens_counts"]
    assert counts == {"2": 5, "4": 2, "8": 1}
    work = sum(int(m) * n for m, n in counts.items())
    assert 5 <= result["workload"]["prompt_tokens"]["min"] <= result["workload"]["prompt_tokens"]["max"] <= 60
    for arm in ARMS.values():
        assert result[arm]["requests"] == requests and result[arm]["tokens_per_s"] > 0, arm
        if arm != "a_naive_loop":  # a is timed on a sample
            assert result[arm]["completion_tokens"] == work, arm
    assert result["a_naive_loop"]["extrapolated"] is True and result["a_naive_loop"]["requests_timed"] == 2
    assert result["d_genq"]["succeeded"] == requests and result["d_genq"]["failed"] == 0
    # Static batches run to their longest row: sorted by max_tokens, fewer rows wait on the longest.
    assert 0 < result["b_static_input"]["useful_share"] <= result["s_static_sorted"]["useful_share"] <= 1
    assert result["c_continuous"]["settings"]["max_requests_per_batch"] == 4

    ratios = result["ratios"]
    for name in ("d_over_a", "d_over_b", "d_over_s", "d_over_c", "c_over_b", "s_over_b"):
        top, bottom = (ARMS[name[0]], ARMS[name[-1]])
        assert ratios[name] == pytest.approx(result[top]["tokens_per_s"] / result[bottom]["tokens_per_s"],
                                             rel=0.01), name

    stag = result["staggered"]
    assert stag["requests"] == staggered and stag["rate_factor"] == 0.7
    assert stag["rate_per_s"] == pytest.approx(0.7 * result["b_static_input"]["requests_per_s"], rel=0.01)
    for arm in ("c_continuous", "d_genq"):
        assert sum(c["count"] for c in stag[arm].values()) == staggered
        assert all(0 < c["p50_ms"] <= c["p95_ms"] <= c["max_ms"] for c in stag[arm].values()), stag[arm]
    shortest = str(stag["shortest_class"])
    assert shortest == min(stag["c_continuous"], key=int) == min(stag["d_genq"], key=int)
    assert ratios["staggered_p95_d_over_c"] == stag["p95_d_over_c"] == pytest.approx(
        stag["d_genq"][shortest]["p95_ms"] / stag["c_continuous"][shortest]["p95_ms"], rel=0.01)
    assert result["machine"]["transformers"] and result["machine"]["cpus"] >= 1
