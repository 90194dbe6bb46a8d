"""`pickscore verify`: the numerics gate. Runs the runtime and the PyTorch reference on the same
prompts x images and fails when they differ by more than the precision's tolerances in models/."""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pickscore_models import model_info
from pickscore_runtime import PickScorer
from pickscore_runtime.errors import PickScoreError
from pickscore_runtime.images import image_name, open_image
from pickscore_runtime.results import scores_and_probs

from .reference import Reference
from .samples import PROMPTS, write_images
from .source import ModelSource

log = logging.getLogger("pickscore")


def check_same_model(given: ModelSource, exported: ModelSource) -> None:
    if given.random_init != exported.random_init or (given.random_init and given.seed != exported.seed):
        what = lambda s: f"random weights, seed {s.seed}" if s.random_init else "trained weights"  # noqa: E731
        raise PickScoreError(
            f"the artifacts were exported with {what(exported)} but verify was asked to compare with {what(given)}; "
            "omit --model/--random-init/--seed to use the artifacts' own source"
        )


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))


def verify(artifacts_dir: str | Path, source: ModelSource | None = None, backend: str = "onnx-cpu",
           precision: str | None = None, images: Sequence[str | Path] = (), prompts: Sequence[str] = PROMPTS,
           builtin_images: bool = True, progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Compare the runtime on `artifacts_dir` with the reference; returns the report (report["passed"])."""
    return verify_precisions(artifacts_dir, [precision], source, backend, images, prompts, builtin_images, progress)[0]


def verify_precisions(artifacts_dir: str | Path, precisions: Sequence[str | None], source: ModelSource | None = None,
                      backend: str = "onnx-cpu", images: Sequence[str | Path] = (), prompts: Sequence[str] = PROMPTS,
                      builtin_images: bool = True, progress: Callable[[str], None] = log.info) -> list[dict[str, Any]]:
    """One report per precision; the PyTorch reference runs once for all of them."""
    with tempfile.TemporaryDirectory(prefix="pickscore-verify-") as tmp:
        paths = (write_images(Path(tmp)) if builtin_images else []) + [Path(p) for p in images]
        for i, p in enumerate(paths):  # a bad user image is named now, not deep inside the reference
            open_image(p, image_name(str(p), i))
        runs = []
        for precision in precisions:
            progress(f"runtime ({precision or 'default precision'}): {len(prompts)} prompts x {len(paths)} images")
            t0 = time.perf_counter()
            scorer = PickScorer.load(artifacts_dir, backend=backend, precision=precision)
            exported = ModelSource.from_manifest(scorer.artifacts.manifest)
            source = source or exported
            check_same_model(source, exported)
            runs.append({
                "text": scorer.embed_text(prompts), "image": scorer.embed_images([str(p) for p in paths]),
                "scale": scorer.artifacts.logit_scale_exp, "random_weights": scorer.random_weights,
                "backend": scorer.backend.name, "precision": scorer.backend.precision,
                "seconds": time.perf_counter() - t0,
            })
            scorer.close()
            del scorer
            gc.collect()

        progress("reference: transformers CLIPModel, model card code path, fp32")
        t0 = time.perf_counter()
        ref = Reference(source)
        ref_text, ref_img = ref.text_embeddings(prompts), ref.image_embeddings(paths)
        ref_scores = [ref.calc_probs(t, ref_img) for t in ref_text]
        t_reference = time.perf_counter() - t0
        del ref
        gc.collect()
    return [_report(run, ref_text, ref_img, ref_scores, t_reference, artifacts_dir, len(paths)) for run in runs]


def _report(run: dict, ref_text: np.ndarray, ref_img: np.ndarray, ref_scores: list, t_reference: float,
            artifacts_dir, n_images: int) -> dict[str, Any]:
    score_diff, prob_diff, same_rank, same_top1, pair_agree, gaps, spreads = [], [], [], [], [], [], []
    for i, (scores, probs) in enumerate(ref_scores):
        rt_scores, rt_probs = scores_and_probs(run["scale"], run["text"][i], run["image"])
        score_diff.append(np.abs(scores - rt_scores).max())
        prob_diff.append(np.abs(probs - rt_probs).max())
        same_rank.append(bool(np.array_equal(np.argsort(-scores, kind="stable"), np.argsort(-rt_scores, kind="stable"))))
        same_top1.append(int(np.argmax(scores)) == int(np.argmax(rt_scores)))
        if len(scores) > 1:
            upper = np.triu_indices(len(scores), 1)
            ref_order = np.sign(scores[:, None] - scores[None, :])[upper]
            pair_agree.append(float(np.mean(ref_order == np.sign(rt_scores[:, None] - rt_scores[None, :])[upper])))
            gaps.append(float(np.diff(np.sort(scores)).min()))
            spreads.append(float(scores.max() - scores.min()))
    tol = model_info()["tolerances"][run["precision"]]
    report = {
        "passed": None,
        "backend": run["backend"],
        "precision": run["precision"],
        "random_weights": run["random_weights"],
        "n_prompts": len(ref_scores),
        "n_images": n_images,
        "max_abs_score_diff": float(max(score_diff)),
        "max_abs_prob_diff": float(max(prob_diff)),
        "rank_agreement": float(np.mean(same_rank)),  # the gate: whole ranking identical, per prompt
        "top1_agreement": float(np.mean(same_top1)),  # informative: same preferred image
        "pairwise_order_agreement": float(np.mean(pair_agree)) if pair_agree else 1.0,  # informative: image pairs in the same order
        "min_cosine_text": float(cosine_rows(ref_text, run["text"]).min()),
        "min_cosine_image": float(cosine_rows(ref_img, run["image"]).min()),
        "max_abs_text_embed_diff": float(np.abs(ref_text - run["text"]).max()),
        "max_abs_image_embed_diff": float(np.abs(ref_img - run["image"]).max()),
        # How far apart the reference's scores for one prompt are: a whole ranking can only be identical
        # when the smallest gap between two images exceeds about twice the score error.
        "min_reference_score_gap": min(gaps, default=float("nan")),
        "median_reference_score_spread": float(np.median(spreads)) if spreads else float("nan"),
        "logit_scale_exp": float(run["scale"]),
        "tolerances": tol,
        "seconds": {"runtime": round(run["seconds"], 1), "reference": round(t_reference, 1)},
        "artifacts": str(artifacts_dir),
    }
    failures = [
        f"max |Δscore| {report['max_abs_score_diff']:.3g} > {tol['max_abs_score_diff']}" if report["max_abs_score_diff"] > tol["max_abs_score_diff"] else "",
        f"max |Δprob| {report['max_abs_prob_diff']:.3g} > {tol['max_abs_prob_diff']}" if report["max_abs_prob_diff"] > tol["max_abs_prob_diff"] else "",
        f"rank agreement {report['rank_agreement']:.3f} < {tol['min_rank_agreement']}" if report["rank_agreement"] < tol["min_rank_agreement"] else "",
    ]
    report["failures"] = [f for f in failures if f]
    report["passed"] = not report["failures"]
    return report
