"""`pickscore serve` under attack or accident (issue 23): hostile and careless clients against a real
server process on 127.0.0.1 (the tiny CLIP, fp32 on onnx-cpu), with real sockets, real images and the
real ONNX Runtime backend. Each test is bounded: a fixed number of requests, deadlines of seconds."""

from __future__ import annotations

import io
import json
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from pickscore_runtime.errors import PromptError
from pickscore_runtime.server.batcher import MicroBatcher
from pickscore_runtime.text_encoder import TextEncoder
from test_server import (FP32, assert_same_result, b64, data_url, free_port, get, gradient, metric, noise, png, post,
                         running, start_server)

pytestmark = pytest.mark.integration

# An EPS whose PostScript loops forever: Ghostscript, were it ever run on it, would spin at 100% CPU.
LOOPING_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{ 1 pop } loop\n%%EOF\n"


@pytest.fixture(scope="module")
def server(tiny_artifacts, tmp_path_factory) -> Iterator[Any]:
    with running(tiny_artifacts, tmp_path_factory.mktemp("attack"), *FP32, "--max-batch", "8", "--max-wait-ms", "20",
                 "--workers", "2", "--threads", "1") as s:
        yield s


def error_of(r: httpx.Response) -> dict:
    """The documented error shape, asserted: {"error": {"message", "type", "code"}} with code == status."""
    assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.text[:200])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["code"] == r.status_code, error
    return error


# ---- S1: one poisoned item never fails another ---------------------------------------------------
class FailsOnMarkedItems:
    """The real backend, except that a call holding a marked item raises, as a kernel or driver fault on one
    input would: a prompt holding the `poison` token, or an all-green image."""

    def __init__(self, backend: Any, poison: int):
        self.backend, self.poison = backend, poison

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def embed_text(self, input_ids: np.ndarray) -> np.ndarray:
        if (input_ids == self.poison).any():
            raise RuntimeError("text kernel fault")
        return self.backend.embed_text(input_ids)

    def check(self, pixels: np.ndarray) -> None:
        if (pixels[:, 1].min(axis=(1, 2)) > 2.0).any():  # green ~255 everywhere, after normalisation
            raise RuntimeError("vision kernel fault")

    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        self.check(pixels)
        return self.backend.embed_images(pixels)

    def submit_images(self, pixels: np.ndarray) -> Any:
        self.check(pixels)
        return self.backend.submit_images(pixels)


def test_batcher_fails_only_the_item_that_fails(tiny_scorer):
    s = tiny_scorer
    poison = int(s.tokenizer(["zebra"]).input_ids[0, 1])
    green = png(np.broadcast_to(np.array([0, 255, 0], np.uint8), (64, 64, 3)).copy())
    images = [png(noise(i)) for i in range(6)]
    with ThreadPoolExecutor(2) as pool:
        backend = FailsOnMarkedItems(s.backend, poison)
        text = TextEncoder(s.text.tokenizer, backend, s.text.cache, s.text.embed_dim)
        batcher = MicroBatcher(text, s.images, backend, pool, max_batch=4, max_wait_s=0.05, workers=2).start()
        try:
            # a prompt the tokenizer refuses is refused on the submitting thread, before anything is queued
            with pytest.raises(PromptError, match="prompt #1"):
                batcher.submit(["a cat", "evil \ud800"], images[:1])
            innocent = [batcher.submit([f"a cat {i}"], images[i : i + 2]) for i in range(0, 6, 2)]
            bad_text = batcher.submit(["a zebra"], images[:1])
            bad_image = batcher.submit(["a dog"], [images[5], green, images[4]])
            for job in innocent + [bad_text, bad_image]:
                job.future.exception(timeout=60)
        finally:
            batcher.close()
    for i, job in zip(range(0, 6, 2), innocent):
        assert job.future.exception() is None and not job.errors
        np.testing.assert_allclose(job.text.embeddings, s.embed_text([f"a cat {i}"]), atol=1e-6)
        np.testing.assert_allclose(job.image_embs, s.embed_images(images[i : i + 2]), atol=1e-5)
    assert "text kernel fault" in str(bad_text.future.exception())
    assert bad_image.future.exception() is None and list(bad_image.errors) == [1]
    assert "#1" in str(bad_image.errors[1]) and "vision kernel fault" in str(bad_image.errors[1])
    np.testing.assert_allclose(bad_image.image_embs[[0, 2]], s.embed_images([images[5], images[4]]), atol=1e-5)


