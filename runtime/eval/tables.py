"""The evaluation reports as text tables (printed) and CSV rows (--output FILE.csv); the JSON report is the
dict itself."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

MAX_LISTED = 20  # errors, missing prompts and flipped pairs shown in a table (the JSON lists them all)


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ci(interval: list[float] | None) -> str:
    return "-" if interval is None else f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def _listed(lines: list[str], items: list[str], what: str) -> None:
    for text in items[:MAX_LISTED]:
        lines.append(f"  {text}")
    if len(items) > MAX_LISTED:
        lines.append(f"  ... and {len(items) - MAX_LISTED} more {what} (the JSON report lists them all)")


def preference_table(doc: dict[str, Any]) -> str:
    per = doc["by_precision"] or [doc]
    how = f"tie threshold chosen on {doc['validation']}" if doc["validation"] else "tie threshold given"
    lines = [f"preference accuracy on {doc['data']} ({doc['n_pairs']} pairs; {how})"]
    if doc["random_weights"]:
        lines.append("RANDOM WEIGHTS: these accuracies are meaningless")
    lines.append(f"{'backend/precision':<22} {'accuracy':>8}  {'95% CI':<18} {'no ties':>7}  {'threshold':>9}  "
                 f"{'evaluated':>9}  {'errors':>6}  {'flipped':>7}")
    for r in per:
        flipped = "-" if "flipped" not in r else str(len(r["flipped"]))
        lines.append(f"{r['backend'] + '/' + r['precision']:<22} {_num(r['accuracy']):>8}  {_ci(r['accuracy_ci95']):<18} "
                     f"{_num(r['accuracy_ties_excluded']):>7}  {r['tie_threshold']:>9g}  {r['n_evaluated']:>9}  "
                     f"{r['n_errors']:>6}  {flipped:>7}")
    counts = per[0]["label_counts"]
    lines.append("labels (evaluated pairs): " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    if per[0]["errors"]:
        lines.append(f"left out of the accuracy ({len(per[0]['errors'])}):")
        _listed(lines, [f"{e['split']} {e['error']}" for e in per[0]["errors"]], "rows")
    for r in per[1:]:
        if r["flipped"]:
            lines.append(f"pairs {r['precision']} predicts differently from {per[0]['precision']} ({len(r['flipped'])}; "
                         f"accuracy change {r['accuracy_change']:+.4f}):")
            _listed(lines, [f"row {f['row']}: label {f['label']}, " + ", ".join(f"{k} {v}" for k, v in f["prediction"].items())
                            + f"  {f['caption']!r}" for f in r["flipped"]], "pairs")
    return "\n".join(lines)




def preference_csv_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in doc["by_precision"] or [doc]:
        rows.append({"backend": r["backend"], "precision": r["precision"], "accuracy": r["accuracy"],
                     "accuracy_ci95_low": r["accuracy_ci95"][0], "accuracy_ci95_high": r["accuracy_ci95"][1],
                     "accuracy_ties_excluded": r["accuracy_ties_excluded"], "tie_threshold": r["tie_threshold"],
                     "n_pairs": r["n_pairs"], "n_evaluated": r["n_evaluated"], "n_errors": r["n_errors"],
                     "n_flipped": len(r["flipped"]) if "flipped" in r else None,
                     **{f"label_{k}": v for k, v in r["label_counts"].items()}, "random_weights": r["random_weights"]})
    return rows


def compare_table(doc: dict[str, Any]) -> str:
    lines = [f"PickScore per model on {doc['generations']} ({doc['n_prompts']} prompts; a prompt's value: "
             f"{'its best image' if doc['per_prompt'] == 'best' else 'the mean of its images'}; "
             f"{doc['backend']}/{doc['precision']})"]
    if doc["random_weights"]:
        lines.append("RANDOM WEIGHTS: these scores are meaningless")
    lines.append(f"{'model':<24} {'mean score':>10}  {'95% CI':<20} {'prompts':>7}  {'images':>6}  {'missing':>7}")
    for m in doc["models"]:
        lines.append(f"{m['model']:<24} {_num(m['mean_score']):>10}  {_ci(m['mean_score_ci95']):<20} {m['n_prompts']:>7}  "
                     f"{m['n_images']:>6}  {len(m['missing']):>7}")
    if doc["win_rates"]:
        lines.append(f"{'win rate':<24} {'':>10}  {'95% CI':<20} {'prompts':>7}")
        for w in doc["win_rates"]:
            lines.append(f"{w['model'] + ' > ' + w['versus']:<24} {_num(w['win_rate']):>10}  {_ci(w['win_rate_ci95']):<20} "
                         f"{w['n_prompts']:>7}")
    missing = [f"{m['model']}: {x['why']} for {x['prompt']!r}" + (f" (prompt id {x['prompt_id']})" if "prompt_id" in x else "")
               for m in doc["models"] for x in m["missing"]]
    if missing:
        lines.append(f"no usable image ({len(missing)}):")
        _listed(lines, missing, "(model, prompt) pairs")
    if doc["errors"]:
        lines.append(f"not scored ({len(doc['errors'])}):")
        _listed(lines, [e["error"] if e["error"].startswith(("row ", "line ")) else
                        f"row {e['row']} ({e['model']}{'' if str(e['image']).startswith('row ') else ', ' + str(e['image'])}): "
                        f"{e['error']}" for e in doc["errors"]], "rows")
    return "\n".join(lines)


def compare_csv_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model (its mean) and one per pair of models (the first's win rate over the second)."""
    rows = []
    for m in doc["models"]:
        ci = m["mean_score_ci95"] or [None, None]
        rows.append({"kind": "mean", "model": m["model"], "versus": None, "value": m["mean_score"], "ci95_low": ci[0],
                     "ci95_high": ci[1], "n_prompts": m["n_prompts"], "n_images": m["n_images"], "n_missing": len(m["missing"])})
    for w in doc["win_rates"]:
        ci = w["win_rate_ci95"] or [None, None]
        rows.append({"kind": "win_rate", "model": w["model"], "versus": w["versus"], "value": w["win_rate"],
                     "ci95_low": ci[0], "ci95_high": ci[1], "n_prompts": w["n_prompts"], "n_images": None, "n_missing": None})
    return rows


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """The rows as CSV, written atomically (durable.atomic_write): a report is small."""
    from pathlib import Path

    from ..durable import atomic_write

    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(Path(path), [text.getvalue().encode("utf-8")])
