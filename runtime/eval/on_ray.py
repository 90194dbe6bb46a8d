"""`pickscore eval preference --ray`: a split's pairs scored by the Ray job (`pickscore score --ray`'s: actors,
checkpoints, resume) instead of in this process, for splits too large for one machine.

The job reads (prompt, images) rows, so the split is first rewritten beside the scores as such a file
(`<split>-input.parquet`: id and group = the row number, so each pair is a comparison of its own; prompt =
caption; images = [jpg_0, jpg_1] as {bytes, path} structs), once: a resumed run reuses it when the split is
unchanged and refuses when it changed. That copy costs the split's size in disk. Rows the job cannot score are
named by the job's own validation ("row N: ...").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from ..durable import write_json_atomically
from ..errors import InputError
from ..optional import require
from .pickapic import BATCH_ROWS, Split

IMAGE_STRUCT = (("bytes", "binary"), ("path", "string"))


def job_input(split: Split, work: Path, resume: bool) -> Path:
    """The split as the Ray job's input file, written once (atomically) and reused while the split is unchanged."""
    pa = require("pyarrow", "eval --ray", extra="ray")
    path, marker = work / f"{split.name}-input.parquet", work / f".{split.name}-input.json"
    identity = split.identity()
    if path.is_file() and marker.is_file():
        if json.loads(marker.read_text(encoding="utf-8")) == identity:
            return path
        if resume:
            raise InputError(f"--resume: the {split.name} split {split.path} is not the one {work} was started from; "
                             "use a new --work for a new run, or --overwrite")
    image = pa.struct([(name, getattr(pa, kind)()) for name, kind in IMAGE_STRUCT])
    schema = pa.schema([("id", pa.string()), ("group", pa.string()), ("prompt", pa.string()), ("images", pa.list_(image))])
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / f".{path.name}.tmp-{os.getpid()}"
    try:
        _write_job_input(split, tmp, schema)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    write_json_atomically(marker, identity)
    return path


def _write_job_input(split: Split, tmp: Path, schema: Any) -> None:
    pa = require("pyarrow", "eval --ray", extra="ray")
    pq = require("pyarrow.parquet", "eval --ray", extra="ray")
    with pq.ParquetWriter(str(tmp), schema) as writer:
        batch: list[dict[str, Any]] = []
        for pair in split.pairs():
            images = [None if x is None else {"bytes": x, "path": None} if isinstance(x, bytes) else {"bytes": None, "path": x}
                      for x in pair.images]
            batch.append({"id": pair.row.id, "group": pair.row.id,
                          "prompt": pair.row.prompt if isinstance(pair.row.prompt, str) else None, "images": images})
            if len(batch) == BATCH_ROWS:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))


def score_split_on_ray(session: Any, job_options: Any, split: Split, work: Path, *, resume: bool, overwrite: bool,
                       progress: Callable[[str], None]) -> Path:
    """Score `split` with the Ray job into `<work>/<split>-<precision>.ray/` (resumable); that directory."""
    from ..scale.job import ScaleJob

    source = job_input(split, work, resume)
    out = work / f"{split.name}-{job_options.scorer.precision or 'auto'}.ray"
    if overwrite and out.exists():
        import shutil

        shutil.rmtree(out)
    progress(f"scoring the {split.name} split ({split.n_rows} pairs) on Ray into {out}")
    with ScaleJob(str(source), str(out), job_options, resume=resume) as job:
        session.run(job, progress=progress)
    return out
