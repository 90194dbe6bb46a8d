"""Gate v3: what users of each precision care about, measured against the fp32 PyTorch reference, as a
report (numbers, each gated one with its margin) and a verdict (the failures against models/<model>.json
tolerances).

Per prompt, over every pair of its images:
- non-finite outputs: any NaN or Inf score, probability or embedding is a failure (gated at 0). Every
  statistic below is NaN-safe: a NaN makes it NaN (never silently dropped by an ordering of `max`), and a
  NaN statistic fails its check;
- max |Δscore|, max |Δprob|, embedding cosines: how far the numbers move;
- resolved pairs: each precision declares a *resolution*, the smallest reference score gap it promises to
  order. Pairwise order agreement is gated on pairs at least that far apart; closer pairs are coin flips
  under any perturbation of the precision's size (a different CPU's int8 kernels, say), so they are
  reported (count, agreement), not gated. v2 gated all pairs, and its verdict moved with the CPU;
- decisive pairs: pairs whose reference gap is at least the precision's score tolerance. None may flip;
- best-of-N: top-1 agreement over prompts whose reference top-2 gap is at least the tolerance (must be
  1.0), and the regret (the reference score of the reference's best minus that of the precision's best),
  whose maximum is gated;
- reported only: Spearman per prompt, all-pairs order agreement (v2's gated number), and whole-ranking
  identity (fp32 keeps it as its gate; no approximate precision can when images are ~1e-3 apart).

`stability` reports how far the verdict could move: over resampled verify sets (bootstrap), and with the
runtime's scores moved again by their own error (what a different CPU's kernels could do). A verdict
that a few pairs can flip shows up there.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from pickscore_runtime.results import softmax

from pickscore_runtime.gate_records import GATE_VERSION  # noqa: E402  (one number for export and runtime)
BOOTSTRAP_RESAMPLES = 200

ScoresAndProbs = tuple[np.ndarray, np.ndarray]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))


def nan_safe_max(values: np.ndarray, default: float = float("nan")) -> float:
    """max that is NaN whenever any value is NaN, whatever the order (Python's max is not)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.max()) if values.size else default


def nan_safe_min(values: np.ndarray, default: float = float("nan")) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(values.min()) if values.size else default


def _ranks(x: np.ndarray) -> np.ndarray:
    out = np.empty(len(x))
    out[np.argsort(x, kind="stable")] = np.arange(len(x))
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 1.0 if np.array_equal(ra, rb) else 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def count_nonfinite(*arrays: np.ndarray) -> int:
    return int(sum(np.size(a) - np.isfinite(a).sum() for a in arrays))


def compare_scores(ref: Sequence[ScoresAndProbs], got: Sequence[ScoresAndProbs], score_tolerance: float,
                   resolution: float = 0.0) -> dict[str, Any]:
    """Per-prompt (scores, probs) of the reference and of the runtime -> the gate's numbers. Pairs whose
    reference gap is below `resolution` are reported, not gated (see the module docstring)."""
    score_diffs, prob_diffs, same_rank, same_top1, spearmans, regrets, gaps, spreads = [], [], [], [], [], [], [], []
    pairs = agree = resolved = resolved_agree = decisive = flips = 0
    decisive_prompts = decisive_top1 = 0
    nonfinite = 0
    for (r_scores, r_probs), (g_scores, g_probs) in zip(ref, got):
        r_scores, g_scores = np.asarray(r_scores, np.float64), np.asarray(g_scores, np.float64)
        r_probs, g_probs = np.asarray(r_probs, np.float64), np.asarray(g_probs, np.float64)
        nonfinite += count_nonfinite(g_scores, g_probs)
        score_diffs.append(np.abs(r_scores - g_scores))
        prob_diffs.append(np.abs(r_probs - g_probs))
        same_rank.append(bool(np.isfinite(g_scores).all()
                              and np.array_equal(np.argsort(-r_scores, kind="stable"), np.argsort(-g_scores, kind="stable"))))
        best_ref = int(np.argmax(r_scores))
        best_got = int(np.argmax(g_scores))  # NaN counts as the maximum: a NaN'd image is the precision's pick
        same_top1.append(best_ref == best_got)
        regrets.append(float(r_scores[best_ref] - r_scores[best_got]) if np.isfinite(g_scores).all() else float("nan"))
        if len(r_scores) < 2:
            continue
        upper = np.triu_indices(len(r_scores), 1)
        r_gap = (r_scores[:, None] - r_scores[None, :])[upper]
        g_gap = (g_scores[:, None] - g_scores[None, :])[upper]
        same = np.sign(r_gap) == np.sign(g_gap)  # a NaN gap never agrees
        big = np.abs(r_gap) >= score_tolerance
        apart = np.abs(r_gap) >= resolution
        pairs, agree = pairs + len(r_gap), agree + int(same.sum())
        resolved, resolved_agree = resolved + int(apart.sum()), resolved_agree + int((apart & same).sum())
        decisive, flips = decisive + int(big.sum()), flips + int((big & ~same).sum())
        top2 = np.sort(r_scores)[-2:]
        if top2[1] - top2[0] >= score_tolerance:
            decisive_prompts += 1
            decisive_top1 += best_ref == best_got
        spearmans.append(spearman(r_scores, g_scores))
        gaps.append(float(np.diff(np.sort(r_scores)).min()))
        spreads.append(float(r_scores.max() - r_scores.min()))
    all_score_diffs = np.concatenate(score_diffs) if score_diffs else np.zeros(0)
    close = pairs - resolved
    return {
        "nonfinite_outputs": nonfinite,  # verify adds the embeddings' count
        "max_abs_score_diff": nan_safe_max(all_score_diffs),
        "mean_abs_score_diff": float(all_score_diffs.mean()) if all_score_diffs.size else float("nan"),
        "max_abs_prob_diff": nan_safe_max(np.concatenate(prob_diffs) if prob_diffs else np.zeros(0)),
        "score_resolution": resolution,
        "n_resolved_pairs": resolved,
        "resolved_pair_agreement": resolved_agree / resolved if resolved else 1.0,
        "n_close_pairs": close,  # closer than the resolution: reported, not gated
        "close_pair_agreement": (agree - resolved_agree) / close if close else 1.0,
        "pairwise_order_agreement": agree / pairs if pairs else 1.0,  # all pairs (gate v2's number)
        "n_pairs": pairs,
        "n_decisive_pairs": decisive,
        "decisive_pair_flips": flips,
        "n_decisive_prompts": decisive_prompts,
        "decisive_top1_agreement": decisive_top1 / decisive_prompts if decisive_prompts else 1.0,
        "best_of_n_regret_mean": float(np.mean(regrets)) if regrets else float("nan"),
        "best_of_n_regret_max": nan_safe_max(np.array(regrets)),
        "spearman_mean": float(np.mean(spearmans)) if spearmans else 1.0,
        "spearman_min": nan_safe_min(np.array(spearmans), 1.0),
        "rank_agreement": float(np.mean(same_rank)),  # the whole ranking identical, per prompt
        "top1_agreement": float(np.mean(same_top1)),
        # How far apart the reference's scores for one prompt are: a whole ranking can only be identical
        # when the smallest gap between two images exceeds about twice the score error.
        "min_reference_score_gap": min(gaps, default=float("nan")),
        "median_reference_score_spread": float(np.median(spreads)) if spreads else float("nan"),
    }


# (report key, tolerance key, how the value must relate to the tolerance, the pair count it is a fraction of)
CHECKS = (
    ("nonfinite_outputs", "max_nonfinite_outputs", "<=", None),
    ("max_abs_score_diff", "max_abs_score_diff", "<=", None),
    ("max_abs_prob_diff", "max_abs_prob_diff", "<=", None),
    ("resolved_pair_agreement", "min_resolved_pair_agreement", ">=", "n_resolved_pairs"),
    ("pairwise_order_agreement", "min_pairwise_order_agreement", ">=", "n_pairs"),
    ("decisive_pair_flips", "max_decisive_pair_flips", "<=", None),
    ("decisive_top1_agreement", "min_decisive_top1_agreement", ">=", "n_decisive_prompts"),
    ("best_of_n_regret_max", "max_best_of_n_regret", "<=", None),
    ("rank_agreement", "min_rank_agreement", ">=", "n_prompts"),
)


def gated_checks(tolerances: dict[str, Any]):
    """The CHECKS whose tolerance is set (null = reported, not gated)."""
    return [c for c in CHECKS if tolerances.get(c[1]) is not None]


def check_passes(value: float, relation: str, limit: float) -> bool:
    if not math.isfinite(value):
        return False
    return value <= limit if relation == "<=" else value >= limit


def failures(report: dict[str, Any], tolerances: dict[str, Any]) -> list[str]:
    """Each gated number outside its tolerance (or not a number), as a sentence."""
    out = []
    for key, tol_key, relation, _ in gated_checks(tolerances):
        limit, value = tolerances[tol_key], report[key]
        if not check_passes(value, relation, limit):
            text = f"{key.replace('_', ' ')} {value:.4g} {'>' if relation == '<=' else '<'} {limit}"
            if key == "nonfinite_outputs" and report.get("nonfinite_items"):
                text += " (" + "; ".join(report["nonfinite_items"][:8]) + ")"
            out.append(text)
    return out


def margins(report: dict[str, Any], tolerances: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per gated statistic: its limit, the distance to it (positive = inside), and for an agreement over
    pairs or prompts how many more would have to disagree before it fails."""
    out = {}
    for key, tol_key, relation, count_key in gated_checks(tolerances):
        limit, value = tolerances[tol_key], report[key]
        distance = (limit - value) if relation == "<=" else (value - limit)
        entry: dict[str, Any] = {"value": value, "limit": limit, "margin": distance if math.isfinite(distance) else None}
        if count_key is not None and report.get(count_key):
            n = report[count_key]
            allowed = math.floor((1.0 - limit) * n + 1e-9)  # disagreements that still pass
            entry["disagreeing"] = int(round((1.0 - value) * n)) if math.isfinite(value) else None
            entry["more_to_fail"] = allowed - entry["disagreeing"] + 1 if entry["disagreeing"] is not None else 0
        out[key] = entry
    return out


def stability(ref_scores: np.ndarray, got_scores: np.ndarray, tolerances: dict[str, Any],
              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """How far the verdict on score matrices [prompts, images] could move, two ways:

    - `bootstrap`: the verify set resampled (prompts and images, with replacement): per gated statistic its
      5th, 50th and 95th percentile and how often that check passes, and how often the whole verdict does;
    - `redrawn`: the precision's error drawn again, of the same size but on other images (its columns
      permuted): what another CPU's kernels give (AVX2 vs AVX-512 VNNI int8 moved v2's verdict this way:
      errors as large, on other pairs). A verdict that holds here does not depend on the CPU;
    - `doubled`: that error added on top of this one: a CPU differing from this one as much as this one
      differs from the reference. Reported as the worst case.
    """
    rng = np.random.default_rng(seed)
    n_prompts, n_images = ref_scores.shape
    error = got_scores - ref_scores

    def bootstrap_case() -> tuple[np.ndarray, np.ndarray]:
        p = rng.integers(0, n_prompts, n_prompts)
        i = np.sort(rng.integers(0, n_images, n_images))
        return ref_scores[np.ix_(p, i)], got_scores[np.ix_(p, i)]

    def redrawn_case() -> tuple[np.ndarray, np.ndarray]:
        return ref_scores, ref_scores + error[:, rng.permutation(n_images)]

    def doubled_case() -> tuple[np.ndarray, np.ndarray]:
        return ref_scores, got_scores + error[:, rng.permutation(n_images)]

    return {"resamples": resamples, "bootstrap": _verdict_spread(bootstrap_case, tolerances, resamples),
            "redrawn": _verdict_spread(redrawn_case, tolerances, resamples),
            "doubled": _verdict_spread(doubled_case, tolerances, resamples)}


def _verdict_spread(draw, tolerances: dict[str, Any], resamples: int) -> dict[str, Any]:
    checks = gated_checks(tolerances)
    values: dict[str, list[float]] = {c[0]: [] for c in checks}
    passes = 0
    for _ in range(resamples):
        ref_matrix, got_matrix = draw()
        ref = [(r, softmax(r)) for r in ref_matrix.astype(np.float32)]
        got = [(g, softmax(g)) for g in got_matrix.astype(np.float32)]
        report = compare_scores(ref, got, tolerances["max_abs_score_diff"], tolerances.get("score_resolution") or 0.0)
        ok = True
        for key, tol_key, relation, _ in checks:
            values[key].append(report[key])
            ok &= check_passes(report[key], relation, tolerances[tol_key])
        passes += ok
    out: dict[str, Any] = {"verdict_pass_rate": passes / resamples, "checks": {}}
    for key, tol_key, relation, _ in checks:
        v = np.array(values[key], np.float64)
        finite = v[np.isfinite(v)]
        out["checks"][key] = {
            **{f"p{q:02d}": float(np.percentile(finite, q)) if finite.size else None for q in (5, 50, 95)},
            "pass_rate": float(np.mean([check_passes(x, relation, tolerances[tol_key]) for x in v])),
        }
    return out
