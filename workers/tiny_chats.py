"""A small real fine-tuning corpus available offline: chat pairs from Python's own docstrings.

Each pair asks what a builtin or standard-library function does and answers with the first
sentence of its docstring, e.g. "What does math.sqrt do?" -> "Return the square root of x.".
The tests and bench/fine_tuning.py train on it: it is real English with a repeated structure a
tiny model can learn in seconds, and the same on every machine with the same Python.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

# Modules whose public functions are asked about, in this order (each one's names sorted).
DOC_MODULES = ("builtins", "math", "os.path", "itertools", "functools", "operator", "string", "textwrap",
               "json", "random", "statistics", "shutil", "heapq", "bisect", "str", "list", "dict")
MAX_ANSWER_CHARS = 120


def python_doc_chats(limit: int | None = None) -> list[dict[str, Any]]:
    """Up to `limit` chat examples `{"messages": [user question, assistant answer]}`, sorted by name."""
    chats = []
    for name, answer in doc_sentences():
        chats.append({"messages": [{"role": "user", "content": f"What does {name} do?"},
                                   {"role": "assistant", "content": answer}]})
        if limit is not None and len(chats) >= limit:
            break
    return chats


def doc_sentences() -> list[tuple[str, str]]:
    """(qualified name, first docstring sentence) for the public callables of DOC_MODULES."""
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for module_name in DOC_MODULES:
        owner = _owner(module_name)
        prefix = "" if module_name == "builtins" else f"{module_name}."
        for attr in sorted(dir(owner)):
            obj = getattr(owner, attr, None)
            if attr.startswith("_") or not callable(obj) or _is_exception(obj):
                continue
            sentence = first_sentence(inspect.getdoc(obj) or "", attr)
            name = prefix + attr
            if sentence and name not in seen:
                seen.add(name)
                pairs.append((name, sentence))
    return pairs


def first_sentence(doc: str, name: str) -> str | None:
    """The docstring's first sentence (signature lines skipped), or None if it is too long or empty."""
    lines = [line.strip() for line in doc.splitlines()]
    while lines and (not lines[0] or re.match(rf"{re.escape(name)}\s*\(", lines[0])):
        lines.pop(0)  # C functions' docstrings may start with their signature
    paragraph = " ".join(lines[: lines.index("")] if "" in lines else lines)
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    sentence = match.group(1) if match else paragraph
    return sentence if 0 < len(sentence) <= MAX_ANSWER_CHARS else None


def _owner(name: str) -> Any:
    import builtins

    return getattr(builtins, name) if name in ("str", "list", "dict") else importlib.import_module(name)


def _is_exception(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseException)
