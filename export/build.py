"""`pickscore export`: model source -> artifacts directory (towers, tokenizer.json, manifest.json)."""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from pickscore_runtime.artifacts import (Artifacts, export_lock, file_entry, is_artifacts_dir, package_versions,
                                         staged_directory, write_manifest)
from pickscore_runtime.backends import BACKENDS
from pickscore_runtime.errors import PickScoreError
from pickscore_runtime.gate_records import record_gate_results
from pickscore_runtime.precisions import EXPORTED
from pickscore_runtime.preprocess import PreprocessConfig
from pickscore_runtime.tokenizer import ClipTokenizer
from pickscore_runtime.torch_towers import tower_module
from pickscore_runtime.towers import TOWERS, tower_specs

from pickscore_models import model_info

from . import onnx_export, stress
from .samples import calibration_pixels
from .source import ModelSource, hub_snapshot, load_clip, read_preprocessing, read_tokenizer_settings, tokenizer_files
from .verify import verify_precisions

log = logging.getLogger("pickscore")

NUMERICS = {
    "fp32": "fp32",
    "fp16": "fp16 weights/compute; LayerNorm, softmax, reductions, pow, sqrt, final L2 norm in fp32; fp32 IO",
}


def weight_scheme_text(scheme: str) -> str:
    """e.g. "int8 in 7 bits, one scale per output column" for onnx_export.WEIGHT_SCHEMES["channel7"]."""
    per_channel, reduce_range, weight_type = onnx_export.WEIGHT_SCHEMES[scheme]
    return (f"{weight_type}{' in 7 bits' if reduce_range else ''}, one scale"
            f"{' and zero point' if weight_type == 'uint8' else ''} per {'output column' if per_channel else 'matrix'}")


def int8_numerics(plan: dict) -> str:
    """The manifest's words for an int8 plan of onnx_export.INT8_PLANS."""
    return (f"SmoothQuant (alpha {plan['smooth_alpha']}, on matmul inputs whose channel maxima reach "
            f"{plan['smooth_min_outlier_ratio']:g}x their median; calibrated on {onnx_export.INT8_CALIBRATION_IMAGES} "
            f"generated images) folded into the fp32 graph, then dynamic quantisation: {plan['weight_type']} "
            f"{'per-channel' if plan['per_channel'] else 'per-tensor'} MatMul/Gemm weights"
            f"{' in 7 bits (reduce_range)' if plan['reduce_range'] else ''}"
            + "".join(f"; {role} weights: {scheme} ({weight_scheme_text(scheme)})"
                      for role, scheme in (plan.get("role_weights") or {}).items())
            + "".join(f"; {role} kept fp32" for role in plan.get("keep_fp32", ()))
            + "; uint8 activations quantised per call; rest fp32")


def int8_plan(name: str) -> dict:
    if name not in onnx_export.INT8_PLANS:
        raise PickScoreError(f"unknown int8 plan {name!r}; choose from {', '.join(onnx_export.INT8_PLANS)}")
    return onnx_export.INT8_PLANS[name]


def approx_parameters(config: dict) -> float:
    """Weights in a CLIP config.json, to scale the measured full-size first-use cost to another size."""
    total = 0.0
    for tower in ("text_config", "vision_config"):
        c = config.get(tower) or {}
        h = c.get("hidden_size", 0)
        total += c.get("num_hidden_layers", 0) * (4 * h * h + 2 * h * c.get("intermediate_size", 4 * h))
    return total + config.get("text_config", {}).get("vocab_size", 0) * config.get("text_config", {}).get("hidden_size", 0)


def first_use_estimate(source: ModelSource, precisions: Sequence[str], gate: bool = True) -> str:
    """What a first export will cost, from the full-size figures measured on this project's 2-core CPU
    (models/pickscore_v1.json `first_use`), scaled by the model's size."""
    measured = model_info()["first_use"]
    folder = source.local_dir or hub_snapshot(source.model, source.commit or source.revision)
    scale = approx_parameters(json.loads((folder / "config.json").read_text())) / measured["parameters"]
    disk = sum(measured["disk_gb"][p] for p in precisions) * scale
    times = measured["seconds"].get("+".join(precisions))
    when = "time not measured for these precisions"
    if times:
        when = f"about {times['export'] * scale / 60:.0f} min to export"
        if gate and len(precisions) > 1:
            when += f" + {times['gate'] * scale / 60:.0f} min to gate"
    return (f"{when} on a 2-core CPU, {disk:.1f} GB of disk, peak memory about {measured['peak_ram_gb'] * scale:.0f} GB"
            f" (scaled from the full size, measured on {measured['machine']})")


