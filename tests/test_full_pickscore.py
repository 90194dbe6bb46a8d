"""The full PickScore architecture (ViT-H-14, random weights from ../shared/models/pickscore_v1):
export fp32 + int8 and check both against the PyTorch reference. Minutes, ~13 GB RAM; runs in CI.

fp32 must pass its whole gate. int8 must meet its score, probability and cosine tolerances. Its rank
agreement (whole 18-image ranking identical per prompt) is reported, not asserted: the reference's
closest two images for a prompt score ~8e-4 apart, so an identical ranking needs a score error below
~4e-4, which no int8 path gives (measured max |Δscore| ~0.2, within its 0.25 tolerance). The test
asserts that this, and nothing else, is why rank agreement falls short. See README, "What is verified".
"""

from __future__ import annotations

import json
import os
import resource
import time

import pytest

pytestmark = pytest.mark.slow


def test_full_architecture_exports_and_passes_verify(shared_model, tmp_path_factory):
    from pickscore_export.build import export_artifacts
    from pickscore_export.source import ModelSource
    from pickscore_export.verify import verify_precisions

    out = tmp_path_factory.mktemp("full") / "pickscore_v1"
    t0 = time.perf_counter()
    export_artifacts(ModelSource(str(shared_model), random_init=True, seed=0), out, ["fp32", "int8"])
    export_s = time.perf_counter() - t0
    export_peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dims"]["embed_dim"] == 1024 and manifest["dims"]["vision_layers"] == 32
    assert manifest["logit_scale"] == 4.59375 and manifest["model"]["random_weights"] is True
    vision_files = manifest["towers"]["vision"]["precisions"]["fp32"]["files"]
    assert len(vision_files) == 2 and vision_files[1]["size"] > 2e9  # > 2 GB: exactly one external-data file

    fp32, int8 = verify_precisions(out, ["fp32", "int8"])
    for report in (fp32, int8):
        report["export_seconds"] = round(export_s, 1)
        report["export_peak_rss_gb"] = round(export_peak_gb, 2)
        report["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
        print(f"\nFULL_VERIFY_{report['precision']} " + json.dumps(report))
    if os.environ.get("PICKSCORE_REPORT_DIR"):
        os.makedirs(os.environ["PICKSCORE_REPORT_DIR"], exist_ok=True)
        with open(os.path.join(os.environ["PICKSCORE_REPORT_DIR"], "full_verify.json"), "w") as f:
            json.dump([fp32, int8], f, indent=2)

    assert fp32["n_prompts"] >= 8 and fp32["n_images"] >= 16
    assert fp32["passed"], fp32["failures"]
    assert fp32["rank_agreement"] == 1.0

    tol = int8["tolerances"]
    assert int8["precision"] == "int8"
    assert int8["max_abs_score_diff"] <= tol["max_abs_score_diff"]
    assert int8["max_abs_prob_diff"] <= tol["max_abs_prob_diff"]
    assert int8["min_cosine_image"] >= 0.999 and int8["min_cosine_text"] >= 0.99999  # text tower stays fp32
    if int8["rank_agreement"] < tol["min_rank_agreement"]:
        # only acceptable because ranks here are unresolvable: gaps below twice the score error
        assert int8["min_reference_score_gap"] < 2 * int8["max_abs_score_diff"]
