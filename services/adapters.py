"""LoRA adapters on the API side: names, what a tenant may name in a request (the catalog), stored
uploads and their public JSON shapes. Upload checks live in genq.services.adapter_archive.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import delete as sql_delete
from sqlalchemy import select
from sqlalchemy.orm import Session

from genq.services.adapter_archive import CONFIG_NAME, AdapterError, CheckedAdapter
from genq.services.adapter_archive import AdapterTooLarge as AdapterTooLarge  # re-exported: the routes catch it here
from genq.shared.adapters import storage_key
from genq.shared.db import Adapter, IdempotencyKey, new_id, owned_by
from genq.shared.fine_tuning_jobs import is_fine_tuned
from genq.shared.kinds import ADAPTER_KINDS
from genq.shared.registry import ModelSpec, Registry
from genq.shared.storage import Storage

log = logging.getLogger("genq.adapters")

_ADAPTER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}$")


def check_name(name: str) -> str | None:
    """Why `name` cannot name an uploaded adapter, or None when it can."""
    if not _ADAPTER_NAME.match(name):
        return "must be 1 to 64 characters of a-z, 0-9, '-', '_' and '.', starting with a letter or digit"
    if name.startswith("adapter_"):
        return "must not start with 'adapter_' (adapter ids do)"
    return None


class AdapterCatalog:
    """The adapters one tenant may name: its own uploads and the registry's. The uploads are read
    once, on first use, so a batch of many lines costs one query (and none without adapters)."""

    def __init__(self, session: Session | None, registry: Registry, tenant: str | None) -> None:
        self.session, self.registry, self.tenant = session, registry, tenant
        self._uploads: tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]] | None = None

    def _read(self) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
        if self._uploads is None:
            rows = [] if self.session is None else self.session.execute(
                select(Adapter.id, Adapter.name, Adapter.base_model).where(owned_by(Adapter.tenant, self.tenant))
                .order_by(Adapter.id)).all()
            by_id = {r.id: (r.id, r.base_model) for r in rows}
            by_name: dict[str, tuple[str, str]] = {}
            for r in rows:
                by_name.setdefault(r.name, (r.id, r.base_model))  # the oldest, were a race to leave two
            self._uploads = (by_id, by_name)
        return self._uploads

    def fine_tuned(self, model: str) -> tuple[str, str] | None:
        """(adapter id, base model) of the tenant's fine-tuned model `model` (an `ft:` name), or None."""
        return self._read()[1].get(model) if is_fine_tuned(model) else None

    def resolve(self, *, model: str, ref: str) -> str:
        """The stable id of adapter `ref` (an id or a name) for `model`, or AdapterError."""
        spec = self.registry.get(model)
        if spec is None or spec.kind not in ADAPTER_KINDS:
            kind = f"a {spec.kind} model" if spec else "not a registered model"
            raise AdapterError(f"model {model!r} is {kind}, which does not serve adapters", code="invalid_request")
        by_id, by_name = self._read()
        found = by_id.get(ref) or by_name.get(ref)
        if found is None and ref in self.registry.adapters:
            found = (ref, self.registry.adapters[ref].model)
        if found is None:
            raise AdapterError(f"adapter {ref!r} is not registered: upload it with POST /v1/adapters or name one "
                               "listed by GET /v1/adapters", code="adapter_not_found")
        if found[1] != model:
            raise AdapterError(f"adapter {ref!r} is for model {found[1]!r}, not {model!r}", code="invalid_request")
        return found[0]


# --- stored adapters ----------------------------------------------------------------------------------

def find(session: Session, *, tenant: str | None, name: str) -> Adapter | None:
    return session.execute(select(Adapter).where(owned_by(Adapter.tenant, tenant), Adapter.name == name)
                           .order_by(Adapter.id).limit(1)).scalar_one_or_none()


def get(session: Session, *, tenant: str | None, adapter_id: str) -> Adapter | None:
    row = session.get(Adapter, adapter_id)
    return row if row is not None and row.tenant == tenant else None