def test_innocent_requests_are_unharmed_by_hostile_ones(server, tiny_scorer):
    innocent = [("a lighthouse", [png(noise(10 + i)) for i in range(1 + i % 2)]) for i in range(6)]
    surrogate = b'{"prompt": "evil \\ud800", "images": ["' + b64(png(noise(1))).encode() + b'"]}'
    hostile = [("/v1/score", surrogate, "prompt is not valid Unicode"),
               ("/v1/embeddings", b'{"input": ["a cat", "evil \\ud800"]}', "input[1]"),
               ("/v1/rerank", b'{"query": "evil \\ud800", "documents": ["' + data_url(png(noise(2))).encode() + b'"]}',
                "query"),
               ("/v1/score", json.dumps({"prompt": "an eps", "images": [b64(LOOPING_EPS), b64(b"\x89PNG\r\n\x1a\ncut")]}).encode(),
                None)]
    barrier = threading.Barrier(len(innocent) + len(hostile))

    def send_innocent(case):
        barrier.wait()
        prompt, images = case
        return post(server.url + "/v1/score", json={"prompt": prompt, "images": [b64(x) for x in images]})

    def send_hostile(case):
        barrier.wait()
        return post(server.url + case[0], content=case[1], headers={"Content-Type": "application/json"})

    with ThreadPoolExecutor(len(innocent) + len(hostile)) as pool:
        good = [pool.submit(send_innocent, c) for c in innocent]
        bad = [pool.submit(send_hostile, c) for c in hostile]
        good, bad = [f.result() for f in good], [f.result() for f in bad]
    for (prompt, images), r in zip(innocent, good):
        assert r.status_code == 200, r.text
        assert_same_result(r.json(), tiny_scorer.score(prompt, images).to_json())
    for (path, _, named), r in zip(hostile, bad):
        if named is None:  # bad images are their own rows' errors
            assert r.status_code == 200 and [x["score"] for x in r.json()["results"]] == [None, None]
            assert all("cannot decode" in x["error"] for x in r.json()["results"])
        else:
            assert r.status_code == 400 and named in error_of(r)["message"], (path, r.text)


# ---- S2: EPS / PostScript never reaches Ghostscript ------------------------------------------------
def test_eps_is_a_quick_per_item_error_and_runs_no_program(server):
    before = {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)}
    started = time.monotonic()
    r = post(server.url + "/v1/score", json={"prompt": "a cat", "images": [b64(LOOPING_EPS), b64(png(noise(3)))]})
    assert time.monotonic() - started < 10
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert rows[0]["score"] is None and "cannot decode" in rows[0]["error"] and rows[1]["score"] is not None
    r = post(server.url + "/v1/rewards", content=pickle.dumps({"images": [b"%!PS-Adobe-3.0\n{ } loop\n"], "prompts": ["a"]}))
    assert r.status_code == 200 and "cannot decode" in pickle.loads(r.content)["errors"][0]
    spawned = [p for p in psutil.Process(server.proc.pid).children(recursive=True) if p.pid not in before]
    assert not spawned, [p.name() for p in spawned]
    assert post(server.url + "/v1/score", json={"prompt": "next", "images": [b64(png(noise(4)))]}).status_code == 200


