"""LoRA adapters on a causal LM through peft: hot-loading onto the resident model (which becomes a
PeftModel with its first adapter), an LRU of `max_adapters`, and the per-row adapter names of a
mixed batch ("__base__" for rows without one)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from genq.workers.runners.base import BatchItem, InvalidRequest, LocalAdapter
from genq.workers.runners.lora import AdapterLRU

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


class PeftAdapters:
    """Owns the model while it is loaded, since loading the first adapter wraps it."""

    def __init__(self, model_name: str, capacity: int) -> None:
        self.model_name = model_name
        self.model: Any = None  # the causal LM, or a peft PeftModel around it once an adapter is loaded
        self.lru: AdapterLRU[LocalAdapter] = AdapterLRU(capacity, self._unload)

    def _unload(self, adapter_id: str, _adapter: LocalAdapter) -> None:
        self.model.delete_adapter(adapter_id)

    def attach(self, model: Any) -> None:
        """A freshly loaded model (or None once unloaded): no adapter is on it."""
        self.model = model
        self.lru.clear()

    @staticmethod
    def name(item: BatchItem) -> str:
        return item.adapter.id if item.adapter is not None else BASE_ADAPTER

    # 1. Loading: what the batch needs, evicting the least recently used ones it does not.
    def ensure(self, items: list[BatchItem], in_use: set[str] | frozenset[str] = frozenset()) -> dict[int, Exception]:
        """Load the batch's adapters not yet resident, never evicting one `in_use` by running rows.
        Returns the items whose adapter could not be loaded (each fails alone)."""
        from peft import PeftModel

        failures: dict[int, Exception] = {}
        needed = {it.adapter.id for it in items if it.adapter is not None} | in_use
        for j, item in enumerate(items):
            adapter = item.adapter
            if adapter is None or self.lru.use(adapter.id) is not None:
                continue
            self.lru.evict_beyond(self.lru.capacity - 1, keep=needed)  # room for this one
            started = time.perf_counter()
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(adapter.path), adapter_name=adapter.id, is_trainable=False)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(adapter.path), adapter_name=adapter.id,
                                                           is_trainable=False).eval()
            except Exception as exc:  # noqa: BLE001 - reported as that job's failure
                self.lru.failed()
                failures[j] = InvalidRequest(
                    f"adapter {item.body.adapter!r} cannot be loaded onto model {self.model_name}: "  # type: ignore[attr-defined]
                    f"{type(exc).__name__}: {exc}"[:1000], "body.adapter")
                continue
            self.lru.loaded(adapter.id, adapter, time.perf_counter() - started)
        for j, item in enumerate(items):  # later items naming an adapter that failed above
            if j not in failures and item.adapter is not None and item.adapter.id not in self.lru:
                failures[j] = InvalidRequest(f"adapter {item.body.adapter!r} cannot be loaded", "body.adapter")  # type: ignore[attr-defined]
        return failures

    # 2. Running: the extra generate/forward arguments for rows using these adapters.
    @contextmanager
    def scope(self, names: list[str]) -> Iterator[dict[str, Any]]:
        """One adapter name per row: all the base model, all one adapter, or a peft mixed batch."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            yield {}
            return
        distinct = set(names)
        if distinct == {BASE_ADAPTER}:
            with self.model.disable_adapter():
                yield {}
        elif len(distinct) == 1:
            self.model.set_adapter(names[0])
            yield {}
        else:
            yield {"adapter_names": names}
