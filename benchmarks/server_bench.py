"""`pickscore serve` against in-process `score_many`, on the same images, in the same run.

    python benchmarks/server_bench.py --artifacts DIR [--precisions int8,fp32] [--clients 1,4,16]
        [--images 64] [--images-per-request 2] [--rounds 3] [--protocols rewards,score,reward_server,cosmos]
        --output OUT.json

For each precision: one `pickscore serve` process (127.0.0.1, a free port) and one in-process
PickScorer, both opened on the same backend, batch size and threads. Every round times in-process
`score_many` over all requests' (prompt, images) items, then the server with 1, 4 and 16 concurrent
clients (each on its own keep-alive connection) sending those same requests, once per protocol; the
order of the modes rotates from round to round, so a drift in the machine's speed hits all of them alike.
Protocols: rewards (/v1/rewards, pickle), score (/v1/score, JSON + base64), reward_server (POST /, the
pickled dict flow_grpo's, DDPO's and verl-omni's clients send), cosmos (cosmos-rl's JSON + .npy enqueue,
then pull). The JPEG protocols send the same JPEG bytes as in-process `score_many` decodes; cosmos sends
those images' decoded pixels (uint8), so it is compared with in-process scoring of the same pixels.
Reported per mode: img/s per round and its median, the server's median img/s as a fraction of the
matching in-process mode (the median of per-round ratios), and p50 / p99 request latency. Target:
>= 0.9 of in-process from 4 clients on.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from pickscore_runtime import PickScorer, RandomWeightsWarning, WorkItem
from pickscore_runtime.artifacts import Artifacts
from pickscore_runtime.bench import bench_images, bench_prompts
from pickscore_runtime.machine import code_version, machine_info
from pickscore_runtime.server import PickScoreClient


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", required=True, type=Path)
    ap.add_argument("--backend", default="onnx-cpu")
    ap.add_argument("--precisions", default="int8,fp32")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--images", type=int, default=64, help="images per timed pass of each mode (default 64)")
    ap.add_argument("--images-per-request", type=int, default=2, help="images per request / work item (default 2)")
    ap.add_argument("--prompts", type=int, default=8, help="distinct prompts, reused as RL groups reuse them (default 8)")
    ap.add_argument("--image-size", default="512x512", help="generated JPEGs, WxH (default 512x512)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--protocols", default="rewards",
                    help="comma-separated: rewards (/v1/rewards pickle), score (JSON, base64), reward_server (POST /, "
                         "the trainers' pickled dict), cosmos (cosmos-rl enqueue + pull)")
    ap.add_argument("--max-batch", type=int, default=None, help="default: the backend's batch size")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="backend threads, both paths (default: all cores)")
    ap.add_argument("--workers", type=int, default=None, help="decoding threads, both paths (default: cores, at most 8)")
    ap.add_argument("--label", default="", help="free text kept in the output, e.g. 'tiny model'")
    ap.add_argument("--output", type=Path, required=True,
                    help="the JSON to write, e.g. benchmarks/results/DATE-MACHINE/server_bench_full.json")
    return ap.parse_args()


# cosmos-rl's trainer starts at 1 s and doubles up to 60 s; shorter here, so that the wait adds little to a
# pass of ~30 s, yet 16 clients do not spend the server's CPU answering "not yet" every few milliseconds.
PULL_FIRST_DELAY_S, PULL_MAX_DELAY_S = 0.1, 1.0
PROTOCOL_INPUTS = {"rewards": "jpeg", "score": "jpeg", "reward_server": "jpeg", "cosmos": "pixels"}


def jpegs(n: int, size: str) -> list[bytes]:
    w, h = (int(x) for x in size.split("x"))
    out = []
    for img in bench_images(n, (w, h)):
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(args: argparse.Namespace, precision: str) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "pickscore_runtime.cli", "-q", "serve", "--artifacts", str(args.artifacts),
               "--port", str(port), "--backend", args.backend, "--precision", precision, "--hash-check", "size",
               "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "1024"]
    for flag, value in (("--max-batch", args.max_batch), ("--threads", args.threads), ("--workers", args.workers)):
        if value:
            command += [flag, str(value)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("server not ready within 900 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def in_process(scorer: PickScorer, requests: list[tuple[str, list]], batch: int) -> dict:
    """The requests' (prompt, images) items through score_many: JPEG bytes are decoded, arrays are used as they are."""
    started = time.perf_counter()
    results = list(scorer.score_many((WorkItem(p, imgs) for p, imgs in requests), batch_size=batch))
    seconds = time.perf_counter() - started
    assert all(r.n_failed == 0 for r in results)
    return {"seconds": seconds, "latencies_ms": []}


def npy_body(prompt: str, pixels: list[np.ndarray]) -> bytes:
    """cosmos-rl's enqueue body: its JSON header, a newline, np.save of uint8 [B, H, W, 3]."""
    buffer = io.BytesIO()
    np.save(buffer, np.stack(pixels), allow_pickle=False)
    header = {"prompts": [prompt] * len(pixels), "reward_fn": {"pickscore": 1.0}, "media_type": "image"}
    return json.dumps(header).encode() + b"\n" + buffer.getvalue()


