"""Gate v3: its numbers on constructed cases (so each check is seen to fail when it should), NaN that
cannot hide, a tower that emits NaN failing verify by name, and stress weights: planted outliers are
really there, recorded, and the reference plants the same ones."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pickscore_export.gate import compare_scores, failures, margins, spearman, stability

pytestmark = pytest.mark.integration


def as_pairs(*score_lists):
    out = []
    for scores in score_lists:
        scores = np.asarray(scores, np.float32)
        e = np.exp(scores - scores.max())
        out.append((scores, e / e.sum()))
    return out


TOL = {"max_nonfinite_outputs": 0, "max_abs_score_diff": 0.25, "max_abs_prob_diff": 0.05, "score_resolution": 0.05,
       "min_resolved_pair_agreement": 0.98, "min_pairwise_order_agreement": None, "max_decisive_pair_flips": 0,
       "min_decisive_top1_agreement": 1.0, "max_best_of_n_regret": 0.25, "min_rank_agreement": None}


def test_a_near_tie_may_flip_but_a_decisive_pair_may_not():
    ref = as_pairs([1.0, 1.05, 3.0, 5.0])
    tie_flip = compare_scores(ref, as_pairs([1.06, 1.0, 3.0, 5.0]), 0.25)
    assert tie_flip["decisive_pair_flips"] == 0 and tie_flip["pairwise_order_agreement"] == 5 / 6
    assert tie_flip["n_decisive_pairs"] == 5 and tie_flip["rank_agreement"] == 0.0
    decisive_flip = compare_scores(ref, as_pairs([1.0, 1.05, 5.1, 5.0]), 0.25)
    assert decisive_flip["decisive_pair_flips"] == 1
    assert any("decisive pair flips 1 > 0" in f for f in failures(decisive_flip, TOL))


def test_pairs_closer_than_the_resolution_are_reported_not_gated():
    ref = as_pairs([0.0, 0.02, 1.0, 1.1, 3.0])
    close_flip = compare_scores(ref, as_pairs([0.03, 0.0, 1.0, 1.1, 3.0]), 0.25, resolution=0.05)
    assert close_flip["n_close_pairs"] == 1 and close_flip["close_pair_agreement"] == 0.0
    assert close_flip["n_resolved_pairs"] == 9 and close_flip["resolved_pair_agreement"] == 1.0
    assert close_flip["pairwise_order_agreement"] == 0.9  # v2's all-pairs number, still reported
    assert failures(close_flip, TOL) == []
    resolved_flip = compare_scores(ref, as_pairs([0.0, 0.02, 1.06, 1.04, 3.0]), 0.25, resolution=0.05)  # 0.1 apart: resolved
    assert resolved_flip["resolved_pair_agreement"] == pytest.approx(8 / 9)
    assert resolved_flip["decisive_pair_flips"] == 0
    assert failures(resolved_flip, TOL) == ["resolved pair agreement 0.8889 < 0.98"]
    # with v2's rule (every pair gated at 0.98), the close pair alone would have failed it
    assert failures(close_flip, {**TOL, "min_pairwise_order_agreement": 0.98}) == ["pairwise order agreement 0.9 < 0.98"]


@pytest.mark.parametrize("where", [0, 1, 2])
def test_a_nan_score_fails_whatever_its_position(where):
    ref = as_pairs([0.0, 1.0, 2.0], [3.0, 1.0, 0.0])
    scores = [0.0, 1.0, 2.0]
    scores[where] = float("nan")
    got = [(np.asarray(scores, np.float32), np.asarray([0.1, 0.2, 0.7], np.float32)), ref[1]]
    report = compare_scores(ref, got, 0.25, resolution=0.05)
    assert report["nonfinite_outputs"] == 1
    assert np.isnan(report["max_abs_score_diff"])  # not the max of the finite ones: order cannot hide it
    found = failures(report, TOL)
    assert "nonfinite outputs 1 > 0" in found
    assert any(f.startswith("max abs score diff nan") for f in found)


def test_margins_say_how_far_each_gated_number_is_from_its_limit():
    ref = as_pairs(list(np.linspace(0.0, 5.0, 11)))
    got = as_pairs(list(np.linspace(0.0, 5.0, 11) + 0.01))
    report = compare_scores(ref, got, 0.25, resolution=0.05)
    m = margins(report, TOL)
    assert set(m) == {"nonfinite_outputs", "max_abs_score_diff", "max_abs_prob_diff", "resolved_pair_agreement",
                      "decisive_pair_flips", "decisive_top1_agreement", "best_of_n_regret_max"}
    assert m["max_abs_score_diff"]["margin"] == pytest.approx(0.24, abs=1e-5)
    # 55 resolved pairs at 0.98: one may disagree, so two more disagreements fail it
    assert m["resolved_pair_agreement"]["disagreeing"] == 0 and m["resolved_pair_agreement"]["more_to_fail"] == 2


def test_stability_tells_a_verdict_at_its_limit_from_one_with_margin():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, (16, 32))
    tol = {**TOL, "max_abs_score_diff": 10.0, "max_abs_prob_diff": 1.0, "max_best_of_n_regret": 10.0,
           "max_decisive_pair_flips": None, "min_decisive_top1_agreement": None}
    safe = stability(ref, ref + rng.normal(0, 0.002, ref.shape), tol, resamples=50)
    assert {safe[k]["verdict_pass_rate"] for k in ("bootstrap", "redrawn", "doubled")} == {1.0}
    noisy = ref + rng.normal(0, 0.03, ref.shape)
    at_limit = compare_scores([(r, r) for r in ref], [(g, g) for g in noisy], 10.0, 0.05)["resolved_pair_agreement"]
    shaky = stability(ref, noisy, {**tol, "min_resolved_pair_agreement": at_limit}, resamples=50)
    boot = shaky["bootstrap"]["checks"]["resolved_pair_agreement"]
    assert 0.1 < shaky["bootstrap"]["verdict_pass_rate"] < 0.9 and boot["p05"] < at_limit < boot["p95"]
    # the same error once more, on top: agreement drops, so a verdict at its limit fails; redrawn it wavers
    assert shaky["doubled"]["verdict_pass_rate"] == 0.0
    assert shaky["doubled"]["checks"]["resolved_pair_agreement"]["p95"] < at_limit
    assert 0.1 < shaky["redrawn"]["verdict_pass_rate"] < 0.9


def test_best_of_n_counts_only_decisive_prompts_and_reports_regret():
    ref = as_pairs([0.0, 2.0, 2.1], [0.0, 1.0, 3.0])  # prompt 0: top-2 gap 0.1 < tol; prompt 1: 2.0 >= tol
    got = as_pairs([0.0, 2.2, 2.1], [0.0, 1.0, 3.0])
    report = compare_scores(ref, got, 0.25)
    assert report["n_decisive_prompts"] == 1 and report["decisive_top1_agreement"] == 1.0
    assert report["top1_agreement"] == 0.5
    assert report["best_of_n_regret_max"] == pytest.approx(0.1, abs=1e-6)
    wrong_best = compare_scores(ref, as_pairs([0.0, 2.0, 2.1], [0.0, 3.5, 3.0]), 0.25)
    assert wrong_best["decisive_top1_agreement"] == 0.0
    assert wrong_best["best_of_n_regret_max"] == pytest.approx(2.0)
    assert any("decisive top1 agreement" in f for f in failures(wrong_best, TOL))


def test_null_tolerances_are_reported_not_gated():
    ref = as_pairs([0.0, 1.0, 2.0])
    report = compare_scores(ref, as_pairs([0.0, 1.0, 2.0]), 0.25)
    assert report["rank_agreement"] == 1.0 and failures(report, TOL) == []
    assert failures({**report, "rank_agreement": 0.0}, TOL) == []
    assert failures({**report, "rank_agreement": 0.0}, {**TOL, "min_rank_agreement": 1.0}) == ["rank agreement 0 < 1.0"]
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)


def test_every_precision_has_every_tolerance():
    from pickscore_export.gate import CHECKS
    from pickscore_models import model_info

    tolerances = model_info()["tolerances"]
    assert set(tolerances) == {"fp32", "fp16", "bf16", "int8"}
    for tol in tolerances.values():
        assert {check[1] for check in CHECKS} | {"score_resolution"} <= set(tol)
        assert tol["max_nonfinite_outputs"] == 0 and tol["max_best_of_n_regret"] is not None
    assert tolerances["fp32"]["min_rank_agreement"] == 1.0 and tolerances["fp32"]["max_abs_score_diff"] == 1e-3
    assert tolerances["fp32"]["score_resolution"] == 0.0 and tolerances["fp32"]["min_pairwise_order_agreement"] == 1.0
    assert tolerances["fp16"]["max_abs_score_diff"] == 0.05 and tolerances["int8"]["max_abs_score_diff"] == 0.25
    assert 0 < tolerances["fp16"]["score_resolution"] < tolerances["int8"]["score_resolution"]


@pytest.fixture(scope="module")
def stress_artifacts(tmp_path_factory, tiny_model_dir):
    from pickscore_export.build import export_artifacts
    from pickscore_export.source import ModelSource

    return export_artifacts(ModelSource(str(tiny_model_dir), random_init=True, seed=0, stress=True),
                            tmp_path_factory.mktemp("stress") / "art", ["fp32", "fp16", "int8"])


def test_stress_weights_plant_outliers_and_record_them(stress_artifacts, tiny_artifacts):
    stress = json.loads((stress_artifacts / "manifest.json").read_text())["model"]
    plain = json.loads((tiny_artifacts / "manifest.json").read_text())["model"]
    assert stress["source"]["random_init"]["stress"] is True and plain["source"]["random_init"]["stress"] is False
    assert plain["stress"] is None and stress["stress"]["recipe"]["massive_ratio"] == 500.0
    for tower in ("vision", "text"):
        s, p = stress["activation_stats"][tower], plain["activation_stats"][tower]
        assert s["residual"]["max_over_median"] > 10 * p["residual"]["max_over_median"]
        assert s["fc2_in"]["max_over_median"] > 5 * p["fc2_in"]["max_over_median"]
        assert s["residual"]["token"] in stress["stress"][tower]["massive_tokens"]


def test_verify_plants_the_same_outliers_in_the_reference(stress_artifacts):
    from pickscore_export.verify import verify

    report = verify(stress_artifacts, precision="fp32")
    assert report["weights"] == "random+stress" and report["gate_version"] == 3
    assert report["passed"], report["failures"]
    assert report["n_prompts"] == 16 and report["n_images"] == 32 and report["n_pairs"] == 16 * 32 * 31 // 2
    assert report["stability"]["bootstrap"]["verdict_pass_rate"] == 1.0
    assert report["margins"]["max_abs_score_diff"]["margin"] > 0
    assert len(report["scores"]["reference"]) == 16 and len(report["scores"]["runtime"][0]) == 32


def test_verify_refuses_stress_against_plain(stress_artifacts, tiny_model_dir):
    from helpers import run_cli

    out = run_cli("verify", "--artifacts", str(stress_artifacts), "--model", str(tiny_model_dir), "--random-init")
    assert out.returncode == 2 and "random+stress weights" in out.stderr and "random weights" in out.stderr
    out = run_cli("export", "--model", str(tiny_model_dir), "--stress", "--out", "x")
    assert out.returncode == 2 and "needs --random-init" in out.stderr


def test_verify_records_its_verdicts_and_auto_never_picks_a_failed_precision(stress_artifacts, tmp_path):
    import shutil
    import warnings

    from helpers import run_cli
    from pickscore_runtime.artifacts import Artifacts
    from pickscore_runtime.backends import BACKENDS, GateWarning, resolve_precision
    from pickscore_runtime.gate_records import gate_status, read_gate_records, record_gate_results

    art = shutil.copytree(stress_artifacts, tmp_path / "art")
    out = run_cli("verify", "--artifacts", str(art), "--precision", "fp32,int8", "--output", str(tmp_path / "r.json"))
    reports = json.loads((tmp_path / "r.json").read_text())
    records = read_gate_records(art)
    # the tiny stress model's planted outliers are far beyond what per-tensor int8 of a 64-wide model can carry
    assert [r["passed"] for r in reports] == [True, False] and out.returncode == 1 and "recorded in" in out.stderr
    assert "FAILED: " in out.stderr and "decisive pair flips" in out.stderr
    assert all(isinstance(r["machine"]["simd"], list) for r in reports)  # int8 numerics depend on the CPU's ISA
    assert {f"onnx-cpu/{r['precision']}": r["passed"] for r in reports}.items() <= {
        k: v["passed"] for k, v in records.items()}.items()
    for r in reports:  # what ran and on which CPU: a derived precision's verdict holds only on a CPU like it
        assert (records[f"onnx-cpu/{r['precision']}"]["runs"], records[f"onnx-cpu/{r['precision']}"]["simd"]) == \
            (r["runs"], r["machine"]["simd"])

    artifacts = Artifacts.load(art, hash_check="size")
    int8 = next(r for r in reports if r["precision"] == "int8")
    record_gate_results(art, artifacts.fingerprint, [{**int8, "passed": False, "failures": ["pairwise 0.95 < 0.98"]}])
    with pytest.warns(GateWarning, match="not int8 on onnx-cpu.*pairwise 0.95"):
        assert resolve_precision(artifacts, BACKENDS["onnx-cpu"], None, auto=True) == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for explicitly: given, without a word
        assert resolve_precision(artifacts, BACKENDS["onnx-cpu"], "int8", auto=True) == "int8"
    record_gate_results(art, "another-export", [{**int8, "passed": True}])  # made for other towers: ignored
    assert gate_status(art, artifacts.fingerprint, "onnx-cpu", "int8").state == "ungated"
    with pytest.warns(GateWarning, match="has not passed the numerics gate"):
        assert resolve_precision(artifacts, BACKENDS["onnx-cpu"], None, auto=True) == "fp32"
    record_gate_results(art, artifacts.fingerprint, [{**int8, "passed": True}])
    assert gate_status(art, artifacts.fingerprint, "onnx-cpu", "int8").state == "passed"
    assert resolve_precision(artifacts, BACKENDS["onnx-cpu"], None, auto=True) == "int8"


def test_smoothquant_keeps_the_function_and_acts_only_where_there_are_outliers(stress_artifacts, tiny_artifacts, tmp_path):
    """export/smooth.py: the smoothed fp32 graph computes the same function; on outlier-free weights nothing
    is smoothed. (Whether it helps int8 is measured at full size, benchmarks/QUANTIZATION.md: on the tiny
    model it is within noise.) keep_fp32 leaves exactly the matmuls of its role unquantised."""
    import onnx
    import onnxruntime as ort

    from pickscore_export.onnx_export import mlp_down_projections, quantize_int8
    from pickscore_export.samples import calibration_pixels
    from pickscore_export.smooth import smooth_quant
    from pickscore_runtime.artifacts import Artifacts
    from pickscore_runtime.preprocess import PreprocessConfig

    def run(path, pixels):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": pixels})[0]

    plain = Artifacts.load(tiny_artifacts, hash_check="size")
    stress = Artifacts.load(stress_artifacts, hash_check="size")
    config = PreprocessConfig.from_json(stress.manifest["preprocessing"])
    calib, held_out = calibration_pixels(config, 16), calibration_pixels(config, 24)[16:]
    assert not smooth_quant(plain.tower_file("vision", "fp32"), tmp_path / "p.onnx", calib, 0.5, 5.0)["applied"]
    fp32 = stress.tower_file("vision", "fp32")
    summary = smooth_quant(fp32, tmp_path / "s.onnx", calib, 0.5, 5.0)
    assert summary["applied"] and summary["matmuls_folded_into_layernorms"] > 0
    want = run(fp32, held_out)
    np.testing.assert_allclose(run(tmp_path / "s.onnx", held_out), want, atol=1e-5)

    quantize_int8(fp32, tmp_path / "keep.int8.onnx", keep_fp32=("mlp_down",))
    kept = set(mlp_down_projections(fp32))
    ops = {n.name: n.op_type for n in onnx.load(str(tmp_path / "keep.int8.onnx")).graph.node}
    layers = json.loads((stress_artifacts / "manifest.json").read_text())["dims"]["vision_layers"]
    assert len(kept) == layers and all(ops.get(name) == "MatMul" for name in kept)
    assert sum(op == "MatMul" for op in ops.values()) == 3 * layers  # + attention's two activation x activation matmuls
    assert any(op in ("MatMulInteger", "DynamicQuantizeMatMul") for op in ops.values())


def quantised_weights(int8_path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name of the fp32 graph's matmul: (its quantised weight, its scale)} of an int8 graph (quantize_dynamic
    names each MatMulInteger <node>_quant, a Gemm's <node>_MatMul_quant)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(int8_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    return {n.name.removesuffix("_quant").removesuffix("_MatMul"): (arrays[n.input[1]], arrays[n.input[1].replace("_quantized", "_scale")])
            for n in graph.node if n.op_type == "MatMulInteger"}


def assert_weight_scheme(w: np.ndarray, scale: np.ndarray, scheme: str) -> None:
    from pickscore_export.onnx_export import WEIGHT_SCHEMES

    per_channel, reduce_range, weight_type = WEIGHT_SCHEMES[scheme]
    assert w.dtype == np.dtype(weight_type)
    assert scale.size == (w.shape[1] if per_channel else 1)
    if w.dtype == np.int8:
        assert (np.abs(w.astype(np.int16)).max() <= 64) == reduce_range


def test_roles_name_their_matmuls_and_take_their_own_weight_scheme(stress_artifacts, tmp_path):
    """role_matmuls finds each role's matmuls in the exported graph (by weight shape, or by the module path
    the exporter records); quantize_int8's role_weights quantises those with their own scheme, the rest
    with the plan's, and keep_fp32 "block:N" leaves one encoder block fp32."""
    import onnx

    from pickscore_export.onnx_export import quantize_int8, role_matmuls

    fp32 = stress_artifacts / "vision.fp32.onnx"
    layers = json.loads((stress_artifacts / "manifest.json").read_text())["dims"]["vision_layers"]
    roles = {r: role_matmuls(fp32, r) for r in ("mlp_up", "mlp_down", "projection", "block:0")}
    assert [len(roles[r]) for r in ("mlp_up", "mlp_down", "projection", "block:0")] == [layers, layers, 1, 6]
    assert set(roles["block:0"]) & set(roles["mlp_up"]) and not set(roles["projection"]) & set(roles["block:0"])
    for bad in ("block:99", "attention", "block:x"):
        with pytest.raises(ValueError, match="matmul role"):
            role_matmuls(fp32, bad)
    bare = onnx.load(str(fp32), load_external_data=False)  # an exporter that records no module paths
    for node in bare.graph.node:
        del node.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    assert role_matmuls(tmp_path / "bare.onnx", "mlp_up") == roles["mlp_up"]  # found by shape
    with pytest.raises(ValueError, match="no module paths"):
        role_matmuls(tmp_path / "bare.onnx", "projection")

    summary = quantize_int8(fp32, tmp_path / "roles.int8.onnx", keep_fp32=("block:0",),
                            role_weights={"mlp_up": "channel_u8", "projection": "channel7"})
    assert summary["role_weights"]["mlp_up"] == {"scheme": "channel_u8", "matmuls": layers - 1}
    quantised = quantised_weights(tmp_path / "roles.int8.onnx")
    assert not set(roles["block:0"]) & set(quantised) and len(quantised) == 6 * (layers - 1) + 1
    for node, (w, scale) in quantised.items():
        scheme = "channel_u8" if node in roles["mlp_up"] else "channel7" if node in roles["projection"] else "tensor"
        assert_weight_scheme(w, scale, scheme)


