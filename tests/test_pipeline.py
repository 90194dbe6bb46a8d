"""score_many: order, per-item errors, batching across items, bounded memory, file IO through the CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from pickscore_export.samples import synthetic_image


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpegs")
    for i in range(14):
        synthetic_image(300 + 10 * i, 240, seed=100 + i).save(folder / f"img{i:02d}.jpg", "JPEG")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return folder


def test_score_many_matches_score_and_keeps_order(tiny_scorer, jpeg_folder):
    good = sorted(str(p) for p in jpeg_folder.glob("img*.jpg"))
    items = [("a cat", good[:5]), ("", good[5:7]), ("a dog", []), ("a dog", good[7:] + [str(jpeg_folder / "broken.jpg")]),
             ("a cat", good[:1])]
    results = list(tiny_scorer.score_many(iter(items), batch_size=3, workers=2))
    assert [r.prompt for r in results] == [p for p, _ in items]
    assert results[1].error and "prompt #1 is empty" in results[1].error
    assert results[2].results == [] and results[2].error is None
    assert results[3].results[-1].error and "cannot decode" in results[3].results[-1].error
    for (prompt, images), result in zip(items, results):
        if result.error is None and images:
            one = tiny_scorer.score(prompt, images)
            np.testing.assert_allclose(result.scores, one.scores, atol=1e-5, equal_nan=True)
            assert [r.rank for r in result.results] == [r.rank for r in one.results]


def test_memory_is_bounded_by_pending_images(tiny_scorer, jpeg_folder):
    """A long lazy stream: never more than max_in_flight images prepared and not yet embedded."""
    from pickscore_runtime.pipeline import ScoringPipeline

    pulled, lock, peak = [0], threading.Lock(), [0]
    pipeline = ScoringPipeline(tiny_scorer, batch_size=2, workers=2)
    real = tiny_scorer._pixels
    in_flight = [0]

    def tracked_pixels(item, name):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        return real(item, name)

    def embed_done(n):
        with lock:
            in_flight[0] -= n

    pipeline.on_images_done = embed_done
    tiny_scorer._pixels = tracked_pixels
    try:
        path = str(next(jpeg_folder.glob("img*.jpg")))

        def stream():
            for i in range(60):
                pulled[0] += 1
                yield f"prompt {i % 3}", [path, path]

        count = sum(1 for _ in pipeline.run(stream()))
    finally:
        del tiny_scorer._pixels
    assert count == 60 and pulled[0] == 60
    assert peak[0] <= pipeline.max_in_flight


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pickscore_runtime.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_directory_and_glob(tiny_artifacts, jpeg_folder):
    out = run_cli("score", "--artifacts", str(tiny_artifacts), "--fast-load", "--prompt", "a cat", "--json",
                  str(jpeg_folder), str(jpeg_folder / "img0*.jpg"))
    doc = json.loads(out.stdout)
    assert len(doc["results"]) == 15 + 10
    assert out.returncode == 1  # broken.jpg
    assert "progress" not in out.stderr and "\r" not in out.stderr  # not a terminal: no progress bar


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_cli_input_output_files(tiny_artifacts, jpeg_folder, tmp_path, fmt):
    images = sorted(str(p) for p in jpeg_folder.glob("img*.jpg"))
    rows = [{"prompt": "a cat", "image": images[0]}, {"prompt": "a cat", "image": images[1]},
            {"prompt": "a dog", "image": images[2]}, {"prompt": "a dog", "image": str(jpeg_folder / "broken.jpg")},
            {"prompt": "a cat", "image": images[3]}]
    src = tmp_path / "work.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dst = tmp_path / f"out.{fmt}"
    out = run_cli("score", "--artifacts", str(tiny_artifacts), "--fast-load", "--input", str(src), "--output", str(dst))
    assert out.returncode == 1, out.stderr  # one broken image
    if fmt == "csv":
        got = list(csv.DictReader(open(dst)))
    elif fmt == "jsonl":
        got = [json.loads(line) for line in open(dst)]
    else:
        import pyarrow.parquet as pq

        got = pq.read_table(dst).to_pylist()
    assert [(g["prompt"], g["image"]) for g in got] == [(r["prompt"], r["image"]) for r in rows]
    assert "cannot decode" in got[3]["error"]
    ranks = [str(g["rank"]) for g in got]
    assert sorted(ranks[:2]) == ["1", "2"] and ranks[2] == ranks[4] == "1"  # consecutive rows = one comparison
    assert ranks[3] in ("", "None")
    assert all(str(g["random_weights"]) == "True" for g in got)


def test_unexpected_decoder_failure_costs_one_image(tiny_scorer, jpeg_folder, monkeypatch):
    good = sorted(str(p) for p in jpeg_folder.glob("img*.jpg"))[:3]
    real = tiny_scorer._pixels

    def flaky(item, name):
        if name == good[1]:
            raise RuntimeError("decoder bug")
        return real(item, name)

    monkeypatch.setattr(tiny_scorer, "_pixels", flaky)
    result = tiny_scorer.score("a cat", good)
    assert result.results[1].error == "unexpected RuntimeError: decoder bug"
    assert result.results[0].score is not None and result.results[2].score is not None
