"""Strict JSON Lines, shared by the API and the workers: one line parsed at a time, with every
problem reported as a LineError naming the 1-based line and, where it can, the field."""

from __future__ import annotations

import codecs
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

BOM = codecs.BOM_UTF8


@dataclass(frozen=True)
class LineError:
    line: int | None
    param: str | None
    message: str
    code: str = "invalid_request"

    def as_dict(self) -> dict[str, Any]:
        where = f"line {self.line}: " if self.line is not None else ""
        field = f"{self.param}: " if self.param else ""
        return {"code": self.code, "line": self.line, "param": self.param,
                "message": f"{where}{field}{self.message}"}


class _NonFinite:
    """Stands in for a NaN or Infinity literal while parsing, so that its field can be named."""

    def __init__(self, literal: str) -> None:
        self.literal = literal


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _first_bad_value(obj: Any) -> tuple[str, str] | None:
    """The location and problem of the first NaN/Infinity or unpaired surrogate, in document order."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, _NonFinite):
            return where, f"{value.literal} is not valid JSON (numbers must be finite)"
        if isinstance(value, str) and _SURROGATE.search(value):
            return where, "holds an unpaired UTF-16 surrogate (\\ud800-\\udfff), which is not valid Unicode"
        if isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                name = key.encode("utf-8", "backslashreplace").decode()  # an error must itself encode
                path = f"{where}.{name}" if where else name
                if _SURROGATE.search(key):
                    stack.append((key, path))
                stack.append((item, path))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in reversed(list(enumerate(value))))
    return None


def parse_json_line(text: str | bytes, line: int) -> tuple[Any, LineError | None]:
    """Parse one line of strict JSON: valid UTF-8, finite numbers, no unpaired surrogates. An
    error names the line, and where it can, the field (`body.temperature`)."""
    non_finite: list[_NonFinite] = []

    def constant(literal: str) -> _NonFinite:
        non_finite.append(_NonFinite(literal))
        return non_finite[-1]

    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        obj = json.loads(text, parse_constant=constant)
    except UnicodeDecodeError as exc:
        return None, LineError(line, None, f"not valid UTF-8 (at byte {exc.start + 1})", code="invalid_json")
    except json.JSONDecodeError as exc:
        bom = exc.msg.startswith("Unexpected UTF-8 BOM")
        why = "a byte order mark (U+FEFF) before the JSON" if bom else f"{exc.msg} at column {exc.colno}"
        return None, LineError(line, None, f"not valid JSON ({why})", code="invalid_json")
    except RecursionError:
        return None, LineError(line, None, "JSON nested too deeply", code="invalid_json")
    except ValueError as exc:  # an integer longer than Python converts
        why = (f"a number has more than {sys.get_int_max_str_digits()} digits"
               if "integer string conversion" in str(exc) else str(exc))
        return None, LineError(line, None, f"not valid JSON ({why})", code="invalid_json")
    if non_finite or _SURROGATE_ESCAPE.search(text):
        bad = _first_bad_value(obj)
        if bad is not None:
            return None, LineError(line, bad[0] or None, bad[1], code="invalid_json")
    return obj, None


def jsonl_objects(raw: bytes) -> Iterator[tuple[int, Any]]:
    """Numbered objects (or the LineError of a line that is not JSON) of a JSONL body, one at a
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
