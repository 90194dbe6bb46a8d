"""The reward function RL trainers for diffusion models call, in process:
`reward_fn(images, prompts, metadata) -> (rewards, info)` (DDPO-style; GRPO-style loops wrap the same).

`images` is what a trainer has: one batch tensor (DDPO hands over float NCHW in [0, 1], usually on the
GPU), or a list of images (PIL, uint8 arrays, encoded bytes, paths). rewards: float32 [N] PickScore
scores (scale * cosine), one prompt per image. info: per-image errors, backend, precision,
random_weights. An image that cannot be scored (undecodable, or a tower returned NaN or Inf for it or
its prompt) raises RewardError naming it, or with on_error="nan" is NaN with its reason in info["errors"].
The server's `pickscore_runtime.server.ServerReward` has the same signature and info,
so a trainer can switch between scoring in process and scoring on a server without other changes.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import NonFiniteError, RewardError
from .scorer import PickScorer
from .tensor_images import is_tensor_batch

__all__ = ["PickScoreReward", "RewardError"]


class PickScoreReward:
    def __init__(self, scorer: PickScorer, mode: str = "exact", on_error: str = "raise"):
        """mode: how tensors are preprocessed ("exact" or "fast", see PickScorer.score_tensors).
        on_error: "raise" (any failed image raises RewardError) or "nan" (its reward is NaN, the reason
        in info["errors"])."""
        if on_error not in ("raise", "nan"):
            raise ValueError(f"on_error must be 'raise' or 'nan', got {on_error!r}")
        self.scorer, self.mode, self.on_error = scorer, mode, on_error

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Any = None) -> tuple[np.ndarray, dict]:
        prompts = list(prompts)
        if is_tensor_batch(images):
            try:
                rewards = self.scorer.score_tensors(prompts, images, self.mode)
                errors: list[str | None] = [None] * len(rewards)
            except NonFiniteError as e:
                rewards, errors = e.scores, [e.reasons.get(i) for i in range(len(e.scores))]
        else:
            images = list(images)
            if len(images) != len(prompts):
                raise ValueError(f"one prompt per image: {len(images)} images but {len(prompts)} prompts")
            embs, failed = self.scorer.pipeline().embed(images)
            text = self.scorer.text.encode(prompts).embeddings
            rewards, errors = self.scorer.assembler.paired_results(text, embs, {i: e.reason for i, e in failed.items()})
        RewardError.raise_for(errors, self.on_error)
        backend = self.scorer.backend
        return rewards, {"errors": errors, "backend": backend.name, "precision": backend.precision,
                         "random_weights": self.scorer.random_weights}
