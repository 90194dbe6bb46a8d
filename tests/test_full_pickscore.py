"""The full PickScore architecture (ViT-H-14, random weights from the config the package ships), through
the path a user takes: `pickscore score --random-init` (the default model) on a CPU exports fp32 + int8, gates
int8 with gate v3 against the PyTorch reference, and serves int8 only because it passed. fp32 is then
judged by the same gate (max |Δscore| <= 1e-3, whole rankings identical). ~20 minutes and ~12 GB on 2
cores; runs in CI. fp16 and the stress weights are judged by `pickscore verify` at full size in
benchmarks/results/ (they would not fit CI's time budget)."""

from __future__ import annotations

import json
import os
import resource
import time

import pytest

from helpers import run_cli

pytestmark = pytest.mark.slow


def test_main_command_exports_gates_and_serves_int8_and_fp32_stays_exact(tmp_path_factory):
    from pickscore_export.samples import synthetic_image
    from pickscore_export.verify import verify_precisions
    from pickscore_models import model_info

    tmp = tmp_path_factory.mktemp("full")
    images = [tmp / "a.png", tmp / "b.jpg"]
    synthetic_image(640, 480, 1).save(images[0])
    synthetic_image(512, 768, 2).save(images[1])
    cache = tmp / "cache"
    t0 = time.perf_counter()
    references = tmp / "references"  # the gate at export runs the reference once; fp32's verify reuses it
    # no --model: the default, PickScore, built from the config the package ships
    out = run_cli("score", "--random-init", "--json", "--prompt", "a cat astronaut", *map(str, images),
                  env={"PICKSCORE_CACHE_DIR": str(cache), "PICKSCORE_REFERENCE_CACHE": str(references)}, timeout=3600)
    first_use_s = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    print(f"\nFULL_FIRST_USE seconds={first_use_s:.0f} peak_rss_gb={peak_gb:.1f}\n{out.stderr}")
    assert out.returncode == 0, out.stderr
    assert "first use of" in out.stderr and "gate v3, onnx-cpu/int8: passed" in out.stderr
    doc = json.loads(out.stdout)
    assert (doc["backend"], doc["precision"], doc["random_weights"]) == ("onnx-cpu", "int8", True)
    assert sorted(r["rank"] for r in doc["results"]) == [1, 2]

    [entry] = [d for d in cache.iterdir() if (d / "manifest.json").is_file()]
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["dims"]["embed_dim"] == 1024 and manifest["dims"]["vision_layers"] == 32
    assert manifest["logit_scale"] == model_info()["logit_scale"] and manifest["model"]["random_weights"] is True
    assert set(manifest["towers"]["vision"]["precisions"]) == {"fp32", "int8"}
    vision_files = manifest["towers"]["vision"]["precisions"]["fp32"]["files"]
    assert len(vision_files) == 2 and vision_files[1]["size"] > 2e9  # > 2 GB: exactly one external-data file
    record = json.loads((entry / "gate.json").read_text())["onnx-cpu/int8"]
    assert record["passed"] is True and record["gate_version"] == 3 and record["weights"] == "random"

    [fp32] = verify_precisions(entry, ["fp32"], reference_cache=references)
    fp32["first_use_seconds"], fp32["first_use_peak_rss_gb"] = round(first_use_s), round(peak_gb, 1)
    print("FULL_VERIFY_fp32 " + json.dumps({k: v for k, v in fp32.items() if k != "scores"}))
    if os.environ.get("PICKSCORE_REPORT_DIR"):
        os.makedirs(os.environ["PICKSCORE_REPORT_DIR"], exist_ok=True)
        with open(os.path.join(os.environ["PICKSCORE_REPORT_DIR"], "full_verify_fp32.json"), "w") as f:
            json.dump(fp32, f, indent=2)
    assert fp32["gate_version"] == 3 and fp32["weights"] == "random"
    assert fp32["n_prompts"] >= 16 and fp32["n_images"] >= 32
    assert fp32["passed"], fp32["failures"]
    assert fp32["rank_agreement"] == 1.0 and fp32["max_abs_score_diff"] <= 1e-3
