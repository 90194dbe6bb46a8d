"""Drop-in reward functions with the signatures RL trainers for diffusion models call (docs/rl-rewards.md
shows the lines to change in each trainer):

- flow_grpo: `flow_grpo_pickscore(device)` -> `_fn(images, prompts, metadata) -> (rewards, info)`, for its
  `score_functions["pickscore"]` (score / 26, float -> uint8 by rounding).
- DDPO-pytorch: `ddpo_pickscore()` -> the same `_fn`, for `config.reward_fn = "pickscore"` (raw scores).
- verl-omni: `await compute_score_pickscore(data_source, solution_image, ground_truth, extra_info, **kwargs)`
  -> {"score", "pickscore_raw"} (both score / 26, as verl-omni's own returns them); concurrent calls are
  micro-batched (up to 16, prompts de-duplicated by the text encoder), in process or, with `server_urls`,
  on `pickscore serve` (round-robin; PNG, lossless).
- cosmos-rl scores remotely only: point its REMOTE_REWARD_ENQUEUE_URL / FETCH_URL at `pickscore serve`.

Which model: `artifacts=` (a keyword argument, or verl's reward_kwargs), else $PICKSCORE_ARTIFACTS, else
the hub model (PickScorer.from_pretrained). A failed image raises RewardError naming it: never a 0.0.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import weakref
from typing import Any, Sequence

from .errors import RewardError
from .reward_base import RewardFunction
from .tokenizer import check_prompt

VERL_MAX_BATCH = 16  # verl-omni's own micro-batch
ARTIFACTS_ENV = "PICKSCORE_ARTIFACTS"
_rewards: dict[tuple, RewardFunction] = {}
_rewards_lock = threading.Lock()


def shared_reward(conventions: str, artifacts: str | None = None, server_url: str | None = None,
                  on_error: str = "raise", **options: Any) -> RewardFunction:
    """One reward per (conventions, model or server, options) in this process: trainers call a reward
    factory once per worker, or the score function once per sample."""
    key = (conventions, artifacts, server_url, on_error, tuple(sorted(options.items())))
    with _rewards_lock:
        if key not in _rewards:
            _rewards[key] = open_reward(conventions, artifacts, server_url, on_error, **options)
        return _rewards[key]


def open_reward(conventions: str, artifacts: str | None = None, server_url: str | None = None,
                on_error: str = "raise", **options: Any) -> RewardFunction:
    if server_url is not None:
        from .server.client import ServerReward

        api_key = options.pop("api_key", None)
        if {"backend", "precision", "artifacts"} & options.keys():
            raise ValueError(f"{', '.join(sorted({'backend', 'precision'} & options.keys()))}: the server's own "
                             "(pickscore serve --backend/--precision), not the client's")
        return ServerReward(server_url, api_key, conventions, on_error=on_error, **options)
    from .rewards import PickScoreReward
    from .scorer import PickScorer

    artifacts = artifacts or os.environ.get(ARTIFACTS_ENV)
    where = {"backend": options.pop("backend", None), "precision": options.pop("precision", None)}
    scorer = PickScorer.load(artifacts, **where) if artifacts else PickScorer.from_pretrained(**where)
    return PickScoreReward(scorer, conventions, on_error=on_error, **options)


def flow_grpo_pickscore(device: Any = None, *, artifacts: str | None = None, server_url: str | None = None,
                        **options: Any) -> RewardFunction:
    """flow_grpo's reward factory: `score_functions["pickscore"]` is called with the trainer's device (the
    backend decides where the model runs; CUDA batches stay on the GPU with a GPU backend)."""
    return shared_reward("flow_grpo", artifacts, server_url, **options)


def ddpo_pickscore(*, artifacts: str | None = None, server_url: str | None = None, **options: Any) -> RewardFunction:
    """DDPO-pytorch's reward factory (`getattr(ddpo_pytorch.rewards, config.reward_fn)()`)."""
    return shared_reward("ddpo", artifacts, server_url, **options)


