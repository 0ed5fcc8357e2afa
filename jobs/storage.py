"""Storage is a URI: a local path or s3://bucket/key, reached through pyarrow.fs.

Writes are atomic per object: local files go to a temporary name and are renamed; an S3 PUT
is atomic. Multi-file artifacts are published by a marker written last (the registry's
manifest, a stage's `_report.json`).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.config import S3Config
from jobs.errors import StorageError


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    base = uri.rstrip("/")
    return "/".join([base, *(part.strip("/") for part in parts if part)])


@dataclass(frozen=True)
class Storage:
    """Resolves URIs to a pyarrow filesystem and path. Picklable, so Ray tasks can carry it."""

    s3: S3Config | None = None

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        if is_s3(uri):
            s3 = self.s3 or S3Config()
            kwargs: dict = {"region": s3.region}
            if s3.endpoint_url:
                scheme, _, host = s3.endpoint_url.partition("://")
                kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
            return pafs.S3FileSystem(**kwargs), uri.removeprefix("s3://")
        return pafs.LocalFileSystem(), os.path.abspath(uri)

    def exists(self, uri: str) -> bool:
        fs, path = self.filesystem(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def list_files(self, uri: str) -> list[str]:
        """Files under a URI (or the URI itself if a file), sorted, hidden ones skipped."""
        fs, path = self.filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"not found: {uri}")
        if info.type == pafs.FileType.File:
            return [uri]
        selector = pafs.FileSelector(path, recursive=True)
        prefix = "s3://" if is_s3(uri) else ""
        files = [
            prefix + item.path
            for item in fs.get_file_info(selector)
            if item.type == pafs.FileType.File
            and not any(part.startswith((".", "_")) for part in item.path[len(path) :].split("/"))
        ]
        return sorted(files)

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.filesystem(uri)
        try:
            with fs.open_input_stream(path) as stream:
                return stream.read()
        except (FileNotFoundError, OSError) as error:
            raise StorageError(f"cannot read {uri}: {error}") from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        fs, path = self.filesystem(uri)
        parent = path.rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        if is_s3(uri):
            with fs.open_output_stream(path) as stream:
                stream.write(data)
            return
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(temporary) as stream:
            stream.write(data)
        fs.move(temporary, path)

    def read_json(self, uri: str) -> dict:
        return json.loads(self.read_bytes(uri))

    def write_json(self, uri: str, payload: dict) -> None:
        self.write_bytes(uri, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())

    def write_table(self, uri: str, table: pa.Table) -> None:
        """Writes one parquet file atomically."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
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
