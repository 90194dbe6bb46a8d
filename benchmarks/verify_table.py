"""A markdown table of gate v2 reports (`pickscore verify --output`), one column per (weights, precision).

    python benchmarks/verify_table.py benchmarks/results/verify_full_plain.json benchmarks/results/verify_full_stress.json
"""

from __future__ import annotations

import json
import sys

ROWS = [
    ("max abs Δscore", "max_abs_score_diff", ".3g"), ("mean abs Δscore", "mean_abs_score_diff", ".3g"),
    ("max abs Δprob", "max_abs_prob_diff", ".3g"), ("min cosine image", "min_cosine_image", ".6f"),
    ("min cosine text", "min_cosine_text", ".6f"), ("pairwise order agreement", "pairwise_order_agreement", ".4f"),
    ("decisive pairs / flipped", ("n_decisive_pairs", "decisive_pair_flips"), "d"),
    ("decisive prompts / best-of-N top-1", ("n_decisive_prompts", "decisive_top1_agreement"), "g"),
    ("best-of-N regret mean / max", ("best_of_n_regret_mean", "best_of_n_regret_max"), ".3g"),
    ("Spearman mean (reported)", "spearman_mean", ".4f"), ("whole ranking identical (reported)", "rank_agreement", ".3f"),
    ("reference: smallest gap / median spread", ("min_reference_score_gap", "median_reference_score_spread"), ".3g"),
]


def cell(report: dict, key, fmt: str) -> str:
    if isinstance(key, tuple):
        return " / ".join(format(report[k], fmt) for k in key)
    return format(report[key], fmt)


def table(reports: list[dict]) -> str:
    head = [f"{r['weights']} {r['precision']}" for r in reports]
    lines = ["| | " + " | ".join(head) + " |", "|---|" + "---|" * len(reports)]
    lines += [f"| {label} | " + " | ".join(cell(r, key, fmt) for r in reports) + " |" for label, key, fmt in ROWS]
    lines.append("| **gate v2** | " + " | ".join("**passes**" if r["passed"] else "**fails**: " + "; ".join(r["failures"])
                                             for r in reports) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    reports = [r for path in sys.argv[1:] for r in (lambda d: d if isinstance(d, list) else [d])(json.load(open(path)))]
    print(table(reports))
