"""`pickscore eval preference | compare` end to end on data whose answer is known by construction: a Pick-a-Pic
split in the real schema (real Parquet, PNG/JPEG bytes of generated images, all three label kinds, bad rows),
labelled from the model's own scores with a known set flipped and ties planted, and generations assigned to
models so that the win rates are planted. The expected figures come from the reference script's functions
(re-typed in test_evaluation.py) on the scores the Python API gives for the same images; a kill mid-run
then --resume gives the same report."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import load_quietly, local_ray_cluster, run_cli
from pickscore_export.samples import synthetic_image
from test_evaluation import calc_acc, get_label, get_pred, softmax_pairs

pytestmark = pytest.mark.integration

THRESHOLDS = [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1]
CAPTIONS = ["a red fox in snow", "a lighthouse at dusk", "an astronaut riding a horse", "a bowl of ramen",
            "a cat wearing a hat", "a city skyline at night", "a watercolor of mountains", "a robot reading a book"]


def png_bytes(seed: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    synthetic_image(40 + seed % 7, 36 + seed % 5, seed=seed).save(buf, fmt)
    return buf.getvalue()


def pair_scores(scorer, captions, images_0, images_1) -> np.ndarray:
    """[N, 2] scores through the Python API, one comparison per pair (as the command scores them)."""
    return np.array([scorer.score(c, [a, b]).scores for c, a, b in zip(captions, images_0, images_1)])


def pickapic_table(rows: list[dict]) -> pa.Table:
    """The Pick-a-Pic schema (binary images, float labels, the metadata columns)."""
    schema = pa.schema([("are_different", pa.bool_()), ("best_image_uid", pa.string()), ("caption", pa.string()),
                        ("created_at", pa.timestamp("ns")), ("has_label", pa.bool_()), ("image_0_uid", pa.string()),
                        ("image_0_url", pa.string()), ("image_1_uid", pa.string()), ("image_1_url", pa.string()),
                        ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()), ("label_1", pa.float64()),
                        ("model_0", pa.string()), ("model_1", pa.string()), ("ranking_id", pa.int64()),
                        ("user_id", pa.int64()), ("num_example_per_prompt", pa.int64())])
    full = []
    for i, r in enumerate(rows):
        full.append({"are_different": True, "best_image_uid": None, "created_at": None, "has_label": True,
                     "image_0_uid": f"u{i}a", "image_0_url": "", "image_1_uid": f"u{i}b", "image_1_url": "",
                     "model_0": "m0", "model_1": "m1", "ranking_id": i, "user_id": 7, "num_example_per_prompt": 1,
                     "label_1": None if r.get("label_0") is None else 1 - r["label_0"], **r})
    return pa.Table.from_pylist(full, schema=schema)


def make_split(scorer, n: int, seed: int, flip_every: int, ties: int) -> tuple[list[dict], np.ndarray]:
    """n pairs labelled as the model prefers, except every `flip_every`-th (the other side) and the `ties`
    pairs the model is least sure of (label 0.5: a threshold above 0 then pays on validation). Returns the
    rows and their scores."""
    captions = [CAPTIONS[(seed + i) % len(CAPTIONS)] + f" #{i}" for i in range(n)]
    a = [png_bytes(seed * 1000 + 2 * i) for i in range(n)]
    b = [png_bytes(seed * 1000 + 2 * i + 1, "JPEG") for i in range(n)]
    scores = pair_scores(scorer, captions, a, b)
    probs = softmax_pairs(scores)
    tie_rows = set(np.argsort(np.abs(probs[:, 0] - probs[:, 1]), kind="stable")[:ties].tolist())
    rows = []
    for i in range(n):
        prefers_0 = scores[i, 0] > scores[i, 1]
        label_0 = 0.5 if i in tie_rows else float(prefers_0 != (i % flip_every == 0))
        rows.append({"caption": captions[i], "jpg_0": a[i], "jpg_1": b[i], "label_0": label_0})
    return rows, scores


@pytest.fixture(scope="module")
def pickapic(tiny_artifacts, tmp_path_factory):
    """test and validation splits (two Parquet shards for test), the expected figures, and the bad rows."""
    folder = tmp_path_factory.mktemp("pickapic")
    scorer = load_quietly(tiny_artifacts, precision="fp32")
    try:
        test_rows, test_scores = make_split(scorer, 30, 1, flip_every=4, ties=3)
        val_rows, val_scores = make_split(scorer, 24, 2, flip_every=5, ties=6)
    finally:
        scorer.close()
    probs = softmax_pairs(val_scores)
    val_acc = [calc_acc(probs, val_rows, t) for t in THRESHOLDS]
    threshold = THRESHOLDS[int(np.argmax(val_acc))]
    assert threshold > 0, val_acc  # by construction: the planted ties are the closest pairs
    test_probs = softmax_pairs(test_scores)
    expected = calc_acc(test_probs, test_rows, threshold)
    decided = [k for k, r in enumerate(test_rows) if r["label_0"] != 0.5]
    no_ties = calc_acc(test_probs[decided], [test_rows[k] for k in decided], 0)
    # bad rows, appended after the good ones: each named in the report, none in the accuracy
    image_path = folder / "on_disk.png"
    image_path.write_bytes(png_bytes(99))
    bad = [{"caption": "a broken image", "jpg_0": b"\x89PNG\r\n\x1a\n not really", "jpg_1": png_bytes(98), "label_0": 1.0},
           {"caption": "a label that is no label", "jpg_0": png_bytes(97), "jpg_1": png_bytes(96), "label_0": 0.3},
           {"caption": None, "jpg_0": png_bytes(95), "jpg_1": png_bytes(94), "label_0": 0.0},
           {"caption": "no second image", "jpg_0": png_bytes(93), "jpg_1": None, "label_0": 1.0}]
    table = pickapic_table(test_rows + bad)
    (folder / "test").mkdir()
    pq.write_table(table.slice(0, 20), folder / "test" / "test_unique-00000-of-00002.parquet", row_group_size=7)
    pq.write_table(table.slice(20), folder / "test" / "test_unique-00001-of-00002.parquet")
    pq.write_table(pickapic_table(val_rows), folder / "validation_unique.parquet")
    return {"test": folder / "test", "validation": folder / "validation_unique.parquet", "threshold": threshold,
            "accuracy": expected, "no_ties": no_ties, "n_good": len(test_rows), "n_bad": len(bad),
            "val_acc": val_acc, "labels": {"0": sum(r["label_0"] == 1 for r in test_rows),
                                            "1": sum(r["label_0"] == 0 for r in test_rows), "tie": 3}}


def preference_args(artifacts, data, *extra) -> list[str]:
    return ["eval", "preference", "--artifacts", str(artifacts), "--hash-check", "size", "--data", str(data["test"]),
            "--validation", str(data["validation"]), *extra]


def test_preference_reproduces_the_planted_accuracy(pickapic, tiny_artifacts, tmp_path):
    report = tmp_path / "report.json"
    done = run_cli(*preference_args(tiny_artifacts, pickapic, "--precision", "fp32", "--output", str(report)))
    assert done.returncode == 1, done.stderr[-3000:]  # the bad rows are reported
    doc = json.loads(report.read_text())
    assert doc["tie_threshold"] == pickapic["threshold"]
    assert doc["validation_accuracies"] == pytest.approx(pickapic["val_acc"], abs=1e-12)
    assert doc["accuracy"] == pytest.approx(pickapic["accuracy"], abs=1e-12)
    assert doc["accuracy_ties_excluded"] == pytest.approx(pickapic["no_ties"], abs=1e-12)
    assert doc["n_pairs"] == pickapic["n_good"] + pickapic["n_bad"] and doc["n_evaluated"] == pickapic["n_good"]
    assert doc["label_counts"] == pickapic["labels"]
    assert doc["n_errors"] == pickapic["n_bad"]
    rows = {e["row"]: e["error"] for e in doc["errors"]}
    first_bad = pickapic["n_good"] + 1
    assert sorted(rows) == list(range(first_bad, first_bad + pickapic["n_bad"]))
    assert "jpg_0 (u30a): cannot decode" in rows[first_bad] and "label_0 must be 0, 0.5 or 1, got 0.3" in rows[first_bad + 1]
    assert "no caption" in rows[first_bad + 2] and "jpg_1 holds no image" in rows[first_bad + 3]
    low, high = doc["accuracy_ci95"]
    assert low <= doc["accuracy"] <= high
    assert "preference accuracy on" in done.stdout and f"{doc['accuracy']:.4f}" in done.stdout
    assert "4 row(s) could not be scored or judged" in done.stderr
    # the per-pair scores are a normal `pickscore score` output, kept for --resume
    scores = pq.read_table(tmp_path / "report.json.work" / "test-fp32.parquet").to_pylist()
    assert len(scores) == 2 * doc["n_pairs"] and {r["image"] for r in scores[:2]} == {"u0a", "u0b"}


def test_fixed_threshold_and_csv(pickapic, tiny_artifacts, tmp_path):
    out = tmp_path / "report.csv"
    done = run_cli("eval", "preference", "--artifacts", str(tiny_artifacts), "--data", str(pickapic["test"]),
                   "--tie-threshold", "0", "--precision", "fp32,int8", "--output", str(out))
    assert done.returncode == 1, done.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["precision"] for r in rows] == ["fp32", "int8"]
    assert float(rows[0]["tie_threshold"]) == 0 and int(rows[0]["n_evaluated"]) == pickapic["n_good"]
    assert rows[0]["n_flipped"] == "" and rows[1]["n_flipped"] != ""


def test_precisions_side_by_side_list_the_flipped_pairs(pickapic, tiny_artifacts, tmp_path):
    report = tmp_path / "r.json"
    done = run_cli(*preference_args(tiny_artifacts, pickapic, "--precision", "fp32,int8", "--output", str(report)))
    assert done.returncode == 1, done.stderr[-3000:]
    doc = json.loads(report.read_text())
    fp32, int8 = doc["by_precision"]
    assert (fp32["precision"], int8["precision"]) == ("fp32", "int8") and doc["accuracy"] == fp32["accuracy"]
    assert int8["accuracy_change"] == pytest.approx(int8["accuracy"] - fp32["accuracy"])
    # the flipped pairs are exactly those whose predictions differ, recomputed from the two scores files
    preds = {}
    for precision, result in (("fp32", fp32), ("int8", int8)):
        rows = pq.read_table(report.with_name("r.json.work") / f"test-{precision}.parquet").to_pylist()
        by_row = {}
        for r in rows:
            by_row.setdefault(r["row"], []).append(r["score"])
        preds[precision] = {row: get_pred(*softmax_pairs(np.array([s]))[0], result["tie_threshold"])
                            for row, s in by_row.items() if None not in s and row <= pickapic["n_good"]}
    want = sorted(row for row in preds["fp32"] if preds["fp32"][row] != preds["int8"][row])
    assert [f["row"] for f in int8["flipped"]] == want


def test_kill_mid_run_then_resume_gives_the_same_report(pickapic, tiny_artifacts, tmp_path):
    whole = tmp_path / "whole.json"
    assert run_cli(*preference_args(tiny_artifacts, pickapic, "--precision", "fp32", "--output", str(whole))).returncode == 1
    report = tmp_path / "killed.json"
    args = preference_args(tiny_artifacts, pickapic, "--precision", "fp32", "--output", str(report), "--commit-rows", "1")
    proc = subprocess.Popen([sys.executable, "-m", "pickscore_runtime.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    parts = report.with_name("killed.json.work") / "test-fp32.parquet.parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(list(parts.glob("part-*"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert not report.exists() and len(list(parts.glob("part-*"))) >= 3
    again = run_cli(*args, "--resume")
    assert again.returncode == 1, again.stderr[-3000:]
    assert "resuming" in again.stderr
    want, got = json.loads(whole.read_text()), json.loads(report.read_text())
    assert got == want
    # SIGTERM: the work in flight is finished and committed, the run says how to finish, --resume does
    report.unlink()
    args = preference_args(tiny_artifacts, pickapic, "--precision", "fp32", "--output", str(report), "--commit-rows", "1",
                           "--overwrite")
    proc = subprocess.Popen([sys.executable, "-m", "pickscore_runtime.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(list(parts.glob("part-*"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "rerun the same command with --resume" in err and "Traceback" not in err and not report.exists()
    again = run_cli(*args[:-1], "--resume")
    assert again.returncode == 1 and json.loads(report.read_text()) == want, again.stderr[-3000:]
    # a changed split under --resume is refused, naming what changed
    changed = run_cli(*preference_args(tiny_artifacts, {**pickapic, "test": pickapic["validation"]}, "--precision", "fp32",
                                       "--output", str(report), "--resume"))
    assert changed.returncode == 2 and "--resume" in changed.stderr and "not the one" in changed.stderr


def test_bad_setups_are_refused_before_any_scoring(pickapic, tiny_artifacts, tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pickapic_table([]), empty)
    done = run_cli(*preference_args(tiny_artifacts, {**pickapic, "test": empty}))
    assert done.returncode == 2 and "has no rows" in done.stderr
    missing = tmp_path / "nolabel.parquet"
    pq.write_table(pickapic_table([{"caption": "x", "jpg_0": b"", "jpg_1": b"", "label_0": 1.0}]).drop(["label_0"]), missing)
    done = run_cli(*preference_args(tiny_artifacts, {**pickapic, "test": missing}))
    assert done.returncode == 2 and "no 'label_0' column" in done.stderr
    done = run_cli("eval", "preference", "--artifacts", str(tiny_artifacts), "--data", str(pickapic["test"]),
                   "--tie-threshold", "0.1", "--validation", str(pickapic["validation"]))
    assert done.returncode == 2 and "not allowed with" in done.stderr
    done = run_cli(*preference_args(tiny_artifacts, pickapic, "--resume"))
    assert done.returncode == 2 and "--resume and --overwrite go with --work" in done.stderr


# ---- eval compare -------------------------------------------------------------------------------------
PROMPTS = ["a red fox in snow", "a lighthouse at dusk", "a bowl of ramen", "a cat wearing a hat", "a city at night",
           "a watercolor of mountains"]
A_WINS = {0, 2, 3, 5}  # prompts where model A gets the pool's best image and B the worst; elsewhere the reverse


@pytest.fixture(scope="module")
def generations(tiny_artifacts, tmp_path_factory):
    """Model A and B with planted wins (A over B on 4 of 6 prompts), B with two images on some prompts (its
    best counts), C missing two prompts and with only a broken image on a third; as a Parquet manifest
    (A's images as bytes, the others' as paths) and as a folder per model with a prompts file."""
    folder = tmp_path_factory.mktemp("generations")
    pool = [png_bytes(300 + k) for k in range(8)]
    scorer = load_quietly(tiny_artifacts, precision="fp32")
    try:
        pool_scores = np.array([scorer.score(p, pool).scores for p in PROMPTS])  # [prompt, image]
    finally:
        scorer.close()
    order = np.argsort(pool_scores, axis=1)  # worst first
    given: dict[str, dict[int, list[int]]] = {"A": {}, "B": {}, "C": {}}
    for p in range(len(PROMPTS)):
        best, worst, middle = int(order[p, -1]), int(order[p, 0]), int(order[p, 1])
        given["A"][p] = [best] if p in A_WINS else [worst]
        given["B"][p] = [worst] if p in A_WINS else [best, middle]
        if p < 3:
            given["C"][p] = [middle]
    rows, broken = [], b"GIF89a not an image"
    tree = folder / "tree"
    for model, by_prompt in given.items():
        for p, images in by_prompt.items():
            for k, image in enumerate(images):
                path = tree / model / (f"{p:05d}_{k}.png" if model == "B" else f"{p}.png")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(pool[image])
                value = {"bytes": pool[image], "path": None} if model == "A" else {"bytes": None, "path": str(path)}
                rows.append({"prompt": PROMPTS[p], "model": model, "image": value})
    (tree / "C" / "3.png").write_bytes(broken)
    (tree / "B" / "notes.txt").write_text("not a generation")  # listed, not skipped
    rows.append({"prompt": PROMPTS[3], "model": "C", "image": {"bytes": broken, "path": None}})
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    means = {m: float(np.mean([np.mean(pool_scores[p, imgs]) for p, imgs in by.items()])) for m, by in given.items()}
    return {"manifest": manifest, "tree": tree, "prompts": folder / "prompts.txt", "means": means,
            "n_prompts": {m: len(by) for m, by in given.items()}}


def check_comparison(doc: dict, generations: dict, n_errors: int = 1) -> None:
    models = {m["model"]: m for m in doc["models"]}
    assert sorted(models) == ["A", "B", "C"] and doc["n_prompts"] == len(PROMPTS)
    for name, m in models.items():
        assert m["n_prompts"] == generations["n_prompts"][name]
        assert m["mean_score"] == pytest.approx(generations["means"][name], abs=1e-4)
        assert m["mean_score_ci95"][0] <= m["mean_score"] <= m["mean_score_ci95"][1]
    wins = {(w["model"], w["versus"]): w for w in doc["win_rates"]}
    assert wins["A", "B"]["win_rate"] == len(A_WINS) / len(PROMPTS) and wins["A", "B"]["n_prompts"] == len(PROMPTS)
    assert wins["A", "C"]["n_prompts"] == 3 and wins["B", "C"]["n_prompts"] == 3
    assert wins["B", "C"]["win_rate"] == pytest.approx(np.mean([0.0 if p in A_WINS else 1.0 for p in range(3)]))
    missing = {(x["prompt"], x["why"]) for x in models["C"]["missing"]}
    assert missing == {(PROMPTS[3], "every image failed"), (PROMPTS[4], "no image"), (PROMPTS[5], "no image")}
    assert doc["n_errors"] == n_errors and any("cannot decode" in e["error"] for e in doc["errors"])


def test_compare_reproduces_the_planted_win_rates(generations, tiny_artifacts, tmp_path):
    report, plot, work = tmp_path / "compare.json", tmp_path / "compare.png", tmp_path / "work"
    args = ["eval", "compare", "--artifacts", str(tiny_artifacts), "--manifest", str(generations["manifest"]),
            "--precision", "fp32", "--work", str(work)]
    done = run_cli(*args, "--output", str(report), "--plot", str(plot))
    assert done.returncode == 1, done.stderr[-3000:]  # C's broken image and missing prompts are reported
    check_comparison(json.loads(report.read_text()), generations)
    assert plot.read_bytes().startswith(b"\x89PNG") and "A > B" in done.stdout and "every image failed" in done.stdout
    # the same work again with --resume: nothing left to score, the same figures, as CSV
    table = tmp_path / "compare.csv"
    again = run_cli(*args, "--output", str(table), "--resume")
    assert again.returncode == 1 and "resuming" in again.stderr, again.stderr[-3000:]
    rows = {(r["kind"], r["model"], r["versus"]): r for r in csv.DictReader(table.open())}
    assert float(rows["win_rate", "A", "B"]["value"]) == len(A_WINS) / len(PROMPTS)
    assert float(rows["mean", "A", ""]["value"]) == pytest.approx(generations["means"]["A"], abs=1e-4)


def test_compare_reads_a_folder_per_model(generations, tiny_artifacts, tmp_path):
    report = tmp_path / "compare.json"
    done = run_cli("eval", "compare", "--artifacts", str(tiny_artifacts), "--generations", str(generations["tree"]),
                   "--prompts", str(generations["prompts"]), "--precision", "fp32", "--output", str(report))
    assert done.returncode == 1, done.stderr[-3000:]
    doc = json.loads(report.read_text())
    check_comparison(doc, generations, n_errors=2)
    assert any("notes.txt: not an image file type (.txt)" in e["error"] for e in doc["errors"])
    missing_prompts = run_cli("eval", "compare", "--artifacts", str(tiny_artifacts), "--generations", str(generations["tree"]))
    assert missing_prompts.returncode == 2 and "--generations needs --prompts" in missing_prompts.stderr


def test_a_datasets_folder_and_image_structs_read_as_the_parquet(pickapic, tiny_artifacts, tmp_path):
    """The same split through datasets.save_to_disk, its images cast to the datasets Image feature
    ({bytes, path} structs), gives the same report (a DatasetDict is refused, naming its splits)."""
    import datasets

    table = pa.concat_tables([pq.read_table(f) for f in sorted(pickapic["test"].glob("*.parquet"))])
    ds = datasets.Dataset(table).cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())
    ds.save_to_disk(str(tmp_path / "test_unique"), max_shard_size="20KB")
    assert len(list((tmp_path / "test_unique").glob("*.arrow"))) > 1
    datasets.DatasetDict({"test_unique": ds}).save_to_disk(str(tmp_path / "dict"))
    reports = []
    for data in (pickapic["test"], tmp_path / "test_unique"):
        out = tmp_path / f"{Path(data).name}.json"
        done = run_cli(*preference_args(tiny_artifacts, {**pickapic, "test": data}, "--precision", "fp32",
                                        "--output", str(out)))
        assert done.returncode == 1, done.stderr[-3000:]
        reports.append({k: v for k, v in json.loads(out.read_text()).items() if k != "data"})
    assert reports[0] == reports[1]
    refused = run_cli(*preference_args(tiny_artifacts, {**pickapic, "test": tmp_path / "dict"}))
    assert refused.returncode == 2 and "DatasetDict" in refused.stderr and "test_unique" in refused.stderr


def test_on_ray_gives_the_same_report(pickapic, tiny_artifacts, tmp_path):
    """--ray scores the pairs with the `score --ray` job on a real local cluster: the same accuracy, threshold
    and rows left out as in process (bad rows named by the job's own validation)."""
    here, there = tmp_path / "here.json", tmp_path / "ray.json"
    assert run_cli(*preference_args(tiny_artifacts, pickapic, "--precision", "fp32", "--output", str(here))).returncode == 1
    with local_ray_cluster(num_cpus=2, object_store_mb=200, prefix="pseval") as address:
        done = run_cli(*preference_args(tiny_artifacts, pickapic, "--precision", "fp32", "--output", str(there),
                                        "--ray", "--ray-address", address, "--workers", "1"))
    assert done.returncode == 1, done.stderr[-3000:]
    want, got = json.loads(here.read_text()), json.loads(there.read_text())
    for key in ("accuracy", "accuracy_ties_excluded", "tie_threshold", "n_pairs", "n_evaluated", "n_errors", "label_counts",
                "accuracy_ci95"):
        assert got[key] == want[key], key
    assert got["validation_accuracies"] == pytest.approx(want["validation_accuracies"], abs=1e-12)
    assert [e["row"] for e in got["errors"]] == [e["row"] for e in want["errors"]]
    assert got["backend"] == "ray:auto" and got["precision"] == "fp32"


def test_compare_refuses_to_destroy_or_misread_its_inputs(generations, tiny_artifacts, tmp_path):
    """An output on an input, a work folder among the generations, a plot it cannot write: refused before any
    scoring. Prompts are told apart by id, not text; an image changed under --resume is refused."""
    base = ["eval", "compare", "--artifacts", str(tiny_artifacts), "--precision", "fp32"]
    manifest = tmp_path / "m.csv"
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(400))
    manifest.write_text(f"prompt,model,image\na cat,A,{image}\na cat,B,{image}\n")
    for extra, why in ((["--manifest", str(manifest), "--output", str(manifest)], "is the input file"),
                       (["--manifest", str(manifest), "--plot", str(tmp_path / "p.txt")], "the plot is written as"),
                       (["--manifest", str(manifest), "--output", str(tmp_path / "no" / "r.json")], "does not exist"),
                       (["--generations", str(generations["tree"]), "--prompts", str(generations["prompts"]),
                         "--work", str(generations["tree"] / "w")], "overlap")):
        done = run_cli(*base, *extra)
        assert done.returncode == 2 and why in done.stderr, (extra, done.stderr[-2000:])
    work = tmp_path / "w"
    assert run_cli(*base, "--manifest", str(manifest), "--work", str(work)).returncode == 0
    image.write_bytes(png_bytes(401))  # the same name, other pixels
    again = run_cli(*base, "--manifest", str(manifest), "--work", str(work), "--resume")
    assert again.returncode == 2 and "not the one" in again.stderr, again.stderr[-2000:]
    # two prompt ids with the same text stay two prompts
    tree = tmp_path / "tree"
    for model in ("A", "B"):
        (tree / model).mkdir(parents=True)
        for p in (0, 1):
            (tree / model / f"{p}.png").write_bytes(png_bytes(410 + p))
    (tmp_path / "twice.txt").write_text("a cat\na cat\n")
    out = tmp_path / "twice.json"
    done = run_cli(*base, "--generations", str(tree), "--prompts", str(tmp_path / "twice.txt"), "--output", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["n_prompts"] == 2 and doc["win_rates"][0]["n_prompts"] == 2
