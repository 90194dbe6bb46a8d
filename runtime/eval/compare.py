"""`pickscore eval compare`: several text-to-image models' generations for the same prompts, scored by the
normal path into a resumable scores file, then the mean PickScore per model and pairwise win rates, each
with a bootstrap confidence interval over prompts.

Generations come from a manifest (CSV / JSONL / Parquet with `prompt, model, image`: a path, or bytes in
Parquet) or a folder per model (`DIR/<model>/<prompt id>.png`, `<prompt id>_<k>.png` or `<prompt id>/*.png`)
with a prompts file (`.txt`: one prompt per line, ids 0, 1, ...; or CSV / JSONL with `id, prompt`). Numeric
prompt ids match whatever their zero padding (`00012.png` is prompt 12).

Per prompt a model's value is its best image's score (`best`: what best-of-N serves) or its images' mean
(`mean`). A win rate of A over B is over the prompts both have a value for: 1 when A's is higher, 0.5 when
equal, 0 else. Nothing is dropped silently: a row that cannot be scored is listed with its reason, and a
model with no usable image for a prompt some other model has is listed under `missing` for that prompt;
each figure says over how many prompts it is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..errors import InputError, PickScoreError
from ..pipeline import WorkItem
from ..tokenizer import check_prompt
from ..work_io import InputRow
from ..work_io.inputs import IMAGE_SUFFIXES, as_text, image_value, table_records
from ..work_io.runs import file_identity
from .accuracy import bootstrap_interval

PER_PROMPT = ("best", "mean")


# ---- generations in -----------------------------------------------------------------------------------
@dataclass
class Generations:
    """Where the generations are, checked before any scoring; `items()` reads them (again, when resuming)."""

    items: Callable[[], Iterator[WorkItem]]
    identity: dict[str, Any]
    n_images: int
    source: str
    prompt_ids: dict[str, str] | None = None  # row id -> prompt id, where prompts have ids (else: grouped by text)


def manifest_generations(path: str | os.PathLike) -> Generations:
    """A CSV / JSONL / Parquet manifest of (prompt, model, image) rows; a row's id is its number."""
    path = Path(path)
    header, _ = table_records(path)  # the file and its columns, checked now
    if header is not None and not {"prompt", "model", "image"} <= header:
        raise InputError(f"{path}: a compare manifest needs prompt, model and image columns; got {sorted(header)}")

    def items() -> Iterator[WorkItem]:
        for number, line, values, problem in table_records(path)[1]:
            yield generation_item(number, line, values, problem)

    n, images = 0, hashlib.sha256()  # the images given as paths: what --resume must also find unchanged
    for n, _, values, _ in table_records(path)[1]:
        name, data = image_value((values or {}).get("image"), 0)
        if data is None and isinstance(name, str):
            images.update(json.dumps([n, name, file_stat(Path(name))]).encode("utf-8", "backslashreplace"))
    if n == 0:
        raise InputError(f"{path} has no rows: there is nothing to compare")
    return Generations(items, {"manifest": file_identity(path), "image_files": images.hexdigest()}, n, str(path))


def file_stat(path: Path) -> Any:
    """[size, mtime] of a file, or why it cannot be read: a changed image makes a resumed run refuse."""
    try:
        stat = path.stat()
    except OSError as e:
        return e.strerror
    return [stat.st_size, stat.st_mtime_ns]


def generation_item(number: int, line: int | None, values: dict[str, Any] | None, problem: str | None) -> WorkItem:
    """One generation as a work item (its InputRow's group is the model), or an error item naming its row."""
    values = values or {}
    where = f"row {number} (line {line})" if line is not None else f"row {number}"
    name, data = image_value(values.get("image"), 0)
    if data is None and isinstance(name, str) and name.strip():
        data = name
    elif data is not None and name == "#0 (bytes)":
        name = f"row {number} image"  # bytes without a path
    model = values.get("model")
    row = InputRow(number, str(number), line, prompt=values.get("prompt"),
                   images=[as_text(name if isinstance(name, str) else f"row {number} image")],
                   group=as_text(model) if isinstance(model, (str, int)) and not isinstance(model, bool) else None)
    reasons = [problem] if problem else []
    if not reasons:
        if row.group is None or not str(row.group).strip():
            reasons.append("no model" if model is None else f"the model must be a name, got {type(model).__name__}")
        try:
            check_prompt(row.prompt)
        except PickScoreError as e:
            reasons.append(str(e))
        if data is None:
            reasons.append("no image" if name is None else f"the image is not a path or bytes ({type(name).__name__})")
    if reasons:
        row.error = f"{where}: {'; '.join(reasons)}"
        return WorkItem(row.prompt, row.images, key=[row], error=row.error)
    return WorkItem(row.prompt, [data], key=[row])


