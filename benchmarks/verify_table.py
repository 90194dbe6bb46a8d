"""A markdown table of gate v3 reports (`pickscore verify --output`), one column per (weights, precision).

    python benchmarks/verify_table.py benchmarks/results/2026-12-06-avx2/verify_full_plain.json \
        benchmarks/results/2026-12-06-avx2/verify_full_stress.json
"""

from __future__ import annotations

import json
import sys

ROWS = [
    ("max abs Δscore", "max_abs_score_diff", ".3g"), ("mean abs Δscore", "mean_abs_score_diff", ".3g"),
    ("max abs Δprob", "max_abs_prob_diff", ".3g"), ("min cosine image", "min_cosine_image", ".6f"),
    ("min cosine text", "min_cosine_text", ".6f"), ("non-finite outputs", "nonfinite_outputs", "d"),
    ("score resolution", "score_resolution", "g"),
    ("resolved pairs / agreement", ("n_resolved_pairs", "resolved_pair_agreement"), ".4g"),
    ("closer pairs / agreement (reported)", ("n_close_pairs", "close_pair_agreement"), ".4g"),
    ("all-pairs order agreement (reported; gate v2's)", "pairwise_order_agreement", ".4f"),
    ("decisive pairs / flipped", ("n_decisive_pairs", "decisive_pair_flips"), "d"),
    ("decisive prompts / best-of-N top-1", ("n_decisive_prompts", "decisive_top1_agreement"), "g"),
    ("best-of-N regret mean / max", ("best_of_n_regret_mean", "best_of_n_regret_max"), ".3g"),
    ("Spearman mean (reported)", "spearman_mean", ".4f"), ("whole ranking identical (reported)", "rank_agreement", ".3f"),
    ("reference: smallest gap / median spread", ("min_reference_score_gap", "median_reference_score_spread"), ".3g"),
]


def cell(report: dict, key, fmt: str) -> str:
    if isinstance(key, tuple):
        return " / ".join(value(report[k], fmt) for k in key)
    return value(report[key], fmt)


def value(x, fmt: str) -> str:
    return "null (not finite)" if x is None else format(x, fmt)


def stability_cell(report: dict) -> str:
    s = report["stability"]
    return " / ".join(f"{s[k]['verdict_pass_rate']:.2f}" for k in ("bootstrap", "redrawn", "doubled"))


def table(reports: list[dict]) -> str:
    head = [f"{r['weights']} {r['precision']}" for r in reports]
    lines = ["| | " + " | ".join(head) + " |", "|---|" + "---|" * len(reports)]
    lines += [f"| {label} | " + " | ".join(cell(r, key, fmt) for r in reports) + " |" for label, key, fmt in ROWS]
    lines.append("| verdict pass rate: resampled sets / error redrawn (another CPU) / error doubled | "
                 + " | ".join(stability_cell(r) for r in reports) + " |")
    lines.append("| **gate v3** | " + " | ".join("**passes**" if r["passed"] else "**fails**: " + "; ".join(r["failures"])
                                             for r in reports) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    reports = [r for path in sys.argv[1:] for r in (lambda d: d if isinstance(d, list) else [d])(json.load(open(path)))]
    print(table(reports))
