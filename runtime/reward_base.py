"""What every PickScore reward function shares, in process (`rewards.PickScoreReward`) or on a server
(`server.ServerReward`): the trainers' conventions as options, the `(rewards, info)` it returns, and a
non-blocking `submit`.

    reward_fn = PickScoreReward(scorer, "flow_grpo")        # or RewardConventions(divide_by=26, quantize="round")
    rewards, info = reward_fn(images, prompts, metadata)    # blocks
    future = reward_fn.submit(images, prompts)              # returns at once; future.result() -> (rewards, info)

Light: numpy only, so that the client side needs no runtime backend.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from .errors import RewardError
from .reward_queue import SubmitQueue
from .tensor_images import LAYOUTS, MODES, check_quantize

ON_ERROR = ("raise", "nan")


@dataclass(frozen=True)
class RewardConventions:
    """How a trainer turns PickScore into its reward. rewards = score / divide_by, where score is
    exp(logit_scale) x cosine; quantize: how a float batch in [0, 1] becomes the uint8 pixels that are
    scored, "round" ((x * 255).round()) or "truncate" ((x * 255).to(uint8)), in the batch's own dtype;
    mode, layout: as PickScorer.score_tensors."""

    divide_by: float = 1.0
    quantize: str = "round"
    mode: str = "exact"
    layout: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.divide_by, bool) or not isinstance(self.divide_by, (int, float)) or not self.divide_by > 0 \
                or self.divide_by == float("inf"):
            raise ValueError(f"divide_by must be a positive finite number, got {self.divide_by!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        check_quantize(self.quantize, self.mode)


# Read from each trainer's source (docs/rl-rewards.md#trainers quotes the lines).
TRAINERS = {
    "pickscore": RewardConventions(),  # the model card: exp(logit_scale) x cosine, pixels as saved
    "ddpo": RewardConventions(),  # DDPO-pytorch: (x * 255).round() before PIL, rewards unscaled
    "flow_grpo": RewardConventions(divide_by=26.0),  # flow_grpo/pickscore_scorer.py: scores / 26, .round()
    "verl_omni": RewardConventions(divide_by=26.0),  # verl_omni pickscore_reward.py: "score" = raw / 26
    "cosmos_rl": RewardConventions(divide_by=26.0),  # cosmos-rl reward_service: / 26
}


def conventions_of(conventions: RewardConventions | str | None, **overrides: Any) -> RewardConventions:
    """A RewardConventions from a trainer's name (TRAINERS), an instance, or None (the model card's), with
    fields overridden where given (not None)."""
    if conventions is None:
        conventions = TRAINERS["pickscore"]
    elif isinstance(conventions, str):
        if conventions not in TRAINERS:
            raise ValueError(f"unknown trainer conventions {conventions!r}; choose from {', '.join(TRAINERS)} "
                             "or pass a RewardConventions")
        conventions = TRAINERS[conventions]
    elif not isinstance(conventions, RewardConventions):
        raise TypeError(f"conventions must be a trainer's name or a RewardConventions, got {type(conventions).__name__}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(conventions, **changes) if changes else conventions


def prompts_for(prompts: str | Sequence[str], n: int) -> list[str]:
    """One prompt per image: a str is one prompt for all; a sequence must have one per image."""
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"one prompt per image (or one str for all): {n} images but {len(prompts)} prompts")
    return prompts


class RewardFunction:
    """`reward_fn(images, prompts, metadata=None) -> (rewards, info)`: rewards float32 [N] under the
    conventions; info: "errors" (None or the reason, per image), "backend", "precision",
    "random_weights", "raw_scores" (float32 [N], PickScore before divide_by), "conventions", "timings"
    (seconds). A failed image raises RewardError naming it, or with on_error="nan" is NaN with its
    reason in info["errors"]: never a made-up 0.0."""

    def __init__(self, conventions: RewardConventions | str | None, on_error: str, max_pending: int, **overrides: Any):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.conventions = conventions_of(conventions, **overrides)
        self.on_error = on_error
        self._queue = SubmitQueue(self, max_pending)  # its thread starts with the first submit

    def score_raw(self, images: Any, prompts: list[str] | str) -> tuple[np.ndarray, list[str | None], dict]:
        """(PickScore scores, NaN where failed; per-image errors; backend facts). Subclasses score here."""
        raise NotImplementedError

    def __call__(self, images: Any, prompts: str | Sequence[str], metadata: Any = None) -> tuple[np.ndarray, dict]:
        started = time.perf_counter()
        scores, errors, facts = self.score_raw(images, prompts)
        RewardError.raise_for(errors, self.on_error)
        scores = np.asarray(scores, dtype=np.float32)
        rewards = (scores / np.float32(self.conventions.divide_by)).astype(np.float32)
        info = dict(facts, errors=errors, raw_scores=scores, conventions=self.conventions,
                    timings={"score_s": time.perf_counter() - started})
        return rewards, info

    def submit(self, images: Any, prompts: str | Sequence[str], metadata: Any = None, *,
               timeout: float | None = None) -> Future:
        """Score in the background; a Future of (rewards, info), finished in submission order (info gains
        "queued_s"). Blocks while max_pending batches are unfinished (QueueFull after `timeout` s). A
        failure, RewardError included, is raised by future.result()."""
        return self._queue.submit(images, prompts, metadata, timeout=timeout)

    def close(self) -> None:
        """Finish what was submitted, then release the background worker."""
        self._queue.close(wait=True)

    def __enter__(self) -> "RewardFunction":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