def list_uploaded(session: Session, *, tenant: str | None, model: str | None = None) -> list[Adapter]:
    q = select(Adapter).where(owned_by(Adapter.tenant, tenant))
    if model:
        q = q.where(Adapter.base_model == model)
    return list(session.execute(q.order_by(Adapter.id)).scalars())


def create(session: Session, storage: Storage, *, tenant: str | None, name: str, model: ModelSpec,
           checked: CheckedAdapter, remember: Callable[[str], None] = lambda _id: None) -> Adapter | None:
    """Store the files, then the row (`remember(id)` runs in the row's transaction: the upload's
    idempotency key). None when another upload of the same name won a race (its files and row are
    removed again)."""
    adapter_id = new_id("adapter")
    files = [{"name": n, "bytes": f.size, "sha256": f.sha256} for n, f in checked.files.items()]
    row = Adapter(id=adapter_id, tenant=tenant, name=name, base_model=model.name, kind=model.kind, files=files,
                  bytes=sum(f.size for f in checked.files.values()), created_at=time.time(),
                  meta={"rank": checked.rank, "lora_alpha": checked.lora_alpha,
                        "target_modules": checked.target_modules})
    try:
        for file_name, member in checked.files.items():
            member.file.seek(0)
            storage.put_file(storage_key(adapter_id, file_name), member.file, member.size)
        session.add(row)
        remember(adapter_id)
        session.commit()
    except Exception:
        session.rollback()
        _drop_files(storage, adapter_id, list(checked.files))
        raise
    # The (tenant, name) index is not unique: after committing, an upload that finds another of its
    # name steps back, so two racing uploads never both stay.
    others = session.execute(select(Adapter.id).where(owned_by(Adapter.tenant, tenant), Adapter.name == name,
                                                      Adapter.id != adapter_id)).first()
    if others is not None:
        # This upload's idempotency key goes too: a retry with it is refused by name, as this was.
        session.execute(sql_delete(IdempotencyKey).where(IdempotencyKey.object_type == "adapter",
                                                         IdempotencyKey.object_id == adapter_id))
        delete(session, storage, row)
        return None
    return row


def delete(session: Session, storage: Storage, row: Adapter) -> None:
    names = [f["name"] for f in row.files]
    session.delete(row)
    session.commit()
    _drop_files(storage, row.id, names)


def _drop_files(storage: Storage, adapter_id: str, names: list[str]) -> None:
    """Best effort: a file left behind by a storage outage is unreachable (no row names it)."""
    for file_name in names:
        try:
            storage.delete(storage_key(adapter_id, file_name))
        except Exception:  # the row is what makes an adapter exist
            log.warning("could not delete %s from storage", storage_key(adapter_id, file_name), exc_info=True)


# --- public shapes -----------------------------------------------------------------------------------

def adapter_object(row: Adapter) -> dict[str, Any]:
    meta = row.meta or {}
    return {"id": row.id, "object": "adapter", "name": row.name, "model": row.base_model, "owned_by": "user",
            "created_at": int(row.created_at), "bytes": row.bytes, "files": [f["name"] for f in row.files],
            "rank": meta.get("rank"), "lora_alpha": meta.get("lora_alpha"),
            "target_modules": meta.get("target_modules")}


def registry_adapter_object(registry: Registry, name: str) -> dict[str, Any]:
    """A registry adapter's object; its details come from its directory when this process can read it."""
    spec = registry.adapters[name]
    source = Path(spec.source)
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else []
    config: dict[str, Any] = {}
    if (source / CONFIG_NAME).is_file():
        try:
            loaded = json.loads((source / CONFIG_NAME).read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            config = {}
    targets = config.get("target_modules")
    return {"id": spec.name, "object": "adapter", "name": spec.name, "model": spec.model, "owned_by": "registry",
            "created_at": None, "bytes": sum(p.stat().st_size for p in files) if files else None,
            "files": [p.name for p in files], "rank": config.get("r"), "lora_alpha": config.get("lora_alpha"),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets}
