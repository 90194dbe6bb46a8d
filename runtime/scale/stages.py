"""The runtime's stages as Ray Data transforms.

- `prepare_images` (CPU tasks): each image through the ImagePreparer -> pixels, or its per-item error.
- `ImageScorer` (an actor per GPU, or per N cores): the TextEncoder (prompts deduplicated per block; its
  LRU lives as long as the actor) and the backend's vision tower -> one score per image, or its image
  error where a tower returned NaN or Inf (never a NaN score).
- `mark_rows` + `rank_comparison` (CPU): global row numbers, ids repeated across the input, and the
  comparisons: consecutive valid rows with the same (group, prompt), whatever blocks they were scored
  in -> probabilities and ranks by `results.ranked_rows`, rows by `result_rows`, exactly as the CLI makes them.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np

from ..errors import ImageError
from ..image_preparer import ImagePreparer
from ..optional import require
from ..preprocess import PreprocessConfig, Preprocessor
from ..results import (PromptResult, RandomWeightsWarning, nonfinite_reasons, prompt_scores, ranked_rows,
                       unscored_rows)
from ..options import ScorerOptions
from ..scorer import PickScorer
from ..work_io import OUTPUT_COLUMNS, InputRow, result_rows
from ..work_io.inputs import validate_record
from .files import RemoteFiles, local_path
from .sources import COMPARISON, FILE, IMAGE_BYTES, IMAGE_INDEX, LINE, LOCAL_ROW, WORK_SCHEMA

pa = require("pyarrow", "scoring on Ray (--ray)")
tensors = require("ray.data.extensions", "scoring on Ray (--ray)")

PIXELS, IMAGE_ERROR = "__pixels", "__image_error"
SCORE, TRUNCATED, PRECISION, RANDOM_WEIGHTS = "__score", "__truncated", "__precision", "__random_weights"
WORK_COLUMNS = {name for name, _ in WORK_SCHEMA}
SCORED_COLUMNS = {SCORE, TRUNCATED, PRECISION, RANDOM_WEIGHTS, IMAGE_ERROR}


def carried_fields(schema: Any) -> list[Any]:
    """The input's own other columns, which every stage carries through to the output."""
    return [f for f in schema if f.name not in WORK_COLUMNS | SCORED_COLUMNS | {PIXELS, "row"}]


# ---- decoding + preprocessing (CPU) -------------------------------------------------------------
_preparers: dict[tuple, tuple[ImagePreparer, RemoteFiles]] = {}  # per worker process, reused across tasks


def prepare_images(batch: Any, preprocessing: PreprocessConfig | dict, preparer_options: dict, base_dir: str) -> Any:
    """Work rows -> the same rows with `__pixels` (float32 [3, S, S]; zeros where unusable) and
    `__image_error` (why an image could not be used), without the image bytes. preprocessing: the artifacts'
    (`Artifacts.preprocessing`, or its JSON form); preparer_options: the ImagePreparer's own
    (max_image_pixels, and the opt-in fast decoding the CLI offers)."""
    config = preprocessing if isinstance(preprocessing, PreprocessConfig) else PreprocessConfig.from_json(preprocessing)
    cache_key = (config, repr(sorted(preparer_options.items())))
    if cache_key not in _preparers:
        preparer = ImagePreparer(Preprocessor(config), **preparer_options)
        _preparers[cache_key] = preparer, RemoteFiles()
    preparer, remote = _preparers[cache_key]
    size = preparer.preprocessor.config.crop_size
    pixels = np.zeros((batch.num_rows, 3, size, size), np.float32)
    reasons: list[str | None] = [None] * batch.num_rows
    columns = {name: batch.column(name).to_pylist() for name in ("image", IMAGE_BYTES, "error", IMAGE_INDEX)}
    for i, (name, data, error, j) in enumerate(zip(*columns.values())):
        if error is not None:
            continue  # a bad row: nothing to decode
        try:
            item = data if data is not None else image_item(name, base_dir, remote)
        except ImageError as e:
            reasons[i] = e.reason
            continue
        prepared = preparer.prepare(item, j)
        if prepared.error is None:
            pixels[i] = prepared.pixels
        else:
            reasons[i] = prepared.error.reason
    out = batch.drop_columns([IMAGE_BYTES])
    out = out.append_column(IMAGE_ERROR, pa.array(reasons, pa.string()))
    return out.append_column(PIXELS, tensors.ArrowTensorArray.from_numpy(pixels))


