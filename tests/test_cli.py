"""The `pickscore` command as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import run_cli
from pickscore_runtime import __version__
from pickscore_runtime.cli import main

pytestmark = pytest.mark.integration


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
    code = main(["score", "--artifacts", str(tiny_artifacts), "--prompt", "a dog", "--hash-check", "size",
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


def test_score_with_model_exports_once_into_cache(tiny_model_dir, tiny_reference, sample_images, tmp_path, tolerances):
    env = {"PICKSCORE_CACHE_DIR": str(tmp_path / "cache")}
    images = [str(p) for p in sample_images[:3]]
    args = ("score", "--model", str(tiny_model_dir), "--random-init", "--precision", "fp32", "--prompt", "a cat", "--json",
            *images)
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert "exporting to" in first.stderr
    (cached,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert "random0-fp32+int8" in cached.name  # what the CPU runs fast, exported beside the exact fp32
    second = run_cli(*args, env=env)
    assert second.returncode == 0 and "exporting" not in second.stderr
    want, _ = tiny_reference.calc_probs(tiny_reference.text_embeddings(["a cat"])[0], tiny_reference.image_embeddings(images))
    for out in (first, second):
        got = np.array([r["score"] for r in json.loads(out.stdout)["results"]])
        assert np.abs(got - want).max() <= tolerances["fp32"]["max_abs_score_diff"]


def test_flags_are_checked_before_any_export(tiny_model_dir, sample_images, tmp_path):
    env = {"PICKSCORE_CACHE_DIR": str(tmp_path / "cache")}
    image = str(sample_images[0])
    out = run_cli("score", "--model", str(tiny_model_dir), "--random-init", "--backend", "onnx-cuda", "--prompt", "x",
                  image, env=env)  # no GPU here: refused before the export, not after it
    assert out.returncode == 2 and "backend onnx-cuda cannot run here" in out.stderr, out.stderr
    out = run_cli("score", "--model", str(tiny_model_dir), "--random-init", "--json", "--output", str(tmp_path / "o.csv"),
                  "--prompt", "x", image, env=env)
    assert out.returncode == 2 and "--json" in out.stderr and not (tmp_path / "o.csv").exists()
    out = run_cli("score", "--model", str(tiny_model_dir), "--random-init", "--backend", "onnx-cpu", "--no-build",
                  "--prompt", "x", image, env=env)  # a tensorrt option on a backend that has none
    assert out.returncode == 2 and "takes no option 'build'" in out.stderr
    out = run_cli("score", "--model", str(tiny_model_dir), "--random-init", "--backend", "onnx-cpuu", "--prompt", "x",
                  str(sample_images[0]), env=env)
    assert out.returncode == 2 and "invalid choice: 'onnx-cpuu'" in out.stderr
    out = run_cli("score", "--model", str(tiny_model_dir), "--random-init", "--backend", "onnx-cuda", "--precision", "int8",
                  "--prompt", "x", str(sample_images[0]), env=env)
    assert out.returncode == 2 and "runs fp16, fp32, not int8" in out.stderr
    out = run_cli("score", "--model", str(tiny_model_dir), "--random-init", "--batch-size", "-3", "--prompt", "x",
                  str(sample_images[0]), env=env)
    assert out.returncode == 2 and "must be at least 1" in out.stderr
    assert not (tmp_path / "cache").exists()


def test_version_info_and_help(tiny_artifacts):
    out = run_cli("--version")
    assert out.returncode == 0 and __version__ in out.stdout
    info = run_cli("info", "--artifacts", str(tiny_artifacts))
    doc = json.loads(info.stdout)
    assert info.returncode == 0 and doc["precisions"] == ["fp32", "fp16", "int8"] and doc["random_weights"] is True
    for command in ("export", "score", "verify", "bench", "info", "cache"):
        lines = run_cli(command, "--help").stdout.splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("  -"):
                continue
            # an option's help follows on its line after a gap, or on the next, deeper-indented line
            described = re.search(r"\S\s{2,}\S", line.strip()) is not None or (i + 1 < len(lines) and lines[i + 1].startswith(" " * 10))
            assert described, f"pickscore {command}: {line.strip()!r} has no help text"


def test_warnings_reach_the_user_and_quiet_hides_them(tiny_artifacts, sample_images, tmp_path):
    cache = tmp_path / "c.sqlite"
    damaged = b"\0" * 68 + b"PSC1" + b"not a database any more" * 64  # our cache's header id, the rest broken
    cache.write_bytes(damaged)
    args = ("score", "--artifacts", str(tiny_artifacts), "--hash-check", "size", "--text-cache", str(cache),
            "--prompt", "a cat", str(sample_images[0]))
    loud = run_cli(*args)
    assert loud.returncode == 0 and "warning: text cache" in loud.stderr and "moved to" in loud.stderr
    cache.write_bytes(damaged)
    for quiet in (run_cli("-q", *args), run_cli(*args, "-q")):  # before or after the subcommand
        assert quiet.returncode == 0 and "warning" not in quiet.stderr
        cache.write_bytes(damaged)


def test_internal_errors_exit_3_with_a_short_message(tiny_artifacts, sample_images, tmp_path):
    # A bug nobody anticipated, planted in the real CLI process at start-up (every artifact fault is an
    # anticipated exit 2 now: test_artifact_faults.py)
    (tmp_path / "sitecustomize.py").write_text(
        "import pickscore_runtime.cli.score as score\n"
        "def work_rows(args):\n    raise RuntimeError('a bug nobody anticipated')\n"
        "score.work_rows = work_rows\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    args = ("score", "--artifacts", str(tiny_artifacts), "--hash-check", "size", "--prompt", "a cat", str(sample_images[0]))
    out = run_cli(*args, env=env)
    assert out.returncode == 3 and "internal error" in out.stderr and "a bug nobody anticipated" in out.stderr
    assert "Traceback" not in out.stderr
    verbose = run_cli("-v", *args, env=env)
    assert verbose.returncode == 3 and "Traceback" in verbose.stderr


def test_sigint_exits_130(tiny_artifacts, sample_images, tmp_path):
    work = tmp_path / "work.jsonl"
    work.write_text("".join(json.dumps({"prompt": f"p{i}", "image": str(sample_images[i % 18])}) + "\n" for i in range(400)))
    proc = subprocess.Popen([sys.executable, "-m", "pickscore_runtime.cli", "score", "--artifacts", str(tiny_artifacts),
                             "--hash-check", "size", "--input", str(work)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline()  # scoring has started
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "SIGINT" in err and "Traceback" not in err
    rows = [json.loads(line) for line in out.splitlines()]  # every row printed is whole: the work in flight finished
    assert len(rows) + 1 < 400 and all(row["prompt"].startswith("p") for row in rows)


def test_verify_cli_passes_and_writes_json(tiny_artifacts, tmp_path):
    report_path = tmp_path / "verify.json"
    out = run_cli("verify", "--artifacts", str(tiny_artifacts), "--output", str(report_path))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(report_path.read_text())
    for key in ("passed", "backend", "precision", "n_prompts", "n_images", "max_abs_score_diff", "max_abs_prob_diff",
                "rank_agreement", "min_cosine_text", "min_cosine_image"):
        assert key in report
    assert report["passed"] and report["n_prompts"] >= 8 and report["n_images"] >= 16
    assert report["max_abs_score_diff"] <= report["tolerances"]["max_abs_score_diff"] and report["rank_agreement"] == 1.0


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


@pytest.mark.parametrize("argv, says", [
    (["score", "--promt", "x", "a.png"], "unknown flag --promt (did you mean --prompt?)"),
    (["scroe", "--prompt", "x"], "did you mean score?"),
    (["score", "--prompt", "a", "--prompt", "b", "a.png"], "--prompt given twice"),
    (["score", "-v", "--prompt", "a", "a.png", "-q"], "-v and -q contradict"),
    (["export", "--out"], "expected one argument"),
])
def test_usage_errors_are_one_line_and_a_hint(argv, says, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert info.value.code == 2 and len(lines) == 2, lines
    assert says in lines[0] and lines[1].startswith("hint: `pickscore")


def test_bare_pickscore_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pickscore") and "score" in out and "export" in out


def test_verbose_after_the_subcommand_and_one_backend_line(tiny_artifacts, sample_images):
    args = ("score", "--artifacts", str(tiny_artifacts), "--hash-check", "size", "--prompt", "a cat", str(sample_images[0]))
    plain = run_cli(*args)
    using = [line for line in plain.stderr.splitlines() if line.startswith("using ")]
    assert plain.returncode == 0 and len(using) == 1 and len(using[0]) < 100 and "skipped" not in plain.stderr
    verbose = run_cli(*args, "-v")
    assert verbose.returncode == 0 and "backend: chosen by auto; skipped tensorrt" in verbose.stderr


def test_a_file_given_as_artifacts_and_a_folder_without_images(tiny_artifacts, sample_images, tmp_path):
    out = run_cli("score", "--artifacts", str(sample_images[0]), "--prompt", "x", str(sample_images[1]))
    assert out.returncode == 2 and "is a file" in out.stderr
    (tmp_path / "notes.txt").write_text("not an image")
    out = run_cli("score", "--artifacts", str(tiny_artifacts), "--hash-check", "size", "--prompt", "x", str(tmp_path))
    assert out.returncode == 2 and "holds no image files" in out.stderr
    shutil.copy(sample_images[0], tmp_path)
    out = run_cli("score", "--artifacts", str(tiny_artifacts), "--hash-check", "size", "--prompt", "x", str(tmp_path),
                  str(tmp_path / "notes.txt"))  # named outright: a row of its own, with its reason
    assert out.returncode == 1 and "ERROR lines above" in out.stderr and "notes.txt  ERROR" in out.stdout, out


def test_devices_and_urls_are_named_for_what_they_are(tiny_artifacts, sample_images):
    url = "https://example.com/cat.png?size=large"
    out = run_cli("score", "--artifacts", str(tiny_artifacts), "--hash-check", "size", "--prompt", "a cat", "--json",
                  "/dev/zero", url, str(sample_images[0]))
    assert out.returncode == 1, out.stderr
    doc = json.loads(out.stdout)
    errors = {r["image"]: r.get("error") for r in doc["results"]}
    assert "not a regular file (character device)" in errors["/dev/zero"]
    assert "URLs are not fetched; download the image first" in errors[url]
    assert errors[str(sample_images[0])] is None
