"""Work in: image paths from the command line, and CSV / JSONL / Parquet files of (prompt, image) rows,
streamed so millions of rows need no more memory than a batch.

Every input row gets an identity: its `id` column when the file has one, else its row number. Every
problem with a row (malformed line, bad encoding, wrong type, missing column, empty image list, empty
prompt, duplicate id) makes that row an error row naming its line; the rows around it are read on.
Consecutive valid rows with the same prompt (and the same `group`, when that column exists) form one
comparison: probabilities and ranks are computed over them.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..errors import InputError, PickScoreError
from ..images import looks_like_url
from ..optional import require
from ..pipeline import WorkItem
from ..tokenizer import check_prompt

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
# A quoted CSV field may hold newlines, but one spanning this many lines is an unbalanced quote that
# would swallow every later row; the record is reported and reading restarts on its next line.
MAX_CSV_RECORD_LINES = 64


def file_format(path: Path) -> str:
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: unknown file type {Path(path).suffix!r}; use .csv, .jsonl or .parquet")
    return fmt


# ---- images on the command line --------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    images: list[str]  # in order; a name that matched nothing stays, to be reported in its own row
    problems: dict[str, str] = field(default_factory=dict)  # name -> why it is not an image to score


def expand_images(args: Iterable[str]) -> Selection:
    """Paths as given. A directory gives its image files (sorted, recursive; dotfiles skipped) and lists
    every other file in it as a problem. An argument that exists is taken literally, even if it looks
    like a glob (`img[1].png`); otherwise a glob is expanded. Nothing at all selected is an InputError."""
    images: list[str] = []
    problems: dict[str, str] = {}
    for arg in args:
        if os.path.isdir(arg):
            found = _scan_directory(arg, problems)
            images += found
            if not found:
                problems.setdefault(arg, "directory holds no image files")
        elif os.path.lexists(arg) or not glob.has_magic(arg) or looks_like_url(arg):
            images.append(arg)  # missing: scored in its own row, which says why ('file not found', a URL)
        else:
            matches = sorted(glob.glob(arg, recursive=True))
            files = [m for m in matches if os.path.isfile(m)]
            images += files
            if not files:
                problems[arg] = "pattern matches no files"
    if not images:
        detail = "; ".join(f"{k}: {v}" for k, v in list(problems.items())[:5])
        raise InputError("no images to score" + (f" ({detail})" if detail else ""))
    return Selection(images, problems)


def _scan_directory(root: str, problems: dict[str, str]) -> list[str]:
    found = []

    def unreadable(error: OSError) -> None:
        problems[error.filename or root] = f"cannot read directory ({error.strerror})"

    for folder, dirs, files in os.walk(root, onerror=unreadable, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(path)
            else:
                problems[path] = f"not an image file type ({Path(name).suffix or 'no suffix'})"
    return found


# ---- rows from files --------------------------------------------------------------------------------
@dataclass
class InputRow:
    row: int  # 1-based position among the input's data rows, bad rows included
    id: str  # identity for resume: the `id` column, else str(row)
    line: int | None = None  # where the row starts in a CSV / JSONL file
    prompt: Any = None
    images: list[str] = field(default_factory=list)
    group: Any = None
    error: str | None = None

    @property
    def where(self) -> str:
        return f"line {self.line}" if self.line is not None else f"row {self.row}"


@dataclass
class _Fields:
    """What one record of a file holds, before validation (`problem`: why it has no usable fields)."""

    line: int | None
    values: dict[str, Any] | None
    problem: str | None = None


def read_rows(path: Path) -> Iterator[InputRow]:
    """Validated rows of an input file, in order; every problem is an error row, never an exception
    (except for a file that cannot be read as a whole: InputError)."""
    path = Path(path)
    fmt = file_format(path)
    if not path.is_file():
        raise InputError(f"input file {path} not found")
    header, records = _records(path, fmt)
    if header is not None and ("prompt" not in header or not ({"image", "images"} & set(header))):
        raise InputError(f"{path}: rows need a 'prompt' column and an 'image' (or 'images') column; got {sorted(header)}")
    ids = _Ids({})
    for number, rec in enumerate(records, 1):
        columns = header if header is not None else set(rec.values or ())
        yield _validate(rec, number, "id" in columns, "group" in columns, ids)


def _records(path: Path, fmt: str) -> tuple[set[str] | None, Iterator[Any]]:
    """The columns the file declares (None: JSONL, where each line has its own) and its records."""
    records = {"csv": _csv_records, "jsonl": _jsonl_records, "parquet": _parquet_records}[fmt](path)
    return next(records), records


def table_records(path: Path) -> tuple[set[str] | None, Iterator[tuple[int, int | None, dict[str, Any] | None, str | None]]]:
    """A CSV / JSONL / Parquet file's columns (None for JSONL) and, per record, (row number, line, values,
    problem), read as read_rows reads them (encodings, quoting, malformed lines as problems), for readers
    of other columns than (prompt, image)."""
    path = Path(path)
    fmt = file_format(path)
    if not path.is_file():
        raise InputError(f"input file {path} not found")
    header, records = _records(path, fmt)
    return header, ((number, rec.line, rec.values, rec.problem) for number, rec in enumerate(records, 1))


def validate_record(values: dict[str, Any] | None, number: int, *, line: int | None = None, problem: str | None = None,
                    has_id: bool = False, has_group: bool = False, first_row_of: dict[str, int] | None = None) -> InputRow:
    """One record checked exactly as read_rows checks it, for readers that number their rows themselves
    (e.g. in parallel). `problem`: why the record has no usable values; `first_row_of`: id -> the row that
    first used it (a repeated id becomes an error row); without it, repeats are not looked for."""
    return _validate(_Fields(line, values, problem), number, has_id, has_group, _Ids({} if first_row_of is None else first_row_of))


def valid_unicode(text: str) -> bool:
    """False for a str holding lone surrogates (JSON's "\\ud800" decodes to one), which no file can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escape_invalid(text: str) -> str:
    """`text` writable as UTF-8: lone surrogates become their backslash escapes (\\ud800); valid text is unchanged."""
    return text if valid_unicode(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def as_text(value: Any) -> str | None:
    """A value as every output format can hold it: text (lone surrogates escaped, see escape_invalid), or None."""
    return None if value is None else escape_invalid(value if isinstance(value, str) else str(value))


class _Ids:
    """Which row holds each id. A row whose own id cannot identify it (repeated, empty, not text) is given a
    made-up one that no row holds yet, and remembered as made up, so a later row that literally uses it is
    reported as colliding with a made-up id rather than as a plain repeat."""

    def __init__(self, first_row_of: dict[str, int]):
        self.first_row_of = first_row_of
        self.made_for: dict[str, str] = {}  # made-up id -> why its row needed one

    def claim(self, wanted: str, number: int) -> str:
        self.first_row_of.setdefault(wanted, number)
        return wanted

    def make(self, base: str, number: int, why: str) -> str:
        made = base
        while made in self.first_row_of:  # taken (by a literal id, too): extend it until it is free
            made += f"#row{number}"
        self.made_for[made] = why
        return self.claim(made, number)

    def repeat(self, wanted: str) -> str | None:
        """Why `wanted` cannot identify another row, or None if it is free."""
        if wanted not in self.first_row_of:
            return None
        first = self.first_row_of[wanted]
        if wanted in self.made_for:
            return f"id {wanted!r} was already given to row {first} ({self.made_for[wanted]})"
        return f"duplicate id {wanted!r} (first at row {first})"


def image_value(value: Any, index: int) -> tuple[Any, bytes | None]:
    """(what validation sees, the bytes) for one image value of a table: a path or URI; the datasets struct
    {bytes, path} (bytes win; a struct with a path only names a file); or plain bytes. A struct whose bytes
    are not bytes is returned as it is, for validation to refuse."""
    if isinstance(value, dict) and ({"bytes", "path"} & set(value)):
        data, path = value.get("bytes"), value.get("path")
        if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
            return value, None
        return (path or f"#{index} (bytes)", bytes(data)) if data is not None else (path, None)
    if isinstance(value, (bytes, bytearray)):
        return f"#{index} (bytes)", bytes(value)
    return value, None


SCALARS = (str, int, float, bool)


def _validate(rec: _Fields, number: int, has_id: bool, has_group: bool, ids: _Ids) -> InputRow:
    row = InputRow(number, str(number), rec.line)
    values = rec.values or {}
    raw_id = values.get("id")
    problems: list[str] = []
    if not has_id:
        row.id = ids.claim(row.id, number)
    elif raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        row.id = ids.make(str(number), number, "its id is empty")
        problems.append("the id is empty")
    elif not isinstance(raw_id, SCALARS):
        row.id = ids.make(str(number), number, "its id is not a string or number")
        problems.append(f"the id must be a string or number, got {type(raw_id).__name__}")
    else:
        wanted = str(raw_id)
        if not valid_unicode(wanted):
            wanted = escape_invalid(wanted)
            problems.append(f"the id is not valid Unicode (a lone surrogate); it is written escaped, as '{wanted}'")
        repeat = ids.repeat(wanted)
        if repeat is None:
            row.id = ids.claim(wanted, number)
        else:
            row.id = ids.make(wanted, number, f"a repeat of id {wanted!r}")
            problems.insert(0, repeat)
    row.prompt = values.get("prompt")
    row.group = values.get("group") if has_group else None

    def bad(problem: str) -> InputRow:
        row.error = f"{row.where}: {problem}"
        return row

    if problems:
        return bad("; ".join(problems))
    if rec.problem:
        return bad(rec.problem)
    if row.group is not None:
        # Written as text, so compared as text: JSON's 1 and "1" are one group, as the output shows them
        if not isinstance(row.group, SCALARS):
            group, row.group = row.group, None
            return bad(f"the group must be a string or number, got {type(group).__name__}")
        row.group = str(row.group)
        if not valid_unicode(row.group):
            row.group = escape_invalid(row.group)
            return bad(f"the group is not valid Unicode (a lone surrogate); it is written escaped, as '{row.group}'")
    if "prompt" not in values:
        return bad("no 'prompt' value")
    try:
        check_prompt(row.prompt)
    except PickScoreError as e:
        return bad(str(e))
    images = values.get("images") if values.get("images") is not None else values.get("image")
    if isinstance(images, str) and values.get("images") is not None and images.lstrip().startswith("["):
        try:  # CSV cells hold lists as JSON
            images = json.loads(images)
        except (json.JSONDecodeError, RecursionError):
            return bad("'images' is not a JSON list of paths")
    if images is None:
        return bad("no 'image' or 'images' value")
    images = images if isinstance(images, list) else [images]
    if not images:
        return bad("the image list is empty")
    for value in images:
        if not isinstance(value, str) or not value.strip():
            return bad(f"an image must be a non-empty path string, got {_shown(value)}")
        if not valid_unicode(value):
            return bad(f"the image path '{escape_invalid(value)}' is not valid Unicode (a lone surrogate)")
    row.images = images
    return row


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)  # repr escapes lone surrogates, so the message itself is writable
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, problem) per physical line; a line that is not UTF-8 has a problem instead of text."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte-order mark, as spreadsheet programs write
            try:
                yield number, raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                yield number, None, (f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                     "save the file as UTF-8")


