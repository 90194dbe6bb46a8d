"""`pickscore score --ray` on a REAL local Ray cluster (started here: 4 logical CPUs, a 300 MB object store),
with the tiny model and real images on disk, checked row by row against the single-machine CLI on the same
input: JSONL manifests (two files, a comparison across them, file:// URIs), Parquet with image bytes (the
datasets struct), WebDataset shards; bad rows kept with their errors; a scorer actor killed mid-run; the
driver SIGKILLed mid-run and resumed; the Dataset API. fp32 throughout: dynamic int8's scores depend on
which images share a batch, and the two paths batch differently."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from helpers import local_ray_cluster, run_cli
from pickscore_export.samples import synthetic_image

pytestmark = pytest.mark.integration
N_ROWS = 48  # the equality tests' rows; the kill tests use more, and bigger images, to be killed mid-run
N_BIG = 240
SPLIT = 26  # the second file starts inside the comparison of rows 25-28
LONG_PROMPT = "a very detailed painting of " + " and ".join(f"a small red object number {k}" for k in range(20))


# ---- the cluster ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """A local cluster owned by this test process; the CLI runs below join it as drivers of their own (a
    driver started by ray.init exports RAY_AUTH_MODE for its children when the cluster uses token auth)."""
    with local_ray_cluster(num_cpus=4, object_store_mb=300, prefix="psray") as address:
        yield address


def ray_args(artifacts: Path, address: str, source, out: Path, *extra: str) -> list[str]:
    return ["score", "--ray", "--ray-address", address, "--artifacts", str(artifacts), "--hash-check", "size",
            "--backend", "onnx-cpu", "--precision", "fp32", "--batch-size", "4", "--input", str(source),
            "--output", str(out), *extra]


def cli_baseline(artifacts: Path, manifest: Path) -> list[dict]:
    out = manifest.with_suffix(".out.parquet")
    done = run_cli("score", "--artifacts", str(artifacts), "--hash-check", "size", "--backend", "onnx-cpu",
                   "--precision", "fp32", "--batch-size", "4", "--input", str(manifest), "--output", str(out))
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return sorted(pq.read_table(out).to_pylist(), key=order)


# ---- inputs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ray_images")
    found = {}
    for k in range(16):
        path = folder / f"img{k:02d}.{'png' if k % 3 == 0 else 'jpg'}"
        synthetic_image(40 + 5 * k, 64 - k, seed=900 + k).save(path)
        found[f"img{k}"] = path
    for k in range(8):  # bigger, slower to decode: the kill tests need time to kill something mid-run
        path = folder / f"big{k}.png"
        synthetic_image(900 + k, 700, seed=950 + k).save(path)
        found[f"big{k}"] = path
    (folder / "corrupt.jpg").write_bytes(b"this is not an image at all" * 10)
    found["corrupt"], found["missing"] = folder / "corrupt.jpg", folder / "missing.jpg"
    return found


def work(images: dict[str, Path]) -> list[dict]:
    """Comparisons of 4 rows; groups that cut one of them; a missing and a corrupt image; an empty prompt
    between two halves of one comparison; a prompt over 77 tokens; a row with three images."""
    rows = []
    for i in range(N_ROWS):
        rows.append({"id": f"r{i + 1:02d}", "prompt": f"a photo of thing {i // 4}", "group": f"g{i // 10}",
                     "image": str(images[f"img{i % 16}"])})
    rows[5]["image"] = str(images["missing"])
    rows[9]["image"] = str(images["corrupt"])
    rows[17]["prompt"] = ""
    for i in range(28, 32):
        rows[i]["prompt"] = LONG_PROMPT
    rows[40]["images"] = [str(images["img1"]), str(images["img2"]), str(images["img3"])]
    del rows[40]["image"]
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def order(row: dict) -> tuple:
    return row["row"], row["image"] or ""


def read_out(out: Path) -> list[dict]:
    files = sorted(out.glob("*.parquet"))
    assert files and not (out / "_work").exists(), sorted(p.name for p in out.iterdir())
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    return sorted(rows, key=order)


def where(error: str | None) -> str | None:
    """Errors without what differs by construction: the file a row came from, 'line' or 'row' before its
    number, and the decoder's text (a file's name, or a BytesIO's address)."""
    if error is None:
        return None
    error = re.sub(r"^.*?\b(?:line|row) (\d+): ", r"@\1: ", error)
    return error.split(" (")[0]


