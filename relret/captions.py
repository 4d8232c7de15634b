"""Caption tables: the CSV layouts the audio-caption datasets ship, read with line numbers and per-row problems.

Used by the shard readers (`shards/readers.py`) and by calibration (`relret/calibrate.py`). A file that cannot be
read as CSV at all (bad quoting, NUL bytes, a header without the required columns) raises ValueError naming the file
and line. A row that is readable but unusable (wrong number of fields, an empty or non-UTF-8 caption) is returned
with a `problem`, so that callers can skip that clip and report why.

Non-UTF-8 bytes are decoded with `surrogateescape`: they survive as lone surrogates, which `caption_problem` detects,
so one bad caption costs one clip rather than the whole file.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

CLOTHO_COLUMNS = ("file_name",)
_CAPTION_COLUMN = re.compile(r"^caption_(\d+)$")


@dataclasses.dataclass
class CsvRow:
    """One data row of a CSV file."""

    line: int
    """1-based line number where the row starts."""
    fields: dict[str, str]
    """column -> value; empty when `problem` is set."""
    problem: str | None = None


def is_valid_utf8(text: str) -> bool:
    """False for text decoded with `surrogateescape` from bytes that are not UTF-8."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def caption_problem(captions: Sequence[object]) -> str | None:
    """Why a clip's captions are unusable (no caption, an empty, non-string or non-UTF-8 caption), or None."""
    if not captions:
        return "no captions"
    for i, caption in enumerate(captions, start=1):
        if not isinstance(caption, str):
            return f"caption {i} is {type(caption).__name__}, not text"
        if not is_valid_utf8(caption):
            return f"caption {i} is not valid UTF-8"
        if not caption.strip():
            return f"caption {i} is empty"
    return None


def read_csv_rows(path: str | os.PathLike, required: Sequence[str], what: str) -> tuple[list[str], Iterator[CsvRow]]:
    """The header and an iterator over the rows of a UTF-8 CSV file (a BOM is ignored, CRLF line ends are fine).

    Raises ValueError naming the file and line when the header lacks a `required` column or the file is not valid
    CSV; `what` names the expected layout in that message. Rows whose field count differs from the header's come back
    with a `problem`; blank lines are ignored.
    """
    path = Path(path)
    fh = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(fh, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        fh.close()
        raise ValueError(f"{path}:{reader.line_num}: not a readable CSV file ({exc})") from None
    if header is None:
        fh.close()
        raise ValueError(f"{path}:1: empty file; expected a header with {what}")
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        fh.close()
        raise ValueError(
            f"{path}:1: header lacks column(s) {', '.join(missing)}; expected {what}, found {', '.join(header)}"
        )

    def rows() -> Iterator[CsvRow]:
        with fh:
            start = reader.line_num + 1
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise ValueError(f"{path}:{start}: not a readable CSV file ({exc})") from None
                line, start = start, reader.line_num + 1
                if not values:
                    continue
                if len(values) != len(header):
                    yield CsvRow(line, {}, f"{path.name}:{line}: {len(values)} fields, the header has {len(header)}")
                else:
                    yield CsvRow(line, dict(zip(header, values)))

    return header, rows()


def caption_columns(header: Sequence[str]) -> list[str]:
    """The `caption_1..caption_k` columns of a header, in numeric order."""
    numbered = [(int(m.group(1)), h) for h in header if (m := _CAPTION_COLUMN.match(h))]
    return [h for _, h in sorted(numbered)]


@dataclasses.dataclass
class CaptionRow:
    """One clip of a Clotho-style caption table."""

    line: int
    file_name: str
    captions: list[str]
    problem: str | None = None


def read_caption_rows(path: str | os.PathLike) -> list[CaptionRow]:
    """Every row of a Clotho-style CSV (`file_name,caption_1..caption_k`), with its problem if it has one.

    Raises ValueError naming the file and line if the file is not such a CSV.
    """
    what = "file_name,caption_1..caption_5 (Clotho)"
    header, rows = read_csv_rows(path, CLOTHO_COLUMNS, what)
    columns = caption_columns(header)
    if not columns:
        raise ValueError(f"{path}:1: header has no caption_1..caption_k columns; expected {what}")
    out = []
    for row in rows:
        if row.problem:
            out.append(CaptionRow(row.line, "", [], row.problem))
            continue
        captions = [row.fields[c] for c in columns]
        name = row.fields["file_name"]
        problem = None if name.strip() else "empty file_name"
        if problem is None and not is_valid_utf8(name):
            problem = "file_name is not valid UTF-8"
        if problem is None and (reason := caption_problem(captions)):
            problem = reason
        out.append(CaptionRow(row.line, name, captions, problem))
    return out


def read_caption_table(path: str | os.PathLike) -> dict[str, list[str]]:
    """file_name -> non-empty captions, from a Clotho-style CSV (rows with problems keep their usable captions)."""
    table = {}
    for row in read_caption_rows(path):
        if row.file_name:
            table[row.file_name] = [c for c in row.captions if c]
    return table