def read_prompts(path: str | os.PathLike) -> dict[str, str]:
    """Prompt id -> prompt: a .txt file (line i is prompt i, from 0; blank lines keep their number), or a
    CSV / JSONL / Parquet file with id and prompt columns."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of prompt 0
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--prompts {path} cannot be read as UTF-8 text ({e})") from None
        # only \n ends a line: a prompt may hold U+2028, a form feed or other characters splitlines() breaks on
        lines = [line.removesuffix("\r") for line in text.split("\n")]
        return {str(i): line for i, line in enumerate(lines) if line.strip()}
    header, records = table_records(path)
    if header is not None and not {"id", "prompt"} <= header:
        raise InputError(f"--prompts {path} needs id and prompt columns; got {sorted(header)}")
    prompts: dict[str, str] = {}
    for number, line, values, problem in records:
        where = f"line {line}" if line is not None else f"row {number}"
        values = values or {}
        key = values.get("id")
        if problem or key is None or not isinstance(values.get("prompt"), str):
            raise InputError(f"--prompts {path} {where}: {problem or 'needs an id and a text prompt'}")
        key = prompt_id(str(key))
        if key in prompts:
            raise InputError(f"--prompts {path} {where}: prompt id {key!r} is given twice")
        prompts[key] = values["prompt"]
    return prompts


def prompt_id(text: str) -> str:
    """Ids as files name them: numeric ids without their zero padding ('00012' and '12' are one prompt)."""
    text = text.strip()
    return str(int(text)) if text.isascii() and text.isdigit() else text


def match_prompt(rel: Path, prompts: dict[str, str]) -> tuple[str, str | None]:
    """A file's prompt id (from `<id>/...`, `<id>.png` or `<id>_<k>.png`) and why it has none usable: an id the
    prompts file lacks, or a name two ids match (`cat_1.png` with ids `cat` and `cat_1`)."""
    if len(rel.parts) > 1:
        candidates = [prompt_id(rel.parts[0])]
    else:
        head, sep, tail = rel.stem.rpartition("_")
        candidates = [prompt_id(rel.stem)] + ([prompt_id(head)] if sep and tail.isascii() and tail.isdigit() else [])
    known = [c for c in dict.fromkeys(candidates) if c in prompts]
    if len(known) > 1:
        return known[0], f"both prompt ids {known[0]!r} and {known[1]!r} match its name; rename it"
    if known:
        return known[0], None
    return candidates[-1], f"prompt id {' or '.join(repr(c) for c in dict.fromkeys(candidates))} is not in the prompts file"


def folder_generations(root: str | os.PathLike, prompts_file: str | os.PathLike) -> Generations:
    """DIR/<model>/<prompt id>[_<k>].<ext> or DIR/<model>/<prompt id>/<files>, with the prompts file's text."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--generations {root} is not a directory (a folder per model)")
    prompts = read_prompts(prompts_file)
    found: list[tuple[str, str, Path, str | None]] = []  # (model, prompt id, file, problem): every file but hidden ones
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        for f in sorted(model_dir.rglob("*")):
            rel = f.relative_to(model_dir)
            if f.is_dir() or any(part.startswith((".", "_")) for part in rel.parts):
                continue
            key, problem = match_prompt(rel, prompts)
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                problem = f"not an image file type ({f.suffix or 'no suffix'})"
            found.append((model_dir.name, key, f, problem and f"{f}: {problem}"))
    if not found:
        raise InputError(f"--generations {root} holds no images in model folders (DIR/<model>/<prompt id>.png)")
    digest = hashlib.sha256()
    for model, key, f, _ in found:
        digest.update(json.dumps([model, key, str(f.relative_to(root)), file_stat(f)]).encode("utf-8", "backslashreplace"))

    def items() -> Iterator[WorkItem]:
        for number, (model, key, f, problem) in enumerate(found, 1):
            values = {"prompt": prompts.get(key), "model": model, "image": str(f)}
            item = generation_item(number, None, values, problem)
            item.key[0].id = str(f.relative_to(root))
            yield item

    identity = {"generations": {"files": len(found), "names_sizes_mtimes": digest.hexdigest()},
                "prompts": file_identity(Path(prompts_file))}
    prompt_ids = {str(f.relative_to(root)): key for _, key, f, _ in found}
    return Generations(items, identity, len(found), str(root), prompt_ids)