def assert_same_rows(got: list[dict], want: list[dict], image=lambda name: name) -> None:
    assert len(got) == len(want), (len(got), len(want))
    for g, w in zip(got, want):
        for key in ("id", "row", "group", "prompt", "rank", "truncated", "random_weights", "precision"):
            assert g[key] == w[key], (key, g, w)
        assert image(g["image"]) == image(w["image"]), (g, w)
        assert where(g["error"]) == where(w["error"]), (g, w)
        if w["score"] is None:
            assert g["score"] is None and g["prob"] is None, (g, w)
        else:
            assert abs(g["score"] - w["score"]) <= 1e-5 and abs(g["prob"] - w["prob"]) <= 1e-6, (g, w)


def check_bad_rows(rows: list[dict]) -> None:
    by_id = {r["id"]: r for r in rows}
    assert by_id["r06"]["error"] and by_id["r06"]["score"] is None
    assert by_id["r10"]["error"].startswith("cannot decode") and by_id["r10"]["score"] is None
    assert "prompt is empty" in by_id["r18"]["error"] and by_id["r18"]["score"] is None
    # r18 splits its comparison in two: r17 alone (prob 1), then r19 and r20
    assert by_id["r17"]["rank"] == 1 and by_id["r17"]["prob"] == pytest.approx(1.0)
    assert sorted(by_id[k]["rank"] for k in ("r19", "r20")) == [1, 2]
    assert all(r["truncated"] for r in rows if r["prompt"] == LONG_PROMPT)
    assert sum(1 for r in rows if r["row"] == 41) == 3


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_artifacts, images):
    folder = tmp_path_factory.mktemp("ray_baseline")
    rows = work(images)
    return rows, cli_baseline(tiny_artifacts, write_jsonl(folder / "all.jsonl", rows))