def image_item(name: str, base_dir: str, remote: RemoteFiles) -> Any:
    """A local path (relative to the driver's directory, as the CLI resolves it) or a remote file's bytes."""
    path = local_path(name, base_dir)
    if path is not None:
        return path
    try:
        return remote.read(name)
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except OSError as e:
        raise ImageError(name, f"cannot read ({e})") from None


# ---- scoring (an actor per GPU, or per N cores) -------------------------------------------------
class ImageScorer:
    """Holds one PickScorer (its backend, TextEncoder and LRU) for the actor's lifetime."""

    def __init__(self, artifacts: str, options: ScorerOptions):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)  # the driver says it, once
            self.scorer = PickScorer.load(artifacts, options=options)
        self.scale = self.scorer.artifacts.logit_scale_exp

    def __call__(self, batch: Any) -> Any:
        n = batch.num_rows
        prompts = batch.column("prompt").to_pylist()
        errors = batch.column("error").to_pylist()
        image_errors = batch.column(IMAGE_ERROR).to_pylist()
        pixels = batch.column(PIXELS).combine_chunks().to_numpy() if n else None
        usable = [i for i in range(n) if errors[i] is None]
        distinct = list(dict.fromkeys(prompts[i] for i in usable))  # one text-tower row per prompt in the block
        encoded = self.scorer.text.encode(distinct)
        text_of = dict(zip(distinct, zip(encoded.embeddings, encoded.truncated)))
        ok = [i for i in usable if image_errors[i] is None]
        kept = pixels if len(ok) == n else pixels[ok]  # no copy when every row is usable
        embeddings = self.scorer.embed_pixels(np.ascontiguousarray(kept)) if ok else None
        scores: list[float | None] = [None] * n
        by_prompt: dict[str, list[int]] = {}
        for k, i in enumerate(ok):
            by_prompt.setdefault(prompts[i], []).append(k)
        for prompt, rows in by_prompt.items():
            text_emb = text_of[prompt][0]
            values = prompt_scores(self.scale, text_emb, embeddings[rows])
            for k, value, why in zip(rows, values, nonfinite_reasons(text_emb, embeddings[rows], values)):
                if why is None:
                    scores[ok[k]] = float(value)
                else:
                    image_errors[ok[k]] = why
        backend = self.scorer.backend
        out = batch.drop_columns([PIXELS])
        out = out.set_column(out.schema.get_field_index(IMAGE_ERROR), IMAGE_ERROR, pa.array(image_errors, pa.string()))
        for name, values, kind in ((SCORE, scores, pa.float64()),
                                   (TRUNCATED, [bool(text_of[prompts[i]][1]) if errors[i] is None else False
                                                for i in range(n)], pa.bool_()),
                                   (PRECISION, [backend.precision] * n, pa.string()),
                                   (RANDOM_WEIGHTS, [self.scorer.random_weights] * n, pa.bool_())):
            out = out.append_column(name, pa.array(values, kind))
        return out

    def __del__(self) -> None:
        scorer = getattr(self, "scorer", None)
        if scorer is not None:
            scorer.close()


