"""Sources: find a source's files, set unreadable ones aside, read CSV and JSONL line-aware.

Used by `jobs.ingest` before and during validation. Nothing here drops a row silently: a
malformed line becomes a flagged row, an unreadable file is reported by name, and neither
keeps PII in clear.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from jobs import validate
from jobs.config import SourceConfig
from jobs.errors import SourceError, StorageError
from jobs.storage import Storage, join


def probe(storage: Storage, name: str, source: SourceConfig) -> tuple[list[str], dict[str, str]]:
    """Lists a source's files, finds unreadable ones, and checks the schema can be mapped."""
    try:
        files = storage.list_files(source.uri)
    except StorageError:
        raise SourceError(f"source {name!r}: no such URI {source.uri}") from None
    if not files:
        raise SourceError(f"source {name!r}: no files under {source.uri}")
    good, bad = [], {}
    for uri in files:
        try:
            if source.format == "parquet":
                fs, path = storage.filesystem(uri)
                names = pq.read_schema(path, filesystem=fs).names
            else:
                fs, path = storage.filesystem(uri)
                with fs.open_input_stream(path) as stream:
                    head = stream.read(65536).decode("utf-8", errors="replace")
                names = text_columns(head, source.format)
        except (OSError, ValueError, pa.ArrowInvalid, IndexError) as error:
            bad[uri] = f"unreadable {source.format} file: {str(error).splitlines()[0][:200]}"
            continue
        validate.check_schema(names, source, name, uri)
        good.append(uri)
    if not good:
        raise SourceError(f"source {name!r}: none of its {len(files)} files can be read: {bad}")
    return good, bad


def read_text_file(storage: Storage, uri: str, source: SourceConfig, key: bytes) -> pa.Table:
    """Reads one CSV or JSONL file as strings; lines that do not parse become flagged rows.

    Their quarantine record never holds PII in clear: parsed rows are redacted, and a line whose
    fields cannot be trusted (in a source with PII) keeps only its number and digest.
    """
    raw_names = list(validate.raw_columns(source).values())
    text = storage.read_bytes(uri).decode("utf-8", errors="replace")
    columns: dict[str, list] = {name: [] for name in raw_names}
    reasons: list[str | None] = []
    records: list[str | None] = []

    def flag(reason: str, record: str) -> None:
        for name in raw_names:
            columns[name].append(None)
        reasons.append(reason)
        records.append(record)

    if source.format == "csv":
        bad_lines: list[tuple[int, str]] = []

        def on_invalid(row) -> str:
            bad_lines.append((row.number, row.text))
            return "skip"

        table = pacsv.read_csv(
            io.BytesIO(text.encode()),
            read_options=pacsv.ReadOptions(use_threads=False),  # threads lose line numbers
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in raw_names}, include_columns=raw_names
            ),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
        )
        for name in raw_names:
            columns[name] = table.column(name).to_pylist()
        reasons = [None] * table.num_rows
        records = [None] * table.num_rows
        header = next(csv.reader([text.split("\n", 1)[0]]))
        for number, line in bad_lines:
            if source.pii:  # fields may be shifted: any of them could hold PII
                flag("csv: wrong number of fields", validate.unparseable_record(line, number))
                continue
            fields = dict(zip(header, next(csv.reader([line]), []), strict=False))
            row = {name: fields.get(name) for name in raw_names}
            flag("csv: wrong number of fields", json.dumps({**row, "_line": number}))
    else:
        declared = {raw: source.types[std] for std, raw in validate.raw_columns(source).items()}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError:
                flag(
                    f"jsonl: line {number} is not a JSON object",
                    validate.unparseable_record(line, number),
                )
                continue
            wrong = [
                name
                for name in raw_names
                if row.get(name) is not None
                and (
                    isinstance(row[name], dict | list)
                    or (declared[name] == "string" and not isinstance(row[name], str))
                )
            ]
            for name in raw_names:
                value = row.get(name)
                columns[name].append(None if value is None else str(value))
            reasons.append(f"{wrong[0]}: wrong JSON type" if wrong else None)
            declared_only = {name: row.get(name) for name in raw_names}
            records.append(
                validate.redact_record(declared_only, source.pii, key, source.rename)
                if wrong
                else None
            )
    result = pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})
    return result.append_column(validate.REASON, pa.array(reasons, pa.string())).append_column(
        validate.RECORD, pa.array(records, pa.string())
    )


def text_columns(head: str, file_format: str) -> list[str]:
    """Column names from the start of a CSV (header) or JSONL file (keys of parseable lines)."""
    lines = head.splitlines()
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
