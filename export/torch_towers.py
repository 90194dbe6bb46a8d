"""The two towers as torch modules with the runtime's IO contract (L2-normalised float32 embeddings),
and the `torch` backend that runs them: the model card's compute, behind the runtime's Backend protocol."""

from __future__ import annotations

import numpy as np
import torch


def features(output) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and a BaseModelOutputWithPooling in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True)  # as the model card writes it


class TextTower(torch.nn.Module):
    """input_ids [B, T] -> text_embeds [B, D]. Pools at argmax(input_ids), the first <|endoftext|>."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return l2_normalise(features(self.clip.get_text_features(input_ids=input_ids)))


class VisionTower(torch.nn.Module):
    """pixel_values [B, 3, S, S] -> image_embeds [B, D]."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return l2_normalise(features(self.clip.get_image_features(pixel_values=pixel_values)))


def tower_module(clip, tower: str) -> torch.nn.Module:
    return {"text": TextTower, "vision": VisionTower}[tower](clip).eval()


class TorchBackend:
    """The PyTorch reference behind the runtime's Backend protocol (fp32, CPU): for benchmarks."""

    name = "torch"
    precision = "fp32"

    def __init__(self, clip, max_batch: int = 8, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.max_batch = max_batch
        self._text, self._vision = tower_module(clip, "text"), tower_module(clip, "vision")

    @torch.inference_mode()
    def embed_text(self, input_ids: np.ndarray) -> np.ndarray:
        return self._text(torch.from_numpy(input_ids)).numpy()

    @torch.inference_mode()
    def embed_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._vision(torch.from_numpy(pixel_values)).numpy()