# ---- comparisons (CPU, after a shuffle by comparison key) --------------------------------------
def mark_rows(batch: Any, offsets: list[int], first_row_of: dict[str, int]) -> Any:
    """Global row numbers (`row`) from each file's offset. An id that `first_row_of` says another row used
    first makes this row an error row, exactly as the CLI's validation makes it. Bad rows get a comparison
    key of their own."""
    files, local_rows = batch.column(FILE).to_pylist(), batch.column(LOCAL_ROW).to_pylist()
    rows = [offsets[f] + r for f, r in zip(files, local_rows)]
    ids, errors = batch.column("id").to_pylist(), batch.column("error").to_pylist()
    comparisons, lines = batch.column(COMPARISON).to_pylist(), batch.column(LINE).to_pylist()
    for i, row in enumerate(rows):
        first = first_row_of.get(ids[i])
        if first is not None and first != row:
            repeated = validate_record({"id": ids[i]}, row, line=lines[i], has_id=True, first_row_of={ids[i]: first})
            ids[i], errors[i] = repeated.id, repeated.error
        if errors[i] is not None:
            comparisons[i] = f"!{row}"  # bad rows are comparisons of their own
    out = batch
    for name, values, kind in (("id", ids, pa.string()), ("error", errors, pa.string()),
                               (COMPARISON, comparisons, pa.string())):
        out = out.set_column(out.schema.get_field_index(name), name, pa.array(values, kind))
    return out.append_column("row", pa.array(rows, pa.int64()))


def rank_comparison(group: Any) -> Any:
    """All rows with one comparison key -> output rows: consecutive rows form one comparison (a gap in the row
    numbers is a bad row or another prompt between them), ranked by `ranked_rows` (the scores already carry the
    logit scale), written by `result_rows`."""
    records = sorted(group.to_pylist(), key=lambda r: (r["row"], r[IMAGE_INDEX]))  # groups are small: no Arrow sort
    # Every copy of an image lands in this group (its key is its row's), so a copy that a retried write left
    # in the scored files is dropped here: the output holds each image once, whatever the scoring pass left.
    records = [r for k, r in enumerate(records)
               if k == 0 or (r["row"], r[IMAGE_INDEX]) != (records[k - 1]["row"], records[k - 1][IMAGE_INDEX])]
    schema = output_schema(group.schema)
    extras = schema.names[len(OUTPUT_COLUMNS):]
    first = records[0]
    random_weights, precision = bool(first[RANDOM_WEIGHTS]), first[PRECISION] or ""
    runs: list[list[dict]] = []
    for r in records:
        if runs and r["row"] in (runs[-1][-1]["row"], runs[-1][-1]["row"] + 1):
            runs[-1].append(r)
        else:
            runs.append([r])
    by_row = {r["row"]: r for r in records}
    out: list[dict] = []
    for run in runs:
        if run[0]["error"] is not None:
            bad = run[0]
            source = InputRow(bad["row"], bad["id"], bad[LINE], bad["prompt"], [], bad["group"], bad["error"])
            result = PromptResult(bad["prompt"], unscored_rows([]), random_weights, error=bad["error"],
                                  precision=precision, key=[source])
        else:
            sources: dict[int, InputRow] = {}
            for r in run:
                sources.setdefault(r["row"], InputRow(r["row"], r["id"], r[LINE], r["prompt"], [], r["group"])).images.append(r["image"])
            names = [r["image"] for r in run]
            scores = np.array([r[SCORE] if r[SCORE] is not None else np.nan for r in run], np.float32)
            failed = {k: r[IMAGE_ERROR] for k, r in enumerate(run) if r[IMAGE_ERROR] is not None}
            result = PromptResult(run[0]["prompt"], ranked_rows(names, scores, failed), random_weights,
                                  truncated=bool(run[0][TRUNCATED]), precision=precision, key=list(sources.values()))
        for row in result_rows(result):
            row.update({name: by_row[row["row"]][name] for name in extras})
            out.append(row)
    return pa.Table.from_pylist(out, schema=schema)


@functools.lru_cache(maxsize=16)
def output_schema(scored: Any) -> Any:
    """The CLI's output columns, then the input's own columns (made once per schema: every group asks)."""
    return pa.schema([(c.name, getattr(pa, c.arrow)()) for c in OUTPUT_COLUMNS] + carried_fields(scored))
