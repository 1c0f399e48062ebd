"""NDJSON batch bodies (inline submissions and uploaded input files): counted first, then parsed
and validated one line at a time, so a body over the line limit is refused before any of it is
parsed and an accepted one is never held as a list of lines or of parsed objects.

Callers run these in a worker thread: they are CPU-bound over bodies of up to GENQ_MAX_BODY_BYTES.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from genq.services.adapters import AdapterCatalog
from genq.services.body import BOM
from genq.services.egress import AddressPolicy
from genq.services.validation import (
    MAX_PROMPT_CHARS,
    LineError,
    ValidLine,
    parse_json_line,
    too_many_lines,
    validate_batch,
)
from genq.shared.registry import Registry


def line_count(raw: bytes) -> int:
    """Lines of an NDJSON body, blank ones included (a final newline ends a line, it starts none);
    counted at C speed, without splitting or parsing."""
    return raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0)


def ndjson_lines(raw: bytes) -> Iterator[tuple[int, Any]]:
    """Numbered objects (or the LineError of a line that is not JSON) of an NDJSON body, one at a
    time; blank lines are skipped but still counted, and a byte order mark at the start (as
    Windows tools write) is ignored."""
    start = len(BOM) if raw.startswith(BOM) else 0
    number = 0
    while start <= len(raw):
        end = raw.find(b"\n", start)
        end = len(raw) if end < 0 else end
        number += 1
        text = raw[start:end]
        start = end + 1
        if not text.strip():
            continue
        obj, err = parse_json_line(text, number)
        yield number, err if err is not None else obj


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
