"""`pickscore score --ray` when things go wrong beyond one process, on REAL local Ray clusters and the tiny model:
the driver killed (SIGKILL, or an exit at a named point of the job) at every stage and resumed; bad rows of
every kind (lone surrogates) as error rows; the local cluster it starts listening on loopback only; and a
multi-node cluster (ray.cluster_utils: a head and two worker nodes with the smallest object stores) that loses a
worker node mid-run, loses one during the rank pass, and spills blocks to disk. Every run is checked row by row
against the single-machine CLI on the same input (fp32). Waits are on observable progress (committed files,
the run record, files in the spill directory), each bounded by a deadline."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import ray

from helpers import local_ray_cluster, run_cli
from pickscore_export.samples import synthetic_image
from pickscore_runtime.scale.job import EXIT_AT_ENV as EXIT_AT
from test_ray import assert_same_rows, cli_baseline, committed, ray_args, read_out, start_cli, wait_for, write_jsonl

pytestmark = pytest.mark.integration
DEADLINE = 150  # seconds any one run may take before the test calls it a hang (a resume takes about 15)
MIN_OBJECT_STORE = 80 * 2**20  # near Ray's minimum (75 MiB): a block of 32 images' pixels is 19 MiB


def run_state(out: Path) -> str | None:
    try:
        return json.loads((out / "_pickscore_run.json").read_text())["state"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_artifacts):
    """A JSONL manifest of small images (comparisons of 4, one missing image) and the CLI's output for it."""
    folder = tmp_path_factory.mktemp("ray_faults")
    paths = []
    for k in range(12):
        path = folder / f"im{k:02d}.{'png' if k % 2 else 'jpg'}"
        synthetic_image(48 + 7 * k, 80 - 2 * k, seed=700 + k).save(path)
        paths.append(str(path))

    def manifest(n: int) -> tuple[Path, list[dict]]:
        rows = [{"id": f"f{i:03d}", "prompt": f"a drawing of thing {i // 4}", "image": paths[i % len(paths)]}
                for i in range(n)]
        rows[3]["image"] = str(folder / "missing.png")
        path = write_jsonl(folder / f"work{n}.jsonl", rows)
        return path, cli_baseline(tiny_artifacts, path)

    return {"small": manifest(32), "big": manifest(160)}