def parse_precisions(text: str | Sequence[str]) -> list[str]:
    items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    bad = [p for p in items if p not in EXPORTED]
    if bad or not items:
        raise PickScoreError(f"unsupported precision {', '.join(bad) or '(none)'}; choose from {', '.join(EXPORTED)}")
    return list(dict.fromkeys(items))


MANIFEST_PACKAGES = ("pickscore-runtime", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers",
                     "pillow", "numpy")


def model_dims(config) -> dict[str, int]:
    t, v = config.text_config, config.vision_config
    return {
        "embed_dim": config.projection_dim, "image_size": v.image_size, "patch_size": v.patch_size,
        "max_text_length": t.max_position_embeddings, "vocab_size": t.vocab_size,
        "text_hidden": t.hidden_size, "text_layers": t.num_hidden_layers,
        "vision_hidden": v.hidden_size, "vision_layers": v.num_hidden_layers,
    }


def export_artifacts(source: ModelSource, out_dir: str | Path, precisions: Sequence[str] = ("fp32",),
                     force: bool = False, opset: int = onnx_export.OPSET, wait: bool = False,
                     reuse_existing: bool = False, progress: Callable[[str], None] = log.info,
                     int8_plan_name: str = "default", gate: bool = True, gate_backend: str = "onnx-cpu") -> Path:
    """Export `source` into `out_dir` atomically; returns the directory. int8_plan_name: the int8 tower's
    plan (onnx_export.INT8_PLANS), recorded in the manifest.

    gate=True (the default) ends an export of any precision but fp32 with the numerics gate on these very
    weights (`pickscore verify` on `gate_backend`, against the transformers reference), recorded in
    gate.json: `auto` serves only what passed. A failed gate still lands the export (fp32 stays exact),
    with its failures in gate.json.

    Only one export writes a target at a time: a second is refused, or with wait=True waits its turn.
    reuse_existing=True returns a target that already holds artifacts (another process may have
    exported them while this one waited) instead of exporting again.
    """
    precisions = parse_precisions(precisions)
    int8_plan(int8_plan_name)  # an unknown name is refused before anything is loaded
    out_dir = Path(out_dir)
    with export_lock(out_dir).acquire(wait=wait):
        if reuse_existing and is_artifacts_dir(out_dir):
            return out_dir
        with staged_directory(out_dir, overwrite=force) as stage:
            _export_into(stage, source, precisions, opset, progress, int8_plan_name)
            gated = [p for p in precisions if p != "fp32"]
            if gate and gated:
                gate_export(stage, source, gated, gate_backend, progress)
            elif gated:
                progress(f"WARNING: {', '.join(gated)} NOT gated (--no-verify): `auto` serves fp32 from these artifacts "
                         f"until `pickscore verify --precision {','.join(gated)}` passes")
    return out_dir


def gate_export(root: Path, source: ModelSource, precisions: Sequence[str], backend: str,
                progress: Callable[[str], None]) -> list[dict]:
    """Gate v3 on freshly exported towers, recorded in root/gate.json; returns the reports."""
    t0 = time.perf_counter()
    by_backend: dict[str, list[str]] = {}
    for p in precisions:  # int8 is a CPU precision: gated on onnx-cpu even when the GPU gates fp16
        by_backend.setdefault(backend if p in BACKENDS[backend].precisions else "onnx-cpu", []).append(p)
    reports = []
    for name, group in by_backend.items():
        progress(f"gating {', '.join(group)} against the PyTorch reference on {name} (gate v3; --no-verify skips it)")
        reports += verify_precisions(root, group, source, backend=name, progress=progress)
    record_gate_results(root, Artifacts.load(root, hash_check="size").fingerprint, reports)
    for r in reports:
        verdict = "passed" if r["passed"] else "FAILED (auto will not serve it): " + "; ".join(r["failures"])
        progress(f"gate v3, {r['backend']}/{r['precision']}: {verdict}")
    progress(f"gate done in {time.perf_counter() - t0:.0f} s")
    return reports