# ---- S3: slow bodies hold no place in the queue ----------------------------------------------------
def send_raw(port: int, path: str, body: bytes, *, drip: float | None = None, piece: int = 1,
             stop_after: int | None = None, give_up_s: float = 20) -> tuple[int, dict, bytes]:
    """POST over a bare socket: the body at once, or `piece` bytes every `drip` seconds (stopping after
    `stop_after` bytes), then the answer: (status, headers, body); status 0 if the connection closed silently."""
    with socket.create_connection(("127.0.0.1", port), timeout=give_up_s) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode())
        deadline = time.monotonic() + give_up_s
        if drip is None:
            sock.sendall(body)
        else:
            sock.settimeout(drip)
            for k in range(0, min(len(body), stop_after if stop_after is not None else len(body)), piece):
                try:
                    sock.sendall(body[k : k + piece])
                    if sock.recv(1, socket.MSG_PEEK):
                        break  # the server answered before the body was done
                except (socket.timeout, BlockingIOError):
                    pass
                except OSError:
                    break
                if time.monotonic() > deadline:
                    break
            sock.settimeout(max(0.1, deadline - time.monotonic()))
        data = b""
        with_body = None
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                head, sep, rest = data.partition(b"\r\n\r\n")
                if sep:
                    headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:])
                    headers = {k.lower(): v for k, v in headers.items()}
                    with_body = int(headers.get("content-length", -1))
                    if len(rest) >= with_body >= 0:
                        break
        except (socket.timeout, ConnectionResetError):
            pass
    if not data:
        return 0, {}, b""
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, rest


def test_slow_bodies_hold_no_queue_place_and_get_408(tiny_artifacts, tmp_path):
    body = json.dumps({"prompt": "a slow cat", "images": [b64(png(noise(5)))]}).encode()
    with running(tiny_artifacts, tmp_path, *FP32, "--max-queue", "2", "--body-timeout-s", "3", "--workers", "1") as s:
        with ThreadPoolExecutor(4) as pool:
            drippers = [pool.submit(send_raw, s.port, "/v1/score", body, drip=0.5) for _ in range(4)]
            time.sleep(1)  # all four are dripping now
            started = time.monotonic()
            legit = [post(s.url + "/v1/score", json={"prompt": "a cat", "images": [b64(png(noise(i)))]}) for i in range(4)]
            assert [r.status_code for r in legit] == [200] * 4, [r.text for r in legit]
            assert time.monotonic() - started < 10
            answers = [d.result(timeout=30) for d in drippers]
    for status, headers, content in answers:
        assert status == 408, (status, content[:200])
        error = json.loads(content)["error"]
        assert error["code"] == 408 and error["type"] == "request_timeout" and "--body-timeout-s" in error["message"]


# ---- S4: a huge request is capped, and cannot starve a small one ------------------------------------
def test_images_per_request_are_capped_before_any_is_decoded(server):
    one = png(noise(6))
    payload = pickle.dumps({"images": [one] * 20_000, "prompts": ["a cat"] * 20_000})  # one memo reference, repeated
    assert len(payload) < 200_000
    started = time.monotonic()
    r = post(server.url + "/v1/rewards", content=payload)
    assert time.monotonic() - started < 10
    assert r.status_code == 413 and "20000 images" in error_of(r)["message"] and "--max-images" in error_of(r)["message"]
    r = post(server.url + "/v1/score", json={"items": [{"prompt": "a", "images": [b64(one)] * 600}] * 2})
    assert r.status_code == 413 and "1200 images" in error_of(r)["message"]
    assert metric(get(server.url + "/metrics").text, "pickscore_pending_images") == 0  # nothing was queued


def test_a_big_request_does_not_starve_a_small_one(tiny_artifacts, tmp_path):
    big = pickle.dumps({"images": [gradient(0, 1200)] * 150, "prompts": ["a big request"] * 150})
    small = {"prompt": "a small request", "images": [b64(png(noise(7)))]}
    with running(tiny_artifacts, tmp_path, *FP32, "--workers", "1", "--max-batch", "4", "--max-wait-ms", "5") as s:
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            pending = pool.submit(post, s.url + "/v1/rewards", content=big)
            deadline = time.monotonic() + 30
            while metric(get(s.url + "/metrics").text, "pickscore_pending_images") < 20:
                assert time.monotonic() < deadline and not pending.done(), "the big request never got going"
                time.sleep(0.02)
            t0 = time.monotonic()
            r = post(s.url + "/v1/score", json=small)
            small_s = time.monotonic() - t0
            big_r = pending.result(timeout=300)
            big_s = time.monotonic() - started
    assert r.status_code == 200 and big_r.status_code == 200
    assert all(e is None for e in pickle.loads(big_r.content)["errors"])
    assert small_s < 0.3 * big_s, (small_s, big_s)


