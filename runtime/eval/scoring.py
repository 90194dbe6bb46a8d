"""An evaluation's images scored through the normal path (pipeline, batching, text cache) into a resumable
scores file: the same parted output as `pickscore score --output` (one row per image, committed in parts,
a run record that makes `--resume` finish only the same run), so a killed evaluation loses at most a part
and its scores are readable with any Parquet tool. Each work item's key is the list of its InputRows (as
`read_work` makes them); the ids must be unique within one file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..optional import require
from ..pipeline import WorkItem
from ..work_io import PartedOutput, Progress
from ..work_io.runs import model_identity

SCORE_COLUMNS = ["id", "row", "group", "prompt", "image", "score", "prob", "error", "random_weights", "precision"]


def score_work(scorer: Any, options: Any, items: Callable[[], Iterator[WorkItem]], input_identity: dict[str, Any], path: Path, *,
               resume: bool = False, overwrite: bool = False, commit_rows: int = 2000, total_images: int | None = None,
               until: Callable[[Iterable[WorkItem]], Iterator[WorkItem]] = iter,
               progress: Callable[[str], None] = lambda message: None) -> bool:
    """Score `items()` with `scorer` (opened with `options`, a ScorerOptions) into `path`, skipping what an
    earlier run committed (`items` is called again to name a changed row when resuming). `until`: wraps the item stream to stop early (a signal handler's). True when every
    item is in the file; False when `until` stopped it (the committed parts are kept for --resume)."""
    out = PartedOutput(path, resume=resume, overwrite=overwrite, part_rows=commit_rows)
    try:
        out.begin(input_identity, model_identity(scorer, options),
                  rows=lambda: (row for item in items() for row in item.key))
        if out.committed:
            progress(f"resuming: {path} already holds {len(out.committed)} row(s); scoring the rest")
        meter = Progress(total_images, unit="img")
        pending = (item for item in items() if not all(out.is_committed(row) for row in item.key))
        finished = True

        def watched() -> Iterator[WorkItem]:
            nonlocal finished
            yield from until(pending)
            finished = next(pending, None) is None  # `until` ended it early when work is left

        try:
            for result in scorer.score_many(watched(), on_images_done=meter.update):
                out.write(result)
        finally:
            meter.close()
        if not finished:
            out.commit()
            out.abandon()
            return False
        out.finish()
        return True
    except BaseException:
        out.abandon()
        raise


def read_scores(path: Path) -> list[dict[str, Any]]:
    """The rows (SCORE_COLUMNS) of a finished scores file, or of the Parquet files of a `score --ray` output
    directory (in file order; within a comparison, in input order)."""
    pq = require("pyarrow.parquet", "evaluation scores files", extra="parquet")
    files = sorted(p for p in Path(path).glob("*.parquet")) if Path(path).is_dir() else [Path(path)]
    return [row for f in files for row in pq.read_table(f, columns=SCORE_COLUMNS).to_pylist()]
