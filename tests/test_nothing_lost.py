"""Nothing lost: kill -9 and SIGTERM at several points of CSV, JSONL and Parquet runs, each followed by
--resume and checked row by row against an uninterrupted run; outputs that would destroy data are
refused; concurrent writers; a full disk; exit codes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import mounted_tmpfs, run_cli
from pickscore_export.samples import synthetic_image

pytestmark = pytest.mark.integration
N_ROWS = 1200
COMMIT = "40"


@pytest.fixture(scope="module")
def small_jpegs(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("small")
    paths = []
    for i in range(12):
        paths.append(str(folder / f"s{i:02d}.jpg"))
        synthetic_image(48 + i, 40, seed=500 + i).save(paths[-1], "JPEG")
    return paths


def write_work(path: Path, images: list[str], n: int = N_ROWS) -> Path:
    """Comparisons of 3 rows each; every 97th row bad in its own way."""
    rows = []
    for i in range(n):
        if i % 97 == 13:
            rows.append({"id": f"r{i}", "prompt": f"prompt {i // 3}", "image": ""})  # empty image path
        else:
            rows.append({"id": f"r{i}", "prompt": f"prompt {i // 3}", "image": images[i % len(images)]})
    fmt = path.suffix
    if fmt == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "prompt", "image"])
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read_output(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(open(path, newline="")))
    else:
        rows = [json.loads(line) for line in open(path)]

    def num(v, kind):
        return None if v in (None, "") else kind(v)
    return [{"id": str(r["id"]), "row": int(r["row"]), "image": r["image"] or None, "error": r["error"] or None,
             "score": num(r["score"], float), "prob": num(r["prob"], float), "rank": num(r["rank"], int)} for r in rows]


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    assert [(r["id"], r["row"], r["image"], r["error"], r["rank"]) for r in got] == \
           [(r["id"], r["row"], r["image"], r["error"], r["rank"]) for r in want]
    for g, w in zip(got, want):
        if w["score"] is None:
            assert g["score"] is None
        else:
            assert abs(g["score"] - w["score"]) <= 1e-5 and abs(g["prob"] - w["prob"]) <= 1e-6


def score_args(artifacts, work, out, *extra) -> list[str]:
    # fp32: its scores do not depend on which images share a batch, and a resumed run batches differently.
    # (Dynamic int8 quantises activations with a scale taken over the whole batch, so its scores do.)
    return ["score", "--artifacts", str(artifacts), "--hash-check", "size", "--precision", "fp32", "--input", str(work),
            "--output", str(out), "--commit-rows", COMMIT, "--batch-size", "4", *extra]


def start(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pickscore_runtime.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def parts_of(out: Path) -> int:
    parts = out.with_name(out.name + ".parts")
    return len(list(parts.glob("part-*"))) if parts.is_dir() else 0


def run_until(proc: subprocess.Popen, out: Path, parts: int, timeout: float = 120) -> int:
    """Wait until `out` has at least `parts` committed parts (0: until scoring started); return how many."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        have = parts_of(out)
        if have >= parts and (parts or have or out.with_name(f".{out.name}.lock").exists()):
            return have
        time.sleep(0.01)
    raise AssertionError(f"the run ended or stalled before {parts} parts: {proc.poll()} {proc.stderr.read()[-2000:]}")


@pytest.fixture(scope="module", params=["csv", "jsonl", "parquet"])
def baseline(request, tiny_artifacts, small_jpegs, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"base_{request.param}")
    work = write_work(folder / f"work.{request.param}", small_jpegs)
    out = folder / f"full.{request.param}"
    done = run_cli(*score_args(tiny_artifacts, work, out))
    assert done.returncode == 1, done.stderr[-2000:]  # the bad rows are reported, everything else scored
    rows = read_output(out)
    n_bad = sum(1 for i in range(N_ROWS) if i % 97 == 13)
    assert len(rows) == N_ROWS and sum(1 for r in rows if r["error"]) == n_bad
    assert f"{n_bad} item(s) could not be scored" in done.stderr
    return work, rows


