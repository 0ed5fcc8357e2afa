"""Storage is a URI: a local path or s3://bucket/key, reached through pyarrow.fs.

Writes are atomic per object: local files go to a hidden temporary name and are renamed; an
S3 PUT is atomic. Multi-file artifacts are published by a marker written last (the registry's
manifest, a stage's `_report.json`).

Two primitives let concurrent writers coordinate without a server of their own:
`create_exclusive` (put-if-absent) and `read_with_token` + `compare_and_swap` (replace only
what was read). On S3 they are conditional PUTs (`If-None-Match: *`, Aug 2024, and
`If-Match: <etag>`, Nov 2024) sent with boto3, because pyarrow's S3FileSystem cannot send
them; locally they are `O_CREAT|O_EXCL` and an `flock` held around read-compare-rename (the
kernel drops the lock when its holder dies, so there is no stale lock to guess about).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.config import S3Config
from jobs.errors import ConflictError, StorageError

# S3 answers to a conditional PUT that lost: 412 the precondition failed, 409 another
# conditional write to the key was in flight, 404 an If-Match target is gone.
_LOST = {412, 409, 404}


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    base = uri.rstrip("/")
    return "/".join([base, *(part.strip("/") for part in parts if part)])


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint_url: str | None, region: str, pid: int):
    """One botocore client per endpoint and process (clients are thread-safe, not fork-safe)."""
    import boto3

    if endpoint_url and "://" not in endpoint_url:
        endpoint_url = f"https://{endpoint_url}"
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url or None, region_name=region)


def _local_token(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Storage:
    """Resolves URIs to a pyarrow filesystem and path. Picklable, so Ray tasks can carry it.

    `lock_timeout_s` bounds how long a local compare-and-swap waits for another writer's lock.
    """

    s3: S3Config | None = None
    lock_timeout_s: float = 30.0

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        if is_s3(uri):
            s3 = self.s3 or S3Config()
            kwargs: dict = {"region": s3.region}
            if s3.endpoint_url:
                scheme, _, host = s3.endpoint_url.partition("://")
                kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
            return pafs.S3FileSystem(**kwargs), uri.removeprefix("s3://")
        return pafs.LocalFileSystem(), os.path.abspath(uri)

    def _info(self, uri: str, selector=None):
        """File info, or a StorageError naming the URI (no bucket, no network, no access)."""
        fs, path = self.filesystem(uri)
        try:
            return fs.get_file_info(selector if selector is not None else path)
        except OSError as error:
            first = str(error).splitlines()[0][:200]
            raise StorageError(f"cannot reach {uri}: {first}") from None

    def exists(self, uri: str) -> bool:
        return self._info(uri).type != pafs.FileType.NotFound

    def list_files(self, uri: str) -> list[str]:
        """Files under a URI (or the URI itself if a file), sorted, hidden ones skipped."""
        fs, path = self.filesystem(uri)
        info = self._info(uri)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"not found: {uri}")
        if info.type == pafs.FileType.File:
            return [uri]
        selector = pafs.FileSelector(path, recursive=True)
        prefix = "s3://" if is_s3(uri) else ""
        files = [
            prefix + item.path
            for item in self._info(uri, selector)
            if item.type == pafs.FileType.File
            and not any(part.startswith((".", "_")) for part in item.path[len(path) :].split("/"))
        ]
        return sorted(files)

    def list_dirs(self, uri: str) -> list[str]:
        """Names of the folders directly under a URI (none if it does not exist), sorted."""
        fs, path = self.filesystem(uri)
        selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
        return sorted(
            item.base_name
            for item in self._info(uri, selector)
            if item.type == pafs.FileType.Directory
        )

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.filesystem(uri)
        try:
            with fs.open_input_stream(path) as stream:
                return stream.read()
        except (FileNotFoundError, OSError) as error:
            raise StorageError(f"cannot read {uri}: {error}") from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        fs, path = self.filesystem(uri)
        try:
            if is_s3(uri):  # no folders to create: a PUT of the key is all it takes
                with fs.open_output_stream(path) as stream:
                    stream.write(data)
                return
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            temporary = _hidden_temporary(path)
            with fs.open_output_stream(temporary) as stream:
                stream.write(data)
            fs.move(temporary, path)
        except OSError as error:
            raise StorageError(f"cannot write {uri}: {error}") from None

    def read_json(self, uri: str) -> dict:
        return json.loads(self.read_bytes(uri))

    def write_json(self, uri: str, payload: dict) -> None:
        self.write_bytes(uri, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())

    def write_table(self, uri: str, table: pa.Table) -> None:
        """Writes one parquet file atomically."""
        sink = pa.BufferOutputStream()
        # Page checksums let readers tell a corrupt page from data (ingest quarantines it).
        pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
        self.write_bytes(uri, sink.getvalue().to_pybytes())

    def read_table(self, uri: str) -> pa.Table:
        fs, path = self.filesystem(uri)
        try:
            return pq.read_table(path, filesystem=fs)
        except (FileNotFoundError, OSError) as error:
            raise StorageError(f"cannot read table {uri}: {error}") from None

    def read_table_dir(self, uri: str) -> pa.Table:
        """Reads every parquet file under a URI into one table (for small tables)."""
        fs, _ = self.filesystem(uri)
        files = [f.removeprefix("s3://") for f in self.list_files(uri)]
        return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])

    def delete(self, uri: str) -> None:
        fs, path = self.filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)

    # Coordination between concurrent writers -------------------------------------------

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """Writes `data` to `uri` only if nothing is there; False if something already is.

        S3: a PUT with `If-None-Match: *`; local: `O_CREAT|O_EXCL`. Exactly one of several
        concurrent callers gets True.
        """
        if is_s3(uri):
            for attempt in range(8):
                etag, status = self._s3_put(uri, data, IfNoneMatch="*")
                if etag is not None:
                    return True
                if status == 412:
                    return False
                time.sleep(0.01 * 2**attempt)  # 409: another conditional PUT is in flight
            raise ConflictError(f"{uri}: conditional writes kept conflicting (HTTP 409)")
        path = os.path.abspath(uri)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as error:
            raise StorageError(f"cannot create {uri}: {error}") from None
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as error:
            raise StorageError(f"cannot create {uri}: {error}") from None
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
        return True

    def read_with_token(self, uri: str) -> tuple[bytes, str] | None:
        """The object's bytes and a token for `compare_and_swap`; None if there is none.

        The token is opaque: the ETag on S3, the SHA-256 of the content locally.
        """
        if is_s3(uri):
            from botocore.exceptions import BotoCoreError, ClientError

            bucket, key = _split_s3(uri)
            try:
                response = self._s3_client().get_object(Bucket=bucket, Key=key)
                return response["Body"].read(), response["ETag"]
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise StorageError(f"cannot read {uri}: {error}") from None
            except BotoCoreError as error:
                raise StorageError(f"cannot read {uri}: {error}") from None
        try:
            with open(os.path.abspath(uri), "rb") as stream:
                data = stream.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise StorageError(f"cannot read {uri}: {error}") from None
        return data, _local_token(data)

    def compare_and_swap(self, uri: str, expected_token: str | None, data: bytes) -> str:
        """Replaces `uri` with `data` if it still holds what `expected_token` was read from.

        `expected_token` None means "only if it does not exist yet". Returns the new token;
        raises ConflictError if another writer got there first (read again and retry).
        S3: a PUT with `If-Match: <etag>` (or `If-None-Match: *`); local: an flock on a hidden
        `.<name>.lock` next to the object around read, compare and an atomic rename.
        """
        if is_s3(uri):
            condition = {"IfMatch": expected_token} if expected_token else {"IfNoneMatch": "*"}
            etag, status = self._s3_put(uri, data, **condition)
            if etag is None:
                raise ConflictError(f"{uri} changed since it was read (HTTP {status}); retry")
            return etag
        path = os.path.abspath(uri)
        with self._local_lock(path, uri):
            current = self.read_with_token(uri)
            if (current[1] if current else None) != expected_token:
                raise ConflictError(f"{uri} changed since it was read; retry")
            temporary = _hidden_temporary(path)
            try:
                with open(temporary, "wb") as stream:
                    stream.write(data)
                os.replace(temporary, path)
            except OSError as error:
                raise StorageError(f"cannot write {uri}: {error}") from None
        return _local_token(data)

    def _s3_client(self):
        s3 = self.s3 or S3Config()
        return _s3_client(s3.endpoint_url, s3.region, os.getpid())

    def _s3_put(self, uri: str, data: bytes, **condition: str) -> tuple[str | None, int]:
        """A conditional PUT: (new ETag, 200), or (None, status) when the condition lost."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _split_s3(uri)
        try:
            response = self._s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)
            return response["ETag"], 200
        except ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = error.response.get("Error", {}).get("Code", "")
            if status in _LOST and code != "NoSuchBucket":
                return None, status
            raise StorageError(f"cannot write {uri}: {error}") from None
        except BotoCoreError as error:
            raise StorageError(f"cannot write {uri}: {error}") from None

    @contextmanager
    def _local_lock(self, path: str, uri: str) -> Iterator[None]:
        """An exclusive flock on `.<name>.lock` beside `path`, released on exit or death."""
        folder, name = os.path.split(path)
        lock_path = os.path.join(folder, f".{name}.lock")
        try:
            os.makedirs(folder, exist_ok=True)
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise StorageError(f"cannot lock {uri}: {error}") from None
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StorageError(
                            f"{uri} is locked by another writer ({lock_path} held for more "
                            f"than {self.lock_timeout_s:g} s)"
                        ) from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(descriptor)  # closing the descriptor releases the lock


def _hidden_temporary(path: str) -> str:
    """A temporary name beside `path` that `list_files` skips if a crash leaves it behind."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
