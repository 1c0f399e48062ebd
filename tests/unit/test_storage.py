"""Object storage: the file backend here; the S3 backend against a real endpoint in integration."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from genq.shared.config import build_settings
from genq.shared.storage import FileStorage, StorageError, StorageUnavailable, check_key, storage_from_settings
from tests.support.processes import free_port


def test_file_storage_round_trip(tmp_path: Path) -> None:
    st = FileStorage(tmp_path / "objects")
    assert not st.exists("jobs/job_1/1/result.json")
    st.put("jobs/job_1/1/result.json", b'{"a": 1}', "application/json")
    assert st.exists("jobs/job_1/1/result.json")
    assert st.get("jobs/job_1/1/result.json") == b'{"a": 1}'
    assert st.presigned_url("jobs/job_1/1/result.json") is None
    st.delete("jobs/job_1/1/result.json")
    with pytest.raises(KeyError):
        st.get("jobs/job_1/1/result.json")
    st.ping()


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", "a/../b", "", "with space", "x" * 400])
def test_keys_cannot_escape(key: str) -> None:
    with pytest.raises(ValueError):
        check_key(key)


def test_file_url_relative_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = storage_from_settings(build_settings(storage_url="file://./var/objects"))
    assert rel.root == (tmp_path / "var/objects").resolve()  # type: ignore[attr-defined]
    absolute = storage_from_settings(build_settings(storage_url=f"file://{tmp_path}/abs"))
    assert absolute.root == tmp_path / "abs"  # type: ignore[attr-defined]


def test_file_storage_deletes_a_folder_of_keys(tmp_path: Path) -> None:
    store = FileStorage(tmp_path)
    for key in ("jobs/a/1/result.json", "jobs/a/1/0.png", "jobs/a/2/result.json", "jobs/ab/1/result.json"):
        store.put(key, b"x")
    assert store.delete_prefix("jobs/a/1/") == 2
    assert not store.exists("jobs/a/1/0.png") and store.exists("jobs/a/2/result.json")
    assert store.exists("jobs/ab/1/result.json") and store.delete_prefix("jobs/none/") == 0


def test_unreachable_s3_fails_fast_as_storage_unavailable_naming_no_address() -> None:
    """Nothing listens on the port: every operation raises StorageUnavailable within the short
    timeouts (not minio's minutes of retries), with a message that gives no host, port or key."""
    port = free_port()
    st = storage_from_settings(build_settings(storage_url="s3://secret-bucket/pre", s3_endpoint=f"127.0.0.1:{port}",
                                              s3_access_key="k", s3_secret_key="s", s3_secure=False))
    calls = {"put": lambda: st.put("jobs/j1/1/0.png", b"x"), "get": lambda: st.get("jobs/j1/1/0.png"),
             "exists": lambda: st.exists("jobs/j1/1/0.png"), "delete": lambda: st.delete("jobs/j1/1/0.png"),
             "delete_prefix": lambda: st.delete_prefix("jobs/j1/"), "ping": st.ping}
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as caught:
            call()
        assert time.monotonic() - started < 3, name
        message = str(caught.value)
        assert not any(s in message for s in (str(port), "127.0.0.1", "secret-bucket", "j1")), message


def test_a_failing_directory_raises_a_storage_error_naming_no_path(tmp_path: Path) -> None:
    st = FileStorage(tmp_path / "objects")
    (tmp_path / "objects" / "jobs").write_text("a file where a folder should be")
    with pytest.raises(StorageError) as caught:
        st.put("jobs/j1/1/0.png", b"x")
    assert str(tmp_path) not in str(caught.value) and "j1" not in str(caught.value)
