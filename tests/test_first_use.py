"""The main command's first use, as a user meets it: `score --model` exports what the backend runs fast
(fp32 + int8 on a CPU), gates it against the PyTorch reference, and only then serves int8; a moved hub
branch is a new export; `auto` never serves a precision without a passing gate record."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from helpers import run_cli

pytestmark = pytest.mark.integration  # the CLI and the API in fresh processes


def hub_repo(cache: Path, repo: str, commit: str, source_dir: Path, seed: int) -> Path:
    """A Hugging Face cache entry for `repo` whose main branch points at `commit`: a trained-looking tiny
    CLIP (seeded weights saved as safetensors) with its tokenizer files, laid out as huggingface_hub
    keeps downloads (blobs named by SHA-256, snapshot files linking to them)."""
    import hashlib

    import torch
    from transformers import CLIPConfig, CLIPModel

    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    staging = cache / f"staging-{commit}"
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig.from_pretrained(source_dir)).save_pretrained(staging)
    for f in source_dir.iterdir():
        if f.name != "config.json" and f.is_file():
            shutil.copyfile(f, staging / f.name)
    (folder / "blobs").mkdir(exist_ok=True)
    for f in staging.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = folder / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(blob)
    shutil.rmtree(staging)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def score_json(out: str) -> dict:
    return json.loads(out, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))


def test_model_on_a_cpu_exports_fp32_and_int8_gates_int8_and_then_serves_it(tiny_model_dir, sample_images, tmp_path):
    env = {"PICKSCORE_CACHE_DIR": str(tmp_path / "cache")}
    first = run_cli("score", "--model", str(tiny_model_dir), "--random-init", "--json", "--prompt", "a cat",
                    *map(str, sample_images[:3]), env=env)
    assert first.returncode == 0, first.stderr
    assert "first use of" in first.stderr and "GB of disk" in first.stderr  # the cost, said before the work
    assert "gate v3, onnx-cpu/int8: passed" in first.stderr
    doc = score_json(first.stdout)
    assert doc["precision"] == "int8" and doc["backend"] == "onnx-cpu"
    [entry] = [d for d in (tmp_path / "cache").glob("*fp32+int8*") if (d / "manifest.json").is_file()]
    manifest = json.loads((entry / "manifest.json").read_text())
    assert set(manifest["towers"]["vision"]["precisions"]) == {"fp32", "int8"}
    gate = json.loads((entry / "gate.json").read_text())
    assert gate["onnx-cpu/int8"]["passed"] is True and gate["onnx-cpu/int8"]["gate_version"] == 3

    again = run_cli("score", "--model", str(tiny_model_dir), "--random-init", "--json", "--prompt", "a cat",
                    *map(str, sample_images[:3]), env=env)
    assert again.returncode == 0 and "first use" not in again.stderr  # reused, not exported again
    assert score_json(again.stdout)["precision"] == "int8"

    # --no-verify: exported, not gated, so auto serves fp32 and says how to enable int8
    skipped = run_cli("score", "--model", str(tiny_model_dir), "--random-init", "--seed", "3", "--no-verify", "--json",
                      "--prompt", "a cat", str(sample_images[0]), env=env)
    assert skipped.returncode == 0, skipped.stderr
    assert "NOT gated (--no-verify)" in skipped.stderr
    assert score_json(skipped.stdout)["precision"] == "fp32"
    assert "not int8 on onnx-cpu: it has not passed the numerics gate" in skipped.stderr
    assert "pickscore verify --artifacts" in skipped.stderr


def test_auto_without_a_gate_record_serves_fp32_and_an_explicit_precision_is_honoured(tiny_artifacts, tmp_path):
    from pickscore_runtime import PickScorer
    from pickscore_runtime.artifacts import Artifacts
    from pickscore_runtime.backends import GateWarning
    from pickscore_runtime.gate_records import GATE_FILE, record_gate_results

    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    (art / GATE_FILE).unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("always", GateWarning)
        with pytest.warns(GateWarning, match="not int8 on onnx-cpu: it has not passed the numerics gate"):
            scorer = PickScorer.load(art, backend="auto", hash_check="size")
        assert scorer.backend.precision == "fp32"
        scorer.close()
        with PickScorer.load(art, backend="auto", precision="int8", hash_check="size") as scorer:
            assert scorer.backend.precision == "int8"
        fingerprint = Artifacts.load(art, hash_check="size").fingerprint
        passed = {"backend": "onnx-cpu", "precision": "int8", "passed": True, "gate_version": 3}
        record_gate_results(art, fingerprint, [{**passed, "gate_version": 2}])  # an older gate does not count
        with PickScorer.load(art, backend="auto", hash_check="size") as scorer:
            assert scorer.backend.precision == "fp32"
        record_gate_results(art, "other-towers", [passed])  # a record for other towers does not count
        with PickScorer.load(art, backend="auto", hash_check="size") as scorer:
            assert scorer.backend.precision == "fp32"
        record_gate_results(art, fingerprint, [passed])
        with PickScorer.load(art, backend="auto", hash_check="size") as scorer:
            assert scorer.backend.precision == "int8"


def test_a_moved_hub_branch_is_a_new_export_and_the_manifest_pins_the_commit(pickscore_files, tiny_model_dir, tmp_path):
    hub = tmp_path / "hub"
    commit_a, commit_b = "a" * 40, "b" * 40
    hub_repo(hub, "pickscore-test/tiny", commit_a, tiny_model_dir, seed=1)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "PICKSCORE_CACHE_DIR": str(tmp_path / "cache")}
    image = tmp_path / "x.png"
    from pickscore_export.samples import synthetic_image

    synthetic_image(64, 48, 5).save(image)
    args = ("score", "--model", "pickscore-test/tiny", "--no-verify", "--precision", "fp32", "--json", "--prompt",
            "a cat", str(image))
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    score_a = score_json(first.stdout)["results"][0]["score"]

    snapshot_b = hub_repo(hub, "pickscore-test/tiny", commit_b, tiny_model_dir, seed=2)  # main now points at B
    second = run_cli(*args, env=env)
    assert second.returncode == 0, second.stderr
    assert "first use of" in second.stderr  # exported again: the cache is keyed on the commit
    score_b = score_json(second.stdout)["results"][0]["score"]
    assert score_b != pytest.approx(score_a, abs=1e-4)

    entries = sorted(d for d in (tmp_path / "cache").glob("tiny-*") if (d / "manifest.json").is_file())
    assert len(entries) == 2
    sources = [json.loads((e / "manifest.json").read_text())["model"]["source"] for e in entries]
    assert {s["commit"] for s in sources} == {commit_a, commit_b}
    by_commit = {s["commit"]: s for s in sources}
    blob = (snapshot_b / "model.safetensors").resolve().name
    assert by_commit[commit_b]["weights_sha256"] == {"model.safetensors": blob}

    # --revision pins the old commit again: the first export is reused, with its scores
    pinned = run_cli(*args[:2], "pickscore-test/tiny", "--revision", commit_a, *args[3:], env=env)
    assert pinned.returncode == 0 and "first use" not in pinned.stderr, pinned.stderr
    assert score_json(pinned.stdout)["results"][0]["score"] == pytest.approx(score_a, abs=1e-6)

    # Python does what --model does (a fresh process: huggingface_hub reads HF_HUB_CACHE when imported)
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "from pickscore_runtime import PickScorer\n"
            "with PickScorer.from_pretrained('pickscore-test/tiny', verify=False, precision='fp32') as s:\n"
            "    print(s.artifacts.manifest['model']['source']['commit'], float(s.score('a cat', [%r]).scores[0]))\n"
            % str(image))
    api = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **env})
    assert api.returncode == 0, api.stderr
    commit, score = api.stdout.split()
    assert commit == commit_b and float(score) == pytest.approx(score_b, abs=1e-6)


def test_first_use_exports_what_the_backend_runs():
    from pickscore_runtime.export_cache import first_use_plan

    assert first_use_plan("auto", None) == (["fp32", "int8"], "onnx-cpu")  # this machine has no GPU
    assert first_use_plan("onnx-cpu", "fp16") == (["fp32", "int8", "fp16"], "onnx-cpu")
    assert first_use_plan("torch", "bf16") == (["fp32"], "onnx-cpu")  # built from the weights
    assert first_use_plan("onnx-cuda", None)[0] == ["fp32", "fp16"]  # the GPU plan, wherever it is asked for