# ---- verl-omni ----------------------------------------------------------------------------------
class SampleBatcher:
    """Concurrent `score(prompt, image)` calls on one event loop, scored together: the first waits one loop
    turn for others, then up to VERL_MAX_BATCH go to the reward (on_error="nan") as one batch in a worker
    thread; an image that fails raises RewardError in its own call only."""

    def __init__(self, reward: RewardFunction, max_batch: int = VERL_MAX_BATCH):
        self.reward, self.max_batch = reward, max_batch
        self.queue: asyncio.Queue = asyncio.Queue()
        self.consumer = asyncio.get_running_loop().create_task(self._consume())

    async def score(self, prompt: str, image: Any) -> float:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((prompt, image, future))
        return await future

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            await asyncio.sleep(0)  # let the other samples of this step arrive
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            ready = []
            for prompt, image, future in batch:  # a bad sample fails its own call, before the batch is scored
                try:
                    ready.append((check_prompt(prompt), verl_image(image), future))
                except Exception as e:  # noqa: BLE001 - handed to that sample's caller
                    settle(future, error=e)
            if not ready:
                continue
            try:
                rewards, info = await loop.run_in_executor(None, self.reward, [r[1] for r in ready], [r[0] for r in ready])
            except Exception as e:  # noqa: BLE001 - the backend failed the batch: every caller hears of it
                for *_, future in ready:
                    settle(future, error=e)
                continue
            for (prompt, _, future), reward, error in zip(ready, rewards, info["errors"]):
                settle(future, float(reward), None if error is None else
                       RewardError(f"verl-omni sample for prompt {prompt[:80]!r}: {error}"))


def settle(future: asyncio.Future, result: float | None = None, error: BaseException | None = None) -> None:
    if future.done():  # its caller gave up (cancelled)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def verl_image(image: Any) -> Any:
    """One verl-omni sample (uint8 CHW since verl-omni #373, float CHW in [0, 1] before it; or a batch of one)
    as a single uint8 HWC array; a float one is rounded, as verl-omni's rollout server quantises it."""
    from .tensor_images import host_uint8_batch

    if len(getattr(image, "shape", ())) == 3:
        image = image[None]  # CHW -> 1CHW (numpy or torch)
    u8 = host_uint8_batch(image, "NCHW" if tuple(image.shape)[1] in (1, 3) else "auto")
    if u8.shape[0] != 1:
        raise ValueError(f"one image per verl-omni sample, got a batch of {u8.shape[0]}")
    return u8[0, ..., 0] if u8.shape[3] == 1 else u8[0]


_batchers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, SampleBatcher]]" = weakref.WeakKeyDictionary()
_round_robin = itertools.count()


async def compute_score_pickscore(data_source: Any = None, solution_image: Any = None, ground_truth: str = "",
                                  extra_info: Any = None, *, artifacts: str | None = None,
                                  server_urls: str | Sequence[str] | None = None, **kwargs: Any) -> dict:
    """verl-omni's `compute_score_pickscore`: {"score": score / 26, "pickscore_raw": the same} (verl-omni
    returns both divided by 26). server_urls: "http://a:8000,http://b:8000" or a list, round-robin."""
    options = {k: v for k, v in kwargs.items() if k in ("backend", "precision", "api_key")}
    server_url = None
    if server_urls:
        urls = [u.strip().strip("'\"") for u in server_urls.split(",")] if isinstance(server_urls, str) else list(server_urls)
        server_url = urls[next(_round_robin) % len(urls)]
    if solution_image is None:
        raise ValueError("solution_image is missing: verl-omni passes the generated image as solution_image=")
    on_this_loop = _batchers.setdefault(asyncio.get_running_loop(), {})  # a batcher's queue and task live on one loop
    key = (artifacts, server_url, tuple(sorted(options.items())))
    if key not in on_this_loop:
        on_this_loop[key] = SampleBatcher(shared_reward("verl_omni", artifacts, server_url, on_error="nan", **options))
    score = await on_this_loop[key].score(ground_truth or "", solution_image)
    return {"score": score, "pickscore_raw": score}
