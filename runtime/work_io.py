"""Work in and results out for `pickscore score`: directories/globs of images, and CSV / JSONL /
Parquet files of (prompt, image) rows, streamed so millions of rows need no more memory than a batch.

Input rows: `prompt` plus `image` (one path per row) or `images` (a list, JSONL/Parquet). Consecutive
rows with the same prompt (and the same `group`, when that column exists) form one comparison: probs
and ranks are computed over them. Output rows, in input order: prompt, image, score, prob, rank,
error, random_weights (and group).
"""

from __future__ import annotations

import csv
import glob
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import PickScoreError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
OUTPUT_COLUMNS = ["group", "prompt", "image", "score", "prob", "rank", "error", "random_weights"]


def expand_images(args: Iterable[str]) -> list[str]:
    """Paths as given; directories -> their image files (sorted, recursive); quoted globs expanded.
    A name that matches nothing is kept, so it is reported as 'file not found' in its own row."""
    out: list[str] = []
    for arg in args:
        if os.path.isdir(arg):
            out += sorted(str(p) for p in Path(arg).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif glob.has_magic(arg):
            out += sorted(glob.glob(arg, recursive=True)) or [arg]
        else:
            out.append(arg)
    return out


def file_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PickScoreError(f"{path}: unknown file type {path.suffix!r}; use .csv, .jsonl or .parquet")
    return fmt


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PickScoreError("Parquet needs pyarrow: pip install pyarrow (or use CSV / JSONL)") from None
    return pq


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    fmt = file_format(path)
    if not path.is_file():
        raise PickScoreError(f"input file {path} not found")
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f)
    elif fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise PickScoreError(f"{path}:{n}: not valid JSON ({e})") from None
    else:
        for batch in _parquet().ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()


def count_images(path: Path) -> int | None:
    """Images in an input file, for the progress bar's ETA (None when it would cost a full read)."""
    fmt = file_format(path)
    if fmt == "parquet":
        return _parquet().ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        lines = sum(1 for line in f if line.strip())
    return lines - (1 if fmt == "csv" else 0)


def read_work(path: Path) -> Iterator[tuple[Any, str, list[str]]]:
    """(group, prompt, images) comparisons from an input file."""
    def key(row: dict) -> tuple:
        if "prompt" not in row or ("image" not in row and "images" not in row):
            raise PickScoreError(f"{path}: rows need a 'prompt' column and an 'image' (or 'images') column; got {sorted(row)}")
        return row.get("group"), row["prompt"]

    for (group, prompt), rows in itertools.groupby(read_rows(path), key=key):
        images: list[str] = []
        for row in rows:
            value = row.get("images", row.get("image"))
            images += [str(v) for v in value] if isinstance(value, list) else [str(value)]
        yield group, prompt, images


def result_rows(result, group: Any = None) -> Iterator[dict[str, Any]]:
    for r in result.results:
        yield {"group": group, "prompt": result.prompt, "image": r.image, "score": r.score, "prob": r.prob,
               "rank": r.rank, "error": r.error or result.error, "random_weights": result.random_weights}


class ResultWriter:
    """Streams rows to CSV / JSONL / Parquet (row groups of `flush_every`)."""

    def __init__(self, path: Path, flush_every: int = 4096):
        self.path, self.fmt, self.flush_every = path, file_format(path), flush_every
        path.parent.mkdir(parents=True, exist_ok=True)
        self._buffer: list[dict] = []
        self._parquet_writer = None
        self._file = None if self.fmt == "parquet" else open(path, "w", newline="", encoding="utf-8")
        if self.fmt == "csv":
            self._csv = csv.DictWriter(self._file, fieldnames=OUTPUT_COLUMNS)
            self._csv.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        if self.fmt == "csv":
            self._csv.writerow(row)
        elif self.fmt == "jsonl":
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            self._buffer.append(row)
            if len(self._buffer) >= self.flush_every:
                self._flush_parquet()

    def _flush_parquet(self) -> None:
        import pyarrow as pa

        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=pa.schema([
            ("group", pa.string()), ("prompt", pa.string()), ("image", pa.string()), ("score", pa.float64()),
            ("prob", pa.float64()), ("rank", pa.int64()), ("error", pa.string()), ("random_weights", pa.bool_())]))
        if self._parquet_writer is None:
            self._parquet_writer = _parquet().ParquetWriter(self.path, table.schema)
        self._parquet_writer.write_table(table)
        self._buffer.clear()

    def close(self) -> None:
        if self.fmt == "parquet":
            self._flush_parquet()
            if self._parquet_writer is None:  # no rows at all: still a valid, empty file
                import pyarrow as pa

                _parquet().write_table(pa.table({c: [] for c in OUTPUT_COLUMNS}), self.path)
            else:
                self._parquet_writer.close()
        else:
            self._file.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Progress:
    """One self-rewriting stderr line (done/total, items/s, ETA) on a terminal; silent when piped."""

    def __init__(self, total: int | None, unit: str = "img", stream=sys.stderr, enabled: bool | None = None):
        self.total, self.unit, self.stream = total, unit, stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.done, self.start, self._last = 0, time.monotonic(), 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.2 or (self.total and self.done >= self.total)):
            self._last = now
            self.stream.write("\r" + self.line(now))
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}  {rate:.2f} {self.unit}/s"
        if self.total and rate > 0:
            text += f"  ETA {_duration(max(self.total - self.done, 0) / rate)}"
        return text

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
