"""Pick-a-Pic splits, as the dataset ships them (yuvalkirstain/pickapic_v1, v2): rows of `caption, jpg_0,
jpg_1, label_0, label_1` and more (`has_label, image_0_uid, image_1_uid, model_0, model_1, ranking_id, ...`),
in Parquet files (the hub's `data/<split>-NNNNN-of-NNNNN.parquet` shards), a folder of them, a glob, or a
`datasets.save_to_disk` folder of one split (Arrow stream files listed in its `state.json`).

A split's rows are numbered 1.. across its files in sorted order; a row's id is its number. Images are bytes
(Pick-a-Pic's `binary` columns, or the `datasets` Image struct `{bytes, path}`) or paths (relative to the
current directory, as `pickscore score --input` reads them). A row that cannot be scored (no caption, no
image) or judged (a label that is not 0, 0.5 or 1; label_0 + label_1 != 1; has_label false) keeps its place
with the reason, named by its row: the report counts it and leaves it out of the accuracy, never silently.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import InputError, PickScoreError
from ..optional import require
from ..tokenizer import check_prompt
from ..work_io import InputRow
from ..work_io.inputs import as_text, image_value, refuse_repeated_columns, table_rows
from ..work_io.runs import file_identity

SCORE_COLUMNS = ("caption", "jpg_0", "jpg_1")
LABEL_COLUMNS = ("label_0",)
NAME_COLUMNS = ("image_0_uid", "image_1_uid")  # optional: the images' names in the scores file when present
OPTIONAL_LABEL_COLUMNS = ("label_1", "has_label")
LABELS = (0.0, 0.5, 1.0)
BATCH_ROWS = 64  # rows per read: two images each, so a batch holds ~100 MB of PNGs at most


@dataclass
class Pair:
    """One row of a split: what scoring needs (`row.prompt`, `images`; `row.images` are their names) or the
    reason it cannot be scored (`row.error`)."""

    row: InputRow
    images: list[Any]  # bytes or paths, two of them (None for one that is missing: row.error says so)


@dataclass(frozen=True)
class Label:
    row: int
    label_0: float | None
    error: str | None  # why the row cannot be judged


class Split:
    """One split's files, checked (columns present, readable) before any scoring starts."""

    def __init__(self, path: str | os.PathLike, name: str):
        self.path, self.name = str(path), name
        self._identity: dict[str, Any] | None = None
        self.files = split_files(self.path)
        self.kind = "arrow" if self.files[0].suffix.lower() == ".arrow" else "parquet"
        self.columns = self._columns()
        missing = [c for c in (*SCORE_COLUMNS, *LABEL_COLUMNS) if c not in self.columns]
        if missing:
            raise InputError(f"{self.name} split {self.path}: no {', '.join(repr(c) for c in missing)} column; Pick-a-Pic rows "
                             f"need caption, jpg_0, jpg_1 and label_0 (it has: {', '.join(sorted(self.columns)) or 'none'})")
        self.n_rows = self._count()
        if self.n_rows == 0:
            raise InputError(f"the {self.name} split {self.path} has no rows: there is nothing to evaluate")

    def _columns(self) -> set[str]:
        found = None
        for f in self.files:
            listed = self._schema(f).names
            refuse_repeated_columns(f, listed)
            names = set(listed)
            if found is not None and names != found:
                raise InputError(f"{f} has other columns than {self.files[0]}; every file of a split needs the same columns")
            found = names
        return found or set()

    def _schema(self, f: Path) -> Any:
        try:
            if self.kind == "parquet":
                return require("pyarrow.parquet", "Pick-a-Pic data", extra="parquet").ParquetFile(f).schema_arrow
            pa = require("pyarrow", "Pick-a-Pic data", extra="parquet")
            with pa.memory_map(str(f)) as source:
                return pa.ipc.open_stream(source).schema
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for an unreadable file
            raise InputError(f"{f} is not a readable {'Parquet' if self.kind == 'parquet' else 'Arrow stream'} file ({e})") from None

    def _count(self) -> int:
        if self.kind == "parquet":
            pq = require("pyarrow.parquet", "Pick-a-Pic data", extra="parquet")
            return sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)
        return sum(1 for _ in self._rows(["label_0"]))

    def _batches(self, f: Path, columns: list[str]) -> Iterator[Any]:
        if self.kind == "parquet":
            yield from require("pyarrow.parquet", "Pick-a-Pic data", extra="parquet").ParquetFile(f).iter_batches(
                batch_size=BATCH_ROWS, columns=columns)
            return
        pa = require("pyarrow", "Pick-a-Pic data", extra="parquet")
        with pa.memory_map(str(f)) as source:
            for batch in pa.ipc.open_stream(source):
                for start in range(0, len(batch), BATCH_ROWS):
                    yield batch.slice(start, BATCH_ROWS).select(columns)

    def _rows(self, columns: list[str]) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
        """(row number, values or None, why a row cannot be read) for every row of every file, in order."""
        number = 0
        wanted = [c for c in columns if c in self.columns]
        for f in self.files:
            for values, problem in table_rows(f, self._batches(f, wanted)):
                number += 1
                yield number, values, problem

    def pairs(self) -> Iterator[Pair]:
        """Every row, in order, with its images' bytes or paths (read a batch at a time)."""
        for number, values, problem in self._rows([*SCORE_COLUMNS, *NAME_COLUMNS]):
            yield pair_of(values or {}, number, problem)

    def labels(self) -> Iterator[Label]:
        """Every row's label_0 (or why it has none usable), without reading images."""
        for number, values, problem in self._rows([*LABEL_COLUMNS, *OPTIONAL_LABEL_COLUMNS]):
            yield Label(number, None, f"row {number}: {problem}") if problem else label_of(values, number)

    def check_labels(self) -> None:
        """Refuse, before any scoring, a split none of whose rows has a usable label (naming a few reasons)."""
        reasons = []
        for label in self.labels():
            if label.error is None:
                return
            if len(reasons) < 3:
                reasons.append(label.error)
        raise InputError(f"no row of the {self.name} split {self.path} has a usable label ({'; '.join(reasons)}"
                         f"{'; ...' if self.n_rows > 3 else ''}): there is nothing to evaluate")

    def identity(self) -> dict[str, Any]:
        """What a resumed run must find unchanged (computed once per Split): every file's bytes (SHA-256,
        about a second per GB), size and rows, named relative to the split, so moved data still resumes; and
        where images are paths, each image file's size and modification time."""
        if self._identity is None:
            root = Path(self.path) if Path(self.path).is_dir() else self.files[0].parent
            files = []
            for f in self.files:
                found = file_identity(f)
                found.pop("path")
                files.append({"name": os.path.relpath(f, root), **found})
            self._identity = {"split": self.name, "files": files, "image_files": self._image_files_digest()}
        return self._identity

    def _image_files_digest(self) -> str | None:
        """A digest of (path, size, mtime) over the images given as paths (None when the image columns hold
        bytes only: the data files' hashes cover them)."""
        pa = require("pyarrow", "Pick-a-Pic data", extra="parquet")
        schema = self._schema(self.files[0])
        types = [schema.field(c).type for c in ("jpg_0", "jpg_1")]
        if all(pa.types.is_binary(t) or pa.types.is_large_binary(t) for t in types):
            return None
        digest = hashlib.sha256()
        for number, values, _ in self._rows(["jpg_0", "jpg_1"]):
            for j in (0, 1):
                name, data = image_value((values or {}).get(f"jpg_{j}"), j)
                if data is None and isinstance(name, str):
                    try:
                        stat = os.stat(name)
                        seen: Any = [stat.st_size, stat.st_mtime_ns]
                    except OSError as e:
                        seen = e.strerror
                    digest.update(json.dumps([number, j, name, seen]).encode("utf-8", "backslashreplace"))
        return digest.hexdigest()


