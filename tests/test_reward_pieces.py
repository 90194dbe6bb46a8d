"""The parts of the RL drop-in that need no server: the trainers' float -> uint8 steps reproduced exactly, the
conventions' checks, the submit queue's lifecycle, numpy str prompts through the restricted unpickler (and
nothing else of numpy), cosmos-rl's enqueue parsing and the result store's expiry."""

from __future__ import annotations

import io
import json
import pickle
import threading
import time

import numpy as np
import pytest
import torch

from pickscore_runtime.reward_base import TRAINERS, RewardConventions, conventions_of
from pickscore_runtime.reward_queue import QueueClosed, SubmitQueue
from pickscore_runtime.server.cosmos import PendingResult, ResultStore, parse_enqueue, pull_fields
from pickscore_runtime.server.http_errors import BadRequest, NotFound, PayloadTooLarge
from pickscore_runtime.server.safe_pickle import RefusedPickle, safe_loads
from pickscore_runtime.tensor_images import host_uint8_batch


# ---- float -> uint8 as the trainers write it --------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_is_the_trainers_own_arithmetic(dtype):
    x = torch.rand(3, 3, 17, 11, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, 0, 0, :4] = torch.tensor([k / 255 for k in (3, 100, 200, 255)]).to(dtype)  # exact levels, where truncation bites
    rounded = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # flow_grpo, DDPO, cosmos-rl
    truncated = (x * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # miles_diffusion
    assert np.array_equal(host_uint8_batch(x), rounded)
    assert np.array_equal(host_uint8_batch(x, quantize="truncate"), truncated)
    assert not np.array_equal(rounded, truncated)
    if dtype != torch.bfloat16:  # numpy has no bf16
        as_numpy = x.numpy()
        assert np.array_equal(host_uint8_batch(as_numpy), rounded)
        assert np.array_equal(host_uint8_batch(as_numpy, quantize="truncate"), truncated)


def test_conventions_are_checked_and_named():
    assert conventions_of("flow_grpo").divide_by == 26 and conventions_of(None) == TRAINERS["pickscore"]
    assert conventions_of("flow_grpo", quantize="truncate") == RewardConventions(divide_by=26, quantize="truncate")
    with pytest.raises(ValueError, match="unknown trainer conventions 'flow-grpo'.*flow_grpo"):
        conventions_of("flow-grpo")
    for bad in (dict(divide_by=0), dict(divide_by=float("inf")), dict(divide_by=True), dict(quantize="floor"),
                dict(mode="fast", quantize="truncate"), dict(layout="CHW")):
        with pytest.raises(ValueError):
            RewardConventions(**bad)


# ---- the submit queue -----------------------------------------------------------------------------
def test_submit_queue_lifecycle():
    started, release = threading.Event(), threading.Event()

    def compute(images, prompts, metadata):
        started.set()
        release.wait(10)
        return np.asarray(images, np.float32), {"prompts": prompts}

    queue = SubmitQueue(compute, max_pending=3)
    first = queue.submit(np.ones(2), "a")
    started.wait(10)
    second, third = queue.submit(np.zeros(2), ["x", "y"]), queue.submit(np.zeros(1), "b")
    assert third.cancel() and queue.pending() == 3  # a queued batch can be cancelled; it still holds its place until skipped
    release.set()
    assert first.result(10)[1]["prompts"] == "a" and second.result(10)[1]["prompts"] == ["x", "y"]
    queue.close()
    assert queue.pending() == 0
    with pytest.raises(QueueClosed):
        queue.submit(np.ones(1), "c")
    with pytest.raises(ValueError):
        SubmitQueue(compute, max_pending=0)


# ---- numpy str prompts, and nothing else of numpy --------------------------------------------------
def test_numpy_str_prompts_unpickle_as_lists_of_str():
    prompts = ("a cat", "ünïcödé 🐱", "", "a very long prompt " * 20)
    halves = np.array_split(np.array(prompts), 2)  # what flow_grpo's and DDPO's clients send
    assert safe_loads(pickle.dumps({"prompts": halves[0]}, protocol=4)) == {"prompts": list(prompts[:2])}
    assert safe_loads(pickle.dumps(np.array([["a", "b"], ["c", "d"]]))) == ["a", "b", "c", "d"]
    assert safe_loads(pickle.dumps(np.array(["big", "endian"], dtype=">U6"))) == ["big", "endian"]
    assert safe_loads(pickle.dumps(list(halves[1]))) == list(prompts[2:])  # numpy str scalars


@pytest.mark.parametrize("value", [np.arange(3), np.array([b"x"]), np.array(["a", 1], dtype=object),
                                   np.zeros((2, 2), np.float32), np.float64(1.5), np.int64(3)])
def test_every_other_numpy_object_is_refused(value):
    with pytest.raises(RefusedPickle):
        safe_loads(pickle.dumps(value, protocol=4))


def test_small_pickles_cannot_make_big_work():
    """Found by probing: a 271-byte pickle whose refused dtype was turned into text (a nested list's repr
    doubles per level), and a pickle that decodes the same bytes once per 3 opcodes."""
    proto = b"\x80\x04"
    dag = b"](K\x01eq\x000" + b"".join(b"](h" + bytes([k]) + b"h" + bytes([k]) + b"eq" + bytes([k + 1]) + b"0" for k in range(24))
    dtype = b"cnumpy\ndtype\n"
    with pytest.raises(RefusedPickle):
        safe_loads(proto + dag + b"h\x18" + b"0" + dtype + b"h\x18\x85R.")
    raw = ("\U0001F600" * 1000).encode("utf-32-le")
    scalar = (b"cnumpy._core.multiarray\nscalar\nq\x00(" + dtype + b"X\x05\x00\x00\x00U1000\x85RB"
              + len(raw).to_bytes(4, "little") + raw + b"tq\x0100")
    started = time.perf_counter()
    with pytest.raises(RefusedPickle, match="over and over"):
        safe_loads(proto + scalar + b"](" + b"h\x00h\x01R" * 20000 + b"e.")
    assert time.perf_counter() - started < 2


def test_forged_numpy_str_pickles_are_refused():
    honest = pickle.dumps(np.array(["abcd"]), protocol=4)
    data = "abcd".encode("utf-32-le")
    assert b"C\x10" + data in honest
    short = honest.replace(b"C\x10" + data, b"C\x0c" + data[:12])  # data shorter than its shape says
    for forged in (honest.replace(b"U4", b"U9999999"),  # a dtype whose items the data cannot hold
                   honest.replace(b"\x8c\x07ndarray", b"\x8c\x07ndarrax"),  # _reconstruct of another class
                   short):
        with pytest.raises(BadRequest):
            safe_loads(forged)


# ---- cosmos-rl ---------------------------------------------------------------------------------------
def enqueue_body(prompts, array, **header) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    doc = {"prompts": prompts, "reward_fn": {"pickscore": 1.0}, "media_type": "image", **header}
    return json.dumps(doc).encode() + b"\n" + buffer.getvalue()


def test_cosmos_enqueue_parses_either_layout_and_groups_prompts():
    bhwc = np.random.default_rng(0).integers(0, 256, (3, 20, 30, 3), dtype=np.uint8)
    for array in (bhwc, bhwc.transpose(0, 3, 1, 2)):
        parsed = parse_enqueue(enqueue_body(["a", "b", "a"], array), max_images=8)
        assert all(np.array_equal(got, want) for got, want in zip(parsed.images, bhwc))
        assert parsed.prompts == ["a", "b"] and parsed.groups == [(0, [0, 2]), (1, [1])]
        assert parsed.extra["input_info"]["shape"] == [3, 20, 30, 3]
    with pytest.raises(PayloadTooLarge):
        parse_enqueue(enqueue_body(["a"] * 3, bhwc), max_images=2)
    with pytest.raises(BadRequest, match="pickscore"):
        parse_enqueue(enqueue_body(["a"] * 3, bhwc, reward_fn={"pickscore": 0, "hpsv2": 1.0}), max_images=8)
    header = b'{"prompts": ["a"], "media_type": "image"}\n'
    buffer = io.BytesIO()
    np.savez(buffer, x=bhwc)
    hostile = [buffer.getvalue(),  # an .npz archive (a zip): refused by its magic, never unzipped
               np.lib.format.magic(1, 0) + (118).to_bytes(2, "little")  # a header asking for ~3e19 bytes, and none
               + b"{'descr': '|u1', 'fortran_order': False, 'shape': (1000000000, 99999, 99999, 3), }".ljust(117) + b"\n",
               np.lib.format.magic(3, 0) + b"\x00\x00"]
    for npy in (np.zeros((1, 0, 8, 3), np.uint8), np.zeros((1, 8, 8, 3), ">u2")):
        buffer = io.BytesIO()
        np.save(buffer, npy, allow_pickle=False)
        hostile.append(buffer.getvalue())
    for body in hostile:  # a 400 naming the problem, before anything the header asks for is allocated
        with pytest.raises(BadRequest):
            parse_enqueue(header + body, max_images=8)


def test_cosmos_pull_fields_and_result_store():
    assert pull_fields(b"uuid=abc&type=pickscore", "application/x-www-form-urlencoded") == ("abc", "pickscore")
    assert pull_fields(b'{"uuid": "abc"}', "application/json") == ("abc", None)
    for body, kind in ((b"type=pickscore", "application/x-www-form-urlencoded"), (b"uuid=abc&type=hpsv2", ""),
                       (b"\xff\xfe", ""), (b'{"uuid": 3}', "application/json")):
        with pytest.raises(BadRequest):
            pull_fields(body, kind)
    store = ResultStore(ttl_s=0.2, max_results=2)
    store.add_pending("a")
    with pytest.raises(PendingResult) as pending:
        store.get("a")
    assert pending.value.status == 400 and pending.value.body()["message"] == "Not found scores for a"
    store.finish("a", 200, b"{}")
    assert store.get("a") == (200, b"{}") and store.get("a") == (200, b"{}")  # kept: a trainer may pull again
    for uuid in ("b", "c"):
        store.add_pending(uuid)
        store.finish(uuid, 200, uuid.encode())
    with pytest.raises(NotFound):  # over max_results: the oldest ready one went first
        store.get("a")
    time.sleep(0.3)
    with pytest.raises(NotFound, match="result-ttl-s"):
        store.get("c")
