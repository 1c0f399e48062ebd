"""API keys: creation, hashing, lookup, revocation (SQLite), the lookup cache, and `genq keys`."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from genq.services.auth import KeyCache, check_tenant, create_key, hash_key, list_keys, resolve_key, revoke_key
from genq.shared.db import ApiKey, session_factory
from genq.shared.migrate import upgrade


@pytest.fixture()
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path}/keys.db"
    upgrade(url)
    return session_factory(url)


def test_a_key_is_random_and_stored_only_as_its_hash(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        row, key = create_key(s, tenant="acme")
        _, other = create_key(s, tenant="acme")
        s.commit()
        stored = s.execute(select(ApiKey)).scalars().all()
    assert key.startswith("gq_") and len(key) >= 43 and key != other
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest() == hash_key(key)
    assert row.prefix == key[:11] and row.tenant == "acme" and row.revoked_at is None
    for r in stored:  # no column holds the key itself
        assert key not in (r.id, r.tenant, r.key_hash, r.prefix) and not key.startswith(r.key_hash)


def test_resolve_finds_the_tenant_of_a_live_key_only(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        _, a = create_key(s, tenant="acme")
        _, b = create_key(s, tenant="beta")
        s.commit()
        assert resolve_key(s, a) == "acme" and resolve_key(s, b) == "beta"
        assert resolve_key(s, a[:-1] + ("x" if a[-1] != "x" else "y")) is None
        assert resolve_key(s, "") is None and resolve_key(s, "not-a-key") is None
        assert resolve_key(s, hash_key(a)) is None  # the stored hash is not a key


def test_revoke_by_prefix_or_id_is_idempotent(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        row_a, a = create_key(s, tenant="acme")
        row_b, b = create_key(s, tenant="acme")
        s.commit()
        revoked = revoke_key(s, row_a.prefix)
        s.commit()
        assert revoked is not None and revoked.id == row_a.id and revoked.revoked_at is not None
        first = revoked.revoked_at
        assert revoke_key(s, row_a.id).revoked_at == first  # type: ignore[union-attr]
        assert resolve_key(s, a) is None and resolve_key(s, b) == "acme"
        assert revoke_key(s, "gq_nothere") is None


def test_a_prefix_naming_two_keys_is_refused(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        row_a, _ = create_key(s, tenant="acme")
        row_b, _ = create_key(s, tenant="beta")
        row_b.prefix = row_a.prefix
        s.commit()
        with pytest.raises(ValueError, match="matches 2 keys"):
            revoke_key(s, row_a.prefix)


def test_list_keys_by_tenant(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        create_key(s, tenant="acme")
        create_key(s, tenant="beta")
        create_key(s, tenant="acme")
        s.commit()
        assert [k.tenant for k in list_keys(s)] == ["acme", "beta", "acme"]
        assert [k.tenant for k in list_keys(s, tenant="beta")] == ["beta"]


@pytest.mark.parametrize("bad", ["", "a b", "-lead", "x" * 65, "ünï", "a/b"])
def test_tenant_names_are_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="must be 1-64"):
        check_tenant(bad)
    assert check_tenant("team-1.prod_A") == "team-1.prod_A"


def test_key_cache_expires_hits_and_misses() -> None:
    now = [100.0]
    cache = KeyCache(ttl_s=30, miss_ttl_s=5, clock=lambda: now[0])
    cache.put("h1", "acme")
    cache.put("h2", None)
    assert cache.get("h1") == (True, "acme") and cache.get("h2") == (True, None)
    assert cache.get("h3") == (False, None)
    now[0] += 6
    assert cache.get("h1") == (True, "acme") and cache.get("h2") == (False, None)
    now[0] += 25
    assert cache.get("h1") == (False, None)


def test_key_cache_stays_bounded() -> None:
    cache = KeyCache(max_entries=10)
    for i in range(25):
        cache.put(f"h{i}", None)
    assert len(cache._entries) <= 10 and cache.get("h24") == (True, None)


def test_key_cache_keeps_a_key_in_use_through_a_flood_of_bad_ones() -> None:
    cache = KeyCache(max_entries=10)
    cache.put("good", "acme")
    for i in range(100):  # random keys, each a miss; the good key is used in between
        cache.put(f"bad{i}", None)
        assert cache.get("good") == (True, "acme")
    assert len(cache._entries) <= 10 and cache.get("bad0") == (False, None)  # least recently used: gone


# --- the command ---------------------------------------------------------------------------------

@pytest.fixture()
def cli_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from genq.shared.config import get_settings

    url = f"sqlite:///{tmp_path}/cli.db"
    for name in [k for k in os.environ if k.startswith("GENQ_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("GENQ_DATABASE_URL", url)
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()


def test_keys_create_prints_the_key_last_and_stores_only_its_hash(cli_db: str) -> None:
    from genq.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["keys", "create", "--tenant", "acme"])
    assert result.exit_code == 0, result.output
    key = result.output.split()[-1]
    assert key.startswith("gq_") and "created key for tenant acme" in result.output
    with session_factory(cli_db)() as s:
        rows = s.execute(select(ApiKey)).scalars().all()
        assert [(r.tenant, r.key_hash) for r in rows] == [("acme", hash_key(key))]
        assert resolve_key(s, key) == "acme"
    assert key.encode() not in Path(cli_db.removeprefix("sqlite:///")).read_bytes()

    listing = runner.invoke(main, ["keys", "list"])
    assert listing.exit_code == 0 and key[:11] in listing.output and "acme" in listing.output
    assert key not in listing.output
    assert runner.invoke(main, ["keys", "list", "--tenant", "other"]).output.count("\n") == 1  # header only

    revoked = runner.invoke(main, ["keys", "revoke", key[:11]])
    assert revoked.exit_code == 0 and "revoked key" in revoked.output
    with session_factory(cli_db)() as s:
        assert resolve_key(s, key) is None
    again = runner.invoke(main, ["keys", "list", "--tenant", "acme"])
    assert again.output.strip().splitlines()[1].split("\t")[-1] != "-"  # the revoked time is shown


def test_keys_commands_explain_bad_input(cli_db: str) -> None:
    from genq.cli import main

    runner = CliRunner()
    bad = runner.invoke(main, ["keys", "create", "--tenant", "no spaces"])
    assert bad.exit_code == 1 and "must be 1-64" in bad.output
    missing = runner.invoke(main, ["keys", "revoke", "gq_unknown"])
    assert missing.exit_code == 1 and "no key with id or prefix 'gq_unknown'" in missing.output
