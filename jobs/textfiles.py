"""Text sources (CSV, JSONL): bytes -> physical lines -> records, every line accounted for.

A physical line ends at b"\\n" (one "\\r" before it is dropped). A lone "\\r", "\\u2028",
"\\x0b", "\\x1c" and the like are characters, not line ends, so JSON strings holding them
still parse. A blank line (empty, or only whitespace) is not a record: it is counted in
`blank_lines`, so that data lines (after a CSV header) = records + blank lines +
continuation lines (the second and later lines of multi-line CSV records).

Every other line yields exactly one row: parsed, or flagged with a reason and a record that
never holds PII in clear (where the source has PII, a line whose fields cannot be trusted
keeps only its line number and digest):

- a line that is not valid text in the source's `encoding` (it is never decoded with
  replacement characters): "<format>: not valid <encoding>";
- CSV: "csv: malformed quoting" (an unbalanced or stray quote, confined to its own line) or
  "csv: wrong number of fields";
- JSONL: not a JSON object, a field of the wrong JSON type, or an invalid unicode escape.

CSV with `multiline: false` (the default): each physical line is one record, so a quote left
open can never swallow the lines after it. With `multiline: true` a quoted value may span
lines: a line that leaves a quote open is joined with the lines up to the next line that can
close it, and only if they form one well-formed record; otherwise just the opening line is
quarantined and reading resumes at the next line.

The work is vectorised (numpy finds the lines, RE2 through pyarrow.compute checks each line's
quoting and field count, pyarrow's CSV reader parses the lines that passed); Python loops run
only over lines that failed a check, and over JSONL lines.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from jobs import validate
from jobs.config import SourceConfig

UNDECODABLE = "rayline-undecodable"
_ESCAPED = re.compile("[\udc00-\udcff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_FIELD = r'(?:"(?:[^"]|"")*"|(?:[^",\r\n][^,\r\n]*)?)'  # quoted, or not starting with one
_QUOTED = r'"(?:[^"]|"")*"'
_LINE_END = r"\r?\n?$"
_PATTERN_FIELDS = 200
_BLANK = r"^\s*$"


def _escape_undecodable(error: UnicodeError):
    """Error handler: an undecodable byte b becomes U+DC00+b, a lone surrogate that no strict
    decoder produces, so its line can be found; encoding maps those back to the same bytes."""
    if isinstance(error, UnicodeDecodeError):
        undecodable = error.object[error.start : error.end]
        return "".join(chr(0xDC00 + byte) for byte in undecodable), error.end
    if isinstance(error, UnicodeEncodeError):
        chars = error.object[error.start : error.end]
        if all(0xDC00 <= ord(char) <= 0xDCFF for char in chars):
            return bytes(ord(char) - 0xDC00 for char in chars), error.end
    raise error


codecs.register_error(UNDECODABLE, _escape_undecodable)


@dataclass
class Flagged:
    """Rows that could not be parsed, in order: a reason and a record each, columns null."""

    reasons: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)

    def add(self, reason: str, record: str) -> None:
        self.reasons.append(reason)
        self.records.append(record)

    def table(self, names: list[str]) -> pa.Table:
        count = len(self.reasons)
        columns = {name: pa.nulls(count, pa.string()) for name in names}
        columns[validate.REASON] = pa.array(self.reasons, pa.string())
        columns[validate.RECORD] = pa.array(self.records, pa.string())
        return pa.table(columns)


def decode(data: bytes, encoding: str) -> tuple[str, dict[int, bytes]]:
    """The file as text, and the raw bytes of each line that is not valid in `encoding`, by
    0-based line index; those lines are emptied in the text (their index still counts)."""
    try:
        text, undecodable = data.decode(encoding), {}
    except UnicodeDecodeError:
        lines = data.decode(encoding, errors=UNDECODABLE).split("\n")
        undecodable = {}
        for index, line in enumerate(lines):
            if _ESCAPED.search(line):
                undecodable[index] = line.encode(encoding, errors=UNDECODABLE)
                lines[index] = ""
        text = "\n".join(lines)
    return text.removeprefix("\ufeff"), undecodable


def undecodable_record(raw: bytes, number: int, source: SourceConfig) -> str:
    """Where the line was and its digest; for a source without PII also its text, with the
    undecodable bytes shown as escapes (never replaced silently)."""
    record = json.loads(validate.unparseable_record(raw, number))
    if not source.pii:
        record["text"] = raw.decode(source.encoding, errors="backslashreplace")
    return json.dumps(record)


def read_text(data: bytes, source: SourceConfig, key: bytes) -> tuple[pa.Table, dict]:
    """One CSV or JSONL file as string columns plus reason/record; and its line accounting."""
    if source.format == "csv":
        return read_csv(data, source, key)
    return read_jsonl(data, source, key)


# --- CSV ------------------------------------------------------------------------------------


@dataclass
class _Lines:
    """Physical lines as one Arrow string array (each with its terminator) over one buffer."""

    buffer: bytes
    array: pa.LargeStringArray
    offsets: np.ndarray

    @classmethod
    def split(cls, buffer: bytes) -> _Lines:
        data = np.frombuffer(buffer, np.uint8)
        starts = np.r_[0, np.flatnonzero(data == 10) + 1]
        if starts[-1] == len(buffer):  # nothing after the last "\n" (or an empty file)
            starts = starts[:-1]
        offsets = np.r_[starts, len(buffer)].astype(np.int64)
        array = pa.Array.from_buffers(
            pa.large_string(), len(starts), [None, pa.py_buffer(offsets), pa.py_buffer(buffer)]
        )
        return cls(buffer, array, offsets)

    def text(self, first: int, last: int | None = None) -> str:
        """Lines first..last (inclusive) as text, without the final terminator."""
        end = self.offsets[(first if last is None else last) + 1]
        text = self.buffer[self.offsets[first] : end].decode()
        return text.removesuffix("\n").removesuffix("\r")

    def take(self, indices: np.ndarray) -> pa.Array:
        return self.array.take(pa.array(indices, pa.int64()))


def _matches(lines: pa.Array, pattern: str) -> np.ndarray:
    return pc.match_substring_regex(lines, pattern).to_numpy(zero_copy_only=False)


def _record_pattern(fields: int | None) -> str:
    """RE2: a whole record with `fields` fields (any number when None), quoting well formed."""
    more = f"(?:,{_FIELD}){{{fields - 1}}}" if fields is not None else f"(?:,{_FIELD})*"
    return f"^{_FIELD}{more}{_LINE_END}"


def _is_record(lines: pa.Array, fields: int | None) -> np.ndarray:
    """Per line: quoting well formed and (unless `fields` is None) exactly `fields` fields.

    One RE2 pattern up to _PATTERN_FIELDS fields (~0.15 s per 1M lines); RE2 caps a
    repetition at 1000 and slows well before that, so wider files count their delimiters
    outside quoted values instead (~0.7 s per 1M lines).
    """
    if fields is None or fields <= _PATTERN_FIELDS:
        return _matches(lines, _record_pattern(fields))
    unquoted = pc.replace_substring_regex(lines, _QUOTED, "")
    delimiters = pc.count_substring(unquoted, ",").to_numpy(zero_copy_only=False)
    return _matches(lines, _record_pattern(None)) & (delimiters == fields - 1)


@dataclass
class _Plan:
    """Which lines the parser gets (header included), how many records that is, and the
    lines set aside as (index, reason)."""

    keep: np.ndarray
    records: int
    bad: list[tuple[int, str]]
    blank: int
    continuation: int


def _plan(lines: _Lines, fields: int, multiline: bool, undecodable: dict) -> _Plan:
    """Classifies every line after the header: record, blank, or set aside (and why)."""
    count = len(lines.array)
    broken = np.zeros(count, bool)
    broken[list(undecodable)] = True
    blank = _matches(lines.array, _BLANK) & ~broken
    whole = _is_record(lines.array, fields) & ~blank & ~broken
    blank[0] = whole[0] = broken[0] = False  # the header is not data
    others = np.flatnonzero(~whole & ~blank & ~broken)
    others = others[others > 0]
    groups: list[tuple[int, int]] = []
    if multiline and len(others):
        groups, others = _multiline_records(lines, others, fields, whole, blank, broken)
    keep = whole.copy()
    keep[0] = True
    for first, last in groups:
        keep[first : last + 1] = True
    well_quoted = _is_record(lines.take(others), None) if len(others) else []
    bad = [
        (int(index), "csv: wrong number of fields" if ok else "csv: malformed quoting")
        for index, ok in zip(others, well_quoted, strict=True)
    ]
    return _Plan(
        keep=keep,
        records=int(whole.sum()) + len(groups),
        bad=bad,
        blank=int(blank.sum()),
        continuation=sum(last - first for first, last in groups),
    )


def _multiline_records(lines: _Lines, others, fields, whole, blank, broken):
    """Joins each line that leaves a quote open with the lines up to the next one with an odd
    number of quotes (the only kind that can close it), if together they are one well-formed
    record. Returns the (first, last) line groups and the lines still set aside; lines inside
    a group stop counting as records or blank lines (`whole`, `blank` are updated)."""
    quotes = pc.count_substring(lines.array, '"').to_numpy(zero_copy_only=False)
    odd = np.flatnonzero(quotes % 2 == 1)
    groups, left, inside_until = [], [], 0
    for index in others:
        if index <= inside_until:
            continue
        after = np.searchsorted(odd, index, side="right")
        if quotes[index] % 2 == 1 and after < len(odd):
            last = int(odd[after])
            closed = _is_record(pa.array([lines.text(index, last)]), fields)[0]
            if closed and not broken[index : last + 1].any():
                groups.append((int(index), last))
                whole[index : last + 1] = blank[index : last + 1] = False
                inside_until = last
                continue
        left.append(index)
    return groups, np.array(left, np.int64)


def _parse(lines: _Lines, keep: np.ndarray, names: list[str]) -> pa.Table:
    """Parses the kept lines (header first) with pyarrow: their bytes are contiguous after an
    Arrow filter, so the parser reads them without a Python join."""
    kept = lines.array.filter(pa.array(keep))
    offsets = np.frombuffer(kept.buffers()[1], np.int64)[kept.offset : kept.offset + len(kept) + 1]
    body = kept.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    return pacsv.read_csv(
        pa.BufferReader(body),
        read_options=pacsv.ReadOptions(use_threads=False),  # one CPU per Ray task
        parse_options=pacsv.ParseOptions(newlines_in_values=True),  # "\r" in quotes, multiline
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names}, include_columns=names
        ),
    )


def _csv_record(text: str, number: int, reason: str, header: list[str], source, names) -> str:
    """The record of a line set aside: digest only with PII (fields may be shifted into any
    column), else its fields by header name (wrong count) or its text (malformed quoting)."""
    if source.pii:
        return validate.unparseable_record(text, number)
    if reason == "csv: wrong number of fields":
        fields = dict(zip(header, next(csv.reader([text]), []), strict=False))
        return json.dumps({**{name: fields.get(name) for name in names}, "_line": number})
    return json.dumps({"_line": number, "_text": text})


def read_csv(data: bytes, source: SourceConfig, key: bytes) -> tuple[pa.Table, dict]:
    """CSV as strings: a header line, then one record per line (or per multi-line record)."""
    names = list(dict.fromkeys(validate.raw_columns(source).values()))
    text, undecodable = decode(data, source.encoding)
    lines = _Lines.split(text.encode())
    if not len(lines.array):
        raise ValueError("empty file: no header line")
    if 0 in undecodable:
        raise ValueError(f"its header line is not valid {source.encoding}")
    header_text = lines.text(0)
    if not _is_record(pa.array([header_text]), None)[0]:
        raise ValueError("its header line has malformed quoting")
    header = next(csv.reader([header_text]))
    plan = _plan(lines, len(header), source.multiline, undecodable)
    parsed = _parse(lines, plan.keep, names)
    if parsed.num_rows != plan.records:  # the checks above promise one row per kept record
        raise RuntimeError(f"csv parser gave {parsed.num_rows} rows for {plan.records} records")
    flagged = Flagged()
    set_aside = dict(plan.bad) | dict.fromkeys(undecodable, f"csv: not valid {source.encoding}")
    for index, reason in sorted(set_aside.items()):
        if index in undecodable:
            flagged.add(reason, undecodable_record(undecodable[index], index + 1, source))
        else:
            text = lines.text(index)
            flagged.add(reason, _csv_record(text, index + 1, reason, header, source, names))
    good = parsed.append_column(validate.REASON, pa.nulls(parsed.num_rows, pa.string()))
    good = good.append_column(validate.RECORD, pa.nulls(parsed.num_rows, pa.string()))
    table = pa.concat_tables([good, flagged.table(names)])
    counts = {
        "rows": table.num_rows,
        "lines": len(lines.array) - 1,
        "blank_lines": plan.blank,
        "continuation_lines": plan.continuation,
    }
    return table, counts


# --- JSONL ----------------------------------------------------------------------------------


class JsonNumber(str):
    """A JSON number (or NaN/Infinity literal) kept as its text: exact, and "1e999" stays
    "1e999" (flagged as not finite by validation) instead of becoming float inf."""


# strict=False: a raw control character (\x0b, \x1c, ...) inside a string is kept as
# written; it is what the old str.splitlines() split records on.
_JSON_OPTIONS = {"parse_float": JsonNumber, "parse_constant": JsonNumber, "strict": False}


def _wrong_type(row: dict, names: list[str], declared: dict[str, str]) -> list[str]:
    def wrong(name: str) -> bool:
        value = row.get(name)
        if value is None:
            return False
        if isinstance(value, dict | list):
            return True
        is_text = isinstance(value, str) and not isinstance(value, JsonNumber)
        return declared[name] == "string" and not is_text

    return [name for name in names if wrong(name)]


def _invalid_unicode(row: dict, names: list[str]) -> bool:
    """A JSON escape like "\\ud800" decodes to a lone surrogate, which is not text."""
    return any(
        isinstance(value := row.get(name), str)
        and not value.isascii()
        and _SURROGATE.search(value) is not None
        for name in names
    )


def _json_row(line: str, number: int, source: SourceConfig, key: bytes, names, declared):
    """(values, reason, record) of one non-blank JSONL line; reason None when it is clean."""
    try:
        row = json.loads(line, **_JSON_OPTIONS)
        if not isinstance(row, dict):
            raise ValueError("not an object")
    except ValueError:
        reason = f"jsonl: line {number} is not a JSON object"
        return {}, reason, validate.unparseable_record(line, number)
    if _invalid_unicode(row, names):
        return {}, "jsonl: invalid unicode escape", validate.unparseable_record(line, number)
    wrong = _wrong_type(row, names, declared)
    if not wrong:
        return row, None, None
    declared_only = {name: row.get(name) for name in names}
    record = validate.redact_record(declared_only, source.pii, key, source.rename)
    return row, f"{wrong[0]}: wrong JSON type", record


def read_jsonl(data: bytes, source: SourceConfig, key: bytes) -> tuple[pa.Table, dict]:
    """JSONL as strings: one JSON object per line; lines that do not parse are flagged."""
    names = list(dict.fromkeys(validate.raw_columns(source).values()))
    declared = {raw: source.types[std] for std, raw in validate.raw_columns(source).items()}
    text, undecodable = decode(data, source.encoding)
    lines = text.split("\n")
    if lines[-1] == "" and len(lines) - 1 not in undecodable:
        lines.pop()  # nothing after the last "\n" (or an empty file)
    columns: dict[str, list] = {name: [] for name in [*names, validate.REASON, validate.RECORD]}
    blank = 0
    for index, line in enumerate(lines):
        number, line = index + 1, line.removesuffix("\r")
        if index in undecodable:
            record = undecodable_record(undecodable[index], number, source)
            values, reason = {}, f"jsonl: not valid {source.encoding}"
        elif not line.strip():
            blank += 1
            continue
        else:
            values, reason, record = _json_row(line, number, source, key, names, declared)
        for name in names:
            value = values.get(name)
            columns[name].append(None if value is None else str(value))
        columns[validate.REASON].append(reason)
        columns[validate.RECORD].append(record)
    table = pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})
    counts = {"rows": table.num_rows, "lines": len(lines), "blank_lines": blank}
    return table, {**counts, "continuation_lines": 0}