def assert_artifacts_follow_int8_plan(art, name: str) -> None:
    """The manifest records the plan, and each matmul of the int8 vision graph is quantised as the plan
    says for its role (weight type, one scale per matrix or per output column, 8 or 7 bits), or left fp32."""
    from pickscore_export.onnx_export import INT8_PLANS, WEIGHT_SCHEMES, role_matmuls

    plan = INT8_PLANS[name]
    manifest = json.loads((art / "manifest.json").read_text())
    variant = manifest["towers"]["vision"]["precisions"]["int8"]
    assert variant["int8_plan"] == plan and variant["int8_plan_name"] == name and variant["smoothquant"]["applied"]
    for role in plan.get("keep_fp32", ()):
        assert f"{role} kept fp32" in variant["numerics"]
    fp32 = art / "vision.fp32.onnx"
    own = {n: scheme for role, scheme in (plan.get("role_weights") or {}).items() for n in role_matmuls(fp32, role)}
    kept = {n for role in plan.get("keep_fp32", ()) for n in role_matmuls(fp32, role)}
    default = next(k for k, v in WEIGHT_SCHEMES.items() if v == (plan["per_channel"], plan["reduce_range"], plan["weight_type"]))
    quantised = quantised_weights(art / "vision.int8.onnx")
    assert len(quantised) == 6 * manifest["dims"]["vision_layers"] + 1 - len(kept)  # q, k, v, out, fc1, fc2; projection
    assert not kept & set(quantised)
    for node, (w, scale) in quantised.items():
        assert_weight_scheme(w, scale, own.get(node, default))


