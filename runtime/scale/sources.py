"""The Ray job's inputs, numbered deterministically: CSV / JSONL / Parquet manifests whose `image` is a
path or URI, Parquet whose `image` holds the bytes (the Hugging Face datasets image struct
`{bytes, path}`, or plain binary), and WebDataset tar shards (an image plus a `.txt` caption or a
`.json` with `prompt` / `caption` / `text`, optionally `group`).

SRC is one file or a directory of files of one kind, read in sorted path order as if concatenated.
Every record is numbered within its file (`local_row`, 1-based, bad records included) and validated by
the CLI's own code (`read_rows` for CSV / JSONL, `validate_record` otherwise), so bad rows, ids and
error messages are the CLI's. Global row numbers come later (`dataset.rank`), from each file's count,
because a CSV, JSONL or tar file can only be counted by reading it; Parquet rows are numbered globally
at once (the footers count them), so their default ids are the CLI's too.

Each image is one Ray row keyed by an int64 (file, local row, image index): the checkpoint key, so a
resumed run never scores an image twice and never skips one. A row that is bad as a whole is one Ray
row without an image.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from ..errors import InputError
from ..optional import require
from ..work_io import COLUMN_NAMES, InputRow, read_rows
from ..work_io.inputs import as_text, image_value, validate_record
from .files import Location, locate

ray_data = require("ray.data", "scoring on Ray (--ray)")
pa = require("pyarrow", "scoring on Ray (--ray)")

KINDS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".tar": "webdataset"}
WEBDATASET_IMAGES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # first one present is the image
WEBDATASET_PROMPT_FIELDS = ("prompt", "caption", "text")  # in a sample's .json, when it has no .txt
INPUT_COLUMNS = {"id", "prompt", "image", "images", "group"}

# The checkpoint key of one image: file index, row within the file, image within the row.
FILE_BITS, ROW_BITS, IMAGE_BITS = 20, 28, 15
MAX_FILES, MAX_ROWS_PER_FILE, MAX_IMAGES_PER_ROW = 1 << FILE_BITS, (1 << ROW_BITS) - 1, (1 << IMAGE_BITS) - 1

PARQUET_ROWS_PER_TASK = 8192  # row groups are gathered into read tasks of about this many rows
BLOCK_ROWS, BLOCK_BYTES = 512, 64 << 20  # a read task yields a block at whichever comes first
READ_CPUS = 0.25  # reading is I/O: the CPUs are the decoding stage's

# Columns the job adds and drops again; an input column may not use these names.
KEY, FILE, LOCAL_ROW, IMAGE_INDEX, LINE = "__key", "__file", "__local_row", "__j", "__line"
COMPARISON, IMAGE_BYTES = "__comparison", "__image_bytes"
WORK_SCHEMA = [(KEY, "int64"), (FILE, "int32"), (LOCAL_ROW, "int64"), (IMAGE_INDEX, "int32"), (LINE, "int64"),
               ("id", "string"), ("prompt", "string"), ("group", "string"), (COMPARISON, "string"),
               ("image", "string"), (IMAGE_BYTES, "binary"), ("error", "string")]


def row_key(file: int, local_row: int, image: int) -> int:
    return (file << (ROW_BITS + IMAGE_BITS)) | (local_row << IMAGE_BITS) | image


def comparison_key(group: Any, prompt: Any) -> str:
    """Rows with equal keys belong to one comparison when their row numbers are consecutive."""
    return json.dumps([group, prompt], ensure_ascii=False, default=str)


def unicode_problem(row: InputRow) -> str | None:
    """Why a row's id, group or image names cannot be kept as they are (the prompt is the tokenizer's check):
    a lone surrogate. Such a row is an error row, its text kept escaped (as_text)."""
    for what, values in (("id", [row.id]), ("group", [row.group]), ("image name", row.images)):
        for value in values:
            if isinstance(value, str) and as_text(value) != value:
                at = next(k for k, c in enumerate(value) if "\ud800" <= c <= "\udfff")
                return f"{row.where}: the {what} is not valid Unicode: {value[at]!r} at character {at} is a lone surrogate"
    return None


@dataclass(frozen=True)
class InputFiles:
    """What SRC holds, found on the driver before anything starts."""

    uri: str
    kind: str
    files: tuple[Location, ...]
    sizes: tuple[int, ...]
    base_dir: str  # relative image paths are relative to the driver's working directory, as in the CLI
    row_groups: tuple[tuple[int, ...], ...] = ()  # Parquet: rows per row group, per file
    extra_fields: tuple[Any, ...] = ()  # Parquet: the input's other columns (pyarrow fields), carried through
    has_id: bool = False
    has_group: bool = False

    def describe(self) -> dict[str, Any]:
        """What a resumed run must find unchanged."""
        return {"uri": self.uri, "kind": self.kind, "files": [[f.uri, s] for f, s in zip(self.files, self.sizes)]}


def find_input(source: str, base_dir: str | None = None) -> InputFiles:
    """Look at SRC without reading its rows: its kind, its files, their sizes; for Parquet, the footers
    (row counts and columns). InputError for anything unusable as a whole."""
    base_dir = base_dir or os.getcwd()
    source = source.rstrip("/") or source  # "dir/" and "dir" are one input (a resumed run compares them)
    where = locate(source, base_dir)
    info = where.info()
    if info.type.name == "NotFound":
        raise InputError(f"input {source} not found")
    if info.type.name == "Directory":
        def wanted(f: Any) -> bool:  # hidden and underscore names (_work, _SUCCESS, .cache) are not data, at any depth
            parts = posixpath.relpath(f.path, where.path).split("/")
            return f.type.name == "File" and not any(p.startswith((".", "_")) for p in parts) \
                and posixpath.splitext(f.path)[1].lower() in KINDS

        listed = sorted((f for f in where.listing(recursive=True) if wanted(f)), key=lambda f: f.path)
        files = [Location(where.fs, f.path, posixpath.join(source, posixpath.relpath(f.path, where.path))) for f in listed]
        sizes = [f.size for f in listed]
    else:
        files, sizes = [where], [info.size]
    kinds = {KINDS.get(posixpath.splitext(f.path)[1].lower()) for f in files}
    if not files or None in kinds:
        raise InputError(f"{source}: no input files (use .csv, .jsonl, .parquet or WebDataset .tar files)")
    if len(kinds) > 1:
        raise InputError(f"{source} mixes {', '.join(sorted(kinds))} files; give one kind at a time")
    if len(files) > MAX_FILES:
        raise InputError(f"{source} has {len(files)} files; at most {MAX_FILES} are read in one run")
    found = InputFiles(source, kinds.pop(), tuple(files), tuple(sizes), base_dir)
    if found.kind == "parquet":
        return _with_parquet_footers(found)
    if found.kind in ("csv", "jsonl"):
        for f in found.files:
            if f.is_local:
                next(read_rows(Path(f.path)), None)  # the header of each file, checked now as the CLI checks it
    return found


def _with_parquet_footers(found: InputFiles) -> InputFiles:
    pq = require("pyarrow.parquet", "Parquet input")

    def footer(f: Location) -> Any:
        try:
            with f.fs.open_input_file(f.path) as handle:
                return pq.ParquetFile(handle).metadata
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for an unreadable file
            raise InputError(f"{f.uri} is not a readable Parquet file ({e})") from None

    with ThreadPoolExecutor(16) as pool:  # footers of object-store files: one round trip each
        footers = list(pool.map(footer, found.files))
    schema = footers[0].schema.to_arrow_schema()
    names = set(schema.names)
    if "prompt" not in names or not ({"image", "images"} & names):
        raise InputError(f"{found.files[0].uri}: rows need a 'prompt' column and an 'image' (or 'images') column; "
                         f"got {sorted(names)}")
    for f, meta in zip(found.files, footers):
        if set(meta.schema.to_arrow_schema().names) != names:
            raise InputError(f"{f.uri} has other columns than {found.files[0].uri}; every file needs the same columns")
    clash = sorted(n for n in names - INPUT_COLUMNS if n in COLUMN_NAMES or n.startswith("__"))
    if clash:
        raise InputError(f"input column(s) {', '.join(clash)} would be overwritten by the output's; rename them")
    groups = tuple(tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) for meta in footers)
    big = [f.uri for f, g in zip(found.files, groups) if sum(g) > MAX_ROWS_PER_FILE]
    if big:
        raise InputError(f"{big[0]} has more than {MAX_ROWS_PER_FILE} rows; split it into several files")
    extras = tuple(schema.field(n) for n in schema.names if n not in INPUT_COLUMNS)
    return InputFiles(found.uri, found.kind, found.files, found.sizes, found.base_dir, groups, extras,
                      "id" in names, "group" in names)


# ---- records of each kind -> (row within the file, validated InputRow, image bytes per image, extras) ----
def _text_rows(f: Location) -> Iterator[tuple[int, InputRow, None, None]]:
    """CSV / JSONL through the CLI's reader (line numbers, quoting, encodings, repeated ids within the file)."""
    if f.is_local:
        for row in read_rows(Path(f.path)):
            yield row.row, row, None, None
        return
    suffix = posixpath.splitext(f.path)[1]
    with tempfile.NamedTemporaryFile(suffix=suffix) as copy:  # read_rows reads local files
        copy.write(f.read_bytes())
        copy.flush()
        for row in read_rows(Path(copy.name)):
            yield row.row, row, None, None