def _jsonl_records(path: Path) -> Iterator[Any]:
    yield None  # JSONL declares no header; each line has its own keys
    for number, text, problem in _lines(path):
        if problem is None and not text.strip():
            continue
        if problem is not None:
            yield _Fields(number, None, problem)
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            yield _Fields(number, None, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        except RecursionError:
            yield _Fields(number, None, "not valid JSON here (nested too deeply)")
            continue
        except ValueError as e:  # e.g. an integer over Python's 4300-digit limit
            yield _Fields(number, None, f"not valid JSON here ({e})")
            continue
        if not isinstance(value, dict):
            yield _Fields(number, None, f"expected a JSON object, got {type(value).__name__ if value is not None else 'null'}")
            continue
        yield _Fields(number, value)


def _csv_records(path: Path) -> Iterator[Any]:
    lines = _lines(path)
    pushed_back: deque[tuple[int, str | None, str | None]] = deque()
    header: list[str] | None = None
    while True:
        record, first_line, problem = _next_csv_record(lines, pushed_back)
        if record is None and problem is None:
            if header is None:
                raise InputError(f"{path} is empty (no header row)")
            return
        if header is None:
            if problem:
                raise InputError(f"{path}: the header row cannot be read ({problem})")
            header = [h.strip() for h in record]
            refuse_repeated_columns(path, header)
            yield set(header)
            continue
        if problem:
            yield _Fields(first_line, None, problem)
        elif not record or record == [""]:
            continue
        elif len(record) != len(header):
            yield _Fields(first_line, dict(zip(header, record)),
                          f"{len(record)} fields where the header has {len(header)} (an unquoted comma or quote?)")
        else:
            yield _Fields(first_line, dict(zip(header, record)))


def _next_csv_record(lines: Iterator, pushed_back: deque) -> tuple[list[str] | None, int | None, str | None]:
    """One CSV record: (fields, first line, None), or (None, first line, problem) for a broken one, after
    which reading resumes on the line after its first; (None, None, None) at the end."""
    taken: list[tuple[int, str | None, str | None]] = []

    def feed() -> Iterator[str]:
        while True:
            item = pushed_back.popleft() if pushed_back else next(lines, None)
            if item is None:
                return
            taken.append(item)
            if item[2] is not None:
                raise _BrokenRecord(item[2])
            if len(taken) > MAX_CSV_RECORD_LINES:
                raise _BrokenRecord(f"a quoted field runs over {MAX_CSV_RECORD_LINES} lines: an unbalanced quote")
            yield item[1]

    reader = csv.reader(feed(), strict=True)
    try:
        record = next(reader, None)
    except (_BrokenRecord, csv.Error) as e:
        first = taken[0][0] if taken else None
        pushed_back.extendleft(reversed(taken[1:]))
        problem = str(e)
        if isinstance(e, csv.Error):
            problem = ("an unbalanced quote runs to the end of the file" if "unexpected end of data" in problem
                       else f"malformed CSV ({problem})")
        return None, first, problem
    if record is None:
        return None, None, None
    return record, taken[0][0], None


def refuse_repeated_columns(path: Path, names: list[str]) -> None:
    # A repeated column would be read as whichever copy comes last, silently: which one was meant is the user's call
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InputError(f"{path}: the header names the column {name!r} more than once; rename or remove the extra one")
        seen.add(name)


class _BrokenRecord(Exception):
    pass


def _parquet_records(path: Path) -> Iterator[Any]:
    pq = require("pyarrow.parquet", "Parquet input")
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for an unreadable file
        raise InputError(f"{path} is not a readable Parquet file ({e})") from None
    refuse_repeated_columns(path, file.schema_arrow.names)
    yield set(file.schema_arrow.names)
    for values, problem in table_rows(path, file.iter_batches(batch_size=4096)):
        yield _Fields(None, values, problem)


def table_rows(path: Path, batches: Iterable[Any]) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """(values, None) per row of Arrow record batches, or (None, why) for a row whose text is not UTF-8 (Arrow
    does not check what a Parquet writer stored); a file that cannot be read on (a corrupt page, a truncated
    file) is an InputError naming it and the rows read before."""
    done = 0
    batches = iter(batches)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{path} cannot be read past row {done} ({type(e).__name__}: {reason})") from None
        if batch is None:
            return
        try:
            rows: list[Any] = batch.to_pylist()
        except UnicodeDecodeError:
            rows = [_row_or_problem(batch, i) for i in range(batch.num_rows)]
        for row in rows:
            yield (None, row) if isinstance(row, str) else (row, None)
        done += batch.num_rows


def _row_or_problem(batch: Any, i: int) -> dict[str, Any] | str:
    try:
        return batch.slice(i, 1).to_pylist()[0]
    except UnicodeDecodeError:
        bad = []
        for name in batch.schema.names:
            try:
                batch.column(name).slice(i, 1).to_pylist()
            except UnicodeDecodeError:
                bad.append(name)
        return f"the {', '.join(repr(b) for b in bad)} column holds text that is not valid UTF-8"


def count_images(path: Path) -> int | None:
    """Images in an input file, for the progress bar's ETA (approximate: one per row)."""
    fmt = file_format(path)
    try:
        if fmt == "parquet":
            return require("pyarrow.parquet", "Parquet input").ParquetFile(path).metadata.num_rows
        with open(path, "rb") as f:
            lines = sum(1 for line in f if line.strip())
    except Exception:  # noqa: BLE001 - only an estimate; read_rows reports real problems
        return None
    return max(lines - (1 if fmt == "csv" else 0), 0)


def read_work(rows: Iterable[InputRow], skip: Callable[[InputRow], bool] = lambda row: False) -> Iterator[WorkItem]:
    """Comparisons from rows: consecutive valid rows with the same (group, prompt) form one WorkItem
    whose key is the list of its InputRows; an error row is a WorkItem of its own with the error.
    Rows for which `skip` is true (already written by an earlier run) are left out."""
    current: list[InputRow] = []

    def flush() -> Iterator[WorkItem]:
        if current:
            yield WorkItem(current[0].prompt, [img for r in current for img in r.images], key=list(current))
            current.clear()

    for row in rows:
        if skip(row):
            continue
        if row.error is not None:
            yield from flush()
            yield WorkItem(row.prompt, row.images, key=[row], error=row.error)
            continue
        if current and (current[-1].group, current[-1].prompt) != (row.group, row.prompt):
            yield from flush()
        current.append(row)
    yield from flush()
