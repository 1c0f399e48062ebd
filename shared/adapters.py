"""Where a worker finds a job's LoRA adapter. A job's stored body names its adapter by a stable
id (`adapter_...` for uploads, the registry name for registry adapters); uploaded files live in
object storage under `adapters/<adapter id>/<file name>`, registry adapters where the registry points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from genq.shared.db import Adapter
from genq.shared.registry import Registry


@dataclass(frozen=True)
class AdapterSource:
    """Where a worker finds an adapter's files: a local directory (registry adapters) or storage keys
    by file name (uploaded adapters)."""

    id: str
    model: str
    kind: str
    local_dir: Path | None = None
    storage_keys: dict[str, str] = field(default_factory=dict)


def storage_key(adapter_id: str, file_name: str) -> str:
    return f"adapters/{adapter_id}/{file_name}"


def locate(session: Session, registry: Registry, adapter_id: str) -> AdapterSource | None:
    """Where a worker finds the files of the adapter a job's body names (by its stable id)."""
    row = session.get(Adapter, adapter_id) if adapter_id.startswith("adapter_") else None
    if row is not None:
        keys = {f["name"]: storage_key(row.id, f["name"]) for f in row.files}
        return AdapterSource(id=row.id, model=row.base_model, kind=row.kind, storage_keys=keys)
    spec = registry.adapters.get(adapter_id)
    model = registry.get(spec.model) if spec else None
    if spec is None or model is None:
        return None
    return AdapterSource(id=spec.name, model=spec.model, kind=model.kind, local_dir=Path(spec.source))
