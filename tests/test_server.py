"""`pickscore serve` as a client meets it: a real server process on 127.0.0.1 (the tiny CLIP, fp32 on
onnx-cpu), real HTTP, the official openai client, real images on disk; its answers are compared with
the in-process PickScorer (itself tested against the PyTorch reference)."""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from typing import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from pickscore_runtime.errors import ImageError
from pickscore_runtime.server import PickScoreClient, RewardError, ServerError, ServerReward

pytestmark = pytest.mark.integration

# fp32 scores move by ~1e-6 with a batch's composition (ONNX Runtime's kernels block differently per
# batch size); anything beyond this would be a real difference.
ATOL = 2e-5
API_KEY = "test-key-0123456789"


# ---- servers -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def stderr(self) -> str:
        return self.log.read_text()


def start_server(artifacts: Path, tmp: Path, *args: str, ready_within: float = 120) -> Server:
    port = free_port()
    log = tmp / f"server-{port}.log"
    command = [sys.executable, "-m", "pickscore_runtime.cli", "serve", "--artifacts", str(artifacts), "--port", str(port),
               "--hash-check", "size", *args]
    with open(log, "wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    server = Server(proc, port, log)
    deadline = time.monotonic() + ready_within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {server.stderr()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return server
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"server not ready within {ready_within} s: {server.stderr()[-3000:]}")


@contextlib.contextmanager
def running(artifacts: Path, tmp: Path, *args: str) -> Iterator[Server]:
    server = start_server(artifacts, tmp, *args)
    try:
        yield server
    finally:
        server.stop()


FP32 = ("--backend", "onnx-cpu", "--precision", "fp32")


@pytest.fixture(scope="module")
def server(tiny_artifacts, tmp_path_factory) -> Iterator[Server]:
    with running(tiny_artifacts, tmp_path_factory.mktemp("server"), *FP32, "--max-batch", "8", "--max-wait-ms", "20",
                 "--max-body-mb", "2", "--workers", "2", "--threads", "1") as s:
        yield s


@pytest.fixture(scope="module")
def auth_server(tiny_artifacts, tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("auth")
    key_file = tmp / "keys"
    key_file.write_text(f"# current key\n{API_KEY}\nold-key-being-rotated-out\n")
    key_file.chmod(0o600)
    with running(tiny_artifacts, tmp, *FP32, "--api-key-file", str(key_file)) as s:
        yield s


# ---- images --------------------------------------------------------------------------------------
def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def noise(seed: int, size: tuple[int, int] = (96, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def gradient(seed: int, side: int) -> bytes:
    """A large image that compresses well: a small body, but real decoding and resizing work."""
    y, x = np.mgrid[0:side, 0:side]
    return png(np.stack([(x + seed) % 256, (y * 2) % 256, (x + y) % 256], -1).astype(np.uint8))


@pytest.fixture(scope="module")
def disk_images(sample_images) -> list[bytes]:
    """Real files of the verify set (several formats, modes and sizes), small enough for the body limit."""
    return [p.read_bytes() for p in sample_images if p.stat().st_size < 150_000][:8]


def post(url: str, **kw: Any) -> httpx.Response:
    """httpx's 5 s default is too short for a loaded 2-core CI machine; the server's own limits are what is tested."""
    return httpx.post(url, **{"timeout": 60, **kw})


def get(url: str, **kw: Any) -> httpx.Response:
    return httpx.get(url, **{"timeout": 60, **kw})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + b64(data)


def assert_same_result(served: dict, expected: dict) -> None:
    assert {k: v for k, v in served.items() if k != "results"} == {k: v for k, v in expected.items() if k != "results"}
    assert len(served["results"]) == len(expected["results"])
    for got, want in zip(served["results"], expected["results"]):
        assert got["image"] == want["image"] and got.get("error") == want.get("error")
        assert got["rank"] == want["rank"]
        if want["score"] is None:
            assert got["score"] is None and got["prob"] is None
        else:
            assert got["score"] == pytest.approx(want["score"], abs=ATOL)
            assert got["prob"] == pytest.approx(want["prob"], abs=ATOL)


# ---- the protocols, against in-process scores -----------------------------------------------------
def test_score_json_equals_in_process(server, tiny_scorer, disk_images):
    bad = b"\x89PNG\r\n\x1a\n truncated"
    images = disk_images[:5] + [bad]
    r = post(server.url + "/v1/score", json={"prompt": "a cat astronaut", "images": [b64(x) for x in images]})
    assert r.status_code == 200, r.text
    expected = tiny_scorer.score("a cat astronaut", images).to_json()
    assert_same_result(r.json(), expected)
    assert "cannot decode" in r.json()["results"][5]["error"]  # one bad image is an error in its own row only

    items = [{"prompt": "a red car", "images": [data_url(x) for x in disk_images[:3]]},
             {"prompt": "A  RED car", "images": [b64(disk_images[4])]},  # tokenises like the first: one text row
             {"prompt": "a dog " * 40, "images": [b64(x) for x in disk_images[2:6]]}]  # truncated at 77 tokens
    r = post(server.url + "/v1/score", json={"items": items})
    assert r.status_code == 200, r.text
    expected = tiny_scorer.score_batch(["a red car", "A  RED car", "a dog " * 40],
                                       [disk_images[:3], disk_images[4:5], disk_images[2:6]])
    for got, want in zip(r.json(), expected, strict=True):
        assert_same_result(got, want.to_json())
    assert r.json()[2]["truncated"] is True

    client = PickScoreClient(server.url)  # the bundled client gives PromptResults
    result = client.score("a cat astronaut", [Image.open(io.BytesIO(disk_images[0])), noise(1)])
    want = tiny_scorer.score("a cat astronaut", [Image.open(io.BytesIO(disk_images[0])), noise(1)])
    np.testing.assert_allclose(result.scores, want.scores, atol=ATOL)
    assert [r.rank for r in result.results] == [r.rank for r in want.results] and result.random_weights


def test_rewards_pickle_as_ddpo_clients_send_it(server, tiny_scorer):
    arrays = [noise(i) for i in range(6)]
    prompts = ["a cat", "a dog", "a cat", "a horse", "a cat", "a dog"]
    jpegs = []
    for a in arrays:  # what DDPO's llava_bertscore does: JPEG bytes in a pickled dict, raw POST
        buffer = io.BytesIO()
        Image.fromarray(a).save(buffer, format="JPEG", quality=80)
        jpegs.append(buffer.getvalue())
    r = post(server.url + "/v1/rewards", content=pickle.dumps({"images": jpegs, "prompts": prompts, "extra": [1, 2]}))
    assert r.status_code == 200, r.text
    answer = pickle.loads(r.content)
    expected = [tiny_scorer.score(p, [j]).results[0].score for p, j in zip(prompts, jpegs)]
    np.testing.assert_allclose(answer["scores"], expected, atol=ATOL)
    assert answer["errors"] == [None] * 6 and answer["random_weights"] is True

    reward_fn = ServerReward(server.url, chunk=4)  # (images, prompts, metadata) -> (rewards, info), PNG: lossless
    rewards, info = reward_fn(np.stack(arrays), prompts, [{}] * 6)
    in_process = [tiny_scorer.score(p, [a]).results[0].score for p, a in zip(prompts, arrays)]
    assert rewards.dtype == np.float32 and rewards.shape == (6,)
    np.testing.assert_allclose(rewards, in_process, atol=ATOL)
    assert info["backend"] == "onnx-cpu" and info["precision"] == "fp32"
    torch = pytest.importorskip("torch")  # what DDPO's pipeline hands its reward_fn: float [0, 1], NCHW
    as_ddpo = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_allclose(reward_fn(as_ddpo, tuple(prompts), None)[0], in_process, atol=ATOL)

    with pytest.raises(RewardError, match="#1"):  # a reward function never hands back a NaN reward silently
        reward_fn([arrays[0], b"not an image"], ["a cat", "a cat"], None)
    rewards, info = ServerReward(server.url, on_error="nan")([arrays[0], b"not an image"], ["a cat", "a cat"], None)
    assert np.isnan(rewards[1]) and not np.isnan(rewards[0]) and "cannot decode" in info["errors"][1]
    assert "0x" not in info["errors"][1]  # no memory address of a server-side buffer reaches the client
    bad = as_ddpo.clone()
    bad[2, 0, 0, 0] = float("nan")
    with pytest.raises(ImageError, match=r"#2 \(tensor\): holds NaN"):  # refused as the in-process reward refuses it
        reward_fn(bad, tuple(prompts), None)
    reward_fn.close()


def test_embeddings_through_the_official_openai_client(server, tiny_scorer, disk_images):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    texts = ["a cat astronaut", "a bowl of ramen"]
    response = client.embeddings.create(model="pickscore_v1", input=[texts[0], data_url(disk_images[1]), texts[1]])
    assert response.object == "list" and response.model == "pickscore_v1" and [d.index for d in response.data] == [0, 1, 2]
    got = np.array([d.embedding for d in response.data])  # the client asked for base64 and decoded it
    np.testing.assert_allclose(got[[0, 2]], tiny_scorer.embed_text(texts), atol=1e-6)
    np.testing.assert_allclose(got[1], tiny_scorer.embed_images([disk_images[1]])[0], atol=1e-6)
    tokens = tiny_scorer.tokenizer(texts).lengths.sum()
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens

    as_floats = client.embeddings.create(model="pickscore_v1", input="a cat astronaut", encoding_format="float")
    np.testing.assert_allclose(as_floats.data[0].embedding, got[0], atol=1e-7)
    assert [m.id for m in client.models.list()] == ["pickscore_v1"]
    assert response.model_extra.get("random_weights") is True  # marked like every other protocol's answer
    assert get(server.url + "/docs").status_code == 404 and get(server.url + "/openapi.json").status_code == 404
    with pytest.raises(openai.BadRequestError, match=r"input\[1\]"):
        client.embeddings.create(model="pickscore_v1", input=["a cat", data_url(b"not an image")])


def test_rerank_as_vllm_jina_and_cohere_define_it(server, tiny_scorer, disk_images):
    images = disk_images[:5]
    expected = tiny_scorer.score("a cozy cabin", images)
    documents = [data_url(images[0]), {"image": data_url(images[1])},  # Cohere/vLLM strings, Jina objects,
                 {"type": "image_url", "image_url": {"url": data_url(images[2])}}, data_url(images[3]),
                 {"image_url": {"url": data_url(images[4])}}]  # and OpenAI content parts (vLLM multi-modal)
    r = post(server.url + "/v1/rerank", json={"model": "pickscore_v1", "query": "a cozy cabin", "documents": documents})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model"] == "pickscore_v1" and doc["id"].startswith("rerank-") and doc["usage"]["total_tokens"] > 0
    results = doc["results"]
    assert [x["index"] for x in results] == [j for j in np.argsort(-expected.scores, kind="stable")]  # best first
    for x in results:
        assert x["relevance_score"] == pytest.approx(expected.results[x["index"]].score, abs=ATOL)
        assert x["prob"] == pytest.approx(expected.results[x["index"]].prob, abs=ATOL)
        assert "document" not in x

    r = post(server.url + "/v1/rerank", json={"query": "a cozy cabin", "top_n": 2, "return_documents": True,
                                                    "documents": {"content": [{"type": "image_url", "image_url": {"url": d}}
                                                                              for d in map(data_url, images)]}})
    assert r.status_code == 200, r.text
    assert [x["index"] for x in r.json()["results"]] == [x["index"] for x in results[:2]]
    assert r.json()["results"][0]["document"]["image_url"]["url"] == data_url(images[results[0]["index"]])

    r = post(server.url + "/v1/rerank", json={"query": "a cat", "documents": [data_url(images[0]), data_url(b"junk")]})
    assert r.status_code == 400 and "documents[1]" in r.json()["error"]["message"]
    r = post(server.url + "/v1/rerank", json={"query": "a cat", "documents": ["a text document"]})
    assert r.status_code == 400 and "reranks images" in r.json()["error"]["message"]


# ---- access and bad input -------------------------------------------------------------------------
def test_auth_with_a_key_file(auth_server, disk_images):
    url, body = auth_server.url + "/v1/score", {"prompt": "a cat", "images": [b64(disk_images[0])]}
    assert post(url, json=body).status_code == 401
    wrong = post(url, json=body, headers={"Authorization": "Bearer not-the-key"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert post(url, json=body, headers={"Authorization": "Bearer old-key-being-rotated-out"}).status_code == 200
    assert get(auth_server.url + "/metrics").status_code == 401
    assert get(auth_server.url + "/healthz").status_code == 200  # probes need no key
    assert get(auth_server.url + "/readyz").status_code == 200
    with PickScoreClient(auth_server.url, api_key=API_KEY) as client:
        assert client.score("a cat", [disk_images[0]]).results[0].score is not None
    with pytest.raises(ServerError) as refused:
        PickScoreClient(auth_server.url).rewards([disk_images[0]], ["a cat"])
    assert refused.value.status == 401


def test_auth_off_by_default(server, disk_images):
    r = post(server.url + "/v1/score", json={"prompt": "a cat", "images": [b64(disk_images[0])]})
    assert r.status_code == 200


MALFORMED = [
    (b'{"prompt": "a cat", "images": [', "malformed JSON"),
    (b'{"prompt": "a cat", "images": ["not base64!"]}', "images[0]: bad base64"),
    (b'{"prompt": "a cat", "images": []}', "images is empty"),
    (b'{"prompt": "   ", "images": ["aGk="]}', "prompt is empty"),
    (b'{"prompt": 7, "images": ["aGk="]}', "prompt must be a string"),
    (b'{"prompt": "a cat", "images": "aGk="}', "images must be an array"),
    (b'{"prompt": "a cat"}', "images is missing"),
    (b'[1, 2]', "must be a JSON object"),
    (b'{"items": [{"prompt": "a", "images": ["aGk="]}, {"prompt": "", "images": ["aGk="]}]}', "items[1].prompt"),
    (b'{"prompt": "a cat", "images": ["/etc/passwd"]}', "bad base64"),
    (b'{"prompt": "a cat", "images": ["file:///etc/passwd"]}', "URLs are not fetched"),
    (b'{"prompt": "a cat", "images": ["data:image/png,raw"]}', "data URL must be base64"),
]


@pytest.mark.parametrize("body, problem", MALFORMED, ids=[problem for _, problem in MALFORMED])
def test_malformed_requests_get_400_naming_the_problem(server, body, problem):
    r = post(server.url + "/v1/score", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert problem in r.json()["error"]["message"]


BAD_PICKLES = [
    (pickle.dumps([b"x"]), "must be a dict"),
    (pickle.dumps({"images": [], "prompts": []}), "images is empty"),
    (pickle.dumps({"images": [b"x", b"y"], "prompts": ["a"]}), "one prompt per image"),
    (pickle.dumps({"images": [b"x"], "prompts": [""]}), "prompts[0]"),
    # numpy str prompts are read as text (trainers send them: test_reward_pieces.py); no other numpy object is
    (pickle.dumps({"images": [b"x"], "prompts": np.array([1.0])}), "numpy array of dtype"),
    (pickle.dumps({"images": np.zeros((1, 8, 8, 3), np.uint8), "prompts": ["a"]}), "numpy array of dtype"),
    (pickle.dumps({"images": [b"x"], "prompts": ["a"]}, protocol=2), "_codecs.encode"),  # bytes need a function there
    (b"\x80\x04not a pickle", "malformed pickle"),
]


@pytest.mark.parametrize("payload, problem", BAD_PICKLES, ids=[problem for _, problem in BAD_PICKLES])
def test_rewards_refuses_bad_payloads(server, payload, problem):
    r = post(server.url + "/v1/rewards", content=payload)
    assert r.status_code == 400 and problem in r.json()["error"]["message"]


class WritesAFile:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class OpensAFile:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_and_never_executed(server, tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(OpensAFile(str(control))))  # unpickled plainly, such a payload runs code ...
    assert control.exists()
    control.unlink()
    for evil, named in [(WritesAFile(str(tmp_path / "pwned-system")), "posix.system"),
                        (OpensAFile(str(tmp_path / "pwned-open")), "io.open")]:
        r = post(server.url + "/v1/rewards", content=pickle.dumps({"images": [evil], "prompts": ["a cat"]}))
        assert r.status_code == 400, r.text
        assert "pickle refused" in r.json()["error"]["message"] and named in r.json()["error"]["message"]
    time.sleep(0.2)
    assert not list(tmp_path.iterdir())  # ... here it ran nothing
    assert get(server.url + "/healthz").status_code == 200


def test_oversized_body_gets_413(server):
    big = json.dumps({"prompt": "a cat", "images": [b64(os.urandom(3 * 2**20))]}).encode()  # over --max-body-mb 2
    r = post(server.url + "/v1/score", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams in
        for at in range(0, len(big), 256 * 1024):
            yield big[at : at + 256 * 1024]

    r = post(server.url + "/v1/score", content=chunks())
    assert r.status_code == 413
    assert get(server.url + "/healthz").status_code == 200


def test_artifacts_that_fail_to_load_exit_2_with_one_line(tiny_artifacts, tmp_path):
    copy = tmp_path / "art"
    shutil.copytree(tiny_artifacts, copy)
    tower = next(copy.glob("vision.fp32.onnx"))
    data = bytearray(tower.read_bytes())
    data[-1] ^= 0xFF  # same size: passes the quick check before listening, fails the full hash check on load
    tower.write_bytes(bytes(data))
    out = subprocess.run([sys.executable, "-m", "pickscore_runtime.cli", "serve", "--artifacts", str(copy), *FP32,
                          "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "error:" in out.stderr and "vision.fp32.onnx" in out.stderr


# ---- load, overload, drain ------------------------------------------------------------------------
def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{\})?") + r" ([0-9.e+-]+)"
    match = re.search("^" + pattern + "$", text, re.M)
    assert match, f"{name}{{{labels}}} not in /metrics"
    return float(match.group(1))


def test_concurrent_clients_share_batches(server, tiny_scorer):
    clients, per_client = 24, 4
    prompts = ["a lighthouse at dawn", "a bowl of ramen", "a red bicycle"]
    work = [(prompts[(c + k) % 3], [png(noise(100 * c + k))] * (1 + (c + k) % 2)) for c in range(clients) for k in range(per_client)]
    before = get(server.url + "/metrics").text

    def client(c: int) -> list[tuple[int, dict]]:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            out = []
            for prompt, images in work[c * per_client : (c + 1) * per_client]:
                r = http.post("/v1/score", json={"prompt": prompt, "images": [b64(x) for x in images]})
                out.append((r.status_code, r.json()))
            return out

    with ThreadPoolExecutor(clients) as pool:
        answers = [a for chunk in pool.map(client, range(clients)) for a in chunk]
    assert [status for status, _ in answers] == [200] * len(work)
    for (prompt, images), (_, doc) in zip(work, answers):
        assert_same_result(doc, tiny_scorer.score(prompt, images).to_json())

    after = get(server.url + "/metrics").text
    batches = metric(after, "pickscore_batch_size_count") - metric(before, "pickscore_batch_size_count")
    singles = metric(after, "pickscore_batch_size_bucket", 'le="1.0"') - metric(before, "pickscore_batch_size_bucket", 'le="1.0"')
    images = sum(len(images) for _, images in work)
    assert batches < images and singles < batches  # images of several requests shared backend calls
    assert metric(after, "pickscore_requests_total", 'endpoint="score",status="200"') >= len(work)
    assert metric(after, "pickscore_images_total", 'outcome="scored"') >= images
    assert metric(after, "pickscore_text_cache_hits_total") > metric(before, "pickscore_text_cache_hits_total")
    assert metric(after, "pickscore_queue_depth") == 0
    assert metric(after, "pickscore_request_seconds_count", 'endpoint="score"') >= len(work)


def fire(url: str, bodies: list[dict], start: threading.Barrier | None = None) -> list:
    """POST every body at once from its own thread: (status, json, headers) or the exception."""

    def one(body: dict):
        if start is not None:
            start.wait()
        try:
            r = httpx.post(url + "/v1/score", json=body, timeout=120)
            return r.status_code, r.json(), r.headers
        except httpx.HTTPError as e:
            return e

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def test_overload_gets_503_and_every_accepted_request_is_answered(tiny_artifacts, tmp_path):
    big = [b64(gradient(i % 2, 1500)) for i in range(6)]
    bodies = [{"prompt": f"overload {i % 3}", "images": big} for i in range(16)]
    with running(tiny_artifacts, tmp_path, *FP32, "--max-queue", "2", "--max-batch", "4", "--workers", "1") as s:
        answers = fire(s.url, bodies, threading.Barrier(len(bodies)))
        assert not [a for a in answers if isinstance(a, Exception)]
        statuses = [a[0] for a in answers]
        assert set(statuses) == {200, 503}, statuses
        for status, doc, headers in answers:
            if status == 503:
                assert int(headers["retry-after"]) >= 1 and "queue full" in doc["error"]["message"]
            else:
                assert len(doc["results"]) == 6 and all(r["score"] is not None for r in doc["results"])
        text = get(s.url + "/metrics").text
        assert metric(text, "pickscore_requests_total", 'endpoint="score",status="503"') == statuses.count(503)
        assert metric(text, "pickscore_requests_total", 'endpoint="score",status="200"') == statuses.count(200)


def test_request_timeout_gets_504(tiny_artifacts, tmp_path):
    with running(tiny_artifacts, tmp_path, *FP32, "--request-timeout-s", "0.05", "--workers", "1") as s:
        r = post(s.url + "/v1/score", json={"prompt": "slow", "images": [b64(gradient(0, 1500))] * 8})
        assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
        assert get(s.url + "/readyz").status_code == 200


def test_sigterm_under_load_answers_in_flight_requests_and_exits_0(tiny_artifacts, tmp_path):
    s = start_server(tiny_artifacts, tmp_path, *FP32, "--workers", "1", "--max-batch", "4")
    bodies = [{"prompt": f"drain {i}", "images": [b64(gradient(j % 2, 1500)) for j in range(5)]} for i in range(10)]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(fire, s.url, bodies)
        deadline = time.monotonic() + 30
        while metric(get(s.url + "/metrics").text, "pickscore_queue_depth") < 3:  # requests are in flight
            assert time.monotonic() < deadline, "requests never got in flight"
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        answers = pending.result(timeout=120)
    code = s.stop()
    assert code == 0, s.stderr()[-2000:]
    statuses = [a[0] if isinstance(a, tuple) else None for a in answers]
    assert statuses.count(200) >= 3  # at least those in flight when SIGTERM came
    for a in answers:  # answered in full, refused as draining, or never accepted: nothing dropped half-way
        if isinstance(a, tuple) and a[0] == 200:
            assert all(r["score"] is not None for r in a[1]["results"])
        elif isinstance(a, tuple):
            assert a[0] == 503 and "draining" in a[1]["error"]["message"] and a[2]["retry-after"]
        else:
            assert isinstance(a, httpx.ConnectError), repr(a)
    assert "every accepted request was answered" in s.stderr()


# ---- the lean runtime, and replicas on Ray Serve --------------------------------------------------
def test_the_client_imports_no_server_framework():
    code = ("import sys; import pickscore_runtime.server as s; s.ServerReward; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette', 'ray', "
            "'prometheus_client', 'torch')]; assert not bad, bad; print('LEAN')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "LEAN" in out.stdout, out.stderr


def test_ray_serve_replica_answers_like_the_server(tiny_artifacts, tmp_path, tiny_scorer, disk_images):
    pytest.importorskip("ray.serve")
    s = start_server(tiny_artifacts, tmp_path, *FP32, "--ray", "local", "--ray-cpus", "2", "--ray-object-store-mb", "300",
                     "--replica-cpus", "1", ready_within=300)
    try:
        r = httpx.post(s.url + "/v1/score", json={"prompt": "a cat", "images": [b64(x) for x in disk_images[:3]]}, timeout=60)
        assert r.status_code == 200, r.text
        assert_same_result(r.json(), tiny_scorer.score("a cat", disk_images[:3]).to_json())
        r = post(s.url + "/v1/rewards", content=pickle.dumps({"images": disk_images[:2], "prompts": ["a", "b"]}),
                       timeout=60)
        assert r.status_code == 200 and len(pickle.loads(r.content)["scores"]) == 2
    finally:
        code = s.stop(timeout=120)
    assert code == 0, s.stderr()[-3000:]
