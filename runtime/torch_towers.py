"""The two CLIP towers as PyTorch modules with the runtime's IO contract (towers.py): what the torch
backends run, what `pickscore export` traces to ONNX and what the reference normalises with. Imports torch:
imported only by the torch backends and the export package, never on the lean scoring path."""

from __future__ import annotations

from typing import Any

import torch

from .towers import TowerSpec, tower_specs


def features(output: Any) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and a BaseModelOutputWithPooling in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True)  # as the model card writes it


class ClipTower(torch.nn.Module):
    """One tower with the runtime's IO contract: text input_ids [B, T] (pooled at argmax(input_ids), the
    first <|endoftext|>) or vision pixel_values [B, 3, S, S] -> L2-normalised embeddings [B, D], normalised
    in float32 whatever the compute precision."""

    def __init__(self, clip: Any, tower: str):
        super().__init__()
        if tower not in ("text", "vision"):
            raise ValueError(f"tower must be 'text' or 'vision', got {tower!r}")
        self.clip, self.tower = clip, tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.clip.get_text_features(input_ids=x) if self.tower == "text" else self.clip.get_image_features(pixel_values=x)
        return l2_normalise(features(out).float())


def tower_module(clip: Any, tower: str) -> ClipTower:
    return ClipTower(clip, tower).eval()


def clip_specs(clip: Any) -> dict[str, TowerSpec]:
    """The tower specs of a transformers CLIPModel, from its config (what its export declares)."""
    return tower_specs(int(clip.config.projection_dim), int(clip.config.vision_config.image_size))