def test_a_pickle_naming_a_huge_memo_index_is_refused_before_any_allocation(server):
    """CPython's unpickler sizes its memo table by the index a PUT names: 9 bytes would cost 1 GB (2**26) or,
    at 2**30, 16 GB. Found by the re-run of the probe."""
    import struct

    rss = psutil.Process(server.proc.pid).memory_info().rss
    for body in (b"\x80\x04Nr" + struct.pack("<I", 2**26) + b".", b"\x80\x04Np67108864\n."):
        r = post(server.url + "/v1/rewards", content=body)
        assert r.status_code == 400 and "memo entry 67,108,864" in error_of(r)["message"], r.text
    assert psutil.Process(server.proc.pid).memory_info().rss - rss < 100 * 2**20
    ordinary = pickle.dumps({"images": [png(noise(10))] * 3, "prompts": ["a cat"] * 3})  # memo references of its own
    r = post(server.url + "/v1/rewards", content=ordinary)
    assert r.status_code == 200 and all(e is None for e in pickle.loads(r.content)["errors"])


# ---- S5 / S6: refused fast, before the expensive work ------------------------------------------------
def test_an_8m_character_prompt_is_refused_before_tokenising(server):
    long = "a" * 8_000_000
    img = b64(png(noise(8)))
    cases = [("/v1/score", {"prompt": long, "images": [img]}, "prompt is 8,000,000 characters"),
             ("/v1/embeddings", {"input": ["a cat", long]}, "input[1]"),
             ("/v1/rerank", {"query": long, "documents": ["data:image/png;base64," + img]}, "query")]
    for path, doc, named in cases:
        started = time.monotonic()
        r = post(server.url + path, json=doc)
        assert time.monotonic() - started < 5, path
        assert r.status_code == 400 and named in error_of(r)["message"] and "16,384" in error_of(r)["message"], r.text
    r = post(server.url + "/v1/rewards", content=pickle.dumps({"images": [png(noise(8))], "prompts": [long]}))
    assert r.status_code == 400 and "prompts[0]" in error_of(r)["message"]


def test_a_thin_tall_png_is_refused_from_its_header_with_bounded_memory(server):
    buffer = io.BytesIO()
    Image.new("L", (60_000_000, 1)).save(buffer, "PNG")  # under the pixel limit; 60 MB were it decoded
    thin = buffer.getvalue()
    assert len(thin) < 200_000
    rss = psutil.Process(server.proc.pid).memory_info().rss
    started = time.monotonic()
    r = post(server.url + "/v1/score", json={"prompt": "a line", "images": [b64(thin)] * 4 + [b64(png(noise(9)))]})
    assert time.monotonic() - started < 5
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert all(x["score"] is None and "aspect ratio" in x["error"] for x in rows[:4]) and rows[4]["score"] is not None
    assert psutil.Process(server.proc.pid).memory_info().rss - rss < 150 * 2**20


