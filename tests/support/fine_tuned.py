"""A fine-tuned model as the training worker registers one when its job succeeds: the adapter's
files in storage and an uploaded-adapter row of the job's tenant named by the job's
`fine_tuned_model`, with rank, alpha, targets and the job's id in its metadata."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from sqlalchemy.orm import Session

from genq.shared.adapters import storage_key
from genq.shared.db import Adapter, new_id
from genq.shared.fine_tuning_jobs import fine_tuned_model_name, new_ft_id
from genq.shared.storage import Storage

FILES = ("adapter_config.json", "adapter_model.safetensors")


def register_fine_tuned(session: Session, storage: Storage, *, tenant: str | None, base: str, adapter_dir: Path,
                        suffix: str | None = None) -> Adapter:
    """Store a peft adapter directory (build_text_lora's) as the fine-tuned model of a new job id."""
    job_id = new_ft_id("ftjob")
    adapter_id = new_id("adapter")
    files = []
    for name in FILES:
        data = (adapter_dir / name).read_bytes()
        storage.put(storage_key(adapter_id, name), data)
        files.append({"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    row = Adapter(id=adapter_id, tenant=tenant, name=fine_tuned_model_name(base, suffix, job_id), base_model=base,
                  kind="text", files=files, bytes=sum(f["bytes"] for f in files), created_at=time.time(),
                  meta={"rank": config["r"], "lora_alpha": config["lora_alpha"],
                        "target_modules": config["target_modules"], "fine_tuning_job": job_id})
    session.add(row)
    session.commit()
    return row
