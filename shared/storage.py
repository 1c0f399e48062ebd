"""Object storage behind one small interface: a local directory or S3 (MinIO) via `minio`.

Keys are built by genq from ids (`jobs/<job id>/<attempt>/0.png`), never from user text.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import urlsplit

from genq.shared.config import PRESIGN_SECONDS, Settings

_KEY = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_\-./]{0,299}$")


def check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key or "//" in key:
        raise ValueError(f"invalid object key {key!r}")
    return key


class MissingObject(KeyError):
    """No object is stored under the key (the API answers 404 `object_not_found`)."""


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...
    def put_file(self, key: str, fh: IO[bytes], size: int, content_type: str = "application/octet-stream") -> None:
        """Store `size` bytes read from `fh` (at its position) without holding them in memory."""
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def presigned_url(self, key: str, expires_s: int = PRESIGN_SECONDS) -> str | None: ...
    def ping(self) -> None: ...


class FileStorage:
    """Objects as files under one root directory; writes are atomic (temp file + rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.put_file(key, io.BytesIO(data), len(data), content_type)

    def put_file(self, key: str, fh: IO[bytes], size: int, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(fh, out)
        os.replace(tmp, path)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise MissingObject(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with `prefix` (a folder, ending in '/')."""
        folder = self._path(prefix.rstrip("/"))
        files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
        for path in files:
            path.unlink(missing_ok=True)
        return len(files)

    def presigned_url(self, key: str, expires_s: int = PRESIGN_SECONDS) -> str | None:
        return None  # the API serves file-backed objects itself

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise OSError(f"storage directory {self.root} is not writable")


class S3Storage:
    """Objects in an S3 bucket (MinIO or any S3 endpoint) through the `minio` client."""

    def __init__(self, bucket: str, prefix: str, endpoint: str, access_key: str | None,
                 secret_key: str | None, secure: bool) -> None:
        from minio import Minio

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                            region="us-east-1")
        self._bucket_checked = False

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _ensure_bucket(self) -> None:
        if self._bucket_checked:
            return
        from minio.error import S3Error

        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:  # another process made it first
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        self._bucket_checked = True

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.put_file(key, io.BytesIO(data), len(data), content_type)

    def put_file(self, key: str, fh: IO[bytes], size: int, content_type: str = "application/octet-stream") -> None:
        self._ensure_bucket()
        self.client.put_object(self.bucket, self._name(key), fh, size, content_type=content_type)

    def get(self, key: str) -> bytes:
        from minio.error import S3Error

        try:
            resp = self.client.get_object(self.bucket, self._name(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                raise MissingObject(key) from None
            raise
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, self._name(key))
            return True
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                return False
            raise

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, self._name(key))

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with `prefix` (a folder, ending in '/')."""
        names = [o.object_name for o in self.client.list_objects(self.bucket, prefix=self._name(prefix),
                                                                 recursive=True)]
        for name in names:
            self.client.remove_object(self.bucket, name)
        return len(names)

    def presigned_url(self, key: str, expires_s: int = PRESIGN_SECONDS) -> str | None:
        # minio-py defaults to 7 days; genq always asks for a short life.
        return self.client.presigned_get_object(self.bucket, self._name(key),
                                                expires=timedelta(seconds=expires_s))

    def ping(self) -> None:
        self._ensure_bucket()


def storage_from_settings(settings: Settings) -> Storage:
    parts = urlsplit(settings.storage_url)
    if parts.scheme == "file":
        return FileStorage(parts.netloc + parts.path)
    settings.check_s3()
    return S3Storage(bucket=parts.netloc, prefix=parts.path, endpoint=settings.s3_endpoint or "",
                     access_key=settings.s3_access_key, secret_key=settings.s3_secret_key,
                     secure=settings.s3_secure)