# ---- S7: a drain answers an admitted slow client in the documented shape ----------------------------
def test_sigterm_with_slow_clients_answers_them_and_says_so_truthfully(tiny_artifacts, tmp_path):
    body = json.dumps({"prompt": "a slow cat", "images": [b64(png(noise(11)))]}).encode()
    s = start_server(tiny_artifacts, tmp_path, *FP32, "--request-timeout-s", "1", "--body-timeout-s", "3")
    try:
        with ThreadPoolExecutor(2) as pool:
            finishing = pool.submit(send_raw, s.port, "/v1/score", body, drip=0.15, piece=len(body) // 10 + 1)  # in ~1.5 s
            stalling = pool.submit(send_raw, s.port, "/v1/score", body, drip=0.2, stop_after=50)  # then stops sending
            time.sleep(0.5)
            s.proc.send_signal(signal.SIGTERM)
            done, stalled = finishing.result(timeout=30), stalling.result(timeout=30)
    finally:
        code = s.stop(timeout=60)
    assert code == 0, s.stderr()[-2000:]
    assert done[0] == 200 and json.loads(done[2])["results"][0]["score"] is not None, done
    assert stalled[0] == 408 and json.loads(stalled[2])["error"]["type"] == "request_timeout", stalled
    assert "Internal Server Error" not in s.stderr() and "every accepted request was answered" in s.stderr()


# ---- S8 / S9 / S10 / S11: messages, keys, error shapes, addresses ------------------------------------
@pytest.mark.parametrize("top_n, said", [("true", "a boolean (true)"), ("2.5", "a number (2.5)"), ("NaN", "a number (NaN)")])
def test_top_n_of_the_wrong_type_says_what_came(server, top_n, said):
    body = '{"query": "a cat", "top_n": %s, "documents": ["%s"]}' % (top_n, data_url(png(noise(12))))
    r = post(server.url + "/v1/rerank", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and error_of(r)["message"] == f"top_n must be an integer, got {said}"


def test_a_non_ascii_api_key_is_refused_at_start(tiny_artifacts, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("ascii-key-1234\nclé-secrète\n")
    keys.chmod(0o600)
    out = subprocess.run([sys.executable, "-m", "pickscore_runtime.cli", "serve", "--artifacts", str(tiny_artifacts),
                          *FP32, "--port", str(free_port()), "--api-key-file", str(keys)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "line 2" in out.stderr and "printable ASCII" in out.stderr


def test_a_non_ascii_authorization_header_is_a_plain_401(tiny_artifacts, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("ascii-key-1234\n")
    keys.chmod(0o600)
    body = {"prompt": "a cat", "images": [b64(png(noise(13)))]}
    with running(tiny_artifacts, tmp_path, *FP32, "--api-key-file", str(keys)) as s:
        for header in ("Bearer clé".encode(), "Bearer clé".encode("latin-1"), b"Bearer ascii-key-1234\xc3\xa9"):
            r = post(s.url + "/v1/score", json=body, headers={"Authorization": header})
            assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
        assert post(s.url + "/v1/score", json=body, headers={"Authorization": "Bearer ascii-key-1234"}).status_code == 200


def test_unknown_routes_and_wrong_methods_answer_in_the_documented_shape(server):
    r = get(server.url + "/v2/nothing")
    assert r.status_code == 404 and error_of(r)["type"] == "not_found" and "/v2/nothing" in error_of(r)["message"]
    r = post(server.url + "/v1/nothing", json={})
    assert r.status_code == 404 and error_of(r)["type"] == "not_found"
    r = get(server.url + "/v1/score")
    assert r.status_code == 405 and error_of(r)["type"] == "method_not_allowed" and r.headers["allow"] == "POST"
    assert "POST" in error_of(r)["message"]
    r = httpx.put(server.url + "/healthz", timeout=60)
    assert r.status_code == 405 and error_of(r)["type"] == "method_not_allowed"


def test_an_ipv6_address_is_printed_in_brackets(tiny_artifacts, tmp_path):
    from pickscore_runtime.server.config import base_url

    assert base_url("::", 8000) == "http://[::]:8000" and base_url("127.0.0.1", 80) == "http://127.0.0.1:80"
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = free_port()
    log = tmp_path / "v6.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pickscore_runtime.cli", "serve", "--artifacts", str(tiny_artifacts),
                                 *FP32, "--hash-check", "size", "--host", "::1", "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while "ready:" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"serving http://[::1]:{port}" in log.read_text(), log.read_text()
        assert httpx.get(f"http://[::1]:{port}/healthz", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

