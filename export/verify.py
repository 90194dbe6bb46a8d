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
from pickscore_runtime.scorer import scores_and_probs

from .reference import Reference
from .samples import PROMPTS, write_images
from .source import ModelSource

log = logging.getLogger("pickscore")


def source_from_manifest(manifest: dict[str, Any]) -> ModelSource:
    src = manifest["model"]["source"]
    random = src.get("random_init")
    return ModelSource(
        model=src.get("path") or src["model"], random_init=bool(random), seed=int(random["seed"]) if random else 0,
        revision=src.get("revision") if src.get("kind") == "hub" else None,
    )


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
    with tempfile.TemporaryDirectory(prefix="pickscore-verify-") as tmp:
        paths = (write_images(Path(tmp)) if builtin_images else []) + [Path(p) for p in images]
        for i, p in enumerate(paths):  # a bad user image is named now, not deep inside the reference
            open_image(p, image_name(str(p), i))
        progress(f"runtime: {len(prompts)} prompts x {len(paths)} images")
        t0 = time.perf_counter()
        scorer = PickScorer.load(artifacts_dir, backend=backend, precision=precision)
        exported = source_from_manifest(scorer.artifacts.manifest)
        if source is None:
            source = exported
        check_same_model(source, exported)
        rt_text, rt_img = scorer.embed_text(prompts), scorer.embed_images([str(p) for p in paths])
        scale, random_weights = scorer.artifacts.logit_scale_exp, scorer.random_weights
        used_backend, used_precision = scorer.backend.name, scorer.backend.precision
        del scorer
        gc.collect()
        t_runtime = time.perf_counter() - t0

        progress("reference: transformers CLIPModel, model card code path, fp32")
        t0 = time.perf_counter()
        ref = Reference(source)
        ref_text, ref_img = ref.text_embeddings(prompts), ref.image_embeddings(paths)
        t_reference = time.perf_counter() - t0

        score_diff, prob_diff, same_rank, min_gap = [], [], [], np.inf
        for i in range(len(prompts)):
            ref_scores, ref_probs = ref.calc_probs(ref_text[i], ref_img)
            rt_scores, rt_probs = scores_and_probs(scale, rt_text[i], rt_img)
            score_diff.append(np.abs(ref_scores - rt_scores).max())
            prob_diff.append(np.abs(ref_probs - rt_probs).max())
            same_rank.append(bool(np.array_equal(np.argsort(-ref_scores, kind="stable"), np.argsort(-rt_scores, kind="stable"))))
            if len(ref_scores) > 1:
                min_gap = min(min_gap, float(np.diff(np.sort(ref_scores)).min()))

    tol = model_info()["tolerances"][used_precision]
    report = {
        "passed": None,
        "backend": used_backend,
        "precision": used_precision,
        "random_weights": random_weights,
        "n_prompts": len(prompts),
        "n_images": len(paths),
        "max_abs_score_diff": float(max(score_diff)),
        "max_abs_prob_diff": float(max(prob_diff)),
        "rank_agreement": float(np.mean(same_rank)),
        "min_cosine_text": float(cosine_rows(ref_text, rt_text).min()),
        "min_cosine_image": float(cosine_rows(ref_img, rt_img).min()),
        "max_abs_text_embed_diff": float(np.abs(ref_text - rt_text).max()),
        "max_abs_image_embed_diff": float(np.abs(ref_img - rt_img).max()),
        # How far apart the reference's scores for one prompt are: rank agreement means little if this is ~0.
        "min_reference_score_gap": min_gap,
        "logit_scale_exp": float(scale),
        "tolerances": tol,
        "seconds": {"runtime": round(t_runtime, 1), "reference": round(t_reference, 1)},
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