def test_export_ships_the_int8_plan_and_records_it(stress_artifacts):
    from pickscore_export.onnx_export import INT8_PLAN, INT8_PLANS

    assert INT8_PLANS["default"] is INT8_PLAN
    assert_artifacts_follow_int8_plan(stress_artifacts, "default")


def test_export_takes_another_int8_plan_by_name(tiny_model_dir, tmp_path):
    """`pickscore export --int8-plan fast`: the faster plan, recorded; an unknown name is refused before
    anything is loaded."""
    from pickscore_export.build import export_artifacts
    from pickscore_export.source import ModelSource
    from pickscore_runtime.errors import PickScoreError

    from helpers import run_cli

    out = run_cli("export", "--model", str(tiny_model_dir), "--random-init", "--out", str(tmp_path / "cli"),
                  "--precision", "int8", "--int8-plan", "fastest")
    assert out.returncode == 2 and "unknown int8 plan 'fastest'" in out.stderr and not (tmp_path / "cli").exists()
    source = ModelSource(str(tiny_model_dir), random_init=True, seed=0, stress=True)
    with pytest.raises(PickScoreError, match="unknown int8 plan 'fastest'; choose from default, fast"):
        export_artifacts(source, tmp_path / "bad", ["fp32", "int8"], int8_plan_name="fastest")
    assert not (tmp_path / "bad").exists()
    assert_artifacts_follow_int8_plan(export_artifacts(source, tmp_path / "fast", ["fp32", "int8"], int8_plan_name="fast"), "fast")


