"""Adapter files on the worker: a job's `adapter` id becomes a local directory the runner loads.

Uploaded adapters are copied from object storage once into `<adapter cache>/<id>/` (written to a
temporary directory, then renamed, so a half-copied adapter is never loaded); registry adapters
are read where the registry says. An adapter deleted after its job was accepted fails that job.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from genq.shared import adapters
from genq.shared.db import session_scope
from genq.shared.registry import Registry
from genq.shared.storage import Storage
from genq.workers.runners.base import InvalidRequest, LocalAdapter


class AdapterFiles:
    def __init__(self, sessions: sessionmaker[Session], storage: Storage, registry: Registry,
                 cache_dir: Path | None = None) -> None:
        self.sessions, self.storage, self.registry = sessions, storage, registry
        self.cache_dir = cache_dir or Path(tempfile.gettempdir()) / "genq-adapters"
        self._lock = threading.Lock()

    def local(self, adapter_id: str, *, model: str) -> LocalAdapter:
        with session_scope(self.sessions) as s:
            source = adapters.locate(s, self.registry, adapter_id)
        if source is None:
            raise InvalidRequest(f"adapter {adapter_id!r} no longer exists", "body.adapter")
        if source.model != model:
            raise InvalidRequest(f"adapter {adapter_id!r} is for model {source.model!r}, not {model!r}",
                                 "body.adapter")
        if source.local_dir is not None:
            return LocalAdapter(source.id, source.local_dir)
        target = self.cache_dir / source.id
        with self._lock:
            if not target.is_dir():
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(prefix=f".{source.id}-", dir=self.cache_dir))
                try:
                    for name, key in source.storage_keys.items():
                        (staging / Path(name).name).write_bytes(self.storage.get(key))
                    staging.rename(target)
                except BaseException:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
        return LocalAdapter(source.id, target)
