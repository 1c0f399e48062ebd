"""A stand-in for the system resolver, so tests can give names any answer (a rebinding DNS server,
a name that points inside the network) without touching real DNS."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest

Answers = dict[str, Callable[[], list[str]] | list[str]]


def fake_resolver(monkeypatch: pytest.MonkeyPatch, answers: Answers) -> list[str]:
    """Names in `answers` resolve to those addresses (a callable is asked on every lookup); any
    other host goes to the real resolver. Returns the names looked up, in order."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in answers:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        answer = answers[host]
        addresses = answer() if callable(answer) else answer
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port or 0))
                for a in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked
