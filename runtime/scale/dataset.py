"""Scoring on Ray Data, as Datasets in and out, for callers who plug it into their own pipelines:

    import ray
    from pickscore_runtime.scale import read_input, score_dataset

    scored = score_dataset(read_input("s3://bucket/manifest/"), "artifacts/pickscore", precision="fp16")
    scored.write_parquet("s3://bucket/scores/")        # or keep transforming it

`score_dataset` also takes a caller's Dataset with `prompt`, `image` (path, URI, bytes or the datasets
struct) or `images`, a `row` column (int, 1-based: the order comparisons are formed in, and the identity
when there is no `id`), and optionally `id` and `group`.

Stages: decode + preprocess (CPU tasks) -> text + vision towers (an actor pool: one scorer per GPU, or
per `threads` cores) -> comparisons (a shuffle by (group, prompt), then consecutive rows -> probabilities
and ranks). The comparisons need every row's global number, so `score_dataset` materialises the scores
(no pixels: a few hundred bytes a row) before ranking; `pickscore score --ray` writes them to Parquet
instead, which is what makes it resumable.
"""

from __future__ import annotations

import os
from typing import Any

from ..artifacts import Artifacts
from ..errors import InputError
from ..options import ScorerOptions
from ..optional import require
from .sources import (COMPARISON, FILE, IMAGE_INDEX, INPUT_COLUMNS, KEY, LOCAL_ROW, InputFiles, WorkBlock, read_input,
                      record_row)
from .stages import ImageScorer, mark_rows, prepare_images, rank_comparison

ray = require("ray", "scoring on Ray (--ray)")
pa = require("pyarrow", "scoring on Ray (--ray)")

PREPARE_BATCH = 32  # images per decoding task call
SCORE_BATCH = 64  # images per scorer call at least (the backend splits it into its own batches)
ROWS_PER_PARTITION, MAX_PARTITIONS = 250_000, 2000  # the ranking shuffle's partitions