def _export_into(stage: Path, source: ModelSource, precisions: list[str], opset: int, progress: Callable[[str], None],
                 int8_plan_name: str) -> None:
    started = time.perf_counter()
    progress(f"loading model {source.model}" + (f" with RANDOM weights (seed {source.seed})" if source.random_init else ""))
    clip = load_clip(source)  # first: missing weights is the error a user most needs to see
    files = tokenizer_files(source)
    preprocessing = PreprocessConfig.from_json(read_preprocessing(files)).to_json()
    tokenizer_settings = read_tokenizer_settings(files, clip.config.text_config.max_position_embeddings)
    tokenizer = ClipTokenizer(files / "tokenizer.json", tokenizer_settings["max_length"], tokenizer_settings["pad_token"])
    dims = model_dims(clip.config)
    specs = tower_specs(dims["embed_dim"], dims["image_size"])
    model_record = {"name": "pickscore_v1", "random_weights": source.random_init, "source": source.describe()}
    if source.random_init:  # what the random (or stress) model's activations look like: see export/stress.py
        model_record["stress"] = getattr(clip, "pickscore_stress", None)
        model_record["activation_stats"] = stress.activation_stats(clip, *stress.calibration_inputs(files))
    shutil.copyfile(files / "tokenizer.json", stage / "tokenizer.json")
    towers, int8_summary, plan = {}, {}, int8_plan(int8_plan_name)
    for tower in TOWERS:
        spec = specs[tower]
        fp32 = stage / f"{tower}.fp32.onnx"
        t0 = time.perf_counter()
        progress(f"exporting {tower} tower (fp32, opset {opset})")
        onnx_export.export_fp32(tower_module(clip, tower), spec, fp32, opset, (tokenizer.bos_id, tokenizer.eos_id))
        derive = {"fp16": lambda dst: onnx_export.convert_fp16(fp32, dst, spec),
                  "int8": lambda dst: int8_summary.update(onnx_export.quantize_int8(
                      fp32, dst, calibration=calibration_pixels(PreprocessConfig.from_json(preprocessing),
                                                                onnx_export.INT8_CALIBRATION_IMAGES),
                      **plan) or {})}
        variants = {}
        for precision in precisions:
            if precision == "int8" and tower not in onnx_export.INT8_TOWERS:
                variants[precision] = _variant(fp32, stage, opset, onnx_export.INT8_SKIPPED_NOTE)
                continue
            path = stage / f"{tower}.{precision}.onnx"
            if precision != "fp32":
                progress(f"deriving {tower} tower {precision} from fp32")
                derive[precision](path)
            variants[precision] = _variant(path, stage, opset, int8_numerics(plan) if precision == "int8" else NUMERICS[precision])
            if precision == "int8":
                variants[precision]["int8_plan"] = dict(plan)
                variants[precision]["int8_plan_name"] = int8_plan_name
                if int8_summary:
                    variants[precision]["smoothquant"] = dict(int8_summary)
        if not any(v["files"][0]["path"] == fp32.name for v in variants.values()):
            _remove_with_data(fp32)
        towers[tower] = {"io": spec.to_json(), "precisions": variants}
        progress(f"{tower} tower done in {time.perf_counter() - t0:.0f} s")
    write_manifest(stage, {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_record,
        "dims": dims,
        "logit_scale": float(clip.logit_scale.item()),
        "preprocessing": preprocessing,
        "tokenizer": {**file_entry(stage / "tokenizer.json", stage), **tokenizer_settings},
        "towers": towers,
        "packages": {"python": platform.python_version(),
                     **{k: v for k, v in package_versions(MANIFEST_PACKAGES).items() if v is not None}},
    })
    progress(f"exported {', '.join(precisions)} in {time.perf_counter() - started:.0f} s")


def _variant(onnx_path: Path, root: Path, opset: int, numerics: str) -> dict:
    files = [onnx_path] + [p for p in [onnx_export.external_data_file(onnx_path)] if p is not None]
    return {"format": "onnx", "opset": opset, "numerics": numerics, "files": [file_entry(f, root) for f in files]}


def _remove_with_data(onnx_path: Path) -> None:
    data = onnx_export.external_data_file(onnx_path)
    onnx_path.unlink()
    if data is not None:
        data.unlink()