def test_a_tower_that_emits_nan_for_one_image_fails_verify_naming_it(tiny_artifacts, sample_images, tmp_path):
    from helpers import pixel_threshold, plant_nonfinite, preprocessed_means, run_cli

    means = preprocessed_means(tiny_artifacts, sample_images)
    order = np.argsort(means)
    brightest = sample_images[order[-1]]
    when = pixel_threshold(tiny_artifacts, [brightest], [sample_images[i] for i in order[:-1]])
    poisoned = plant_nonfinite(tiny_artifacts, tmp_path / "nan", tower="vision", when=when)
    out = run_cli("verify", "--artifacts", str(poisoned), "--precision", "fp32", "--output", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the report"))
    assert out.returncode == 1 and not report["passed"]
    assert report["nonfinite_outputs"] > 0 and report["nonfinite_items"] == [f"vision tower: image {brightest.name}"]
    assert f"nonfinite outputs {report['nonfinite_outputs']} > 0 (vision tower: image {brightest.name})" in out.stderr
    assert report["max_abs_image_embed_diff"] is None and report["max_abs_score_diff"] is None  # NaN, written as null
    assert json.loads((poisoned / "gate.json").read_text())["onnx-cpu/fp32"]["passed"] is False


def test_export_ends_with_the_gate_and_says_when_it_failed(tiny_model_dir, tmp_path):
    from helpers import run_cli

    out = run_cli("export", "--model", str(tiny_model_dir), "--random-init", "--stress", "--precision", "fp32,int8",
                  "--out", str(tmp_path / "art"))
    assert out.returncode == 1, out.stderr  # exported, but int8 failed its gate on these weights
    assert "gate v3, onnx-cpu/int8: FAILED (auto will not serve it)" in out.stderr
    assert "the numerics gate failed for onnx-cpu/int8" in out.stderr and "`auto` serves fp32 instead" in out.stderr
    record = json.loads((tmp_path / "art" / "gate.json").read_text())["onnx-cpu/int8"]
    assert record["passed"] is False and record["gate_version"] == 3 and record["failures"]
    skipped = run_cli("export", "--model", str(tiny_model_dir), "--random-init", "--stress", "--precision", "fp32,int8",
                      "--no-verify", "--out", str(tmp_path / "unchecked"))
    assert skipped.returncode == 0 and "int8 NOT gated (--no-verify)" in skipped.stderr
    assert not (tmp_path / "unchecked" / "gate.json").exists()
    refused = run_cli("score", "--artifacts", str(tmp_path / "art"), "--no-verify", "--prompt", "x", "y.png")
    assert refused.returncode == 2 and "--revision and --no-verify go with --model" in refused.stderr
