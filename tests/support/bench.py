"""Running a bench/ script as a user would, for the benchmarks' smoke tests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest


def run_benchmark(cmd: list[str], out: Path, timeout_s: float, busy: str) -> dict[str, Any]:
    """Run a bench/ script as a user would; return its JSON (checked against --out). Skips when
    another run holds the benchmark's lock (exit 75)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM, not SIGKILL: the benchmark then stops its processes and drops its database
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"benchmark took over {timeout_s:g}s:\n{stderr[-4000:]}")
    if proc.returncode == 75:
        pytest.skip(busy)
    assert proc.returncode == 0, stderr[-4000:]
    result: dict[str, Any] = json.loads(stdout)
    assert result == json.loads(out.read_text())
    return result
