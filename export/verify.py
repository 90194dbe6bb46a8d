"""`pickscore verify`: the numerics gate. Runs the runtime and the PyTorch reference on the same
prompts x images and fails when they differ by more than the precision's tolerances in models/
(gate v3: see gate.py for what is measured and why).

The runtime's raw embeddings are judged, not its results: a tower that emits NaN must fail the gate,
naming the image or prompt, where the scoring path would have turned it into an error row."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pickscore_models import model_info
from pickscore_runtime import PickScorer
from pickscore_runtime.artifacts import package_versions, sha256_file
from pickscore_runtime.backends.base import effective_precision
from pickscore_runtime.machine import machine_info
from pickscore_runtime.durable import atomic_write
from pickscore_runtime.errors import PickScoreError
from pickscore_runtime.images import image_name, open_image
from pickscore_runtime.results import RandomWeightsWarning, finite_rows, scores_and_probs

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
           reference_device: str = "cpu", reference_cache: str | Path | None = None,
           backend_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Compare the runtime on `artifacts_dir` with the reference; returns the report (report["passed"])."""
    return verify_precisions(artifacts_dir, [precision], source, backend, images, prompts, builtin_images, progress,
                             reference_device, reference_cache, backend_options)[0]


def verify_precisions(artifacts_dir: str | Path, precisions: Sequence[str | None], source: ModelSource | None = None,
                      backend: str = "onnx-cpu", images: Sequence[str | Path] = (), prompts: Sequence[str] = PROMPTS,
                      builtin_images: bool = True, progress: Callable[[str], None] = log.info,
                      reference_device: str = "cpu", reference_cache: str | Path | None = None,
                      backend_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One report per precision; the PyTorch reference runs once for all of them, fp32, on
    `reference_device` ("cuda": on the GPU with TF32 off). reference_cache: a folder where the reference's
    embeddings are kept, keyed by everything they depend on (gating several int8 plans of one export
    then runs the reference once). backend_options: the options the backend declares (torch-cuda's
    compile and cuda_graphs...), so the path gated is the path that will run."""
    backend_options = dict(backend_options or {})
    with tempfile.TemporaryDirectory(prefix="pickscore-verify-") as tmp:
        paths = (write_images(Path(tmp)) if builtin_images else []) + [Path(p) for p in images]
        for i, p in enumerate(paths):  # a bad user image is named now, not deep inside the reference
            open_image(p, image_name(str(p), i))
        names = [p.name for p in paths]
        runs = []
        for precision in precisions:
            progress(f"runtime ({precision or 'default precision'}): {len(prompts)} prompts x {len(paths)} images")
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RandomWeightsWarning)  # the report says random_weights
                scorer = PickScorer.load(artifacts_dir, backend=backend, precision=precision, **backend_options)
            exported = ModelSource.from_manifest(scorer.artifacts.manifest)
            source = source or exported
            check_same_model(source, exported)
            image_embs, errors = scorer.pipeline().embed([str(p) for p in paths])  # raw: NaN is judged, not hidden
            if errors:
                raise next(iter(errors.values()))
            runs.append({
                "text": scorer.text.encode(prompts).embeddings, "image": image_embs,
                "scale": scorer.artifacts.logit_scale_exp, "random_weights": scorer.random_weights,
                "backend": scorer.backend.name, "precision": scorer.backend.precision, "backend_options": backend_options,
                "runs": effective_precision(scorer.backend), "seconds": time.perf_counter() - t0,
            })
            scorer.close()
            del scorer
            gc.collect()

        t0 = time.perf_counter()
        ref_text, ref_img, ref_scale = reference_embeddings(source, paths, prompts, reference_device, reference_cache, progress)
        t_reference = time.perf_counter() - t0
    reports = [_report(run, ref_text, ref_img, ref_scale, source, t_reference, artifacts_dir, names, prompts) for run in runs]
    machine = machine_info(None)  # which CPU ran it: int8 kernels differ with and without AVX-512 VNNI
    for report in reports:
        report["reference_device"] = reference_device
        report["machine"] = machine
    return reports


def reference_embeddings(source: ModelSource, paths: Sequence[Path], prompts: Sequence[str], device: str,
                         cache: str | Path | None, progress: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """The reference's (text, image) embeddings and exp(logit_scale), from `cache` (else
    $PICKSCORE_REFERENCE_CACHE) when it holds them for exactly these inputs."""
    cache = cache if cache is not None else os.environ.get("PICKSCORE_REFERENCE_CACHE") or None
    key = None
    if cache is not None:
        identity = {k: v for k, v in source.describe().items() if k != "model"}  # "model" is as typed; path is resolved
        key = hashlib.sha256(json.dumps([identity, list(prompts), [sha256_file(p) for p in paths], device,
                                         package_versions(("torch", "transformers"))], sort_keys=True).encode()).hexdigest()[:20]
        hit = Path(cache) / f"reference-{key}.npz"
        if hit.is_file():
            progress(f"reference: reusing {hit}")
            with np.load(hit) as saved:
                return saved["text"], saved["image"], np.float32(saved["scale"])
    progress(f"reference: transformers CLIPModel, model card code path, fp32 on {device}")
    ref = Reference(source, device=device)
    text, image, scale = ref.text_embeddings(prompts), ref.image_embeddings(paths), ref.logit_scale_exp
    del ref
    gc.collect()
    if key is not None:
        Path(cache).mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, text=text, image=image, scale=scale)
        atomic_write(Path(cache) / f"reference-{key}.npz", [buf.getvalue()])
    return text, image, scale


def nonfinite_items(text: np.ndarray, image: np.ndarray, prompts: Sequence[str], image_names: Sequence[str]) -> list[str]:
    """What a tower returned NaN or Inf for, named."""
    return ([f"text tower: prompt {i} {prompts[i][:40]!r}" for i in np.flatnonzero(~finite_rows(text))]
            + [f"vision tower: image {image_names[j]}" for j in np.flatnonzero(~finite_rows(image))])


def _report(run: dict, ref_text: np.ndarray, ref_img: np.ndarray, ref_scale: np.float32, source: ModelSource, t_reference: float,
            artifacts_dir, image_names: Sequence[str], prompts: Sequence[str]) -> dict[str, Any]:
    tol = model_info()["tolerances"][run["precision"]]
    # The model card's calc_probs on the reference's own embeddings and exp(logit_scale), fp32.
    ref = [scores_and_probs(ref_scale, text, ref_img) for text in ref_text]
    with np.errstate(invalid="ignore", over="ignore"):
        got = [scores_and_probs(run["scale"], text, run["image"]) for text in run["text"]]
    report = {
        "passed": None,
        "gate_version": gate.GATE_VERSION,
        "backend": run["backend"],
        "precision": run["precision"],
        "backend_options": run["backend_options"],
        "runs": run["runs"],  # what the kernels really ran (an OpenVINO bf16 hint is fp32 on a CPU without BF16)
        "random_weights": run["random_weights"],
        "weights": source.weights_kind,
        "n_prompts": len(ref),
        "n_images": len(image_names),
        **gate.compare_scores(ref, got, tol["max_abs_score_diff"], tol.get("score_resolution") or 0.0),
        "min_cosine_text": gate.nan_safe_min(gate.cosine_rows(ref_text, run["text"])),
        "min_cosine_image": gate.nan_safe_min(gate.cosine_rows(ref_img, run["image"])),
        "max_abs_text_embed_diff": gate.nan_safe_max(np.abs(ref_text - run["text"])),
        "max_abs_image_embed_diff": gate.nan_safe_max(np.abs(ref_img - run["image"])),
        "logit_scale_exp": float(run["scale"]),
        "tolerances": tol,
        "seconds": {"runtime": round(run["seconds"], 1), "reference": round(t_reference, 1)},
        "artifacts": str(artifacts_dir),
    }
    report["nonfinite_outputs"] += gate.count_nonfinite(run["text"], run["image"])
    report["nonfinite_items"] = nonfinite_items(run["text"], run["image"], prompts, image_names)
    report["failures"] = gate.failures(report, tol)
    report["passed"] = not report["failures"]
    report["margins"] = gate.margins(report, tol)
    ref_matrix = np.array([r[0] for r in ref], np.float64)
    got_matrix = np.array([g[0] for g in got], np.float64)
    report["stability"] = gate.stability(ref_matrix, got_matrix, tol)
    # The raw scores, so a report can be judged again (another resolution, another set size) without a rerun.
    report["scores"] = {"images": list(image_names), "prompts": list(prompts),
                        "reference": ref_matrix.tolist(), "runtime": got_matrix.tolist()}
    return json_safe(report)


def json_safe(value: Any) -> Any:
    """The report with every NaN or Inf as null, so it is valid JSON (the verdict was taken before)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
