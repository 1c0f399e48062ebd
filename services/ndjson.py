"""NDJSON batch bodies (inline submissions and uploaded input files): counted first, then parsed
and validated one line at a time, so a body over the line limit is refused before any of it is
parsed and an accepted one is never held as a list of lines or of parsed objects.

Callers run these in a worker thread: they are CPU-bound over bodies of up to GENQ_MAX_BODY_BYTES.
"""

from __future__ import annotations

from genq.services.adapters import AdapterCatalog
from genq.services.egress import AddressPolicy
from genq.services.validation import (
    MAX_PROMPT_CHARS,
    LineError,
    ValidLine,
    too_many_lines,
    validate_batch,
)
from genq.shared.jsonl import jsonl_objects as ndjson_lines
from genq.shared.registry import Registry


def line_count(raw: bytes) -> int:
    """Lines of an NDJSON body, blank ones included (a final newline ends a line, it starts none);
    counted at C speed, without splitting or parsing."""
    return raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0)


def validate_ndjson(raw: bytes, registry: Registry, *, max_lines: int, endpoint: str | None = None,
                    max_prompt_chars: int = MAX_PROMPT_CHARS,
                    adapters: AdapterCatalog | None = None,
                    webhook_policy: AddressPolicy = AddressPolicy()) -> tuple[list[ValidLine], list[LineError]]:
    """validate_batch over an NDJSON body, refusing one of more than `max_lines` lines before
    parsing any."""
    if (over := too_many_lines(line_count(raw), max_lines)) is not None:
        return [], [over]
    return validate_batch(ndjson_lines(raw), registry, max_lines=max_lines, endpoint=endpoint,
                          max_prompt_chars=max_prompt_chars, adapters=adapters, webhook_policy=webhook_policy)
