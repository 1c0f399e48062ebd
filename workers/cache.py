"""The worker's model cache: loaded runners in an LRU bounded by a memory budget.

A worker may serve several models. Each is loaded on first use; when loading one would take the
resident models over the budget, the least recently used ones that no job is using are unloaded
first. A model's size is what it measured when last loaded, or before its first load the size of
its weight files. Jobs pin the runner they use (`acquire`/`release`), so a model is never unloaded
under a running batch; if everything resident is in use, a load waits for a release (up to
`pin_wait_s`) and then goes ahead over the budget, with a warning.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from genq.shared.registry import ModelSpec
from genq.workers.runners.base import Runner

log = logging.getLogger("genq.worker")
PIN_WAIT_S = 120.0
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@dataclass
class ModelStats:
    loads: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    bytes: int = 0
    resident: bool = False


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """'20GiB', '512MB', '1.5g', '0' -> bytes."""
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = value[len(number):]
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size like 20GiB or 512MiB") from None
    if unit not in _UNITS or amount < 0:
        raise ValueError(f"{text!r} is not a size like 20GiB or 512MiB")
    return int(amount * _UNITS[unit])


def weight_file_bytes(source: str) -> int:
    """Bytes of the weight files under a local model directory; 0 for a hub id."""
    root = Path(source)
    if not root.is_dir():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def device_budget(device: str) -> int:
    """The default budget: 90% of the GPU's memory on CUDA, half the machine's RAM on the CPU."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory * 0.9)
    try:
        import os

        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 0  # unknown: no limit


class ModelCache:
    def __init__(self, specs: dict[str, ModelSpec], make: Callable[[ModelSpec], Runner], *,
                 budget_bytes: int = 0, on_change: Callable[[], None] | None = None,
                 pin_wait_s: float = PIN_WAIT_S) -> None:
        """`budget_bytes` 0 means no limit; `on_change` is called after each load and eviction."""
        self.specs, self.make, self.budget, self.on_change = specs, make, budget_bytes, on_change
        self.pin_wait_s = pin_wait_s
        self._runners: OrderedDict[str, Runner] = OrderedDict()  # resident, least recently used first
        self._pins: dict[str, int] = {}
        self._loading: set[str] = set()
        self._cond = threading.Condition()
        self.stats: dict[str, ModelStats] = {name: ModelStats() for name in specs}

    # --- use -------------------------------------------------------------------------------

    def acquire(self, model: str) -> Runner:
        """The model's runner, loaded if needed, pinned until `release(model)`."""
        with self._cond:
            while model in self._loading:
                self._cond.wait()
            self._pins[model] = self._pins.get(model, 0) + 1
            runner = self._runners.get(model)
            if runner is not None:
                self._runners.move_to_end(model)
                return runner
            self._loading.add(model)
        try:
            return self._load(model)
        except BaseException:
            with self._cond:
                self._pins[model] -= 1
                self._cond.notify_all()
            raise
        finally:
            with self._cond:
                self._loading.discard(model)
                self._cond.notify_all()

    def release(self, model: str) -> None:
        with self._cond:
            self._pins[model] = max(0, self._pins.get(model, 0) - 1)
            self._cond.notify_all()

    def fits(self, model: str) -> bool:
        """Whether the model would load without unloading another."""
        with self._cond:
            return not self.budget or self._used() + self._estimate(model) <= self.budget

    def loaded(self, model: str) -> Runner | None:
        """The model's runner if it is loaded now (not pinned: for reports)."""
        with self._cond:
            return self._runners.get(model)

    def resident(self) -> list[str]:
        with self._cond:
            return list(self._runners)

    # --- load and evict --------------------------------------------------------------------

    def _estimate(self, model: str) -> int:
        return self.stats[model].bytes or weight_file_bytes(self.specs[model].source)

    def _used(self) -> int:
        return sum(self.stats[m].bytes for m in self._runners)

    def _make_room(self, model: str, need: int) -> None:
        """Unload unpinned models, least recently used first, until `need` more bytes fit."""
        if not self.budget:
            return
        deadline = time.monotonic() + self.pin_wait_s
        with self._cond:
            while self._used() + need > self.budget:
                victim = next((m for m in self._runners if m != model and not self._pins.get(m)), None)
                if victim is not None:
                    self._evict(victim)
                    continue
                left = deadline - time.monotonic()
                if not any(m != model for m in self._runners) or left <= 0:
                    if self._runners:
                        log.warning("loading %s goes over the memory budget (%d MiB in use by models "
                                    "that are busy, %d MiB needed, budget %d MiB)", model,
                                    self._used() >> 20, need >> 20, self.budget >> 20)
                    return
                self._cond.wait(min(left, 1.0))

    def _evict(self, model: str) -> None:  # under the lock
        runner = self._runners.pop(model)
        started = time.perf_counter()
        runner.unload()
        del runner
        gc.collect()
        _empty_device_cache()
        stats = self.stats[model]
        stats.evictions += 1
        stats.resident = False
        log.info("evicted model %s (%d MiB) in %.2fs to stay within the %d MiB budget", model,
                 stats.bytes >> 20, time.perf_counter() - started, self.budget >> 20)

    def _load(self, model: str) -> Runner:
        spec = self.specs[model]
        self._make_room(model, self._estimate(model))
        started = time.perf_counter()
        runner = self.make(spec)
        runner.load()
        seconds = time.perf_counter() - started
        size = int(runner.memory_bytes())
        with self._cond:
            stats = self.stats[model]
            stats.loads += 1
            stats.load_seconds += seconds
            stats.bytes = size
            stats.resident = True
            self._runners[model] = runner
        log.info("loaded model %s (%s, %d MiB) in %.2fs%s", model, spec.kind, size >> 20, seconds,
                 f" (load {stats.loads})" if stats.loads > 1 else "")
        self._make_room(model, 0)  # the real size may be larger than the estimate
        if self.on_change is not None:
            self.on_change()  # evictions made room before this load: one report covers both
        return runner


def _empty_device_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
