"""The `pickscore` command as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pickscore_runtime.cli import main


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pickscore_runtime.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def test_score_json_in_input_order_with_bad_image(tiny_artifacts, sample_images, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    images = [str(sample_images[4]), str(bad), str(sample_images[0])]
    out = run_cli("score", "--artifacts", str(tiny_artifacts), "--prompt", "a cat", "--json", *images)
    assert out.returncode == 1, out.stderr  # 1: some images could not be scored
    doc = json.loads(out.stdout)
    assert doc["prompt"] == "a cat" and doc["random_weights"] is True
    assert [r["image"] for r in doc["results"]] == images
    assert doc["results"][1]["score"] is None and "cannot decode" in doc["results"][1]["error"]
    assert sorted(r["rank"] for r in doc["results"] if r["rank"]) == [1, 2]
    assert "RANDOM WEIGHTS" in out.stderr


def test_score_table(tiny_artifacts, sample_images, capsys):
    code = main(["score", "--artifacts", str(tiny_artifacts), "--prompt", "a dog", "--fast-load",
                 str(sample_images[1]), str(sample_images[2])])
    table = capsys.readouterr().out.splitlines()
    assert code == 0
    assert "RANDOM WEIGHTS" in table[0] and table[1].split() == ["rank", "score", "prob", "image"]
    assert [line.split()[0] for line in table[2:]] == ["1", "2"]


def test_missing_weights_is_one_clear_message(tmp_path):
    out = run_cli("export", "--out", str(tmp_path / "a"))  # default: the hub id, with no network here
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "--model DIR" in out.stderr and "yuvalkirstain/PickScore_v1" in out.stderr
    assert not (tmp_path / "a").exists()


def test_missing_artifacts_is_one_clear_message(tmp_path):
    out = run_cli("score", "--artifacts", str(tmp_path / "nothing"), "--prompt", "x", "a.png")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "pickscore export" in out.stderr


def test_score_with_model_exports_once_into_cache(tiny_model_dir, sample_images, tmp_path):
    env = {"PICKSCORE_CACHE_DIR": str(tmp_path / "cache")}
    args = ("score", "--model", str(tiny_model_dir), "--random-init", "--prompt", "a cat", "--json", str(sample_images[0]))
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert "exporting to" in first.stderr
    (cached,) = (tmp_path / "cache").iterdir()
    assert "random0-fp32" in cached.name
    second = run_cli(*args, env=env)
    assert second.returncode == 0 and "exporting" not in second.stderr
    assert json.loads(second.stdout) == json.loads(first.stdout)


def test_verify_cli_passes_and_writes_json(tiny_artifacts, tmp_path):
    report_path = tmp_path / "verify.json"
    out = run_cli("verify", "--artifacts", str(tiny_artifacts), "--json", str(report_path))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(report_path.read_text())
    for key in ("passed", "backend", "precision", "n_prompts", "n_images", "max_abs_score_diff", "max_abs_prob_diff",
                "rank_agreement", "min_cosine_text", "min_cosine_image"):
        assert key in report
    assert report["passed"] and report["n_prompts"] >= 8 and report["n_images"] >= 16
    assert report["max_abs_score_diff"] <= 1e-3 and report["rank_agreement"] == 1.0


def test_verify_refuses_a_different_model_than_exported(tiny_artifacts, tiny_model_dir):
    out = run_cli("verify", "--artifacts", str(tiny_artifacts), "--model", str(tiny_model_dir), "--random-init", "--seed", "7")
    assert out.returncode == 2 and "seed 0" in out.stderr and "seed 7" in out.stderr


def test_verify_fails_when_numerics_are_off(tiny_artifacts, tmp_path):
    """The gate must be able to fail: artifacts whose logit scale was edited no longer match the reference."""
    import shutil

    from pickscore_export.verify import verify

    broken = shutil.copytree(tiny_artifacts, tmp_path / "broken")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["logit_scale"] += 0.01  # 1 % off
    (broken / "manifest.json").write_text(json.dumps(manifest))
    report = verify(broken)
    assert not report["passed"] and any("score" in f for f in report["failures"])


@pytest.mark.parametrize("argv", [["score", "--prompt", "x", "a.png"], ["nonsense"]])
def test_usage_errors(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
