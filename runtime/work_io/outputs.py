"""Results out: one row per image (or per bad input row), in input order, to CSV / JSONL / Parquet.

`PartedOutput` is what `pickscore score --output` writes through. Finished comparisons are committed
in parts (`OUT.parts/part-NNNNNN.ext`, each written to a temp file, synced and renamed), so a crash at
any moment loses at most the part being written; `finish` merges the parts into OUT by the same
temp-file-and-rename. `--resume` skips the input rows whose id OUT or its parts already hold. A lock
keeps a second writer off the same output.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..durable import sync_dir
from ..errors import InputError, PickScoreError
from ..locks import FileLock, LockedError
from ..optional import require
from ..results import PromptResult
from .inputs import InputRow, as_text, file_format
from .runs import changes, load_record, record_path, save_record


@dataclass(frozen=True)
class Column:
    name: str
    arrow: str  # pyarrow type name


OUTPUT_COLUMNS = (
    Column("id", "string"), Column("row", "int64"), Column("group", "string"), Column("prompt", "string"),
    Column("image", "string"), Column("score", "float64"), Column("prob", "float64"), Column("rank", "int64"),
    Column("truncated", "bool_"), Column("error", "string"), Column("random_weights", "bool_"), Column("precision", "string"),
)
COLUMN_NAMES = [c.name for c in OUTPUT_COLUMNS]


class OutputError(PickScoreError):
    """The output cannot be written (disk full, permissions); what was committed is kept."""


def row_digest(row: int, prompt: str | None, images: Iterable[str | None]) -> int:
    """What an input row was, as its output rows record it (row number, prompt, images): a resumed run
    skips a row under a committed id only if this matches, so an edited, inserted or removed row is caught."""
    text = json.dumps([int(row), prompt or "", [image or "" for image in images]], ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "backslashreplace"), digest_size=8).digest(), "big")


def input_row_digest(source: InputRow) -> int:
    return row_digest(source.row, as_text(source.prompt), [as_text(i) for i in source.images] or [None])


def result_rows(result: PromptResult) -> Iterator[dict[str, Any]]:
    """Output rows of one result, whose key is the list of InputRows it was made from."""
    inputs: list[InputRow] = result.key
    scores = iter(result.results)
    for source in inputs:
        for image in source.images or [None]:  # a bad row without images still gets its row
            scored = next(scores, None) if image is not None else None
            yield {
                "id": source.id, "row": source.row, "group": as_text(source.group), "prompt": as_text(result.prompt),
                "image": as_text(image), "score": scored.score if scored else None, "prob": scored.prob if scored else None,
                "rank": scored.rank if scored else None, "truncated": bool(result.truncated),
                "error": as_text(result.error or (scored.error if scored else None)),
                "random_weights": result.random_weights, "precision": result.precision,
            }


# ---- one file in one format ------------------------------------------------------------------------
class _CsvFile:
    def __init__(self, path: Path):
        self._file = open(path, "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMN_NAMES)
        self._writer.writeheader()

    def write(self, rows: list[dict]) -> None:
        self._writer.writerows(rows)

    def append(self, source: Path) -> None:
        with open(source, newline="", encoding="utf-8") as f:
            for batch in _batched(csv.DictReader(f), 4096):
                self.write(batch)

    def close(self) -> None:
        _sync_close(self._file)


class _JsonlFile:
    def __init__(self, path: Path):
        self._file = open(path, "w", encoding="utf-8")

    def write(self, rows: list[dict]) -> None:
        self._file.writelines(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)

    def append(self, source: Path) -> None:
        with open(source, encoding="utf-8") as f:
            self._file.writelines(line for line in f if line.strip())

    def close(self) -> None:
        _sync_close(self._file)


class _ParquetFile:
    def __init__(self, path: Path):
        pa = require("pyarrow", "Parquet output")
        self._pa, self._path = pa, path
        self._schema = pa.schema([(c.name, getattr(pa, c.arrow)()) for c in OUTPUT_COLUMNS])
        self._writer = require("pyarrow.parquet", "Parquet output").ParquetWriter(str(path), self._schema)

    def write(self, rows: list[dict]) -> None:
        if rows:
            self._writer.write_table(self._pa.Table.from_pylist(rows, schema=self._schema))

    def append(self, source: Path) -> None:
        file = require("pyarrow.parquet", "Parquet output").ParquetFile(source)
        for group in range(file.num_row_groups):
            self._writer.write_table(file.read_row_group(group).select(COLUMN_NAMES).cast(self._schema))

    def close(self) -> None:
        self._writer.close()
        with open(self._path, "rb") as f:
            os.fsync(f.fileno())


WRITERS = {"csv": _CsvFile, "jsonl": _JsonlFile, "parquet": _ParquetFile}


def _sync_close(file: Any) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()


@dataclass(frozen=True)
class Committed:
    """One input row an output file holds: its id, whether it is an error row, and its row_digest."""

    id: str
    error: bool
    digest: int


def read_committed(path: Path) -> list[Committed]:
    """Every input row an output file of ours holds, in order; InputError if the file is not one of ours."""
    fmt = file_format(path)
    wanted = ["id", "row", "prompt", "image", "error"]
    not_ours = f"{path} has no id column: it was not written by `pickscore score`, so it cannot be resumed"
    try:
        if fmt == "parquet":
            pq = require("pyarrow.parquet", "Parquet output")
            if not set(wanted) <= set(pq.ParquetFile(path).schema_arrow.names):
                raise InputError(not_ours)
            table = pq.read_table(path, columns=wanted)
            rows: Iterable[dict] = (dict(zip(wanted, values)) for values in zip(*(table.column(c).to_pylist() for c in wanted)))
            return _committed_rows(rows)
        with open(path, newline="", encoding="utf-8") as f:
            if fmt == "csv":
                reader = csv.DictReader(f)
                if not set(wanted) <= set(reader.fieldnames or []):
                    raise InputError(not_ours)
                return _committed_rows(reader)
            return _committed_rows(json.loads(line) for line in f if line.strip())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path} cannot be read as an earlier output to resume ({type(e).__name__}: {e})") from None


def _committed_rows(rows: Iterable[dict]) -> list[Committed]:
    """Output rows -> input rows: the output rows of one input row (one per image) are consecutive."""
    found: list[Committed] = []
    current: list[dict] = []

    def close() -> None:
        if current:
            first = current[0]
            found.append(Committed(str(first["id"]), any(bool(r["error"]) for r in current),
                                   row_digest(first["row"], first["prompt"], [r["image"] for r in current])))
            current.clear()

    for r in rows:
        if current and str(r["id"]) != str(current[0]["id"]):
            close()
        current.append(r)
    close()
    return found


def _batched(rows: Iterable[dict], n: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for row in rows:
        batch.append(row)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# ---- the resumable output ---------------------------------------------------------------------------
class PartedOutput:
    def __init__(self, path: Path, *, resume: bool = False, overwrite: bool = False, inputs: Iterable[Path] = (),
                 part_rows: int = 2000, part_seconds: float = 10.0):
        self.path = Path(path)
        self.fmt = file_format(self.path)
        if resume and overwrite:
            raise InputError("--resume and --overwrite contradict each other: choose one")
        for source in inputs:
            if same_file(Path(source), self.path):
                raise InputError(f"--output {self.path} is the input file: writing it would destroy the input")
        if self.path.is_dir():
            raise InputError(f"--output {self.path} is a directory; give a file name ending in .csv, .jsonl or .parquet")
        if self.path.absolute().parent.name.endswith(".parts"):
            # another run's parts: that run would merge this output into its own, then delete it
            raise InputError(f"--output {self.path} is inside {self.path.parent}, where another run keeps the parts "
                             "of its output; give an output of its own")
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self.part_rows, self.part_seconds = part_rows, part_seconds
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(self.path.with_name(f".{self.path.name}.lock"), f"output {self.path}").acquire()
        except LockedError as e:
            raise InputError(f"another pickscore run is writing {self.path}: {e}") from None
        except OSError as e:
            raise OutputError(f"cannot write next to {self.path}: {e.strerror or e}") from None
        try:
            self._prepare(resume, overwrite)
        except BaseException:
            self._lock.release()
            raise
        self.identity: tuple[dict[str, Any], dict[str, Any]] | None = None  # what begin() recorded
        self._buffer: list[dict] = []
        self._last_commit = time.monotonic()
        self.rows_written = 0

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        if self.parts_dir.is_dir():
            for tmp in self.parts_dir.glob(".tmp-*"):  # a part being written when a run died
                tmp.unlink()
        parts = self._parts()
        exists = self.path.exists()
        if overwrite:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            parts = []
        elif not resume and exists:
            raise InputError(f"{self.path} exists: pass --resume to add only the rows it lacks, or --overwrite to replace it")
        elif not resume and parts:
            raise InputError(f"{self.parts_dir} holds {len(parts)} committed part(s) of an interrupted run: pass "
                             "--resume to finish it, or --overwrite to start over")
        # An interrupted --overwrite run leaves the file it replaces in place until it finishes: its rows are not
        # this run's, and a resume must not keep them.
        self.replacing = overwrite or (resume and exists and bool((load_record(self.path) or {}).get("replacing")))
        self.base = self.path if (resume and exists and not self.replacing) else None
        earlier = read_committed(self.base) if self.base else []
        self.base_ids = {c.id for c in earlier}
        for part in parts:
            rows = read_committed(part)
            if self.base_ids.isdisjoint(c.id for c in rows):
                earlier += rows
        self.committed = {c.id: c.digest for c in earlier}
        self.earlier_rows, self.earlier_errors = len(earlier), sum(1 for c in earlier if c.error)
        self._next_part = 1 + max((int(p.stem.split("-")[1].split(".")[0]) for p in parts), default=0)

    def _parts(self) -> list[Path]:
        names = re.compile(rf"part-\d{{6}}\.{self.fmt}")  # as commit() names them, nothing else
        return sorted(p for p in self.parts_dir.glob(f"part-*.{self.fmt}") if names.fullmatch(p.name)) \
            if self.parts_dir.is_dir() else []

    def begin(self, input_identity: dict[str, Any], model: dict[str, Any], rows: Callable[[], Iterable[InputRow]]) -> None:
        """Record what this run is, or, when there is earlier work to finish, refuse (InputError) unless the
        earlier run had the same input and model. `rows`: the input rows read afresh, to name the first row
        that differs when the input changed."""
        self.identity = (input_identity, model)
        if not (self.base or self.committed):
            save_record(self.path, input_identity, model, replacing=self.replacing and self.path.exists())
            return
        record = load_record(self.path)
        redo = "Use a new --output for a new run, or --overwrite to replace this one"
        if record is None:
            raise InputError(f"--resume: {self.path} has no run record ({record_path(self.path).name}), so whether it "
                             f"is the same run cannot be checked (written by an older version?). {redo}")
        changed = changes(record["model"], model)
        if changed:
            raise InputError(f"--resume: {self.path} was written with other model settings ({'; '.join(changed)}): "
                             f"its scores would not match. {redo}")
        if changes(record["input"], input_identity, ignore=("path",)):
            detail = "; ".join(changes(record["input"], input_identity))
            raise InputError(f"--resume: the input is not the one {self.path} was started from ({detail}); "
                             f"{self._first_difference(rows())}. {redo}")

    def _first_difference(self, rows: Iterable[InputRow]) -> str:
        seen = 0
        for row in rows:
            digest = self.committed.get(row.id)
            if digest is None:
                continue
            if digest != input_row_digest(row):
                return (f"{row.where} (id {row.id!r}) is not the row the earlier run scored under that id "
                        "(rows inserted, removed or edited)")
            seen += 1
        if seen < len(self.committed):
            return f"{len(self.committed) - seen} row(s) the earlier run scored are no longer in the input"
        return "the rows it scored are unchanged, but others were added or edited"

    def is_committed(self, row: InputRow) -> bool:
        digest = self.committed.get(row.id)
        if digest is None:
            return False
        if digest != input_row_digest(row):  # begin() compared the whole file; this holds even if it changes now
            raise InputError(f"--resume: {row.where} (id {row.id!r}) is not the row {self.path} holds under that id; "
                             "the input changed during the run")
        return True

    # ---- writing ------------------------------------------------------------------------------
    def write(self, result: PromptResult) -> None:
        """Buffer a finished comparison; a part is committed every part_rows rows or part_seconds."""
        self._buffer += result_rows(result)
        if len(self._buffer) >= self.part_rows or time.monotonic() - self._last_commit >= self.part_seconds:
            self.commit()

    def commit(self) -> None:
        if not self._buffer:
            return
        part = self.parts_dir / f"part-{self._next_part:06d}.{self.fmt}"
        tmp = self.parts_dir / f".tmp-{part.name}"
        try:
            self.parts_dir.mkdir(exist_ok=True)
            writer = WRITERS[self.fmt](tmp)
            writer.write(self._buffer)
            writer.close()
            os.replace(tmp, part)
            sync_dir(self.parts_dir)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write {part}: {e.strerror or e}. The {len(self.committed)} rows committed "
                              "before are kept; fix this and rerun the same command with --resume") from None
        self.committed.update((c.id, c.digest) for c in _committed_rows(self._buffer))
        self.rows_written += len(self._buffer)
        self._buffer.clear()
        self._next_part += 1
        self._last_commit = time.monotonic()

    def finish(self) -> None:
        """Commit what is buffered and merge everything into OUT (atomically); release the output."""
        try:
            self.commit()
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            try:
                writer = WRITERS[self.fmt](tmp)
                if self.base is not None:
                    writer.append(self.base)
                for part in self._parts():
                    if not self.base_ids.isdisjoint(c.id for c in read_committed(part)):
                        continue  # merged into OUT already: the last run died between the rename and the cleanup
                    writer.append(part)
                writer.close()
                os.replace(tmp, self.path)
                sync_dir(self.path.parent)
                if self.replacing and self.identity:  # the file is this run's now (until this is saved, a resume rebuilds it from the parts)
                    save_record(self.path, *self.identity)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise OutputError(f"cannot write {self.path}: {e.strerror or e}. Every row is kept in "
                                  f"{self.parts_dir}; fix this and rerun the same command with --resume") from None
            shutil.rmtree(self.parts_dir, ignore_errors=True)
        finally:
            self._lock.release()

    def abandon(self) -> None:
        """Stop without merging: committed parts stay for --resume; the buffer (unfinished work) is dropped."""
        self._lock.release()


def same_file(a: Path, b: Path) -> bool:
    """One file by any path: hard links, symlinks and '.' included."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b) or a.resolve() == b.resolve()
    except OSError:
        return False
