"""The reward function RL trainers for diffusion models call, in process:
`reward_fn(images, prompts, metadata) -> (rewards, info)` (DDPO / flow_grpo style), and
`reward_fn.submit(images, prompts) -> Future` to score while the next rollout runs.

`images` is what a trainer has: one batch tensor (float NCHW in [0, 1], usually on the GPU; uint8;
NHWC), or a list of images (PIL, uint8 arrays, encoded bytes, paths). `prompts`: one per image, or one
str for all. The trainer's conventions (divide by 26, round or truncate to uint8) are options
(reward_base.RewardConventions, by trainer name in TRAINERS). A tensor that requires grad is scored
detached, under no-grad: a reward is never back-propagated through.
The server's `pickscore_runtime.server.ServerReward` has the same signature, info and submit, so a
trainer can switch between scoring in process and on a server without other changes.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import NonFiniteError, RewardError
from .reward_base import TRAINERS, RewardConventions, RewardFunction, prompts_for
from .reward_queue import DEFAULT_MAX_PENDING
from .scorer import PickScorer
from .tensor_images import batch_length, is_tensor_batch

__all__ = ["PickScoreReward", "RewardConventions", "RewardError", "TRAINERS", "jpeg_score_shift"]


class PickScoreReward(RewardFunction):
    def __init__(self, scorer: PickScorer, conventions: RewardConventions | str | None = None, *,
                 mode: str | None = None, quantize: str | None = None, on_error: str = "raise",
                 max_pending: int = DEFAULT_MAX_PENDING):
        """conventions: a trainer's name ("flow_grpo", "ddpo", "verl_omni", "cosmos_rl", "pickscore") or a
        RewardConventions; mode / quantize override its fields. on_error: "raise" (a failed image raises
        RewardError) or "nan" (its reward is NaN, the reason in info["errors"]). max_pending: batches
        `submit` queues before it blocks."""
        super().__init__(conventions, on_error, max_pending, mode=mode, quantize=quantize)
        self.scorer = scorer

    def score_raw(self, images: Any, prompts: str | Sequence[str]) -> tuple[np.ndarray, list[str | None], dict]:
        c = self.conventions
        if is_tensor_batch(images):
            prompts = prompts_for(prompts, batch_length(images))
            try:
                scores = self.scorer.score_tensors(prompts, images, c.mode, c.layout, c.quantize)
                errors: list[str | None] = [None] * len(scores)
            except NonFiniteError as e:
                scores, errors = e.scores, [e.reasons.get(i) for i in range(len(e.scores))]
        else:
            images = list(images)
            prompts = prompts_for(prompts, len(images))
            embs, failed = self.scorer.pipeline().embed(images)
            text = self.scorer.text.encode(prompts).embeddings
            scores, errors = self.scorer.assembler.paired_results(text, embs, {i: e.reason for i, e in failed.items()})
        backend = self.scorer.backend
        return scores, errors, {"backend": backend.name, "precision": backend.precision,
                                "random_weights": self.scorer.random_weights}


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """One uint8 HxWx3 image as a JPEG at `quality` would give it back."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def jpeg_score_shift(scorer: PickScorer, images: Any, prompts: str | Sequence[str], quality: int = 75) -> dict:
    """How much sending `images` as JPEG at `quality` (Pillow's default 75: flow_grpo's and verl-omni's
    clients; DDPO's llava client uses 80) moves their scores on this scorer's weights: the same uint8
    pixels scored as they are and after a JPEG round trip. {"quality", "n", "max_abs", "mean_abs",
    "p99_abs"} in raw PickScore units (divide by 26 for flow_grpo's)."""
    from .tensor_images import host_uint8_batch

    u8 = host_uint8_batch(images) if is_tensor_batch(images) else np.stack([np.asarray(x) for x in images])
    prompts = prompts_for(prompts, len(u8))
    jpegs = np.stack([jpeg_round_trip(image, quality) for image in u8])
    shift = np.abs(scorer.score_tensors(prompts, jpegs) - scorer.score_tensors(prompts, u8))
    return {"quality": quality, "n": int(len(shift)), "max_abs": float(shift.max()), "mean_abs": float(shift.mean()),
            "p99_abs": float(np.percentile(shift, 99))}
