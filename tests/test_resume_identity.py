"""A resume can only finish the same run: `pickscore score --output --resume` refuses (exit 2, saying what
changed) an input with rows inserted or edited, other artifacts, another precision, or another run's output;
and rows no file can encode (lone surrogates) become error rows that every output format can write."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import run_cli

pytestmark = pytest.mark.integration


def score(artifacts, work, out, *extra, precision="fp32"):
    return run_cli("score", "--artifacts", str(artifacts), "--hash-check", "size", "--precision", precision,
                   "--input", str(work), "--output", str(out), "--commit-rows", "20", *extra)


def write_csv(path, rows, fields=("prompt", "image")):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


def rows_for(images, n, ids=False):
    return [{**({"id": f"r{i}"} if ids else {}), "prompt": f"prompt {i // 3}", "image": str(images[i % len(images)])}
            for i in range(n)]


def test_a_row_inserted_into_an_input_without_ids_is_refused(tiny_artifacts, sample_images, tmp_path):
    work = write_csv(tmp_path / "work.csv", rows_for(sample_images, 150))
    out = tmp_path / "out.jsonl"
    assert score(tiny_artifacts, work, out).returncode == 0
    before = out.read_bytes()
    rows = rows_for(sample_images, 150)
    write_csv(work, [{"prompt": "an inserted row", "image": str(sample_images[0])}, *rows])
    again = score(tiny_artifacts, work, out, "--resume")
    assert again.returncode == 2, again.stderr[-2000:]
    assert "the input is not the one" in again.stderr and "line 2 (id '1') is not the row" in again.stderr
    assert "lines: 151 -> 152" in again.stderr and "Traceback" not in again.stderr
    assert out.read_bytes() == before


def test_an_edited_prompt_under_the_same_id_is_refused(tiny_artifacts, sample_images, tmp_path):
    rows = rows_for(sample_images, 30, ids=True)
    work = write_csv(tmp_path / "work.csv", rows, ("id", "prompt", "image"))
    out = tmp_path / "out.csv"
    assert score(tiny_artifacts, work, out).returncode == 0
    rows[7]["prompt"] = "prompt 2, edited"  # same length class of change: an id still maps to a row
    write_csv(work, rows, ("id", "prompt", "image"))
    again = score(tiny_artifacts, work, out, "--resume")
    assert again.returncode == 2 and "line 9 (id 'r7') is not the row" in again.stderr, again.stderr[-2000:]


def test_other_artifacts_or_precision_are_refused_mid_run(tiny_artifacts, sample_images, tmp_path):
    work = write_csv(tmp_path / "work.csv", rows_for(sample_images, 600, ids=True), ("id", "prompt", "image"))
    out = tmp_path / "out.parquet"
    pytest.importorskip("pyarrow")
    proc = subprocess.Popen([sys.executable, "-m", "pickscore_runtime.cli", "score", "--artifacts", str(tiny_artifacts),
                             "--hash-check", "size", "--precision", "fp32", "--input", str(work), "--output", str(out),
                             "--commit-rows", "20", "--batch-size", "2"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    parts = out.with_name(out.name + ".parts")
    while proc.poll() is None and len(list(parts.glob("part-*"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = sorted(p.name for p in parts.glob("part-*"))
    assert committed, "the run ended before it committed anything"

    other = shutil.copytree(tiny_artifacts, tmp_path / "other")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["logit_scale"] += 0.5  # other weights, as far as the scores go
    (other / "manifest.json").write_text(json.dumps(manifest))
    refused = score(other, work, out, "--resume")
    assert refused.returncode == 2 and "other model settings" in refused.stderr and "artifacts:" in refused.stderr, \
        refused.stderr[-2000:]
    refused = score(tiny_artifacts, work, out, "--resume", precision="int8")
    assert refused.returncode == 2 and "precision: 'fp32' -> 'int8'" in refused.stderr, refused.stderr[-2000:]
    assert sorted(p.name for p in parts.glob("part-*")) == committed and not out.exists()  # nothing touched

    finished = score(tiny_artifacts, work, out, "--resume")  # the same run still finishes
    assert finished.returncode == 0 and "resuming" in finished.stderr, finished.stderr[-2000:]
    import pyarrow.parquet as pq

    ids = pq.read_table(out, columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(f"r{i}" for i in range(600))


def test_another_runs_output_is_refused(tiny_artifacts, sample_images, tmp_path):
    first = write_csv(tmp_path / "a.csv", rows_for(sample_images, 12))
    unrelated = write_csv(tmp_path / "b.csv", [{"prompt": "something else", "image": str(sample_images[1])}] * 5)
    out = tmp_path / "out.jsonl"
    assert score(tiny_artifacts, first, out).returncode == 0
    before = out.read_bytes()
    again = score(tiny_artifacts, unrelated, out, "--resume")
    assert again.returncode == 2 and "the input is not the one" in again.stderr and "sha256" in again.stderr
    assert out.read_bytes() == before
    no_record = tmp_path / "copied.jsonl"
    shutil.copy(out, no_record)  # an output without the record beside it cannot be checked
    again = score(tiny_artifacts, first, no_record, "--resume")
    assert again.returncode == 2 and "has no run record" in again.stderr


BAD_LINES = [
    '{"id": "ok1", "prompt": "a cat", "image": "IMG0"}',
    '{"id": "bad\\ud800id", "prompt": "a cat", "image": "IMG0"}',
    '{"id": "p", "prompt": "bad \\udc00 prompt", "image": "IMG0"}',
    '{"id": "g", "prompt": "a cat", "group": "\\ud83d", "image": "IMG0"}',
    '{"id": "i", "prompt": "a cat", "image": "img\\udfff.png"}',
    '{"id": ["a list"], "prompt": "a cat", "image": "IMG0"}',
    '{"id": "t", "prompt": "a cat", "group": {"x": 1}, "image": "IMG0"}',
    '{"id": "m", "prompt": "a cat"}',
    '{"id": "n", "prompt": null, "image": "IMG0"}',
    '{"id": "deep", "prompt": "a cat", "image": ' + "[" * 100000 + "]" * 100000 + "}",
    '{"id": "ok2", "prompt": "a dog", "image": "IMG1"}',
]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_rows_with_lone_surrogates_or_wrong_types_are_error_rows_in_every_format(tiny_artifacts, sample_images,
                                                                                 tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    work = tmp_path / "work.jsonl"
    work.write_text("\n".join(line.replace("IMG0", str(sample_images[0])).replace("IMG1", str(sample_images[1]))
                              for line in BAD_LINES) + "\n")
    out = tmp_path / f"out.{fmt}"
    done = score(tiny_artifacts, work, out)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
    elif fmt == "csv":
        rows = list(csv.DictReader(open(out, newline="", encoding="utf-8")))
    else:
        rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert len(rows) == len(BAD_LINES)
    by_id = {r["id"]: r for r in rows}
    assert by_id["ok1"]["score"] not in (None, "") and by_id["ok2"]["score"] not in (None, "")
    assert "not valid Unicode" in by_id["bad\\ud800id"]["error"] and "written escaped" in by_id["bad\\ud800id"]["error"]
    assert "line 3" in by_id["p"]["error"] and by_id["p"]["prompt"] == "bad \\udc00 prompt"
    assert "the group is not valid Unicode" in by_id["g"]["error"]
    assert "image path 'img\\udfff.png' is not valid Unicode" in by_id["i"]["error"]
    assert "the id must be a string or number, got list" in by_id["6"]["error"]
    assert "the group must be a string or number, got dict" in by_id["t"]["error"]
    assert "no 'image'" in by_id["m"]["error"] and by_id["n"]["error"]
    assert "nested too deeply" in by_id["10"]["error"]
    again = score(tiny_artifacts, work, out, "--resume")  # once crashed here on every try; now nothing is left to do
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert "scored 0 image(s)" in again.stderr


# ---- found by the re-run of the probe ----------------------------------------------------------------
def kill_after_parts(artifacts, work, out, n, *extra):
    """Start a run and SIGKILL it once `n` parts are committed; the committed part names."""
    proc = subprocess.Popen([sys.executable, "-m", "pickscore_runtime.cli", "score", "--artifacts", str(artifacts),
                             "--hash-check", "size", "--precision", "fp32", "--input", str(work), "--output", str(out),
                             "--commit-rows", "20", "--batch-size", "2", *extra],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    parts = out.with_name(out.name + ".parts")
    while proc.poll() is None and len(list(parts.glob("part-*"))) < n:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = sorted(p.name for p in parts.glob("part-*"))
    assert committed, "the run ended before it committed anything"
    return committed


def test_an_interrupted_overwrite_keeps_the_old_output_and_a_resume_never_mixes_it_in(tiny_artifacts, sample_images,
                                                                                     tmp_path):
    old_rows = [{"id": f"r{i}", "prompt": f"the old run {i}", "image": str(sample_images[i % 3])} for i in range(40)]
    out = tmp_path / "out.csv"
    assert score(tiny_artifacts, write_csv(tmp_path / "old.csv", old_rows, ("id", "prompt", "image")), out).returncode == 0
    before = out.read_bytes()
    work = write_csv(tmp_path / "new.csv", rows_for(sample_images, 600, ids=True), ("id", "prompt", "image"))
    kill_after_parts(tiny_artifacts, work, out, 2, "--overwrite")
    assert out.read_bytes() == before  # replaced only when the new run finishes, as --overwrite promises
    finished = score(tiny_artifacts, work, out, "--resume")
    assert finished.returncode == 0, finished.stderr[-2000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(600))  # each once: none of the old run's
    assert not any(r["prompt"].startswith("the old run") for r in rows)
    assert score(tiny_artifacts, work, out, "--resume").returncode == 0  # the finished output is this run's now
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == 600


def test_an_output_inside_another_runs_parts_is_refused(tiny_artifacts, sample_images, tmp_path):
    work = write_csv(tmp_path / "work.csv", rows_for(sample_images, 600, ids=True), ("id", "prompt", "image"))
    out = tmp_path / "out.csv"
    committed = kill_after_parts(tiny_artifacts, work, out, 2)
    intruder = out.with_name(out.name + ".parts") / "part-000900.csv"
    refused = score(tiny_artifacts, work, intruder)
    assert refused.returncode == 2 and "where another run keeps the parts" in refused.stderr, refused.stderr[-2000:]
    assert not intruder.exists() and sorted(p.name for p in intruder.parent.glob("part-*")) == committed
    finished = score(tiny_artifacts, work, out, "--resume")
    assert finished.returncode == 0, finished.stderr[-2000:]
    with open(out, newline="") as f:
        assert sorted(r["id"] for r in csv.DictReader(f)) == sorted(f"r{i}" for i in range(600))


def test_a_json_row_python_cannot_parse_is_an_error_row_and_the_run_finishes(tiny_artifacts, sample_images, tmp_path):
    lines = [json.dumps({"id": f"r{i}", "prompt": f"prompt {i}", "image": str(sample_images[i % 3])}) for i in range(30)]
    lines[12] = '{"id": "big", "prompt": "p", "image": "%s", "x": %s}' % (sample_images[0], "9" * 5000)  # over 4300 digits
    work = tmp_path / "work.jsonl"
    work.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    done = score(tiny_artifacts, work, out)
    assert done.returncode == 1, done.stderr[-2000:]  # exit 1: some rows are error rows
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 and sum(1 for r in rows if r["error"]) == 1
    bad = next(r for r in rows if r["error"])
    assert "line 13" in bad["error"] and "not valid JSON" in bad["error"] and bad["score"] is None
