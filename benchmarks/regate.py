"""Judge verify reports again from the raw scores they carry (gate v3 reports keep `scores`): with the
tolerances in models/ now, or another resolution, or on a subset of the verify set, without running the
towers or the reference again. What sized the verify set and chose the resolutions (docs/numerics.md).

    python benchmarks/regate.py REPORT.json [...] [--resolution R] [--limit A] [--subset PROMPTS,IMAGES]
        [--resamples N] [--json OUT] [--rewrite DIR]

--subset 9,18 judges the first 9 prompts x 18 images (gate v2's set) to compare with the whole set.
--rewrite DIR writes each report again, whole, judged by the tolerances in models/ now (its measured
numbers unchanged; `rejudged` says so): how a report made while the tolerances were chosen gets its
final verdict without running the towers again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pickscore_export import gate
from pickscore_models import model_info
from pickscore_runtime.results import softmax


def matrices(report: dict) -> tuple[np.ndarray, np.ndarray]:
    """The reference's and the runtime's scores [prompts, images] a report carries (null: not finite)."""
    ref = np.array(report["scores"]["reference"], np.float64)
    got = np.array([[np.nan if x is None else x for x in row] for row in report["scores"]["runtime"]], np.float64)
    return ref, got


def judge(ref: np.ndarray, got: np.ndarray, tol: dict) -> dict:
    pairs = lambda m: [(r, softmax(r)) for r in m.astype(np.float32)]  # noqa: E731
    numbers = gate.compare_scores(pairs(ref), pairs(got), tol["max_abs_score_diff"], tol["score_resolution"])
    numbers["n_prompts"] = ref.shape[0]
    return numbers


def regate(report: dict, resolution: float | None, limit: float | None, subset: tuple[int, int] | None,
           resamples: int) -> dict:
    tol = dict(model_info()["tolerances"][report["precision"]])
    if resolution is not None:
        tol["score_resolution"] = resolution
    if limit is not None:
        tol["min_resolved_pair_agreement"] = limit
    ref, got = matrices(report)
    if subset is not None:
        ref, got = ref[: subset[0], : subset[1]], got[: subset[0], : subset[1]]
    numbers = judge(ref, got, tol)
    error = got - ref
    upper = np.triu_indices(ref.shape[1], 1)
    pair_error = np.concatenate([(e[:, None] - e[None, :])[upper] for e in error])
    return {
        "source": report.get("artifacts"), "precision": report["precision"], "weights": report["weights"],
        "set": list(ref.shape), "tolerances": tol, "failures": gate.failures(numbers, tol),
        "pair_error_std": float(np.nanstd(pair_error)), "pair_error_p99": float(np.nanpercentile(np.abs(pair_error), 99)),
        **{k: numbers[k] for k in ("max_abs_score_diff", "mean_abs_score_diff", "n_resolved_pairs",
                                   "resolved_pair_agreement", "n_close_pairs", "close_pair_agreement",
                                   "pairwise_order_agreement", "decisive_pair_flips", "best_of_n_regret_max")},
        "margins": gate.margins(numbers, tol),
        "stability": gate.stability(ref, got, tol, resamples=resamples),
    }


TOLERANCE_DEPENDENT = ("score_resolution", "n_resolved_pairs", "resolved_pair_agreement", "n_close_pairs",
                       "close_pair_agreement", "n_decisive_pairs", "decisive_pair_flips", "n_decisive_prompts",
                       "decisive_top1_agreement")


def rejudged(report: dict) -> dict:
    """The whole report with every gate field recomputed from its scores under today's tolerances."""
    tol = model_info()["tolerances"][report["precision"]]
    ref, got = matrices(report)
    numbers = judge(ref, got, tol)
    # Only what the tolerances decide is recomputed; the measured statistics stay as measured (the stored
    # scores may be rounded to 1e-6).
    out = {**report, **{k: numbers[k] for k in TOLERANCE_DEPENDENT}, "gate_version": gate.GATE_VERSION, "tolerances": tol}
    out["failures"] = gate.failures(out, tol)
    out["passed"] = not out["failures"]
    out["margins"] = gate.margins(out, tol)
    out["stability"] = gate.stability(ref, got, tol)
    out["rejudged"] = {"by": "benchmarks/regate.py --rewrite", "tolerances_when_measured": report["tolerances"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--resolution", type=float, default=None, help="score resolution to judge with (default: models/)")
    ap.add_argument("--limit", type=float, default=None, help="min resolved pair agreement (default: models/)")
    ap.add_argument("--subset", default=None, help="PROMPTS,IMAGES: judge only the first ones")
    ap.add_argument("--resamples", type=int, default=gate.BOOTSTRAP_RESAMPLES)
    ap.add_argument("--json", dest="json_out", type=Path, default=None)
    ap.add_argument("--rewrite", type=Path, default=None, metavar="DIR", help="write the rejudged reports here")
    args = ap.parse_args()
    subset = tuple(int(x) for x in args.subset.split(",")) if args.subset else None
    rows = []
    for path in args.reports:
        doc = json.loads(path.read_text())
        if args.rewrite is not None:
            args.rewrite.mkdir(parents=True, exist_ok=True)
            new = [rejudged(r) for r in (doc if isinstance(doc, list) else [doc])]
            (args.rewrite / path.name).write_text(json.dumps(new if isinstance(doc, list) else new[0], indent=2) + "\n")
        for report in doc if isinstance(doc, list) else [doc]:
            if "scores" not in report:
                continue
            row = regate(report, args.resolution, args.limit, subset, args.resamples)
            rows.append(row)
            stab = row["stability"]
            print(f"{path.name} {row['precision']:>5} {row['weights']:>13} set {row['set']} resolution "
                  f"{row['tolerances']['score_resolution']}: resolved {row['n_resolved_pairs']} agree "
                  f"{row['resolved_pair_agreement']:.4f} (close {row['n_close_pairs']} agree {row['close_pair_agreement']:.3f}) "
                  f"pair-error std {row['pair_error_std']:.4f} p99 {row['pair_error_p99']:.4f} | "
                  f"{'PASS' if not row['failures'] else 'FAIL ' + '; '.join(row['failures'])} | bootstrap pass "
                  f"{stab['bootstrap']['verdict_pass_rate']:.3f}, redrawn {stab['redrawn']['verdict_pass_rate']:.3f}, "
                  f"doubled {stab['doubled']['verdict_pass_rate']:.3f}")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
