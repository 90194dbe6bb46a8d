"""Export targets: --force replaces only our own artifacts, concurrent exports take turns or are refused,
a killed export's staging directory is cleaned up by the next export of that target."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import run_cli
from pickscore_runtime.artifacts import Artifacts

pytestmark = pytest.mark.integration


def export_args(model_dir, out, *extra) -> list[str]:
    return ["export", "--model", str(model_dir), "--random-init", "--out", str(out), *extra]


def test_force_replaces_artifacts_but_nothing_else(tiny_model_dir, tiny_artifacts, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refused = run_cli(*export_args(tiny_model_dir, mine, "--force"))
    assert refused.returncode == 2 and "not a PickScore artifacts directory" in refused.stderr
    assert (mine / "thesis.tex").read_text() == "years of work" and sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]

    target = tmp_path / "art"
    # fp32 only, and no gate: what is tested is which directories --force may replace (CI time)
    assert run_cli(*export_args(tiny_model_dir, target, "--precision", "fp32")).returncode == 0
    first = json.loads((target / "manifest.json").read_text())["created_utc"]
    again = run_cli(*export_args(tiny_model_dir, target, "--precision", "fp32"))
    assert again.returncode == 2 and "pass --force" in again.stderr
    time.sleep(1.1)
    assert run_cli(*export_args(tiny_model_dir, target, "--force", "--precision", "fp32,int8", "--no-verify")).returncode == 0
    replaced = Artifacts.load(target)
    assert replaced.precisions == ["fp32", "int8"] and replaced.manifest["created_utc"] != first


def test_concurrent_exports_one_wins_the_other_says_so(tiny_model_dir, tmp_path):
    target = tmp_path / "art"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "pickscore_runtime.cli", *export_args(tiny_model_dir, target, "--precision", "fp32")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = next(err for p, (_, err) in zip(procs, outs) if p.returncode == 2)
    assert "in use by another process" in loser or "already exists" in loser
    Artifacts.load(target)


def test_killed_export_leaves_no_staging_behind_the_next_one(tiny_model_dir, tmp_path):
    target = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "pickscore_runtime.cli", *export_args(tiny_model_dir, target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".art.staging-*/*.onnx")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".art.staging-*")) and not target.exists()  # kill -9: nothing could clean up
    assert run_cli(*export_args(tiny_model_dir, target, "--precision", "fp32")).returncode == 0
    assert not list(tmp_path.glob(".art.staging-*")) and not list(tmp_path.glob(".art.old-*"))
    Artifacts.load(target)


def test_two_processes_scoring_with_model_export_once(tiny_model_dir, sample_images, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PICKSCORE_CACHE_DIR": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "pickscore_runtime.cli", "score", "--model", str(tiny_model_dir), "--random-init",
            "--no-verify", "--prompt", "a cat", "--json", str(sample_images[0])]  # the lock is tested, not the gate
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in outs]
    assert sum("loading model" in err for _, err in outs) == 1  # one exported, the other waited and reused it
    assert json.loads(outs[0][0])["results"][0]["score"] == json.loads(outs[1][0])["results"][0]["score"]
    cached = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(cached) == 1 and not list((tmp_path / "cache").glob(".*staging*"))
