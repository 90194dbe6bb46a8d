"""`pickscore score --ray`: SRC -> OUT_DIR, a directory of Parquet files, with every input image exactly once
whatever dies along the way.

Two passes, each safe to repeat:

1. **score** (the expensive one): decode, preprocess, text and vision towers -> one row per image with its
   score, written to OUT_DIR/_work/scored/ through Ray Data checkpointing keyed on the image's row key
   (file, row, image). Ray retries a task whose worker died; after a killed driver, `--resume` skips every
   image a committed file holds (Ray deletes files whose checkpoint was still pending).
2. **rank** (cheap: no images, no model): global row numbers, repeated ids, and each comparison's
   probabilities and ranks, into OUT_DIR/_work/ranked/; then moved into OUT_DIR. Probabilities need a
   comparison's every score, so this pass starts only after the first has finished; a killed rank pass is
   simply run again.

OUT_DIR/_pickscore_run.json records the input, the model and how far the run got; `--resume` refuses a
run whose input or model changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..artifacts import Artifacts
from ..errors import InputError
from ..locks import FileLock, LockedError
from ..options import ScorerOptions
from ..optional import require
from .files import Location, locate
from .sources import FILE, KEY, LOCAL_ROW, InputFiles, find_input

RUN_FILE, WORK_DIR, LOCK_FILE, COMPLETE = "_pickscore_run.json", "_work", ".pickscore.lock", "_COMPLETE.json"
RUN_FORMAT = "pickscore-ray-run/1"
# Tests name a point here to have the driver die there, as a SIGKILL would (no cleanup, no finally).
EXIT_AT_ENV = "PICKSCORE_RAY_EXIT_AT"
WRITE_ARGS = {"num_cpus": 0.25}  # writing Parquet is I/O: the CPUs are the decoding stage's


@dataclass(frozen=True)
class Tally:
    rows: int = 0
    scored: int = 0
    errors: int = 0

    def summary(self) -> str:
        text = f"scored {self.scored} image(s) of {self.rows} output row(s)"
        return text + (f"; {self.errors} item(s) could not be scored (see the error column)" if self.errors else "")


@dataclass(frozen=True)
class JobOptions:
    """The scorer's options (what scores depend on is checked on --resume), then how the work is spread
    and committed (free to change between runs)."""

    artifacts: str
    scorer: ScorerOptions = field(default_factory=ScorerOptions)  # workers: scorer actors; threads: each one's cores
    gpus_per_worker: float | None = None
    commit_rows: int = 2000  # rows per committed Parquet file (and checkpoint): what a crash can cost at most

    def identity(self, fingerprint: str) -> dict[str, Any]:
        return {"artifacts": fingerprint, **self.scorer.identity()}


def _ray_path(where: Location) -> str:
    return where.path if where.is_local else where.uri


class OutputDirectory:
    """OUT_DIR and its run record: refused when it would destroy data, locked while a driver writes it."""

    def __init__(self, out_dir: str, found: InputFiles, identity: dict[str, Any], resume: bool):
        self.root = locate(out_dir)
        self.run_file, self.work = self.root.child(RUN_FILE), self.root.child(WORK_DIR)
        self.scored, self.ranked, self.checkpoint = (self.work.child(n) for n in ("scored", "ranked", "checkpoint"))
        _refuse_input_as_output(found, self.root)
        info = self.root.info()
        if info.type.name == "File":
            raise InputError(f"--output {out_dir} is a file; --ray writes a directory of Parquet files")
        self._lock = self._take_lock()
        try:
            self.record = self._open(found, identity, resume)
        except BaseException:
            self.release()
            raise

    def _take_lock(self) -> FileLock | None:
        if not self.root.is_local:
            return None  # object stores have no locks: one driver per OUT_DIR is the caller's to ensure
        os.makedirs(self.root.path, exist_ok=True)
        try:
            return FileLock(posixpath.join(self.root.path, LOCK_FILE), f"output {self.root.uri}").acquire()
        except LockedError as e:
            raise InputError(f"another pickscore run is writing {self.root.uri}: {e}") from None

    def _open(self, found: InputFiles, identity: dict[str, Any], resume: bool) -> dict[str, Any]:
        present = [f for f in self.root.listing() if posixpath.basename(f.path) != LOCK_FILE]
        fresh = {"format": RUN_FORMAT, "state": "scoring", "input": found.describe(), "model": identity,
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if not present:
            self.save(fresh)
            return fresh
        if not resume:
            raise InputError(f"--output {self.root.uri} is not empty: pass --resume to finish the run it holds, "
                             "or give an empty or new directory")
        if not self.run_file.exists():
            raise InputError(f"--output {self.root.uri} holds files that `pickscore score --ray` did not write "
                             f"(no {RUN_FILE}); refusing to add to it")
        record = json.loads(self.run_file.read_bytes())
        for what, theirs, ours in (("input", record.get("input"), found.describe()), ("model", record.get("model"), identity)):
            if theirs != ours:
                raise InputError(f"--resume: {self.root.uri} was started with another {what} ({json.dumps(theirs)[:300]}); "
                                 f"this run has {json.dumps(ours)[:300]}. Use a new --output for a new run")
        return record

    def save(self, record: dict[str, Any]) -> None:
        self.record = record
        self.root.fs.create_dir(self.root.path, recursive=True)
        self.run_file.write_bytes(json.dumps(record, indent=2).encode())

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _refuse_input_as_output(found: InputFiles, out: Location) -> None:
    """OUT_DIR may be neither an input file, nor inside SRC (its files would be read as input), nor hold SRC."""
    def norm(where: Location) -> str:
        return os.path.realpath(where.path) if where.is_local else where.uri.rstrip("/")

    target = norm(out)
    sources = [norm(f) for f in found.files] + [norm(locate(found.uri, found.base_dir))]
    for source in sources:
        if target == source or source.startswith(target + "/") or target.startswith(source + "/"):
            raise InputError(f"--output {out.uri} is or overlaps the input {found.uri}: writing it would destroy or "
                             "feed back into the input; choose a directory outside it")


class ScaleJob:
    """One run of SRC into OUT_DIR. Opening it checks the input, the model and the output and takes the
    output's lock, all before a cluster is touched; `run` does what is left on the connected cluster."""

    def __init__(self, source: str, out_dir: str, options: JobOptions, *, resume: bool = False):
        self.found = find_input(source)
        self.options = options
        identity = options.identity(Artifacts.load(options.artifacts, hash_check="size").fingerprint)
        self.out = OutputDirectory(out_dir, self.found, identity, resume)

    @property
    def done(self) -> bool:
        """OUT_DIR holds a finished run: nothing is left to do (nor any cluster needed)."""
        return self.out.record["state"] == "done"

    def run(self, progress: Callable[[str], None] = lambda message: None) -> Tally:
        out = self.out
        record = out.record
        if record["state"] == "done":
            if out.work.exists():
                out.root.fs.delete_dir(out.work.path)  # the last run died between its record and its cleanup
            progress(f"{out.root.uri} is complete already")
            return Tally(**record["tally"])
        with _job_context():
            if record["state"] == "scoring":
                done = _committed_images(out.checkpoint)
                # An earlier driver may have died after its last image was committed but before it recorded
                # the rank pass: Ray Data, given a checkpoint that filters out every row, never finishes, so a
                # pass with nothing left to score is not started at all.
                if done and done >= _input_images(self.found):
                    progress(f"resuming: all {done} item(s) were scored by the earlier run")
                    _drop_pending(out)
                else:
                    if done:
                        progress(f"resuming: {done} item(s) were scored by the earlier run; scoring the rest")
                    _score_pass(self.found, out, self.options)
                exit_at("scored")
                out.save({**record, "state": "ranking"})
            tally = _rank_pass(self.found, out, self.options, progress)
        out.save({**out.record, "state": "done", "tally": tally.__dict__,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        exit_at("finished")
        out.root.fs.delete_dir(out.work.path)
        return tally

    def close(self) -> None:
        self.out.release()

    def __enter__(self) -> "ScaleJob":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _job_context() -> Iterator[None]:
    """Ray Data settings for the job's own Datasets, restored after it: Parquet reader v1 (v2 starts 32
    footer-reading actors for every read, the rank pass's and the checkpoint's: seconds of fixed cost on a
    small cluster, for footers this job reads itself) and the sort-based shuffle (the hash shuffle starts
    aggregator actors first)."""
    ray_data = require("ray.data", "scoring on Ray (--ray)")
    context = ray_data.DataContext.get_current()
    saved = context.use_datasource_v2, context.shuffle_strategy
    context.use_datasource_v2 = False
    context.shuffle_strategy = ray_data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        context.use_datasource_v2, context.shuffle_strategy = saved


def score_to_directory(source: str, out_dir: str, options: JobOptions, *, resume: bool = False,
                       progress: Callable[[str], None] = lambda message: None) -> Tally:
    """Score SRC into OUT_DIR (see the module's docstring) on the Ray cluster this process is connected
    to (or a new local one); returns what the output holds."""
    with ScaleJob(source, out_dir, options, resume=resume) as job:
        return job.run(progress)


def _score_pass(found: InputFiles, out: OutputDirectory, options: JobOptions) -> None:
    from .dataset import read_input, score_images

    ray_data = require("ray.data", "scoring on Ray (--ray)")
    checkpoint = require("ray.data.checkpoint", "scoring on Ray (--ray)")
    context = ray_data.DataContext.get_current()
    # Kept after success (Ray would delete it): until the rank pass is recorded as started, a rerun must
    # still find which images were scored.
    context.checkpoint_config = checkpoint.CheckpointConfig(
        id_column=KEY, checkpoint_path=_ray_path(out.checkpoint), override_filesystem=out.root.fs,
        delete_checkpoint_on_success=False)
    try:
        scored = score_images(read_input(found), options.artifacts, options.scorer, gpus_per_worker=options.gpus_per_worker,
                              base_dir=found.base_dir)
        scored.write_parquet(_ray_path(out.scored), filesystem=out.root.fs, min_rows_per_file=options.commit_rows,
                             ray_remote_args=WRITE_ARGS)
    finally:
        context.checkpoint_config = None


def _rank_pass(found: InputFiles, out: OutputDirectory, options: JobOptions, progress: Callable[[str], None]) -> Tally:
    from .dataset import rank

    ray_data = require("ray.data", "scoring on Ray (--ray)")
    complete = out.ranked.child(COMPLETE)
    if not complete.exists():
        if out.ranked.exists():
            out.root.fs.delete_dir(out.ranked.path)  # a rank pass that died: it is redone whole
        scored_files = _parquet_files(out.scored)
        if not scored_files:
            return Tally()
        progress("ranking: probabilities and ranks over each comparison")
        scored = ray_data.read_parquet(scored_files, filesystem=out.root.fs)
        # read_rows finds a CSV / JSONL file's repeated ids as it reads it; ids need a look over the whole input
        # where records were validated one at a time (Parquet with ids, tar keys) or where files are several.
        look = len(found.files) > 1 or found.kind == "webdataset" or (found.kind == "parquet" and found.has_id)
        ranked = rank(scored, rows_per_file=_rows_per_file(out.root.fs, scored_files), find_repeated_ids=look)
        ranked.write_parquet(_ray_path(out.ranked), filesystem=out.root.fs, min_rows_per_file=options.commit_rows,
                             ray_remote_args=WRITE_ARGS)
        files = _parquet_files(out.ranked)
        tally = _tally(out.root.fs, files)
        files = [posixpath.basename(p) for p in files]
        exit_at("ranked")
        complete.write_bytes(json.dumps({"files": files, "tally": tally.__dict__}).encode())
    listed = json.loads(complete.read_bytes())
    for moved, name in enumerate(listed["files"]):  # each move is a rename; a rerun after a crash moves what is left
        staged = out.ranked.child(name)
        if staged.exists():
            out.root.fs.move(staged.path, out.root.child(name).path)
        if moved == 0:
            exit_at("moving")
    return Tally(**listed["tally"])


def _parquet_files(where: Location) -> list[str]:
    return sorted(f.path for f in where.listing(recursive=True) if f.path.endswith(".parquet"))


def _committed_images(checkpoint: Location) -> int:
    """Images in the committed checkpoint files of an earlier run (pending ones are Ray's to clean up)."""
    pq = require("pyarrow.parquet", "scoring on Ray (--ray)")
    total = 0
    for path in _parquet_files(checkpoint):
        if not path.endswith(".pending.parquet"):
            with checkpoint.fs.open_input_file(path) as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
    return total


def _input_images(found: InputFiles) -> int:
    """How many images (work rows) SRC holds: a read of the input alone, no decoding and no model."""
    from .dataset import read_input

    counts = read_input(found).select_columns([KEY]).map_batches(_count_rows, batch_format="pyarrow", batch_size=None)
    return int(counts.sum("n") or 0)


def _count_rows(batch: Any) -> Any:
    pa = require("pyarrow", "scoring on Ray (--ray)")
    return pa.table({"n": [batch.num_rows]})


def _drop_pending(out: OutputDirectory) -> None:
    """What Ray Data does at the start of a pass, for a pass that is not started: each pending checkpoint's
    data files (named from the checkpoint's id) are deleted, then the pending checkpoint."""
    util = require("ray.data.checkpoint.util", "scoring on Ray (--ray)")
    suffix = ".pending.parquet"
    pending = [f for f in out.checkpoint.listing() if f.path.endswith(suffix)]
    if not pending:
        return
    prefixes = util.build_pending_checkpoint_trie(pending, suffix)
    for path in _parquet_files(out.scored):
        if prefixes.has_prefix_of(posixpath.basename(path)):
            out.root.fs.delete_file(path)
    for f in pending:
        out.root.fs.delete_file(f.path)


def _rows_per_file(fs: Any, files: list[str]) -> dict[int, int]:
    """Each input file's row count (its highest row number) from the scored files' footer statistics; a row
    group whose rows come from several input files (a scorer batch can span read tasks) is read."""
    pq = require("pyarrow.parquet", "scoring on Ray (--ray)")
    counts: dict[int, int] = {}

    def note(file: int, row: int) -> None:
        counts[file] = max(counts.get(file, 0), row)

    for path in files:
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.metadata.schema.names
            for g in range(parquet.metadata.num_row_groups):
                group = parquet.metadata.row_group(g)
                file_stats, row_stats = (group.column(names.index(c)).statistics for c in (FILE, LOCAL_ROW))
                if file_stats is not None and row_stats is not None and file_stats.has_min_max \
                        and file_stats.min == file_stats.max and row_stats.has_min_max:
                    note(file_stats.min, row_stats.max)
                    continue
                table = parquet.read_row_group(g, columns=[FILE, LOCAL_ROW])
                for file, row in zip(table.column(FILE).to_pylist(), table.column(LOCAL_ROW).to_pylist()):
                    note(file, row)
    return counts


def _tally(fs: Any, files: list[str]) -> Tally:
    """Rows, scored images and error rows, from the Parquet footers' null counts (the columns themselves
    only where a footer lacks them)."""
    pq = require("pyarrow.parquet", "scoring on Ray (--ray)")
    rows = scored = errors = 0
    for path in files:
        with fs.open_input_file(path) as handle:
            file = pq.ParquetFile(handle)
            meta, names = file.metadata, file.metadata.schema.names
            stats = [meta.row_group(g).column(names.index(c)).statistics
                     for g in range(meta.num_row_groups) for c in ("score", "error")]
            if all(s is not None and s.has_null_count for s in stats):
                nulls = [sum(s.null_count for s in stats[k::2]) for k in (0, 1)]
            else:
                table = file.read(columns=["score", "error"])
                nulls = [table.column("score").null_count, table.column("error").null_count]
        rows += meta.num_rows
        scored += meta.num_rows - nulls[0]
        errors += meta.num_rows - nulls[1]
    return Tally(rows, scored, errors)


def exit_at(point: str) -> None:
    """Die here, at once and without cleanup, when the environment names this point (see EXIT_AT_ENV)."""
    if os.environ.get(EXIT_AT_ENV) == point:
        os._exit(137)
