"""The LoRA adapters loaded on one model: least recently used first, bounded by the model's
`max_adapters`, with the load counters the worker reports to /metrics. Text and image runners
share it; each says how to unload one of its own adapters."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class AdapterStats:
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    load_failures: int = 0


class AdapterLRU(Generic[T]):
    """Adapter id -> whatever the runner keeps for a loaded adapter (its peft name, its files)."""

    def __init__(self, capacity: int, unload: Callable[[str, T], None]) -> None:
        self.capacity = capacity
        self._unload = unload
        self._entries: OrderedDict[str, T] = OrderedDict()
        self.stats = AdapterStats()

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def ids(self) -> list[str]:
        """Loaded adapter ids, least recently used first."""
        return list(self._entries)

    def use(self, adapter_id: str) -> T | None:
        """The loaded adapter's value, now the most recently used; None if it is not loaded."""
        if adapter_id not in self._entries:
            return None
        self._entries.move_to_end(adapter_id)
        return self._entries[adapter_id]

    def loaded(self, adapter_id: str, value: T, seconds: float) -> None:
        """Record a successful load that took `seconds`."""
        self._entries[adapter_id] = value
        self.stats.loads += 1
        self.stats.load_seconds += seconds

    def failed(self) -> None:
        self.stats.load_failures += 1

    def evict_beyond(self, limit: int, keep: Iterable[str] = ()) -> None:
        """Unload least recently used adapters, sparing `keep`, until at most `limit` stay."""
        spared = set(keep)
        while len(self._entries) > limit:
            victim = next((a for a in self._entries if a not in spared), None)
            if victim is None:
                return
            self._unload(victim, self._entries.pop(victim))
            self.stats.evictions += 1

    def clear(self) -> None:
        """Forget every adapter (they went with the model's weights); not counted as evictions."""
        self._entries.clear()

    def report(self) -> dict[str, Any]:
        return {**asdict(self.stats), "resident": len(self._entries)}