def record_row(values: dict[str, Any], number: int, has_id: bool, has_group: bool, extra_names: list[str]
               ) -> tuple[InputRow, list[bytes | None], dict[str, Any]]:
    """One record with columns (a Parquet row, a row of a caller's Dataset): validated as the CLI validates it,
    its images' bytes beside their names, and its other columns."""
    column = "images" if values.get("images") is not None else "image"
    raw = values.get(column)
    pairs = [image_value(v, j) for j, v in enumerate(raw)] if isinstance(raw, list) else [image_value(raw, 0)]
    values = {**values, column: [p[0] for p in pairs] if isinstance(raw, list) else pairs[0][0]}
    row = validate_record(values, number, has_id=has_id, has_group=has_group)
    return row, [p[1] for p in pairs], {n: values.get(n) for n in extra_names}


def _parquet_rows(f: Location, groups: list[int], first_row: int, row_offset: int, found: InputFiles
                  ) -> Iterator[tuple[int, InputRow, list, dict]]:
    pq = require("pyarrow.parquet", "Parquet input")
    extra_names = [x.name for x in found.extra_fields]
    number = first_row
    with f.fs.open_input_file(f.path) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=256, row_groups=groups):
            for values in batch.to_pylist():
                # Parquet rows are numbered globally here already (footers give every file's count), so
                # default ids and messages ("row N") are the CLI's for a single file and for many.
                row, data, extras = record_row(values, row_offset + number, found.has_id, found.has_group, extra_names)
                yield number, row, data, extras
                number += 1


