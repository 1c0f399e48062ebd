"""The S3 backend through the real `minio` client against an S3 endpoint over HTTP."""

from __future__ import annotations

import uuid
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from genq.shared.config import build_settings
from genq.shared.storage import S3Storage, storage_from_settings

pytestmark = pytest.mark.integration


def _storage(endpoint: str, bucket: str) -> S3Storage:
    st = storage_from_settings(build_settings(
        storage_url=f"s3://{bucket}/prefix", s3_endpoint=endpoint, s3_access_key="testing",
        s3_secret_key="testing", s3_secure=False))
    assert isinstance(st, S3Storage)
    return st


def test_bucket_is_created_and_objects_round_trip(s3_endpoint: str) -> None:
    bucket = f"genq-{uuid.uuid4().hex[:8]}"
    st = _storage(s3_endpoint, bucket)
    assert not st.client.bucket_exists(bucket)
    st.put("jobs/job_1/1/result.json", b'{"ok": true}', "application/json")
    assert st.client.bucket_exists(bucket)
    assert st.exists("jobs/job_1/1/result.json") and not st.exists("jobs/job_2/1/result.json")
    assert st.get("jobs/job_1/1/result.json") == b'{"ok": true}'
    names = [o.object_name for o in st.client.list_objects(bucket, recursive=True)]
    assert names == ["prefix/jobs/job_1/1/result.json"]
    st.delete("jobs/job_1/1/result.json")
    with pytest.raises(KeyError):
        st.get("jobs/job_1/1/result.json")
    # A second process racing to create the same bucket is fine.
    _storage(s3_endpoint, bucket).put("x", b"1")


def test_presigned_url_downloads_and_expires_soon(s3_endpoint: str) -> None:
    st = _storage(s3_endpoint, f"genq-{uuid.uuid4().hex[:8]}")
    st.put("files/file_1.jsonl", b"line\n")
    url = st.presigned_url("files/file_1.jsonl", expires_s=600)
    assert url is not None
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["600"]
    assert httpx.get(url).content == b"line\n"
    default = st.presigned_url("files/file_1.jsonl")
    assert parse_qs(urlsplit(default).query)["X-Amz-Expires"] == ["3600"]


def test_a_folder_of_keys_is_deleted_and_nothing_beside_it(s3_endpoint: str) -> None:
    st = _storage(s3_endpoint, f"genq-{uuid.uuid4().hex[:8]}")
    for key in ("jobs/a/1/result.json", "jobs/a/1/0.png", "jobs/a/2/result.json", "jobs/ab/1/result.json"):
        st.put(key, b"x")
    assert st.delete_prefix("jobs/a/1/") == 2
    assert not st.exists("jobs/a/1/0.png") and st.exists("jobs/a/2/result.json")
    assert st.exists("jobs/ab/1/result.json") and st.delete_prefix("jobs/none/") == 0