# ---- one machine: the cluster started by `score --ray` itself ---------------------------------------
def listening(proc: psutil.Process) -> set[tuple[str, str]]:
    """(process name, listening address) of a process and all its descendants."""
    found = set()
    for p in [proc, *proc.children(recursive=True)]:
        try:
            for c in p.net_connections("inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((p.name(), c.laddr.ip))
        except psutil.Error:
            continue
    return found


def test_the_local_cluster_listens_on_loopback_only(tiny_artifacts, inputs, tmp_path):
    """Without --ray-address, `score --ray` starts a cluster of its own: every socket that cluster's processes
    (GCS, raylet, workers, agents) listen on, watched for the whole run, is a loopback address."""
    assert not ray.is_initialized()  # no cluster of this test process's own is running beside it
    manifest, want = inputs["small"]
    args = ray_args(tiny_artifacts, "x", manifest, tmp_path / "out")
    args = args[:args.index("--ray-address")] + args[args.index("--ray-address") + 2:]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "pickscore_runtime.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": tempfile.mkdtemp(prefix="psl", dir="/tmp")})
    driver, seen = psutil.Process(proc.pid), set()
    deadline = time.monotonic() + DEADLINE
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= listening(driver)
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err[-3000:]
    assert_same_rows(read_out(tmp_path / "out"), want)
    names = {name for name, _ in seen}
    assert "gcs_server" in names and "raylet" in names, seen  # the cluster was watched while it ran
    exposed = {(name, ip) for name, ip in seen if ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")}
    assert not exposed, f"listening beyond this machine: {sorted(exposed)}"


# ---- one machine: the driver killed at every stage ---------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    with local_ray_cluster(num_cpus=2, object_store_mb=200, prefix="psf") as address:
        yield address


# point -> the run record's state after the kill, and what else is there
KILL_POINTS = {
    "scoring": "scoring",  # SIGKILL once the first part is committed
    "scored": "scoring",  # every image committed, the rank pass not recorded yet
    "ranked": "ranking",  # the rank pass's files written, not listed yet
    "moving": "ranking",  # listed, and some moved into OUT_DIR
    "finished": "done",  # recorded done, the work folder not yet deleted
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_driver_killed_at_any_point_finishes_on_resume(cluster, tiny_artifacts, inputs, tmp_path, point):
    manifest, want = inputs["small"]
    out = tmp_path / "out"
    args = ray_args(tiny_artifacts, cluster, manifest, out, "--commit-rows", "8")
    if point == "scoring":
        proc = start_cli(args)
        wait_for(lambda: committed(out) >= 1, proc, "a part was committed", timeout=DEADLINE)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    else:
        killed = run_cli(*args, env={EXIT_AT: point}, timeout=DEADLINE)
        assert killed.returncode == 137, killed.stderr[-3000:]
    assert run_state(out) == KILL_POINTS[point]
    if point == "moving":
        assert (out / "_work" / "ranked" / "_COMPLETE.json").exists() and list(out.glob("*.parquet"))
    done = run_cli(*args, "--resume", timeout=DEADLINE)  # a hang fails here, at the deadline
    assert done.returncode == 1, done.stderr[-3000:]
    assert_same_rows(read_out(out), want)  # every row exactly once, as an uninterrupted run
    assert run_state(out) == "done"
    if point == "scored":
        assert "all 32 item(s) were scored by the earlier run" in done.stderr


# ---- bad rows of any kind ----------------------------------------------------------------------------
def test_rows_with_lone_surrogates_are_error_rows(cluster, tiny_artifacts, inputs, tmp_path):
    """JSON's \\udXXX escapes decode to lone surrogates, which no UTF-8 file can hold: in a prompt, an id, a group
    or an image name they make that row an error row, and every other row is scored and written."""
    image = json.loads(inputs["small"][0].read_text().splitlines()[0])["image"]
    lines = [json.dumps({"id": "good1", "prompt": "a cat", "image": image}),
             '{"id": "bad-prompt", "prompt": "a \\ud800 cat", "image": "%s"}' % image,
             '{"id": "bad\\udc80id", "prompt": "a cat", "image": "%s"}' % image,
             '{"id": "bad-group", "prompt": "a cat", "group": "g\\udfff", "image": "%s"}' % image,
             '{"id": "bad-image", "prompt": "a cat", "image": "%s\\ud83d"}' % image,
             json.dumps({"id": "good2", "prompt": "a cat", "image": image})]
    src = tmp_path / "hostile.jsonl"
    src.write_text("\n".join(lines) + "\n")
    done = run_cli(*ray_args(tiny_artifacts, cluster, src, tmp_path / "out"), timeout=DEADLINE)
    assert done.returncode == 1, done.stderr[-3000:]
    rows = {r["row"]: r for r in read_out(tmp_path / "out")}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for row in (1, 6):
        assert rows[row]["error"] is None and rows[row]["score"] is not None
    assert rows[1]["prob"] == pytest.approx(1.0)  # the bad rows between them split the comparison
    for row in (2, 3, 4, 5):  # the CLI's own checks name the prompt and the image; the Ray job's the id and group
        assert rows[row]["score"] is None and rows[row]["error"].startswith(f"line {row}: "), rows[row]
        assert "not valid Unicode" in rows[row]["error"] and "lone surrogate" in rows[row]["error"], rows[row]
    assert "the id is not valid" in rows[3]["error"] and "the group is not valid" in rows[4]["error"]
    assert rows[3]["id"] == "bad\\udc80id"  # kept, escaped
    assert "5 output row(s)" not in done.stderr and "4 item(s) could not be scored" in done.stderr


# ---- many nodes ---------------------------------------------------------------------------------------
@pytest.fixture()
def nodes(tmp_path):
    """A head (no CPUs: it only coordinates) and two worker nodes of 2 CPUs, each with an object store near
    Ray's minimum; objects that do not fit are spilled to `spill` (watched by the spill test)."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the module's single-node cluster: one cluster at a time on a 2-core machine
    temp = tempfile.mkdtemp(prefix="psn", dir="/tmp")
    # Cluster() writes the head's address to <tmp>/ray/ray_current_cluster whatever temp_dir says, and fails where
    # nothing made that folder before (a fresh machine whose earlier tests all gave Ray other folders)
    os.makedirs(os.path.join(tempfile.gettempdir(), "ray"), exist_ok=True)
    spill = tmp_path / "spill"
    spill.mkdir()
    config = {"object_spilling_config": json.dumps({"type": "filesystem", "params": {"directory_path": str(spill)}})}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": MIN_OBJECT_STORE, "include_dashboard": False, "temp_dir": temp,
        "_system_config": config})
    workers = [cluster.add_node(num_cpus=2, object_store_memory=MIN_OBJECT_STORE) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)  # exports the cluster's auth settings to the CLI runs
    try:
        yield cluster, workers, spill
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_worker_node_lost_mid_run(nodes, tiny_artifacts, inputs, tmp_path):
    cluster, workers, _ = nodes
    manifest, want = inputs["big"]
    out = tmp_path / "out"
    proc = start_cli(ray_args(tiny_artifacts, cluster.address, manifest, out, "--commit-rows", "16", "--workers", "1",
                                "--threads", "1"))  # one scorer of 1 CPU: it fits on the node that survives, beside decoding
    wait_for(lambda: committed(out) >= 1, proc, "a part was committed", timeout=DEADLINE)
    cluster.remove_node(workers[0], allow_graceful=False)  # SIGKILL: raylet, object store and workers at once
    assert proc.poll() is None, "the run had finished before the node was lost"
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 1, err[-3000:]
    assert_same_rows(read_out(out), want)  # every row exactly once, as the CLI scores it


def test_a_worker_node_lost_in_the_rank_pass(nodes, tiny_artifacts, inputs, tmp_path):
    """The node goes once the run records its rank pass (which may be over by then on a fast machine: the
    result must be exact either way)."""
    cluster, workers, _ = nodes
    manifest, want = inputs["small"]
    out = tmp_path / "out"
    proc = start_cli(ray_args(tiny_artifacts, cluster.address, manifest, out, "--commit-rows", "8"))
    wait_for(lambda: run_state(out) in ("ranking", "done"), proc, "the rank pass started", timeout=DEADLINE)
    cluster.remove_node(workers[1], allow_graceful=False)
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 1, err[-3000:]
    assert_same_rows(read_out(out), want)


@ray.remote(num_cpus=0)
class Ballast:
    """Objects held in one node's object store for as long as the actor lives."""

    def __init__(self, mib: int, count: int):
        import numpy as np

        self.held = [ray.put(np.ones(mib << 20, np.uint8)) for _ in range(count)]

    def ready(self) -> bool:
        return True


def test_blocks_spilled_to_disk_give_exact_results(nodes, tiny_artifacts, inputs, tmp_path):
    """Ray Data keeps its blocks within a share of each object store, so the stores are filled to 60 of their
    80 MiB first: the run's blocks (19 MiB of pixels each) must then be spilled to disk and read back."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster, _, spill = nodes
    workers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    ballast = [Ballast.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(30, 2)
               for node in workers]
    ray.get([b.ready.remote() for b in ballast], timeout=60)
    before = {p for p in spill.rglob("*") if p.is_file()}
    manifest, want = inputs["big"]
    out = tmp_path / "out"
    proc = start_cli(ray_args(tiny_artifacts, cluster.address, manifest, out, "--commit-rows", "200"))
    spilled = False
    deadline = time.monotonic() + DEADLINE
    while proc.poll() is None and time.monotonic() < deadline:
        spilled = spilled or any(p.is_file() and p not in before for p in spill.rglob("*"))
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err[-3000:]
    assert_same_rows(read_out(out), want)
    assert spilled, "no block was spilled: the object stores had room for every block"