def cluster_shape(workers: int | None, gpus_per_worker: float | None, threads: int | None) -> tuple[int, float, int]:
    """(scorer actors, GPUs each, CPU threads each): one scorer per GPU where the cluster has GPUs, else one
    per `threads` cores (default 4) on half the cluster's CPUs, leaving the rest to decoding."""
    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus else 0.0
    if gpus_per_worker and gpus_per_worker > gpus:
        raise InputError(f"--gpus-per-worker {gpus_per_worker:g}: the cluster has {gpus:g} GPU(s)")
    threads = threads or min(4, max(1, int(resources.get("CPU", 1)) // 2))
    if workers is None:
        workers = int(gpus // gpus_per_worker) if gpus_per_worker else max(1, int(resources.get("CPU", 1)) // (2 * threads))
    return workers, gpus_per_worker, threads


def score_images(work: Any, artifacts: str | os.PathLike, options: ScorerOptions | None = None, *,
                 gpus_per_worker: float | None = None, base_dir: str | None = None, **settings: Any) -> Any:
    """Work rows (`read_input`, `work_rows`) -> the same rows with each image's score (`__score`), or why it
    has none (`error` for the row, `__image_error` for the image). Probabilities and ranks are `rank`'s.
    `options` / `settings`: the scorer's, as `PickScorer.load` takes them; here `workers` is the number of
    scorer actors (default one per GPU) and `threads` each one's cores.

    text_cache_file: a SQLite file per node (a node-local path): SQLite's locking does not work over NFS,
    so one file cannot be shared across nodes; each actor keeps its own in-memory LRU regardless."""
    options = (options or ScorerOptions()).replace(**settings)
    exported = Artifacts.load(artifacts, hash_check="size")  # the scorers check hashes themselves
    workers, gpus_per_worker, threads = cluster_shape(options.workers, gpus_per_worker, options.threads)
    scorer_options = options.replace(threads=threads, workers=None)
    # Decoding is a stage of its own, on every node's CPUs. Its memory reservation (which the scorers do not
    # have) also keeps Ray from fusing it into the scorer actors, where it would decode on a GPU actor's one CPU.
    prepared = work.map_batches(prepare_images, batch_format="pyarrow", batch_size=PREPARE_BATCH, num_cpus=1,
                                memory=decode_memory(options.decode.max_image_pixels, exported.crop_size),
                                fn_kwargs={"preprocessing": exported.preprocessing, "base_dir": base_dir or os.getcwd(),
                                           "preparer_options": options.decode.preparer_options()})
    resources = {"num_gpus": gpus_per_worker, "num_cpus": 1} if gpus_per_worker else {"num_cpus": threads}
    return prepared.map_batches(ImageScorer, fn_constructor_args=(os.fspath(artifacts), scorer_options), batch_format="pyarrow",
                                batch_size=max(SCORE_BATCH, options.batch_size or 0), compute=ray.data.ActorPoolStrategy(size=workers),
                                **resources)


def decode_memory(max_image_pixels: int, crop_size: int) -> int:
    """Bytes one decoding task may hold: the image preparer's pixel budget (two of the largest images at 4
    bytes a pixel) and one batch of output pixels."""
    return 2 * max_image_pixels * 4 + PREPARE_BATCH * 3 * crop_size * crop_size * 4


def _first_rows(batch: Any) -> Any:
    pc = require("pyarrow.compute", "scoring on Ray (--ray)")
    return batch.filter(pc.equal(batch.column(IMAGE_INDEX), 0)).select(["id", "row"])


def rank(scored: Any, *, rows_per_file: dict[int, int] | None = None, find_repeated_ids: bool = True) -> Any:
    """Scored work rows -> output rows (the CLI's columns, then the input's other columns): global row
    numbers, ids repeated anywhere in the input as error rows, and probabilities and ranks over each
    comparison (consecutive valid rows with the same group and prompt), wherever its rows were scored.
    `scored` is read more than once: pass a materialised Dataset or one read from files. `rows_per_file`:
    each input file's row count where the caller knows it (else counted here). The shuffles follow the
    Dataset's DataContext (`pickscore score --ray` picks Ray's sort-based shuffle: the default hash shuffle
    starts its aggregator actors first, seconds of fixed cost on a small cluster)."""
    if rows_per_file is None:
        rows_per_file = {}
        for block in scored.select_columns([FILE, LOCAL_ROW]).map_batches(_rows_per_file, batch_format="pyarrow").take_all():
            rows_per_file[block[FILE]] = max(rows_per_file.get(block[FILE], 0), block[LOCAL_ROW])
    offsets, total = [], 0
    for f in range(max(rows_per_file, default=-1) + 1):
        offsets.append(total)
        total += rows_per_file.get(f, 0)
    # Shuffles sized to the data: Ray's default of 200 partitions costs seconds on a small input.
    partitions = min(MAX_PARTITIONS, max(1, total // ROWS_PER_PARTITION))
    first_row_of: dict[str, int] = {}
    if find_repeated_ids:
        from ray.data.aggregate import Count, Min

        numbered = scored.map_batches(mark_rows, batch_format="pyarrow", fn_kwargs={"offsets": offsets, "first_row_of": {}})
        ids = numbered.map_batches(_first_rows, batch_format="pyarrow").groupby("id", num_partitions=partitions)
        # Only the repeated ids come back to the driver (not one record per row of the input).
        repeated = ids.aggregate(Count(), Min("row")).map_batches(_repeated_ids, batch_format="pyarrow")
        first_row_of = {r["id"]: r["min(row)"] for r in repeated.take_all()}
    marked = scored.map_batches(mark_rows, batch_format="pyarrow", fn_kwargs={"offsets": offsets, "first_row_of": first_row_of})
    return marked.groupby(COMPARISON, num_partitions=partitions).map_groups(rank_comparison, batch_format="pyarrow")


def _repeated_ids(batch: Any) -> Any:
    pc = require("pyarrow.compute", "scoring on Ray (--ray)")
    return batch.filter(pc.greater(batch.column("count()"), 1))


def _rows_per_file(batch: Any) -> Any:
    """Each file's highest row number in this block."""
    table = batch.group_by(FILE).aggregate([(LOCAL_ROW, "max")])
    return table.select([FILE, f"{LOCAL_ROW}_max"]).rename_columns([FILE, LOCAL_ROW])


def _records_to_work(batch: Any) -> Any:
    names = set(batch.schema.names)
    extras = tuple(f for f in batch.schema if f.name not in INPUT_COLUMNS | {"row"})
    block = WorkBlock(extras)
    for values in batch.to_pylist():
        number = values["row"]
        if not isinstance(number, int) or number < 1:
            raise InputError(f"the 'row' column must hold whole numbers from 1, got {number!r}")
        row, data, extra = record_row(values, number, "id" in names, "group" in names, [f.name for f in extras])
        block.add(0, number, row, data, extra, "")
    return block.table()


def work_rows(rows: Any) -> Any:
    """A caller's Dataset of (row, prompt, image | images[, id, group, ...]) -> work rows."""
    names = set(rows.schema().names)
    if "row" not in names or "prompt" not in names or not ({"image", "images"} & names):
        raise InputError("a Dataset to score needs 'row' (1-based order and identity), 'prompt' and 'image' (or "
                         f"'images') columns; got {sorted(names)}")
    return rows.map_batches(_records_to_work, batch_format="pyarrow")


def score_dataset(rows: Any, artifacts: str | os.PathLike, options: ScorerOptions | None = None, **settings: Any) -> Any:
    """Rows to score (from `read_input`, or a caller's Dataset as `work_rows` takes) -> one output row per
    image with score, prob, rank and error, as `pickscore score` writes them. Options as `score_images`."""
    work = rows if KEY in rows.schema().names else work_rows(rows)
    return rank(score_images(work, artifacts, options, **settings).materialize())


__all__ = ["InputFiles", "rank", "read_input", "score_dataset", "score_images", "work_rows"]