def send(c: PickScoreClient, protocol: str, prompt: str, images: list) -> None:
    """One request of `protocol`, checked to have scored every image."""
    if protocol == "rewards":
        assert not any(c.rewards(images, [prompt] * len(images))["errors"])
    elif protocol == "score":
        assert c.score(prompt, images).n_failed == 0
    elif protocol == "reward_server":
        status, body = c.request("POST", "/", pickle.dumps({"images": images, "prompts": [prompt] * len(images), "metadata": {}}))
        assert status == 200 and not any(pickle.loads(body)["errors"]), body[:300]
    else:  # cosmos: enqueue, then pull until ready, retrying a 400 with backoff as cosmos-rl's trainer does
        status, body = c.request("POST", "/api/reward/enqueue", npy_body(prompt, images), "application/octet-stream")
        assert status == 200, body[:300]
        form = urllib.parse.urlencode({"uuid": json.loads(body)["uuid"], "type": "pickscore"}).encode()
        delay = PULL_FIRST_DELAY_S
        while True:
            time.sleep(delay)
            status, body = c.request("POST", "/api/reward/pull", form, "application/x-www-form-urlencoded")
            if status != 400:
                break
            delay = min(2 * delay, PULL_MAX_DELAY_S)
        assert status == 200 and not any(json.loads(body)["errors"]), body[:300]


def through_server(url: str, requests: list[tuple[str, list]], clients: int, protocol: str) -> dict:
    """`clients` threads, each on its own connection, take requests from a shared list until it is empty."""
    latencies: list[float] = []
    lock = threading.Lock()
    todo = iter(requests)

    def client() -> None:
        with PickScoreClient(url) as c:
            while True:
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                t0 = time.perf_counter()
                send(c, protocol, *item)
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"seconds": time.perf_counter() - started, "latencies_ms": latencies}


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for precision in dict.fromkeys(r["precision"] for r in rows):
        mine = [r for r in rows if r["precision"] == precision]
        base = {(r["inputs"], r["round"]): r["img_s"] for r in mine if r["mode"].startswith("in-process")}
        for mode in dict.fromkeys(r["mode"] for r in mine):
            runs = [r for r in mine if r["mode"] == mode]
            lat = [x for r in runs for x in r["latencies_ms"]]
            out.append({
                "precision": precision, "mode": mode, "img_s_median": float(np.median([r["img_s"] for r in runs])),
                "img_s_per_round": [round(r["img_s"], 3) for r in runs],
                "vs_in_process": float(np.median([r["img_s"] / base[(r["inputs"], r["round"])] for r in runs])),
                "p50_ms": float(np.percentile(lat, 50)) if lat else None,
                "p99_ms": float(np.percentile(lat, 99)) if lat else None})
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| precision | mode | img/s (median) | vs in-process | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for s in summary:
        p50 = f"{s['p50_ms']:.0f}" if s["p50_ms"] is not None else "-"
        p99 = f"{s['p99_ms']:.0f}" if s["p99_ms"] is not None else "-"
        lines.append(f"| {s['precision']} | {s['mode']} | {s['img_s_median']:.2f} | {s['vs_in_process']:.2f} | {p50} | {p99} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    protocols = args.protocols.split(",")
    unknown = set(protocols) - set(PROTOCOL_INPUTS)
    if unknown:
        raise SystemExit(f"unknown protocol(s) {', '.join(sorted(unknown))}; choose from {', '.join(PROTOCOL_INPUTS)}")
    images = jpegs(args.images, args.image_size)
    inputs = {"jpeg": images, "pixels": [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in images]}
    prompts = bench_prompts(args.prompts)
    k = args.images_per_request
    requests = {kind: [(prompts[i % len(prompts)], items[at : at + k]) for i, at in enumerate(range(0, len(items), k))]
                for kind, items in inputs.items()}
    kinds = list(dict.fromkeys(PROTOCOL_INPUTS[p] for p in protocols))
    rows = []
    for precision in args.precisions.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            scorer = PickScorer.load(args.artifacts, backend=args.backend, precision=precision, hash_check="size",
                                     batch_size=args.max_batch, threads=args.threads, workers=args.workers)
        batch = scorer.backend.batch_size
        with scorer, server_process(args, precision) as url:
            modes = {f"in-process ({kind})": (kind, lambda kind=kind: in_process(scorer, requests[kind], batch))
                     for kind in kinds}
            for protocol in protocols:
                kind = PROTOCOL_INPUTS[protocol]
                modes.update({f"{protocol}, {c} client{'s' if c > 1 else ''}":
                              (kind, lambda c=c, p=protocol, kind=kind: through_server(url, requests[kind], c, p))
                              for c in clients})
            for kind in kinds:
                in_process(scorer, requests[kind][: max(clients)], batch)
            for protocol in protocols:
                through_server(url, requests[PROTOCOL_INPUTS[protocol]][: max(clients)], max(clients), protocol)
            names = list(modes)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order every round
                    kind, run = modes[name]
                    timed = run()
                    row = {"precision": precision, "mode": name, "inputs": kind, "round": r, "images": len(images),
                           "img_s": len(images) / timed["seconds"], **timed}
                    rows.append(row)
                    print(f"{precision:5} round {r} {name:22} {row['img_s']:8.2f} img/s", file=sys.stderr, flush=True)
    artifacts = Artifacts.load(args.artifacts, hash_check="size")
    summary = summarize(rows)
    result = {"label": args.label, "code": code_version(), "command": shlex.join(sys.argv), "cwd": os.getcwd(),
              "machine": machine_info(args.threads), "artifacts": str(args.artifacts),
              "random_weights": artifacts.random_weights, "dims": artifacts.manifest["dims"], "backend": args.backend,
              "protocols": protocols, "images_per_pass": len(images), "images_per_request": k,
              "image_size": args.image_size, "max_wait_ms": args.max_wait_ms, "summary": summary, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(summary))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
