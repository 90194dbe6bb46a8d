"""Gate v2: what users of each precision care about, measured against the fp32 PyTorch reference, as a
report (numbers) and a verdict (the failures against models/<model>.json tolerances).

Per prompt, over every pair of its images:
- max |Δscore|, max |Δprob|, embedding cosines: how far the numbers move;
- pairwise order agreement: the fraction of image pairs ordered as the reference orders them;
- decisive pairs: pairs whose reference gap is at least the precision's score tolerance. A precision
  that flips one of them changed a preference it had no licence to change: none may flip;
- best-of-N: top-1 agreement over prompts whose reference top-2 gap is at least the tolerance (must be
  1.0), and the regret (the reference score of the reference's best minus that of the precision's best);
- reported only: Spearman per prompt, and whole-ranking identity (which fp32 keeps as its gate; no
  approximate precision can meet it when the reference's closest images are ~1e-3 apart).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))


def _ranks(x: np.ndarray) -> np.ndarray:
    out = np.empty(len(x))
    out[np.argsort(x, kind="stable")] = np.arange(len(x))
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 1.0 if np.array_equal(ra, rb) else 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def compare_scores(ref: Sequence[tuple[np.ndarray, np.ndarray]], got: Sequence[tuple[np.ndarray, np.ndarray]],
                   score_tolerance: float) -> dict[str, Any]:
    """Per-prompt (scores, probs) of the reference and of the runtime -> the gate's numbers."""
    score_diff, all_diffs, prob_diff, same_rank, same_top1, spearmans, regrets, gaps, spreads = [], [], [], [], [], [], [], [], []
    pairs = agree = decisive = flips = 0
    decisive_prompts = decisive_top1 = 0
    for (r_scores, r_probs), (g_scores, g_probs) in zip(ref, got):
        r_scores, g_scores = r_scores.astype(np.float64), g_scores.astype(np.float64)
        all_diffs += np.abs(r_scores - g_scores).tolist()
        score_diff.append(np.abs(r_scores - g_scores).max())
        prob_diff.append(np.abs(r_probs - g_probs).max())
        same_rank.append(bool(np.array_equal(np.argsort(-r_scores, kind="stable"), np.argsort(-g_scores, kind="stable"))))
        best_ref, best_got = int(np.argmax(r_scores)), int(np.argmax(g_scores))
        same_top1.append(best_ref == best_got)
        regrets.append(float(r_scores[best_ref] - r_scores[best_got]))
        if len(r_scores) < 2:
            continue
        upper = np.triu_indices(len(r_scores), 1)
        r_gap = (r_scores[:, None] - r_scores[None, :])[upper]
        g_gap = (g_scores[:, None] - g_scores[None, :])[upper]
        same = np.sign(r_gap) == np.sign(g_gap)
        big = np.abs(r_gap) >= score_tolerance
        pairs, agree = pairs + len(r_gap), agree + int(same.sum())
        decisive, flips = decisive + int(big.sum()), flips + int((big & ~same).sum())
        top2 = np.sort(r_scores)[-2:]
        if top2[1] - top2[0] >= score_tolerance:
            decisive_prompts += 1
            decisive_top1 += best_ref == best_got
        spearmans.append(spearman(r_scores, g_scores))
        gaps.append(float(np.diff(np.sort(r_scores)).min()))
        spreads.append(float(r_scores.max() - r_scores.min()))
    return {
        "max_abs_score_diff": float(max(score_diff)),
        "mean_abs_score_diff": float(np.mean(all_diffs)),  # over every prompt x image
        "max_abs_prob_diff": float(max(prob_diff)),
        "pairwise_order_agreement": agree / pairs if pairs else 1.0,
        "n_pairs": pairs,
        "n_decisive_pairs": decisive,
        "decisive_pair_flips": flips,
        "n_decisive_prompts": decisive_prompts,
        "decisive_top1_agreement": decisive_top1 / decisive_prompts if decisive_prompts else 1.0,
        "best_of_n_regret_mean": float(np.mean(regrets)),
        "best_of_n_regret_max": float(max(regrets)),
        "spearman_mean": float(np.mean(spearmans)) if spearmans else 1.0,
        "spearman_min": float(min(spearmans)) if spearmans else 1.0,
        "rank_agreement": float(np.mean(same_rank)),  # the whole ranking identical, per prompt
        "top1_agreement": float(np.mean(same_top1)),
        # How far apart the reference's scores for one prompt are: a whole ranking can only be identical
        # when the smallest gap between two images exceeds about twice the score error.
        "min_reference_score_gap": min(gaps, default=float("nan")),
        "median_reference_score_spread": float(np.median(spreads)) if spreads else float("nan"),
    }


# (report key, tolerance key, how the value must relate to the tolerance)
CHECKS = (
    ("max_abs_score_diff", "max_abs_score_diff", "<="),
    ("max_abs_prob_diff", "max_abs_prob_diff", "<="),
    ("pairwise_order_agreement", "min_pairwise_order_agreement", ">="),
    ("decisive_pair_flips", "max_decisive_pair_flips", "<="),
    ("decisive_top1_agreement", "min_decisive_top1_agreement", ">="),
    ("rank_agreement", "min_rank_agreement", ">="),
)


def failures(report: dict[str, Any], tolerances: dict[str, Any]) -> list[str]:
    """Each gated number outside its tolerance, as a sentence; a tolerance that is null is not gated."""
    out = []
    for key, tol_key, relation in CHECKS:
        limit = tolerances.get(tol_key)
        if limit is None:
            continue
        value = report[key]
        if (relation == "<=" and value > limit) or (relation == ">=" and value < limit):
            out.append(f"{key.replace('_', ' ')} {value:.4g} {'>' if relation == '<=' else '<'} {limit}")
    return out
