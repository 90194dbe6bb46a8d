"""The full PickScore architecture (ViT-H-14, random weights from ../shared/models/pickscore_v1):
export at fp32 and pass the numerics gate at fp32 tolerances. Minutes, 4+ GB RAM; runs in CI."""

from __future__ import annotations

import json
import os
import resource
import time

import pytest

pytestmark = pytest.mark.slow


def test_full_architecture_exports_and_passes_verify(shared_model_dir, tmp_path_factory):
    from pickscore_export.build import export_artifacts
    from pickscore_export.source import ModelSource
    from pickscore_export.verify import verify

    out = tmp_path_factory.mktemp("full") / "pickscore_v1"
    t0 = time.perf_counter()
    export_artifacts(ModelSource(str(shared_model_dir), random_init=True, seed=0), out, ["fp32"])
    export_s = time.perf_counter() - t0
    export_peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dims"]["embed_dim"] == 1024 and manifest["dims"]["vision_layers"] == 32
    assert manifest["logit_scale"] == 4.59375 and manifest["model"]["random_weights"] is True
    vision_files = manifest["towers"]["vision"]["precisions"]["fp32"]["files"]
    assert len(vision_files) == 2 and vision_files[1]["size"] > 2e9  # > 2 GB: exactly one external-data file

    report = verify(out)
    report["export_seconds"] = round(export_s, 1)
    report["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    report["export_peak_rss_gb"] = round(export_peak_gb, 2)
    print("\nFULL_VERIFY " + json.dumps(report))
    if os.environ.get("PICKSCORE_REPORT_DIR"):
        os.makedirs(os.environ["PICKSCORE_REPORT_DIR"], exist_ok=True)
        with open(os.path.join(os.environ["PICKSCORE_REPORT_DIR"], "full_verify.json"), "w") as f:
            json.dump(report, f, indent=2)
    assert report["n_prompts"] >= 8 and report["n_images"] >= 16
    assert report["passed"], report["failures"]
    assert report["rank_agreement"] == 1.0