def generations_from(rows: list[dict[str, Any]], source: str = "(in memory)") -> Generations:
    """Generations a program holds: dicts with prompt, model and image (a path, bytes, a PIL image or an HWC
    uint8 array), e.g. a training script's samples every N steps. Not resumable (nothing names them on disk)."""
    rows = list(rows)
    if not rows:
        raise InputError("no generations to compare")

    def items() -> Iterator[WorkItem]:
        for number, values in enumerate(rows, 1):
            image = values.get("image") if isinstance(values, dict) else None
            if image is None or isinstance(image, (str, bytes, bytearray, dict)):
                yield generation_item(number, None, values if isinstance(values, dict) else None,
                                      None if isinstance(values, dict) else f"a {type(values).__name__}, not a dict")
            else:  # a decoded image: scored as it is
                item = generation_item(number, None, {**values, "image": f"row {number} image"}, None)
                yield item if item.error else WorkItem(item.prompt, [image], key=item.key)
    return Generations(items, {"in_memory": len(rows), "started": time.time()}, len(rows), source)


def compare_generations(scorer: Any, generations: Generations, *, per_prompt: str = "best", options: Any = None,
                        work_dir: str | os.PathLike | None = None, resume: bool = False, overwrite: bool = False,
                        commit_rows: int = 2000, until: Callable[[Iterable[WorkItem]], Iterator[WorkItem]] = iter,
                        progress: Callable[[str], None] = lambda message: None) -> dict[str, Any] | None:
    """Score `generations` with an open scorer (into `work_dir/generations-<precision>.parquet`, resumable, or a
    temporary file) and compare the models; None when `until` stopped it early."""
    from ..options import ScorerOptions
    from .scoring import read_scores, score_work

    if per_prompt not in PER_PROMPT:
        raise ValueError(f"per_prompt must be one of {', '.join(PER_PROMPT)}, got {per_prompt!r}")
    with tempfile.TemporaryDirectory(prefix="pickscore-eval-") as tmp:
        path = Path(work_dir or tmp) / f"generations-{scorer.backend.precision}.parquet"
        progress(f"scoring {generations.n_images} generation(s) with {scorer.backend.name}/{scorer.backend.precision}")
        if not score_work(scorer, options or ScorerOptions(), generations.items, generations.identity, path, resume=resume,
                          overwrite=overwrite, commit_rows=commit_rows, total_images=generations.n_images, until=until,
                          progress=progress):
            return None
        rows = read_scores(path)
    return {"generations": generations.source, "backend": scorer.backend.name, "precision": scorer.backend.precision,
            "random_weights": scorer.random_weights, **compare_scores(rows, per_prompt, prompt_ids=generations.prompt_ids)}


# ---- figures out ----------------------------------------------------------------------------------------
REFUSED = ("row ", "line ")  # how the error of a generation refused before scoring starts (generation_item)