# ---- flags -----------------------------------------------------------------------------------------
def test_flags_are_checked_before_anything_starts(tiny_artifacts, images, tmp_path, capsys):
    from pickscore_runtime.cli import main

    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "w.jsonl", work(images)[:4])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "precious.txt").write_text("keep me")
    base = ["score", "--artifacts", str(tiny_artifacts)]
    cases = [
        (base + ["--ray", "--input", str(src)], "--ray needs --input SRC"),
        (base + ["--ray-address", "127.0.0.1:1", "--input", str(src), "--output", str(tmp_path / "o")], "go(es) with --ray"),
        (base + ["--ray", "--input", str(src), "--output", str(tmp_path / "o.csv")], "directory of Parquet files"),
        (base + ["--ray", "--input", str(src), "--output", str(tmp_path / "o"), "--overwrite"], "does not replace"),
        (base + ["--ray", "--input", str(src), "--output", str(src)], "overlaps the input"),
        (base + ["--ray", "--input", str(src), "--output", str(src / "out")], "overlaps the input"),
        (base + ["--ray", "--input", str(src / "w.jsonl"), "--output", str(tmp_path / "full")], "is not empty"),
        (base + ["--ray", "--input", str(src / "w.jsonl"), "--output", str(tmp_path / "full"), "--resume"], "did not write"),
        (base + ["--ray", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")], "not found"),
    ]
    import ray

    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert not ray.is_initialized()  # refused before a cluster is started or joined
    assert (tmp_path / "full" / "precious.txt").read_text() == "keep me"
    from pickscore_runtime.locks import FileLock

    (tmp_path / "taken").mkdir()
    with FileLock(tmp_path / "taken" / ".pickscore.lock", "a run"):  # another driver writing that directory
        assert main(base + ["--ray", "--input", str(src), "--output", str(tmp_path / "taken")]) == 2
    assert "another pickscore run is writing" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_uris_other_file_systems_open(images):
    """Image URIs that pyarrow cannot open go through fsspec (hf:// in practice; fsspec's in-memory file system
    here, since nothing remote can be reached from the tests): bytes come back, a missing file is one error."""
    import fsspec

    from pickscore_runtime.errors import ImageError
    from pickscore_runtime.scale.files import RemoteFiles
    from pickscore_runtime.scale.stages import image_item

    data = images["img3"].read_bytes()
    fsspec.filesystem("memory").pipe("/bucket/gen/a b.jpg", data)
    remote = RemoteFiles()
    assert image_item("memory://bucket/gen/a%20b.jpg", "/", remote) == data
    with pytest.raises(ImageError, match="file not found"):
        image_item("memory://bucket/gen/missing.jpg", "/", remote)
    assert image_item(f"file://{images['img3']}", "/", remote) == str(images["img3"])  # local: the CLI's own path


# ---- equality with the CLI, per input kind --------------------------------------------------------
def test_jsonl_manifests_match_the_cli(cluster, tiny_artifacts, baseline, tmp_path):
    rows, want = baseline
    src = tmp_path / "manifests"
    src.mkdir()
    write_jsonl(src / "part-0.jsonl", rows[:SPLIT])
    second = [{**r, "image": "file://" + r["image"]} if "image" in r else r for r in rows[SPLIT:]]
    write_jsonl(src / "part-1.jsonl", second)
    done = run_cli(*ray_args(tiny_artifacts, cluster, src, tmp_path / "out"))
    assert done.returncode == 1, done.stderr[-3000:]  # 1: some rows could not be scored, as the CLI says
    got = read_out(tmp_path / "out")
    assert_same_rows(got, want, image=lambda name: name and name.removeprefix("file://"))
    check_bad_rows(got)
    assert "3 item(s) could not be scored" in done.stderr


def test_parquet_with_image_bytes_matches_the_cli(cluster, tiny_artifacts, baseline, tmp_path):
    rows, want = baseline

    def as_struct(path: str) -> dict:
        return {"bytes": Path(path).read_bytes() if Path(path).exists() else None, "path": path}

    table = [{"id": r["id"], "prompt": r["prompt"], "group": r["group"], "seed": 1000 + n,
              "image": as_struct(r["image"]) if "image" in r else None,
              "images": [as_struct(p) for p in r["images"]] if "images" in r else None} for n, r in enumerate(rows)]
    src = tmp_path / "shards"
    src.mkdir()
    for part, chunk in enumerate((table[:SPLIT], table[SPLIT:])):
        pq.write_table(pa.Table.from_pylist(chunk), src / f"part-{part}.parquet", row_group_size=7)
    done = run_cli(*ray_args(tiny_artifacts, cluster, src, tmp_path / "out"))
    assert done.returncode == 1, done.stderr[-3000:]
    got = read_out(tmp_path / "out")
    assert_same_rows(got, want)
    check_bad_rows(got)
    assert [r["seed"] for r in got] == [1000 + r["row"] - 1 for r in got]  # the input's other columns come along


def test_webdataset_shards_match_the_cli(cluster, tiny_artifacts, images, tmp_path):
    rows = work(images)[:40]  # the tar test has no multi-image row: a sample holds one image
    shards = [tarfile.open(tmp_path / f"shard-{k}.tar", "w") for k in range(2)]
    manifest = []
    extracted = tmp_path / "extracted"
    extracted.mkdir()

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for n, r in enumerate(rows):
        tar, key = shards[n >= SPLIT], r["id"]
        meta = {"group": r["group"]}
        if n % 2:
            meta["caption"] = r["prompt"]
        else:
            add(tar, f"{key}.txt", r["prompt"].encode())
        add(tar, f"{key}.json", json.dumps(meta).encode())
        row = {"id": key, "prompt": r["prompt"], "group": r["group"]}
        if Path(r["image"]).exists():  # a missing file is a sample without an image
            ext = Path(r["image"]).suffix
            add(tar, f"{key}{ext}", Path(r["image"]).read_bytes())
            row["image"] = str(extracted / f"{key}{ext}")
            shutil.copy(r["image"], row["image"])
        manifest.append(row)
    for tar in shards:
        tar.close()
    src = tmp_path / "shards"
    src.mkdir()
    for k in range(2):
        shutil.move(tmp_path / f"shard-{k}.tar", src / f"shard-{k}.tar")
    want = cli_baseline(tiny_artifacts, write_jsonl(tmp_path / "equivalent.jsonl", manifest))
    done = run_cli(*ray_args(tiny_artifacts, cluster, src, tmp_path / "out"))
    assert done.returncode == 1, done.stderr[-3000:]
    got = read_out(tmp_path / "out")
    assert_same_rows(got, want, image=lambda name: name and Path(name).name)
    by_id = {r["id"]: r for r in got}
    assert "no 'image'" in by_id["r06"]["error"] and by_id["r10"]["error"].startswith("cannot decode")


def test_the_dataset_api_matches_the_cli(cluster, tiny_artifacts, baseline):
    from pickscore_runtime.scale import score_dataset

    rows, want = baseline
    table = [{**r, "row": n + 1, "image": r.get("image"), "images": r.get("images")} for n, r in enumerate(rows)]
    scored = score_dataset(ray.data.from_items(table), tiny_artifacts, backend="onnx-cpu", precision="fp32",
                           batch_size=4, hash_check="size")
    assert_same_rows(sorted(scored.take_all(), key=order), want)


# ---- failures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_work(tmp_path_factory, tiny_artifacts, images):
    """Larger images, so that a run lasts long enough to be killed in the middle; two bad images."""
    folder = tmp_path_factory.mktemp("ray_big")
    rows = [{"id": f"b{i:03d}", "prompt": f"a painting of thing {i // 5}", "image": str(images[f"big{i % 8}"])}
            for i in range(N_BIG)]
    rows[7]["image"], rows[101]["image"] = str(images["missing"]), str(images["corrupt"])
    manifest = write_jsonl(folder / "big.jsonl", rows)
    return rows, manifest, cli_baseline(tiny_artifacts, manifest)


def start_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pickscore_runtime.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def committed(out: Path) -> int:
    """Checkpoint files the run has committed so far (each: a scored file on disk)."""
    folder = out / "_work" / "checkpoint"
    return sum(1 for p in folder.glob("*.parquet") if ".pending." not in p.name) if folder.is_dir() else 0


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run ended or stalled before {what}: {proc.returncode} {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)


def scorer_processes() -> list[psutil.Process]:
    """This test's cluster's scorer actors (Ray names an actor's process after its class)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "ImageScorer" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_a_scorer_killed_mid_run_is_retried_by_ray(cluster, tiny_artifacts, big_work, tmp_path):
    rows, manifest, want = big_work
    out = tmp_path / "out"
    proc = start_cli(ray_args(tiny_artifacts, cluster, manifest, out, "--workers", "1", "--commit-rows", "40"))
    wait_for(lambda: committed(out) >= 1 and scorer_processes(), proc, "a scorer was working")
    victims = scorer_processes()
    for victim in victims:
        victim.kill()  # SIGKILL: the actor's process dies with whatever batch it held
    assert proc.poll() is None, "the run had finished before the scorer was killed"
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert_same_rows(read_out(out), want)  # every image exactly once, as the CLI scores it
    assert all(not v.is_running() for v in victims)


def test_a_killed_driver_resumes_and_writes_every_row_once(cluster, tiny_artifacts, big_work, tmp_path):
    rows, _, want = big_work
    src = tmp_path / "src"
    src.mkdir()
    for part, chunk in enumerate((rows[:130], rows[130:])):
        pq.write_table(pa.Table.from_pylist(chunk), src / f"part-{part}.parquet", row_group_size=20)
    out = tmp_path / "out"
    args = ray_args(tiny_artifacts, cluster, src, out, "--commit-rows", "40")
    proc = start_cli(args)
    wait_for(lambda: committed(out) >= 2, proc, "two parts were committed")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert json.loads((out / "_pickscore_run.json").read_text())["state"] == "scoring"  # killed mid-scoring
    refused = run_cli(*args)
    assert refused.returncode == 2 and "--resume" in refused.stderr, refused.stderr[-2000:]
    done = run_cli(*args, "--resume")
    assert done.returncode == 1, done.stderr[-3000:]
    earlier = int(re.search(r"resuming: (\d+) item\(s\)", done.stderr).group(1))
    assert 0 < earlier < N_BIG
    assert_same_rows(read_out(out), want)  # every row exactly once, with the values of an uninterrupted run
    again = run_cli(*args, "--resume")  # a finished output: nothing left to do
    assert again.returncode == 1 and "complete already" in again.stderr
