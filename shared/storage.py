"""Object storage behind one small interface: a local directory or S3 (MinIO) via `minio`.

Keys are built by genq from ids (`jobs/<job id>/<attempt>/0.png`), never from user text.

Every S3 failure leaves this module as a `StorageError` whose message names no host, port, bucket
or key (the original is its `__cause__`, for logs): `StorageUnavailable` when it is worth waiting
for (the endpoint unreachable or slow, a 5xx, the bucket gone), a plain `StorageError` otherwise.
`classify` is the one place that decides which.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import IO, Protocol, TypeVar
from urllib.parse import urlsplit

from genq.shared.config import PRESIGN_SECONDS, Settings
from genq.shared.retry import retry_while

log = logging.getLogger("genq.storage")
T = TypeVar("T")

# Each S3 request fails fast (the minio default is 5 minutes and 5 retries), so the API answers
# 503 and /readyz reports within seconds; waiting out an outage is the caller's choice (retry_storage).
CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 10.0
STORAGE_RETRY_S = 10.0  # how long a worker retries one storage write before handing its job back
# S3 error codes that mean "not now" rather than "never": the bucket gone (genq makes it again) or
# the service throttling or failing.
_TRANSIENT_CODES = frozenset({"NoSuchBucket", "SlowDown", "ServiceUnavailable", "InternalError",
                              "RequestTimeout", "RequestTimeTooSkewed"})

_KEY = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_\-./]{0,299}$")


def check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key or "//" in key:
        raise ValueError(f"invalid object key {key!r}")
    return key


class MissingObject(KeyError):
    """No object is stored under the key (the API answers 404 `object_not_found`)."""


class StorageError(Exception):
    """Storage refused or failed an operation. The message is safe to show anyone: it says what
    kind of failure, never where (the original error, with its addresses, is `__cause__`)."""


class StorageUnavailable(StorageError):
    """A transient failure: storage is unreachable, slow, failing (5xx) or its bucket is gone.
    Workers wait and retry, then hand the job back; the API answers 503 `storage_unavailable`."""


def classify(exc: BaseException) -> StorageError:
    """The one place that sorts a storage client's exception into transient or not."""
    import urllib3.exceptions
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return StorageUnavailable("object storage cannot be reached")
    if isinstance(exc, ServerError):
        return StorageUnavailable(f"object storage failed (HTTP {exc.status_code})")
    if isinstance(exc, S3Error):
        if exc.code == "NoSuchBucket":
            return StorageUnavailable("the storage bucket does not exist (yet)")
        if exc.code in _TRANSIENT_CODES:
            return StorageUnavailable(f"object storage is unavailable ({exc.code})")
        return StorageError(f"object storage refused the request ({exc.code})")
    if isinstance(exc, InvalidResponseError):
        return StorageUnavailable("object storage sent an invalid response")
    return StorageError(f"object storage failed ({type(exc).__name__})")


@contextmanager
def storage_errors() -> Iterator[None]:
    """Raise what a storage call raises as a StorageError (see `classify`); MissingObject passes."""
    try:
        yield
    except (MissingObject, StorageError):
        raise
    except Exception as exc:
        raise classify(exc) from exc


def retry_storage(fn: Callable[[], T], *, what: str, deadline_s: float = STORAGE_RETRY_S) -> T:
    """Run one storage operation, retrying with backoff while storage is unavailable, for up to
    `deadline_s`; then the last StorageUnavailable is raised. `fn` must be safe to run again."""
    return retry_while(lambda exc: isinstance(exc, StorageUnavailable), fn, what=what, logger=log,
                       dependency="storage", deadline_s=deadline_s, max_delay_s=2.0)


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
        with storage_errors():  # a full disk or a lost mount: no path in the message
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(fh, out)
            os.replace(tmp, path)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        with storage_errors():
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise MissingObject(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        with storage_errors():
            path.unlink(missing_ok=True)

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
        import urllib3
        from minio import Minio

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # No retries here: retry_storage retries whole operations, with a deadline the caller picks.
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
                                   retries=urllib3.Retry(total=0, redirect=0, raise_on_status=False),
                                   maxsize=10)
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                            region="us-east-1", http_client=http)
        self._bucket_checked = False  # reset when the bucket turns out gone, so it is made again

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _calls(self) -> Iterator[None]:
        """Storage errors as StorageError; a missing bucket is noted, so the next write makes it."""
        from minio.error import S3Error

        try:
            with storage_errors():
                yield
        except StorageError as exc:
            if isinstance(exc.__cause__, S3Error) and exc.__cause__.code == "NoSuchBucket":
                self._bucket_checked = False
            raise

    def _ensure_bucket(self) -> None:
        if self._bucket_checked:
            return
        from minio.error import S3Error

        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
                log.warning("storage bucket was missing; created it")
            except S3Error as exc:  # another process made it first
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        self._bucket_checked = True

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.put_file(key, io.BytesIO(data), len(data), content_type)

    def put_file(self, key: str, fh: IO[bytes], size: int, content_type: str = "application/octet-stream") -> None:
        name = self._name(key)
        with self._calls():
            self._ensure_bucket()
            self.client.put_object(self.bucket, name, fh, size, content_type=content_type)

    def get(self, key: str) -> bytes:
        from minio.error import S3Error

        name = self._name(key)
        with self._calls():
            try:
                resp = self.client.get_object(self.bucket, name)
            except S3Error as exc:
                if exc.code == "NoSuchKey":
                    raise MissingObject(key) from None
                raise
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        name = self._name(key)
        with self._calls():
            try:
                self.client.stat_object(self.bucket, name)
                return True
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject"):
                    return False
                raise

    def delete(self, key: str) -> None:
        name = self._name(key)
        with self._calls():
            self.client.remove_object(self.bucket, name)

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with `prefix` (a folder, ending in '/')."""
        folder = self._name(prefix)
        with self._calls():
            names = [o.object_name for o in self.client.list_objects(self.bucket, prefix=folder, recursive=True)]
            for name in names:
                self.client.remove_object(self.bucket, name)
        return len(names)

    def presigned_url(self, key: str, expires_s: int = PRESIGN_SECONDS) -> str | None:
        # minio-py defaults to 7 days; genq always asks for a short life.
        return self.client.presigned_get_object(self.bucket, self._name(key),
                                                expires=timedelta(seconds=expires_s))

    def ping(self) -> None:
        """Ask the endpoint about the bucket on every call (one short HEAD request), making the
        bucket again if it is gone: readiness must see an outage that began after start."""
        self._bucket_checked = False
        with self._calls():
            self._ensure_bucket()


def storage_from_settings(settings: Settings) -> Storage:
    parts = urlsplit(settings.storage_url)
    if parts.scheme == "file":
        return FileStorage(parts.netloc + parts.path)
    settings.check_s3()
    return S3Storage(bucket=parts.netloc, prefix=parts.path, endpoint=settings.s3_endpoint or "",
                     access_key=settings.s3_access_key, secret_key=settings.s3_secret_key,
                     secure=settings.s3_secure)