@pytest.mark.parametrize("kill_at_parts", [0, 3, 12])
def test_kill_9_then_resume_writes_every_row_once(baseline, tiny_artifacts, tmp_path, kill_at_parts):
    work, want = baseline
    out = tmp_path / f"out{work.suffix}"
    proc = start(score_args(tiny_artifacts, work, out))
    reached = run_until(proc, out, kill_at_parts)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and reached >= kill_at_parts
    assert not out.exists()  # only committed parts so far
    again = run_cli(*score_args(tiny_artifacts, work, out, "--resume"))
    assert again.returncode == 1, again.stderr[-2000:]
    if reached:
        assert "resuming" in again.stderr
    assert_same_rows(read_output(out), want)
    assert not out.with_name(out.name + ".parts").exists()


def test_sigterm_leaves_a_valid_output_and_resume_completes_it(baseline, tiny_artifacts, tmp_path):
    work, want = baseline
    out = tmp_path / f"out{work.suffix}"
    proc = start(score_args(tiny_artifacts, work, out))
    run_until(proc, out, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "rerun the same command with --resume" in err and "Traceback" not in err
    partial = read_output(out)  # a complete, readable file (a Parquet footer and all)
    assert 0 < len(partial) < N_ROWS
    assert_same_rows(partial, want[: len(partial)])
    again = run_cli(*score_args(tiny_artifacts, work, out, "--resume"))
    assert again.returncode == 1
    assert_same_rows(read_output(out), want)


def test_crash_between_merge_and_cleanup_still_gives_each_row_once(baseline, tiny_artifacts, tmp_path):
    work, want = baseline
    out = tmp_path / f"out{work.suffix}"
    parts = out.with_name(out.name + ".parts")
    proc = start(score_args(tiny_artifacts, work, out))
    run_until(proc, out, 4)
    proc.kill()
    proc.wait()
    saved = shutil.copytree(parts, tmp_path / "saved_parts")
    assert run_cli(*score_args(tiny_artifacts, work, out, "--resume")).returncode == 1
    shutil.copytree(saved, parts)  # as if the run died after renaming OUT into place, before removing its parts
    again = run_cli(*score_args(tiny_artifacts, work, out, "--resume"))
    assert again.returncode == 1
    assert_same_rows(read_output(out), want)


def test_output_that_is_the_input_is_refused(tiny_artifacts, small_jpegs, tmp_path):
    for fmt in ("csv", "jsonl", "parquet"):
        work = write_work(tmp_path / f"w.{fmt}", small_jpegs, n=6)
        before = work.read_bytes()
        for out in (work, tmp_path / "." / f"w.{fmt}"):
            done = run_cli("score", "--artifacts", str(tiny_artifacts), "--input", str(work), "--output", str(out))
            assert done.returncode == 2 and "is the input file" in done.stderr
        os.link(work, tmp_path / f"hardlink.{fmt}")
        done = run_cli("score", "--artifacts", str(tiny_artifacts), "--input", str(work), "--output",
                       str(tmp_path / f"hardlink.{fmt}"), "--overwrite")
        assert done.returncode == 2 and "is the input file" in done.stderr
        assert work.read_bytes() == before


def test_existing_output_is_never_overwritten_silently(tiny_artifacts, small_jpegs, tmp_path):
    work = write_work(tmp_path / "w.jsonl", small_jpegs, n=6)
    out = tmp_path / "results.csv"
    out.write_text("precious,data\n1,2\n")
    refused = run_cli("score", "--artifacts", str(tiny_artifacts), "--input", str(work), "--output", str(out))
    assert refused.returncode == 2 and "--resume" in refused.stderr and "--overwrite" in refused.stderr
    assert out.read_text() == "precious,data\n1,2\n"
    resumed = run_cli("score", "--artifacts", str(tiny_artifacts), "--input", str(work), "--output", str(out), "--resume")
    assert resumed.returncode == 2 and "no id column" in resumed.stderr  # not ours: not appended to
    assert out.read_text() == "precious,data\n1,2\n"
    replaced = run_cli("score", "--artifacts", str(tiny_artifacts), "--input", str(work), "--output", str(out), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert len(read_output(out)) == 6


def test_a_second_writer_is_refused(tiny_artifacts, small_jpegs, tmp_path):
    work = write_work(tmp_path / "w.jsonl", small_jpegs)
    out = tmp_path / "out.jsonl"
    first = start(score_args(tiny_artifacts, work, out))
    run_until(first, out, 1)
    second = run_cli(*score_args(tiny_artifacts, work, out, "--resume"))
    assert second.returncode == 2 and "another pickscore run is writing" in second.stderr and "pid" in second.stderr
    first.communicate(timeout=300)
    assert first.returncode == 1 and len(read_output(out)) == N_ROWS


def test_full_disk_keeps_what_was_committed(tiny_artifacts, small_jpegs, tmp_path):
    work = write_work(tmp_path / "w.jsonl", small_jpegs)
    with mounted_tmpfs(tmp_path / "fs", "48k") as fs:
        if fs is not None:
            out = fs / "out.jsonl"
            done = run_cli(*score_args(tiny_artifacts, work, out))
        else:  # no mount here: the same failure through a file-size limit (EFBIG instead of ENOSPC)
            out = tmp_path / "out.jsonl"
            limit = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
                    "resource.setrlimit(resource.RLIMIT_FSIZE, (48000, 48000))"
            done = subprocess.run([sys.executable, "-c", f"{limit}; import sys; from pickscore_runtime.cli import main; "
                                   f"sys.exit(main({score_args(tiny_artifacts, work, out)!r}))"],
                                  capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "cannot write" in done.stderr and "--resume" in done.stderr and "Traceback" not in done.stderr
        kept = sum(len(read_output(p)) for p in out.with_name(out.name + ".parts").glob("part-*"))
        assert 0 < kept < N_ROWS


@pytest.mark.parametrize("argv,message", [
    (["--input", "missing.jsonl"], "input file missing.jsonl not found"),
    (["--input", "{work}", "--output", "/proc/no/such/dir/out.csv"], "cannot write"),
    (["--input", "{work}", "--workers", "-1"], "must be at least 1"),
    (["--input", "{work}", "--resume"], "--resume and --overwrite go with --output"),
    (["--prompt", "x", "{empty}"], "no images to score"),
])
def test_usage_and_setup_errors_exit_2_without_a_traceback(tiny_artifacts, small_jpegs, tmp_path, argv, message):
    work = write_work(tmp_path / "w.jsonl", small_jpegs, n=3)
    (tmp_path / "empty").mkdir()
    argv = [a.format(work=work, empty=tmp_path / "empty") for a in argv]
    done = run_cli("score", "--artifacts", str(tiny_artifacts), *argv, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_huge_images_are_refused_by_name(tiny_artifacts, tmp_path, small_jpegs):
    from PIL import Image

    big = tmp_path / "9000x9000.png"
    Image.new("L", (9000, 9000)).save(big)  # 81 Mpx of one colour: a tiny file, a big decode
    done = run_cli("score", "--artifacts", str(tiny_artifacts), "--hash-check", "size", "--prompt", "a cat", "--json",
                   str(big), small_jpegs[0])
    doc = json.loads(done.stdout)
    assert done.returncode == 1
    assert "9000x9000 = 81 Mpx is over the 67 Mpx limit" in doc["results"][0]["error"]
    assert doc["results"][1]["score"] is not None
    lowered = run_cli("score", "--artifacts", str(tiny_artifacts), "--hash-check", "size", "--max-image-pixels", "1000",
                      "--prompt", "a cat", "--json", small_jpegs[0])
    assert "over the 0 Mpx limit" in json.loads(lowered.stdout)["results"][0]["error"]


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(logit_scale=float("nan")), "logit_scale is nan"),
    (lambda m: m["towers"]["vision"].update(precisions="oops"), "towers.vision.precisions is missing"),
    (lambda m: m["dims"].update(embed_dim="64"), "dims.embed_dim is '64'"),
    (lambda m: m["towers"]["text"]["precisions"]["fp32"]["files"][0].update(path="../../etc/passwd"),
     "outside the artifacts directory"),
])
def test_malformed_manifests_are_setup_errors_even_with_size_checks(tiny_artifacts, tmp_path, small_jpegs, edit, message):
    broken = shutil.copytree(tiny_artifacts, tmp_path / "broken")
    manifest = json.loads((broken / "manifest.json").read_text())
    edit(manifest)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    done = run_cli("score", "--artifacts", str(broken), "--hash-check", "size", "--prompt", "a cat", small_jpegs[0])
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
