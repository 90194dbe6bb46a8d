"""`pickscore verify`: the numerics gate. Runs the runtime and the PyTorch reference on the same
prompts x images and fails when they differ by more than the precision's tolerances in models/
(gate v2: see gate.py for what is measured and why)."""

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
from pickscore_runtime.bench import machine_info
from pickscore_runtime.errors import PickScoreError
from pickscore_runtime.images import image_name, open_image
from pickscore_runtime.results import scores_and_probs

from . import gate
from .reference import Reference
from .samples import PROMPTS, write_images
from .source import ModelSource

log = logging.getLogger("pickscore")


def check_same_model(given: ModelSource, exported: ModelSource) -> None:
    if given.random_init != exported.random_init or (given.random_init and (given.seed, given.stress) != (exported.seed, exported.stress)):
        what = lambda s: f"{s.weights_kind} weights, seed {s.seed}" if s.random_init else "trained weights"  # noqa: E731
        raise PickScoreError(
            f"the artifacts were exported with {what(exported)} but verify was asked to compare with {what(given)}; "
            "omit --model/--random-init/--seed to use the artifacts' own source"
        )


def verify(artifacts_dir: str | Path, source: ModelSource | None = None, backend: str = "onnx-cpu",
           precision: str | None = None, images: Sequence[str | Path] = (), prompts: Sequence[str] = PROMPTS,
           builtin_images: bool = True, progress: Callable[[str], None] = log.info,
           reference_device: str = "cpu") -> dict[str, Any]:
    """Compare the runtime on `artifacts_dir` with the reference; returns the report (report["passed"])."""
    return verify_precisions(artifacts_dir, [precision], source, backend, images, prompts, builtin_images, progress,
                             reference_device)[0]


def verify_precisions(artifacts_dir: str | Path, precisions: Sequence[str | None], source: ModelSource | None = None,
                      backend: str = "onnx-cpu", images: Sequence[str | Path] = (), prompts: Sequence[str] = PROMPTS,
                      builtin_images: bool = True, progress: Callable[[str], None] = log.info,
                      reference_device: str = "cpu") -> list[dict[str, Any]]:
    """One report per precision; the PyTorch reference runs once for all of them, fp32, on
    `reference_device` ("cuda": on the GPU with TF32 off)."""
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

        progress(f"reference: transformers CLIPModel, model card code path, fp32 on {reference_device}")
        t0 = time.perf_counter()
        ref = Reference(source, device=reference_device)
        ref_text, ref_img = ref.text_embeddings(prompts), ref.image_embeddings(paths)
        ref_scores = [ref.calc_probs(t, ref_img) for t in ref_text]
        t_reference = time.perf_counter() - t0
        del ref
        gc.collect()
    reports = [_report(run, ref_text, ref_img, ref_scores, t_reference, artifacts_dir, len(paths), source.weights_kind)
               for run in runs]
    machine = machine_info(None)  # which CPU ran it: int8 kernels differ with and without AVX-512 VNNI
    for report in reports:
        report["reference_device"] = reference_device
        report["machine"] = machine
    return reports


def _report(run: dict, ref_text: np.ndarray, ref_img: np.ndarray, ref_scores: list, t_reference: float,
            artifacts_dir, n_images: int, weights: str) -> dict[str, Any]:
    tol = model_info()["tolerances"][run["precision"]]
    got = [scores_and_probs(run["scale"], text, run["image"]) for text in run["text"]]
    report = {
        "passed": None,
        "gate_version": 2,
        "backend": run["backend"],
        "precision": run["precision"],
        "random_weights": run["random_weights"],
        "weights": weights,
        "n_prompts": len(ref_scores),
        "n_images": n_images,
        **gate.compare_scores(ref_scores, got, tol["max_abs_score_diff"]),
        "min_cosine_text": float(gate.cosine_rows(ref_text, run["text"]).min()),
        "min_cosine_image": float(gate.cosine_rows(ref_img, run["image"]).min()),
        "max_abs_text_embed_diff": float(np.abs(ref_text - run["text"]).max()),
        "max_abs_image_embed_diff": float(np.abs(ref_img - run["image"]).max()),
        "logit_scale_exp": float(run["scale"]),
        "tolerances": tol,
        "seconds": {"runtime": round(run["seconds"], 1), "reference": round(t_reference, 1)},
        "artifacts": str(artifacts_dir),
    }
    report["failures"] = gate.failures(report, tol)
    report["passed"] = not report["failures"]
    return report