def _tar_samples(tar: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """WebDataset samples: consecutive members sharing a key (the path up to the first dot of the file name)."""
    key, sample = None, {}
    for member in tar:
        folder, name = posixpath.split(member.name)
        stem, dot, ext = name.partition(".")
        if not member.isfile() or not dot or name.startswith("."):
            continue
        this = posixpath.join(folder, stem)
        if sample and this != key:
            yield key, sample
            sample = {}
        key = this
        sample[ext.lower()] = tar.extractfile(member).read()
    if sample:
        yield key, sample


def _sample_values(key: str, sample: dict[str, bytes]) -> tuple[dict[str, Any], str | None, bytes | None]:
    """(values to validate, why the sample is unusable, the image bytes). The id is the sample's key."""
    values: dict[str, Any] = {"id": key}
    meta: Any = {}
    try:
        if "json" in sample:
            meta = json.loads(sample["json"].decode("utf-8"))
        if "txt" in sample:
            values["prompt"] = sample["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        return values, f"{key}: not UTF-8 ({e.reason} at byte {e.start})", None
    except json.JSONDecodeError as e:
        return values, f"{key}.json: not valid JSON ({e.msg} at column {e.colno})", None
    except (ValueError, RecursionError) as e:  # an integer over 4300 digits; nesting too deep
        return values, f"{key}.json: not valid JSON here ({type(e).__name__}: {e})", None
    if not isinstance(meta, dict):
        return values, f"{key}.json: expected a JSON object, got {type(meta).__name__}", None
    caption = next((k for k in WEBDATASET_PROMPT_FIELDS if k in meta), None)
    if "prompt" not in values and caption is not None:
        values["prompt"] = meta[caption]
    if "group" in meta:
        values["group"] = meta["group"]
    ext = next((e for e in WEBDATASET_IMAGES if e in sample), None)
    if ext is not None:
        values["image"] = f"{key}.{ext}"
    return values, None, sample[ext] if ext else None


def _webdataset_rows(f: Location) -> Iterator[tuple[int, InputRow, list, None]]:
    with f.fs.open_input_stream(f.path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for number, (key, sample) in enumerate(_tar_samples(tar), 1):
            values, problem, data = _sample_values(key, sample)
            row = validate_record(values, number, problem=problem, has_id=True, has_group="group" in values)
            yield number, row, [data], None


# ---- rows -> Arrow blocks --------------------------------------------------------------------------
@dataclass
class WorkBlock:
    """Work rows on their way into one Arrow block: one row per image, one for a row without images."""

    extra_fields: tuple[Any, ...]
    columns: dict[str, list] = field(default_factory=dict)
    nbytes: int = 0

    def __post_init__(self) -> None:
        self.columns = {name: [] for name, _ in WORK_SCHEMA} | {f.name: [] for f in self.extra_fields}

    def add(self, file: int, local_row: int, row: InputRow, data: list | None, extras: dict | None, prefix: str) -> None:
        if local_row > MAX_ROWS_PER_FILE:
            raise InputError(f"{prefix or 'the input'} has more than {MAX_ROWS_PER_FILE} rows; split it into several files")
        error = row.error or unicode_problem(row)
        if error is None and len(row.images) > MAX_IMAGES_PER_ROW:
            error = f"{row.where}: more than {MAX_IMAGES_PER_ROW} images in one row; split the row"
        images = row.images if error is None else [None]
        for j, image in enumerate(images):
            value = data[j] if data and error is None else None
            self.nbytes += len(value) if value else 0
            for name, item in ((KEY, row_key(file, local_row, j)), (FILE, file), (LOCAL_ROW, local_row),
                               (IMAGE_INDEX, j), (LINE, row.line), ("id", as_text(row.id)), ("prompt", as_text(row.prompt)),
                               ("group", as_text(row.group)),
                               (COMPARISON, None if error else comparison_key(row.group, row.prompt)),
                               ("image", as_text(image)), (IMAGE_BYTES, value),
                               ("error", None if error is None else as_text(prefix + error))):
                self.columns[name].append(item)
            for f in self.extra_fields:
                self.columns[f.name].append(extras[f.name])

    @property
    def full(self) -> bool:
        return len(self.columns[KEY]) >= BLOCK_ROWS or self.nbytes >= BLOCK_BYTES

    def table(self) -> Any:
        fields = [pa.field(name, getattr(pa, kind)()) for name, kind in WORK_SCHEMA] + list(self.extra_fields)
        return pa.table({f.name: pa.array(self.columns[f.name], type=f.type) for f in fields})


def _blocks(rows: Iterator[tuple], file: int, prefix: str, extra_fields: tuple) -> Iterator[Any]:
    block = WorkBlock(extra_fields)
    for local_row, row, data, extras in rows:
        block.add(file, local_row, row, data, extras, prefix)
        if block.full:
            yield block.table()
            block = WorkBlock(extra_fields)
    if block.columns[KEY]:
        yield block.table()


class WorkSource(ray_data.Datasource):
    """Read tasks over SRC: a group of Parquet row groups, or one CSV / JSONL / tar file, each."""

    def __init__(self, found: InputFiles):
        super().__init__()
        self.found = found

    def get_name(self) -> str:
        return "PickScoreWork"

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(self.found.sizes) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None) -> list:
        from ray.data.block import BlockMetadata

        found, tasks = self.found, []
        several = len(found.files) > 1

        def task(read: Any, rows: int | None, f: Location) -> Any:
            meta = BlockMetadata(num_rows=rows, size_bytes=None, input_files=[f.uri], exec_stats=None)
            return ray_data.ReadTask(read, meta, per_task_row_limit=per_task_row_limit)

        row_offset = 0
        for index, f in enumerate(found.files):
            # Rows numbered within their file name the file in their errors when SRC has several.
            prefix = f"{f.uri}: " if several and found.kind != "parquet" else ""
            if found.kind == "parquet":
                groups, first = found.row_groups[index], 1
                for chunk in _chunks(groups, PARQUET_ROWS_PER_TASK):
                    rows = sum(groups[g] for g in chunk)
                    read = partial(_read, _parquet_rows, (f, chunk, first, row_offset, found), index, prefix, found.extra_fields)
                    tasks.append(task(read, rows, f))
                    first += rows
                row_offset += sum(groups)
            else:
                reader = _webdataset_rows if found.kind == "webdataset" else _text_rows
                tasks.append(task(partial(_read, reader, (f,), index, prefix, ()), None, f))
        return tasks


def _read(reader: Any, args: tuple, file: int, prefix: str, extra_fields: tuple) -> Iterator[Any]:
    yield from _blocks(reader(*args), file, prefix, extra_fields)


def _chunks(groups: tuple[int, ...], rows_per_task: int) -> Iterator[list[int]]:
    chunk: list[int] = []
    rows = 0
    for g, n in enumerate(groups):
        if chunk and rows + n > rows_per_task:
            yield chunk
            chunk, rows = [], 0
        chunk.append(g)
        rows += n
    if chunk:
        yield chunk


def read_input(source: str | InputFiles, *, base_dir: str | None = None) -> Any:
    """SRC as a `ray.data.Dataset` of work rows: one per image, with the input's identity (`id`, and the
    row's file and number within it), `prompt`, `group`, `image` (name, path or URI), the image bytes for
    byte inputs, the row's `error` (a bad row), and a Parquet input's other columns."""
    found = source if isinstance(source, InputFiles) else find_input(source, base_dir)
    return ray_data.read_datasource(WorkSource(found), num_cpus=READ_CPUS)
