"""Sources: find a source's files, set unreadable ones aside, read each file into Arrow.

Used by `jobs.ingest` before and during validation. Nothing here drops a row silently: a
malformed line becomes a flagged row (`jobs.textfiles`), an unreadable file is reported by
name, and neither keeps PII in clear.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import validate
from jobs.config import SourceConfig
from jobs.errors import SourceError, StorageError
from jobs.storage import Storage, join
from jobs.textfiles import read_text

HEAD_BYTES = 65536
MAX_HEAD_BYTES = 8 * 2**20
# What a damaged file raises while it is read: I/O and decompression errors (OSError), bad
# encodings or structure (ArrowInvalid, ValueError, UnicodeError), indices out of bounds.
READ_ERRORS = (OSError, ValueError, IndexError, pa.ArrowException)


def probe(storage: Storage, name: str, source: SourceConfig) -> tuple[list[str], dict[str, str]]:
    """Lists a source's files, finds unreadable ones, and checks the schema can be mapped."""
    try:
        files = storage.list_files(source.uri)
    except StorageError as error:
        missing = str(error).startswith("not found")
        reason = f"no such URI {source.uri}" if missing else str(error)
        raise SourceError(f"source {name!r}: {reason}") from None
    if not files:
        raise SourceError(f"source {name!r}: no files under {source.uri}")
    good, bad = [], {}
    for uri in files:
        try:
            if source.format == "parquet":
                fs, path = storage.filesystem(uri)
                names = pq.read_schema(path, filesystem=fs).names
            else:
                names = text_columns(head_lines(storage, uri, source.encoding), source.format)
        except READ_ERRORS as error:
            bad[uri] = f"unreadable {source.format} file: {str(error).splitlines()[0][:200]}"
            continue
        if not names:  # an empty text file has no header to map: set it aside, go on
            bad[uri] = f"empty {source.format} file: no header"
            continue
        validate.check_schema(names, source, name, uri)
        good.append(uri)
    if not good:
        raise SourceError(f"source {name!r}: none of its {len(files)} files can be read: {bad}")
    return good, bad


def head_lines(storage: Storage, uri: str, encoding: str) -> list[str]:
    """The first complete lines of a text file, split on "\n" only like the reader does.

    Tolerant, as a probe should be (an undecodable byte shows as U+FFFD here; the reader
    quarantines its line), but correct: decoded in the source's encoding, a character cut at
    the end of the head is not mangled, and a line cut there is left out.
    """
    fs, path = storage.filesystem(uri)
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    text, complete, size = "", False, 0
    with fs.open_input_stream(path) as stream:
        while "\n" not in text and not complete and size < MAX_HEAD_BYTES:
            chunk = stream.read(HEAD_BYTES)
            size += len(chunk)
            complete = len(chunk) < HEAD_BYTES
            text += decoder.decode(chunk, final=complete)
    lines = text.removeprefix("\ufeff").split("\n")
    if not complete:
        lines = lines[:-1]
    return [line.removesuffix("\r") for line in lines]


def read_file(storage: Storage, uri: str, source: SourceConfig, key: bytes):
    """One file as an Arrow table (raw columns, plus reason/record for text files) and its
    counts: {"rows"} for parquet (from the footer), line accounting for text files."""
    if source.format == "parquet":
        return read_parquet(storage, uri, source)
    return read_text(storage.read_bytes(uri), source, key)


def read_parquet(storage: Storage, uri: str, source: SourceConfig) -> tuple[pa.Table, dict]:
    """Reads the declared columns and checks what was read.

    A corrupt page under an intact footer either fails to decode (OSError, ArrowInvalid) or
    decodes into arrays with out-of-range dictionary indices or offsets, which only fail
    later, inside another task; a full validation here catches those in this file's task.
    Page checksums are verified where the writer stored them.
    """
    fs, path = storage.filesystem(uri)
    columns = list(dict.fromkeys(validate.raw_columns(source).values()))
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle, page_checksum_verification=True)
        table = parquet.read(columns=columns, use_threads=False)
        rows = parquet.metadata.num_rows
    table.validate(full=True)
    if table.num_rows != rows:
        raise ValueError(f"read {table.num_rows} rows where its footer says {rows}")
    return table, {"rows": rows}


def text_columns(lines: list[str], file_format: str) -> list[str]:
    """Column names from the first lines of a CSV (header) or JSONL file (keys of objects)."""
    if file_format == "csv":
        return next(csv.reader(lines[:1]), [])
    names: dict[str, None] = {}
    for line in lines[:50]:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            names.update(dict.fromkeys(row))
    if not names:
        raise ValueError("no JSON object in its first lines")
    return list(names)


def quarantine_file(storage: Storage, uri: str, error: str, folder: str, has_pii: bool) -> None:
    """Sets an unreadable file aside: a copy, or only its digest when it may hold PII in clear."""
    content = storage.read_bytes(uri)
    name = uri.rstrip("/").replace("/", "__").replace(":", "")
    note = {
        "uri": uri,
        "reason": error,
        "bytes": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
    }
    if has_pii:
        note["copy"] = "not kept: the source has PII columns and the file could not be parsed"
    else:
        storage.write_bytes(join(folder, "files", name), content)
    storage.write_json(join(folder, "files", name + ".reason.json"), note)
