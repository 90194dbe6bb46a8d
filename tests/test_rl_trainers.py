"""The RL trainers' own reward paths, against a real `pickscore serve` on 127.0.0.1 (tiny CLIP, fp32 on
onnx-cpu) and in process. Each stand-in client is the trainer's code as read from its source (quoted in
docs/rl-rewards.md), speaking through the same library it uses (requests, aiohttp), so the bytes on the
wire are the trainer's: flow_grpo's remote-reward client (pickled dict of JPEGs, np.array_split batches of
64, POST /), DDPO-pytorch's llava client (JPEG q=80, batches of 4, numpy prompt arrays), verl-omni's
pickscore_http_client (aiohttp, one image per request, round robin), cosmos-rl's RemoteRewardCalculator
(JSON + NPY enqueue, form-field pull retried on 400). Each must equal the in-process `score_tensors` of
the same pixels under that trainer's conventions."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from pickscore_runtime.reward_queue import QueueFull
from pickscore_runtime.rewards import PickScoreReward
from pickscore_runtime.server import PickScoreClient, ServerReward
from pickscore_runtime.trainers import compute_score_pickscore, ddpo_pickscore, flow_grpo_pickscore, shared_reward
from test_server import FP32, running

pytestmark = pytest.mark.integration

ATOL = 2e-5  # fp32 scores move by ~1e-6 with a batch's composition (test_server.py)
API_KEY = "rl-test-key-0123456789"
requests = pytest.importorskip("requests")


@pytest.fixture(scope="module")
def trainer_server(tiny_artifacts, tmp_path_factory):
    """The trainers' convention: score / 26 (--reward-divide-by's default)."""
    with running(tiny_artifacts, tmp_path_factory.mktemp("rl"), *FP32, "--max-batch", "8", "--workers", "2",
                 "--threads", "1", "--result-ttl-s", "30") as s:
        yield s


@pytest.fixture(scope="module")
def raw_server(tiny_artifacts, tmp_path_factory):
    """DDPO keeps PickScore unscaled (--reward-divide-by 1); this one also has a key and a small --max-images."""
    tmp = tmp_path_factory.mktemp("rl_raw")
    (tmp / "keys").write_text(API_KEY + "\n")
    (tmp / "keys").chmod(0o600)
    with running(tiny_artifacts, tmp, *FP32, "--max-batch", "8", "--threads", "1", "--reward-divide-by", "1",
                 "--max-images", "8", "--api-key-file", str(tmp / "keys")) as s:
        yield s


def generations(n: int, seed: int, size: tuple[int, int] = (64, 48), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What a diffusion pipeline hands its reward: float NCHW in [0, 1], smooth enough to look like images."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size[1] // 8, size[0] // 8, generator=g)
    images = torch.nn.functional.interpolate(low, size=(size[1], size[0]), mode="bilinear", align_corners=False)
    return (images + 0.05 * torch.rand(images.shape, generator=g)).clamp(0, 1).to(dtype)


def decoded(jpegs: list[bytes]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])


# ---- flow_grpo and DDPO: the same client, inherited ----------------------------------------------------
def reward_server_client(url: str, batch_size: int, save_kwargs: dict, headers: dict | None = None):
    """The remote-reward client flow_grpo inherited from DDPO-pytorch, as written in flow_grpo/rewards.py
    (deqa_score_remote; the prompts as its unifiedreward_score_remote sends them) and ddpo_pytorch/rewards.py
    (llava_strict_satisfaction, prompts for queries): they differ only in batch_size and the JPEG's save
    arguments (flow_grpo: Pillow's defaults; DDPO: quality=80). `headers`: none in either; the one line a
    user adds for a server with --api-key-file."""
    from requests.adapters import HTTPAdapter, Retry

    sess = requests.Session()
    retries = Retry(total=1000, backoff_factor=1, status_forcelist=[500], allowed_methods=False)
    sess.mount("http://", HTTPAdapter(max_retries=retries))
    sent: list[bytes] = []

    def _fn(images, prompts, metadata):
        del metadata
        if isinstance(images, torch.Tensor):
            images = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
            images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
        images_batched = np.array_split(images, np.ceil(len(images) / batch_size))
        prompts_batched = np.array_split(prompts, np.ceil(len(prompts) / batch_size))
        all_scores = []
        for image_batch, prompt_batch in zip(images_batched, prompts_batched):
            jpeg_images = []
            for image in image_batch:
                img = Image.fromarray(image)
                buffer = io.BytesIO()
                img.save(buffer, format="JPEG", **save_kwargs)
                jpeg_images.append(buffer.getvalue())
            sent.extend(jpeg_images)
            data = {"images": jpeg_images, "prompts": prompt_batch}
            data_bytes = pickle.dumps(data)
            response = sess.post(url, data=data_bytes, timeout=120, **({"headers": headers} if headers else {}))
            response_data = pickle.loads(response.content)
            all_scores += response_data["outputs"]
        return np.array(all_scores), {}

    return _fn, sent


def test_flow_grpo_remote_and_in_process(trainer_server, tiny_scorer, tiny_artifacts):
    images = generations(70, seed=1)  # np.array_split: two requests of 35
    prompts = [f"a photo of object {i % 6}" for i in range(70)]
    remote, sent = reward_server_client(trainer_server.url, batch_size=64, save_kwargs={})
    scores, info = remote(images, prompts, [{}] * 70)
    assert len(sent) == 70 and info == {}
    expected = tiny_scorer.score_tensors(prompts, decoded(sent)) / 26  # the JPEG pixels the server was sent
    np.testing.assert_allclose(scores, expected, atol=ATOL / 26)

    reward_fn = flow_grpo_pickscore("cpu", artifacts=str(tiny_artifacts), backend="onnx-cpu", precision="fp32")
    rewards, info = reward_fn(images, prompts, [{}] * 70)  # as flow_grpo's multi_score calls it
    u8 = (images * 255).round().clamp(0, 255).to(torch.uint8)  # flow_grpo's own conversion
    np.testing.assert_allclose(rewards, tiny_scorer.score_tensors(prompts, u8) / 26, atol=1e-6)
    np.testing.assert_allclose(info["raw_scores"], rewards * 26, rtol=1e-6)
    assert info["errors"] == [None] * 70 and rewards.dtype == np.float32


# ---- DDPO-pytorch ----------------------------------------------------------------------------------
def test_ddpo_remote_and_in_process(raw_server, tiny_scorer, tiny_artifacts):
    images = generations(10, seed=2, dtype=torch.float16)  # DDPO's VAE under fp16 mixed precision
    prompts = tuple(f"a {animal} riding a bike" for animal in ("cat", "dog", "horse", "cat", "cat") * 2)  # zip(*...) gives a tuple
    remote, sent = reward_server_client(raw_server.url, batch_size=4, save_kwargs={"quality": 80},
                                        headers={"Authorization": f"Bearer {API_KEY}"})
    scores, _ = remote(images, prompts, ({},) * 10)
    np.testing.assert_allclose(scores, tiny_scorer.score_tensors(list(prompts), decoded(sent)), atol=ATOL)

    # the same auth and limits as /v1/*: no key is 401, more than --max-images is 413 before decoding
    body = pickle.dumps({"images": sent[:2], "prompts": list(prompts[:2])})
    assert requests.post(raw_server.url, data=body, timeout=30).status_code == 401
    body = pickle.dumps({"images": sent[:1] * 9, "prompts": ["a"] * 9})
    too_many = requests.post(raw_server.url + "/score", data=body, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"})
    assert too_many.status_code == 413 and "--max-images" in too_many.json()["error"]["message"]
    cosmos = CosmosRemoteReward(raw_server.url)
    with pytest.raises(RuntimeError, match="401"):
        cosmos.compute_rewards(images[:1].float(), ["a"])
    cosmos.token = API_KEY
    raw = tiny_scorer.score_tensors(["a", "b"], (images[:2].float() * 255).round().to(torch.uint8))
    np.testing.assert_allclose(cosmos.compute_rewards(images[:2].float(), ["a", "b"]).numpy(), np.clip(raw, -5, 5), atol=ATOL)

    reward_fn = ddpo_pickscore(artifacts=str(tiny_artifacts), backend="onnx-cpu", precision="fp32")
    rewards, _ = reward_fn(images, prompts, ({},) * 10)
    u8 = (images * 255).round().clamp(0, 255).to(torch.uint8)  # in fp16, as DDPO computes it
    np.testing.assert_allclose(rewards, tiny_scorer.score_tensors(list(prompts), u8), atol=1e-5)


# ---- verl-omni ---------------------------------------------------------------------------------------
_counter = itertools.count()


async def verl_omni_compute_score(solution_image, ground_truth: str, server_urls, **kwargs) -> dict:
    """verl_omni/utils/reward_score/pickscore_http_client.py (last version, 6302838d), verbatim in substance."""
    aiohttp = pytest.importorskip("aiohttp")
    urls = [u.strip() for u in server_urls.split(",")] if isinstance(server_urls, str) else list(server_urls)
    server_url = urls[next(_counter) % len(urls)]
    loop = asyncio.get_event_loop()

    def _serialize_image(image) -> bytes:
        image = image[0] if image.ndim == 4 else image
        image = image.float().permute(1, 2, 0).cpu().numpy()
        image = (image * 255).round().clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG")
        return buf.getvalue()

    image_bytes = await loop.run_in_executor(None, _serialize_image, solution_image)
    payload = pickle.dumps({"images": [image_bytes], "prompts": [ground_truth], "metadata": {}})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.post(server_url, data=payload) as resp:
            if resp.status != 200:
                return {"score": 0.0, "status": resp.status}
            response_data = pickle.loads(await resp.read())
    if "error" in response_data:
        return {"score": 0.0}
    scores = response_data.get("scores", [])
    return {"score": float(scores[0]) if scores else 0.0, "sent": image_bytes}


def test_verl_omni_remote_and_in_process(trainer_server, tiny_scorer, tiny_artifacts):
    images = generations(20, seed=3)
    prompts = [f"a castle at dawn, style {i % 4}" for i in range(20)]
    urls = f"{trainer_server.url},{trainer_server.url}/score"  # its reference server answered both paths

    async def remote():
        return await asyncio.gather(*(verl_omni_compute_score(img, p, urls) for img, p in zip(images, prompts)))

    answers = asyncio.run(remote())
    expected = tiny_scorer.score_tensors(prompts, decoded([a["sent"] for a in answers])) / 26
    np.testing.assert_allclose([a["score"] for a in answers], expected, atol=ATOL / 26)

    # In process, as verl-omni's VisualRewardManager calls it (keywords; many samples at once, micro-batched):
    # uint8 CHW since verl-omni #373, float CHW before it.
    u8 = (images * 255).round().clamp(0, 255).to(torch.uint8)

    async def local(batch):
        return await asyncio.gather(*(compute_score_pickscore(
            data_source="pickapic", solution_image=img, ground_truth=p, extra_info={"num_turns": 1},
            artifacts=str(tiny_artifacts), backend="onnx-cpu", precision="fp32") for img, p in zip(batch, prompts)))

    want = tiny_scorer.score_tensors(prompts, u8) / 26
    reward = shared_reward("verl_omni", str(tiny_artifacts), None, on_error="nan", backend="onnx-cpu", precision="fp32")
    sizes, raw = [], reward.score_raw
    reward.score_raw = lambda images, prompts: sizes.append(len(images)) or raw(images, prompts)
    for batch in (u8, images):
        sizes.clear()
        results = asyncio.run(local(batch))
        np.testing.assert_allclose([r["score"] for r in results], want, atol=1e-6)
        assert all(r["pickscore_raw"] == r["score"] for r in results)  # as verl-omni returns them
        assert sum(sizes) == 20 and max(sizes) == 16  # micro-batched: 20 concurrent samples in batches of up to 16


def test_verl_omni_in_process_fails_only_the_bad_sample(tiny_artifacts):
    good = generations(3, seed=4)
    bad = good[1].clone()
    bad[0, 0, 0] = float("nan")

    async def run():
        return await asyncio.gather(*(compute_score_pickscore(solution_image=img, ground_truth="a dog",
                                                              artifacts=str(tiny_artifacts), backend="onnx-cpu", precision="fp32")
                                      for img in (good[0], bad, good[2])), return_exceptions=True)

    first, failed, last = asyncio.run(run())
    assert isinstance(failed, Exception) and "NaN" in str(failed)
    assert np.isfinite(first["score"]) and np.isfinite(last["score"])


# ---- cosmos-rl -------------------------------------------------------------------------------------
class CosmosRemoteReward:
    """cosmos_rl/reward/remote_calculator.py's RemoteRewardCalculator: enqueue, then fetch with
    make_request_with_retry (raise_for_status: a 400 "not ready" is retried with backoff)."""

    def __init__(self, base: str, token: str = ""):
        self.enqueue_url, self.fetch_url, self.token = base + "/api/reward/enqueue", base + "/api/reward/pull", token

    def enqueue_request(self, mm_tensor, data) -> str:
        buffer = io.BytesIO()
        np.save(buffer, mm_tensor, allow_pickle=False)
        buffer.seek(0)
        payload = json.dumps(data).encode("utf-8") + b"\n" + buffer.getvalue()
        response = requests.post(self.enqueue_url, data=payload, timeout=60,
                                 headers={"Content-Type": "application/octet-stream", "Authorization": f"Bearer {self.token}"})
        if response.status_code != 200:
            raise RuntimeError(f"enqueue failed: {response.status_code} {response.text}")
        return response.json()["uuid"]

    def fetch_reward(self, uuid: str, name: str = "pickscore", retries: int = 60) -> dict:
        delay = 0.05
        for _ in range(retries):
            response = requests.post(self.fetch_url, data={"uuid": uuid, "type": name},
                                     headers={"Authorization": f"Bearer {self.token}"}, timeout=10.0)
            try:
                response.raise_for_status()
                return response.json()
            except requests.HTTPError:
                if response.status_code != 400:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        raise TimeoutError(uuid)

    def compute_rewards(self, all_mm_datas: torch.Tensor, all_prompts: list[str]) -> torch.Tensor:
        data = {"prompts": all_prompts, "reward_fn": {"pickscore": 1.0}, "media_type": "image"}
        mm_tensor = (all_mm_datas.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()  # B,C,H,W -> B,H,W,C
        uuid = self.enqueue_request(mm_tensor, data)
        response_json = self.fetch_reward(uuid)
        scores = response_json.get("scores")
        if not isinstance(scores, dict):
            raise KeyError(f"no scores in {response_json}")
        score = torch.tensor(scores["pickscore"])
        return torch.clamp(score, min=-5.0, max=5.0) * 1.0


def test_cosmos_rl_enqueue_pull_and_in_process(trainer_server, tiny_scorer):
    images = generations(6, seed=5, size=(80, 80))
    prompts = ["a red car"] * 3 + ["a blue boat"] * 3  # all completions of two prompts
    rewards = CosmosRemoteReward(trainer_server.url).compute_rewards(images, prompts)
    u8 = (images * 255).round().clamp(0, 255).to(torch.uint8)
    want = tiny_scorer.score_tensors(prompts, u8) / 26  # raw uint8 travels losslessly: the very pixels
    np.testing.assert_allclose(rewards.numpy(), np.clip(want, -5, 5), atol=ATOL / 26)
    in_process, _ = PickScoreReward(tiny_scorer, "cosmos_rl")(u8.permute(0, 2, 3, 1).numpy(), prompts)  # BHWC uint8
    np.testing.assert_allclose(in_process, want, atol=1e-6)


def test_cosmos_rl_bad_requests_are_refused_at_enqueue(trainer_server):
    url = trainer_server.url + "/api/reward/enqueue"

    def enqueue(header: dict, array: np.ndarray) -> requests.Response:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        return requests.post(url, data=json.dumps(header).encode() + b"\n" + buffer.getvalue(), timeout=30)

    ok = {"prompts": ["a"], "reward_fn": {"pickscore": 1.0}, "media_type": "image"}
    u8 = np.zeros((1, 32, 32, 3), np.uint8)
    cases = [(dict(ok, prompts=["a", "b"]), u8, "one prompt per image"),
             (dict(ok, media_type="latent"), u8, "media_type"),
             ({k: v for k, v in ok.items() if k != "media_type"}, u8, "media_type"),
             (dict(ok, reward_fn={"hpsv2": 1.0}), u8, "pickscore"),
             (ok, u8.astype(np.float32), "uint8"),
             (ok, np.zeros((1, 32, 32, 4), np.uint8), "shape")]
    for header, array, message in cases:
        response = enqueue(header, array)
        assert response.status_code == 400 and message in response.json()["error"]["message"], (header, response.text)
    assert requests.post(url, data=b"no newline here", timeout=30).status_code == 400
    assert requests.post(url, data=b'{"prompts": ["a"], "media_type": "image"}\nnot npy', timeout=30).status_code == 400
    pull = requests.post(trainer_server.url + "/api/reward/pull", data={"uuid": "never-enqueued", "type": "pickscore"}, timeout=30)
    assert pull.status_code == 404 and "never enqueued" in pull.json()["error"]["message"]


# ---- failures are errors, never 0.0 ------------------------------------------------------------------
def test_a_broken_image_is_an_error_with_the_rest_scored(trainer_server, tiny_scorer):
    good = (generations(2, seed=6) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pngs = []
    for array in good:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    body = pickle.dumps({"images": [pngs[0], b"\xff\xd8 not a jpeg", pngs[1]], "prompts": np.array(["a", "b", "c"]),
                         "metadata": {}})
    answer = pickle.loads(requests.post(trainer_server.url, data=body, timeout=60).content)
    assert np.isnan(answer["scores"][1]) and "cannot decode" in answer["errors"][1] and answer["outputs"] == answer["scores"]
    np.testing.assert_allclose([answer["scores"][0], answer["scores"][2]],
                               tiny_scorer.score_tensors(["a", "c"], good) / 26, atol=ATOL / 26)
    assert answer["errors"][0] is None and answer["errors"][2] is None


# ---- the client takes what the in-process reward takes -------------------------------------------------
def test_client_takes_tensor_batches_losslessly(trainer_server, tiny_scorer):
    images = generations(4, seed=7)
    prompts = ["a", "b", "c", "d"]
    want = tiny_scorer.score_tensors(prompts, images)
    with PickScoreClient(trainer_server.url) as client:
        for batch in (images, images.permute(0, 2, 3, 1), images.numpy(), (images * 255).round().to(torch.uint8)):
            np.testing.assert_allclose(client.rewards(batch, prompts)["scores"], want, atol=ATOL)
        np.testing.assert_allclose(client.rewards(images, "a")["scores"], tiny_scorer.score_tensors("a", images), atol=ATOL)
    with pytest.warns(UserWarning, match="JPEG.* is lossy"):
        PickScoreClient(trainer_server.url, image_format="JPEG").close()


# ---- submit(): scoring overlaps the next rollout ---------------------------------------------------------
def test_submit_under_8_producers_returns_every_result_once_in_order(tiny_scorer):
    batches = [generations(2, seed=100 + k, size=(32, 32)) for k in range(10)]
    prompts = [[f"prompt {k}", f"other {k}"] for k in range(10)]
    reward_fn = PickScoreReward(tiny_scorer, "flow_grpo", max_pending=4)
    expected = [reward_fn(b, p)[0] for b, p in zip(batches, prompts)]
    done: list[tuple[int, int]] = []
    most_pending = [0]

    def produce(t: int) -> list:
        futures = []
        for i in range(50):
            k = (t * 50 + i) % 10
            batch = batches[k].clone()
            future = reward_fn.submit(batch, prompts[k])
            batch.fill_(0.5)  # the trainer reuses its buffer at once: what was submitted is what is scored
            future.add_done_callback(lambda _, t=t, i=i: done.append((t, i)))  # list.append is atomic
            most_pending[0] = max(most_pending[0], reward_fn._queue.pending())  # noqa: SLF001 - observing the bound
            futures.append((k, future))
        return futures

    with ThreadPoolExecutor(8) as pool:
        per_thread = list(pool.map(produce, range(8)))
    for futures in per_thread:
        for k, future in futures:
            rewards, info = future.result(timeout=120)
            np.testing.assert_allclose(rewards, expected[k], atol=1e-6)
            assert info["queued_s"] >= 0
    assert len(done) == 400 and len(set(done)) == 400  # every result once
    for t in range(8):  # each producer's batches finish in the order it submitted them
        assert [i for tt, i in done if tt == t] == list(range(50))
    assert 1 <= most_pending[0] <= 4  # back-pressure: never more than max_pending unfinished
    reward_fn.close()


def test_submit_back_pressure_and_errors(tiny_scorer, trainer_server):
    reward_fn = PickScoreReward(tiny_scorer, max_pending=1)
    gate = threading.Event()
    original = reward_fn.score_raw

    def slow(images, prompts):
        gate.wait(30)
        return original(images, prompts)

    reward_fn.score_raw = slow
    first = reward_fn.submit(generations(1, seed=8), "a")
    with pytest.raises(QueueFull):
        reward_fn.submit(generations(1, seed=9), "a", timeout=0.2)
    gate.set()
    assert first.result(timeout=60)[0].shape == (1,)
    bad = generations(2, seed=10)
    bad[1, 0, 0, 0] = 2.0  # out of [0, 1]
    with pytest.raises(Exception, match=r"#1 \(tensor\)"):
        reward_fn.submit(bad, ["a", "b"]).result(timeout=60)
    reward_fn.close()

    with ServerReward(trainer_server.url, conventions="flow_grpo") as remote:
        futures = [remote.submit(generations(3, seed=20 + i), "a boat") for i in range(5)]
        for i, future in enumerate(futures):
            rewards, info = future.result(timeout=120)
            np.testing.assert_allclose(rewards, tiny_scorer.score_tensors("a boat", generations(3, seed=20 + i)) / 26,
                                       atol=ATOL / 26)
