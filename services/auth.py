"""API keys: made per tenant by `genq keys create`, stored only as a SHA-256 hash.

A key is `gq_` plus 32 random bytes (URL-safe base64), so a plain hash is enough: nobody can
guess a preimage of 256 random bits, and the hash can be looked up directly (unlike a salted,
slow password hash). The first characters are kept as a `prefix` so people can tell keys apart
in listings and revoke one without the secret.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections.abc import Callable

from cachetools import TLRUCache
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from genq.shared.db import NO_TENANT, ApiKey, new_id

KEY_PREFIX = "gq_"
PREFIX_CHARS = 11  # "gq_" and 8 characters of the random part: shown in listings, never the secret
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY = re.compile(r"gq_[A-Za-z0-9_-]{20,100}")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    """A tenant name: 1-64 letters, digits, `.`, `_` or `-`, starting with a letter or digit."""
    if not _TENANT.fullmatch(tenant):
        raise ValueError(f"tenant {tenant!r} must be 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    if tenant == NO_TENANT:  # the name genq uses for everything made while auth is off
        raise ValueError(f"tenant {NO_TENANT!r} is reserved; choose another name")
    return tenant


def create_key(session: Session, *, tenant: str) -> tuple[ApiKey, str]:
    """Record a new key for `tenant`; returns the row and the key itself, which is not stored.
    The caller commits."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), tenant=check_tenant(tenant), key_hash=hash_key(key), prefix=key[:PREFIX_CHARS],
                 created_at=time.time(), revoked_at=None)
    session.add(row)
    session.flush()
    return row, key


def resolve_key(session: Session, presented: str) -> str | None:
    """The tenant of a presented key, or None if it is malformed, unknown or revoked."""
    if not _KEY.fullmatch(presented):
        return None
    return session.execute(select(ApiKey.tenant).where(ApiKey.key_hash == hash_key(presented),
                                                       ApiKey.revoked_at.is_(None))).scalar()


def revoke_key(session: Session, ident: str) -> ApiKey | None:
    """Revoke the key with this id or prefix (idempotent); None if there is none. Raises ValueError
    when a prefix names more than one key. The caller commits."""
    rows = session.execute(select(ApiKey).where(or_(ApiKey.id == ident, ApiKey.prefix == ident))).scalars().all()
    if len(rows) > 1:
        raise ValueError(f"{ident!r} matches {len(rows)} keys ({', '.join(r.id for r in rows)}); revoke by id")
    if not rows:
        return None
    row = rows[0]
    if row.revoked_at is None:
        row.revoked_at = time.time()
    return row


def list_keys(session: Session, *, tenant: str | None = None) -> list[ApiKey]:
    """Keys, oldest first, optionally of one tenant (hashes included; never show them)."""
    q = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant is not None:
        q = q.where(ApiKey.tenant == tenant)
    return list(session.execute(q).scalars())


class KeyCache:
    """Recent key lookups (hash -> tenant, or None for a bad key) kept briefly in this process, so
    most requests need no query. A revoked key therefore works for up to `ttl_s` more seconds in a
    process that used it just before; unknown keys are remembered for a shorter time. A cachetools
    TLRUCache: each entry's lifetime is chosen when it is stored, and past `max_entries` the least
    recently used entry goes (expired ones first)."""

    def __init__(self, ttl_s: float = 30.0, miss_ttl_s: float = 5.0, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.miss_ttl_s, self.max_entries, self.clock = ttl_s, miss_ttl_s, max_entries, clock
        self._entries: TLRUCache[str, str | None] = TLRUCache(maxsize=max_entries, ttu=self._expires, timer=clock)
        self._lock = threading.Lock()  # cachetools caches are not thread-safe; a read reorders too

    def _expires(self, _key_hash: str, tenant: str | None, now: float) -> float:
        return now + (self.ttl_s if tenant else self.miss_ttl_s)

    def get(self, key_hash: str) -> tuple[bool, str | None]:
        """(found, tenant): found is False when the hash is not cached or its entry expired."""
        with self._lock:
            try:
                return True, self._entries[key_hash]
            except KeyError:
                return False, None

    def put(self, key_hash: str, tenant: str | None) -> None:
        with self._lock:
            self._entries[key_hash] = tenant