def split_files(path: str) -> list[Path]:
    """A split's data files in reading order: one file, a glob, a `datasets.save_to_disk` folder (its
    state.json's order), or a folder's Parquet files (recursive, sorted; hidden and _ names skipped)."""
    if glob.has_magic(path) and not os.path.exists(path):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise InputError(f"{path} matches no files")
        return _one_kind(path, files)
    where = Path(path)
    if where.is_file():
        return _one_kind(path, [where])
    if not where.is_dir():
        raise InputError(f"{path} not found")
    if (where / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in where.iterdir() if (p / "state.json").is_file())
        raise InputError(f"{path} is a datasets DatasetDict; give one split's folder, e.g. {where / (splits[0] if splits else 'test_unique')}"
                         f" (it has: {', '.join(splits) or 'no split folders'})")
    state = where / "state.json"
    if state.is_file():
        try:
            listed = [where / entry["filename"] for entry in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise InputError(f"{state} is not a datasets state file ({type(e).__name__}: {e})") from None
        if len(set(listed)) != len(listed):
            raise InputError(f"{state} lists a data file more than once: its rows would count twice")
        missing = [str(f) for f in listed if not f.is_file()]
        if missing or not listed:
            raise InputError(f"{path}: the datasets folder lists {', '.join(missing) or 'no data files'}"
                             + (" which are missing" if missing else ""))
        return _one_kind(path, listed)
    files = sorted(p for p in where.rglob("*") if p.suffix.lower() == ".parquet" and p.is_file()
                   and not any(part.startswith((".", "_")) for part in p.relative_to(where).parts))
    if not files:
        raise InputError(f"{path} holds no .parquet files (nor a datasets state.json)")
    return files


def _one_kind(path: str, files: list[Path]) -> list[Path]:
    kinds = {f.suffix.lower() for f in files}
    if not kinds <= {".parquet", ".arrow"} or len(kinds) > 1:
        raise InputError(f"{path}: Pick-a-Pic data is read from .parquet files or a datasets folder (.arrow); "
                         f"got {', '.join(sorted(k or '(no suffix)' for k in kinds))}")
    return files


def pair_of(values: dict[str, Any], number: int, problem: str | None = None) -> Pair:
    """A row's caption and two images, or why it cannot be scored (named by its row)."""
    row = InputRow(number, str(number), prompt=values.get("caption"))
    if problem:  # the row could not be read (text that is not UTF-8)
        row.images, row.error = [f"row {number} jpg_0", f"row {number} jpg_1"], f"row {number}: {problem}"
        return Pair(row, [None, None])
    images, names, problems = [], [], []
    for j in (0, 1):
        name, data = image_value(values.get(f"jpg_{j}"), j)
        if data is None and isinstance(name, str) and name.strip():
            data = name  # a path
        if data is None:
            problems.append(f"jpg_{j} holds no image" if name is None else f"jpg_{j} is not image bytes or a path ({type(name).__name__})")
        uid = values.get(f"image_{j}_uid")
        names.append(as_text(uid if isinstance(uid, str) and uid.strip() else data if isinstance(data, str) else f"row {number} jpg_{j}"))
        images.append(data)
    row.images = names
    if not isinstance(row.prompt, str):
        problems.insert(0, "no caption" if row.prompt is None else f"the caption is a {type(row.prompt).__name__}, not text")
    else:
        try:
            check_prompt(row.prompt)
        except PickScoreError as e:
            problems.insert(0, "the caption " + str(e).removeprefix("prompt "))
    if problems:
        row.error = f"row {number}: {'; '.join(problems)}"
    return Pair(row, images)


def label_of(values: dict[str, Any], number: int) -> Label:
    """label_0 as the reference reads it, or why this row cannot be judged."""
    label_0, label_1, has_label = values.get("label_0"), values.get("label_1"), values.get("has_label")

    def bad(why: str) -> Label:
        return Label(number, None, f"row {number}: {why}")

    if has_label is not None and (not isinstance(has_label, (bool, int)) or has_label not in (0, 1)):
        return bad(f"has_label must be true or false, got {has_label!r}")
    if has_label is not None and not has_label:
        return bad("has_label is false (an unlabelled pair)")
    if label_0 is None:
        return bad("no label_0")
    if isinstance(label_0, bool) or not isinstance(label_0, (int, float)) or float(label_0) not in LABELS:
        return bad(f"label_0 must be 0, 0.5 or 1, got {label_0!r}")
    if label_1 is not None and (isinstance(label_1, bool) or not isinstance(label_1, (int, float))
                                or float(label_0) + float(label_1) != 1.0):
        return bad(f"label_0 + label_1 must be 1, got {label_0!r} + {label_1!r}")
    return Label(number, float(label_0), None)