def compare_scores(rows: list[dict[str, Any]], per_prompt: str = "best", seed: int = 0,
                   prompt_ids: dict[str, str] | None = None) -> dict[str, Any]:
    """The comparison from a scores file's rows (group = model). Prompts are told apart by `prompt_ids`
    (row id -> prompt id) where given, else by their text. A generation refused before scoring (no model, a
    bad prompt, ...) is an error and counts for no model or prompt; one that failed in scoring (an image that
    does not decode) leaves its model without that image for its prompt."""
    if per_prompt not in PER_PROMPT:
        raise ValueError(f"per_prompt must be one of {', '.join(PER_PROMPT)}, got {per_prompt!r}")
    reduce = np.max if per_prompt == "best" else np.mean
    scores: dict[str, dict[str, list[float]]] = {}
    attempted: dict[str, set[str]] = {}
    text: dict[str, str] = {}
    errors = []
    for r in rows:
        model = r["group"]
        prompt = prompt_ids.get(r["id"], r["prompt"]) if prompt_ids is not None else r["prompt"]
        score, error = r["score"], r["error"]
        if error is None and (score is None or not math.isfinite(score)):
            error = "no finite score in the scores file (edited by hand?)"
        if error is not None:
            errors.append({"id": r["id"], "row": r["row"], "model": model, "image": r["image"], "error": error})
            if error.startswith(REFUSED):
                continue
        text.setdefault(prompt, r["prompt"])
        attempted.setdefault(model, set()).add(prompt)
        if error is None:
            scores.setdefault(model, {}).setdefault(prompt, []).append(float(score))
    models = sorted(attempted)
    prompts = sorted({p for by in attempted.values() for p in by})
    value = {m: {p: float(reduce(v)) for p, v in scores.get(m, {}).items()} for m in models}

    def named(p: str) -> dict[str, str]:
        return {"prompt": text[p]} if text[p] == p else {"prompt": text[p], "prompt_id": p}

    per_model = []
    for m in models:
        have = value[m]
        mean_of = np.array([np.mean(scores[m][p]) for p in sorted(have)]) if have else np.array([])
        per_model.append({
            "model": m, "n_prompts": len(have), "n_images": sum(len(v) for v in scores.get(m, {}).values()),
            "mean_score": float(mean_of.mean()) if len(mean_of) else None,
            "mean_score_ci95": list(bootstrap_interval(mean_of, seed=seed)) if len(mean_of) else None,
            "missing": [{**named(p), "why": "every image failed" if p in attempted[m] else "no image"}
                        for p in prompts if p not in have]})
    wins = []
    for a in models:
        for b in models:
            if a >= b:
                continue
            shared = sorted(set(value[a]) & set(value[b]))
            credit = np.array([1.0 if value[a][p] > value[b][p] else 0.5 if value[a][p] == value[b][p] else 0.0
                               for p in shared])
            wins.append({"model": a, "versus": b, "n_prompts": len(shared),
                         "win_rate": float(credit.mean()) if len(shared) else None,
                         "win_rate_ci95": list(bootstrap_interval(credit, seed=seed)) if len(shared) else None})
    return {"per_prompt": per_prompt, "n_prompts": len(prompts), "models": per_model, "win_rates": wins,
            "n_errors": len(errors), "errors": errors}


def plot_comparison(doc: dict[str, Any], path: str | os.PathLike) -> None:
    """Mean PickScore per model with its 95 % interval as error bars (needs matplotlib: the [bench] extra)."""
    from ..optional import require

    require("matplotlib", "eval compare --plot", extra="bench")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [m for m in doc["models"] if m["mean_score"] is not None]
    if not rows:
        raise InputError("no model has a scored image: there is nothing to plot")
    means = [m["mean_score"] for m in rows]
    low = [m["mean_score"] - m["mean_score_ci95"][0] for m in rows]
    high = [m["mean_score_ci95"][1] - m["mean_score"] for m in rows]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows) + 2), 4))
    ax.bar([m["model"] for m in rows], means, yerr=[low, high], capsize=6, color="#4c72b0")
    ax.set_ylabel("mean PickScore (95 % CI)")
    ax.set_ylim(min(means) - 2 * max(low + [0.1]), max(means) + 2 * max(high + [0.1]))
    ax.set_title(f"PickScore per model ({doc['n_prompts']} prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
