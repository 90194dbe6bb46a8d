"""Stress weights: seeded random weights with the activation outliers of trained ViTs planted in them.

Plain random weights have none of the outliers that make fp16 and int8 fragile in trained transformers:
high-norm tokens that act as registers / attention sinks (Darcet et al. 2023, "Vision Transformers Need
Registers", seen in OpenCLIP ViT-H), massive activations in a few residual channels of a few tokens
(Sun et al. 2024, "Massive Activations in Large Language Models", also in CLIP ViTs), and the
channel-wise outliers of post-LayerNorm activations that break per-tensor activation quantisation
(RepQ-ViT, Li et al. 2023; LLM.int8(), Dettmers et al. 2022). `plant_outliers` puts all three into the
real architecture by editing weights, so every engine computes them the way it would a trained model's:

1. massive tokens (vision: 4 patch positions, the high-norm "register" patches of Darcet et al.; text:
   <|startoftext|>, the start token of Sun et al.) carry a value of about MASSIVE_RATIO x the median
   residual activation in one residual channel, from the first layer on: written into the position /
   token embedding, and (vision) scaled through the pre-LayerNorm's weight for that channel, so the same
   channel is a ~10x outlier for every token too. The CLS token, which the embedding is pooled from,
   stays clean, as in trained ViTs: planting it there too would make every image's embedding alike
   (a first version did: the reference's scores per prompt spread 0.3 instead of 2.4);
2. LayerNorm outlier channels: in every block, the same LN_OUTLIER_CHANNELS channels of both LayerNorms
   get LN_OUTLIER_GAIN x weight, so attention's q/k/v inputs and the MLP's input carry channel outliers;
3. MLP outlier units: in every block, MLP_OUTLIER_UNITS hidden units get MLP_OUTLIER_GAIN x their fc1
   row, so the MLP's second matmul reads a few huge activations.

`activation_stats` measures what that produces (max / median |activation| per layer and where it sits);
the numbers are recorded in the manifest and in benchmarks/QUANTIZATION.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

MASSIVE_RATIO = 500.0
HIGH_NORM_PATCHES = 4
LN_OUTLIER_CHANNELS = 8
LN_OUTLIER_GAIN = 12.0
MLP_OUTLIER_UNITS = 4
MLP_OUTLIER_GAIN = 6.0


def recipe() -> dict[str, Any]:
    return {"massive_ratio": MASSIVE_RATIO, "high_norm_patches": HIGH_NORM_PATCHES,
            "ln_outlier_channels": LN_OUTLIER_CHANNELS, "ln_outlier_gain": LN_OUTLIER_GAIN,
            "mlp_outlier_units": MLP_OUTLIER_UNITS, "mlp_outlier_gain": MLP_OUTLIER_GAIN}


def _median_residual(model, tower: str, inputs: torch.Tensor) -> float:
    """Median |residual activation| over the tower's middle layer for `inputs` (before any planting)."""
    layers = (model.vision_model if tower == "vision" else model.text_model).encoder.layers
    seen: list[torch.Tensor] = []
    handle = layers[len(layers) // 2].register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        if tower == "vision":
            model.get_image_features(pixel_values=inputs)
        else:
            model.get_text_features(input_ids=inputs)
    handle.remove()
    return float(seen[0].abs().median())


@torch.no_grad()
def plant_outliers(model, seed: int, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> dict[str, Any]:
    """Edit `model` in place (see the module docstring); returns where everything was planted."""
    rng = np.random.default_rng(seed + 7919)
    planted: dict[str, Any] = {"recipe": recipe()}
    for tower, inputs in (("vision", pixel_values), ("text", input_ids)):
        body = model.vision_model if tower == "vision" else model.text_model
        width = body.config.hidden_size
        # 3 significant digits: the same weights in every process, whatever its thread count did to the median
        target = float(f"{MASSIVE_RATIO * _median_residual(model, tower, inputs):.3g}")
        massive, ln_channels = int(rng.choice(width)), rng.choice(width, LN_OUTLIER_CHANNELS, replace=False)
        if tower == "vision":
            # Dominate the pre-LayerNorm input of a few patches in one channel; the LayerNorm then outputs
            # ~sqrt(width) there, scaled up to `target` by its weight for that channel.
            patches = (1 + rng.choice(body.embeddings.num_patches, HIGH_NORM_PATCHES, replace=False)).tolist()
            body.embeddings.position_embedding.weight[patches, massive] = 30.0
            body.pre_layrnorm.weight[massive] = target / width ** 0.5
            planted[tower] = {"massive_channels": [massive], "massive_tokens": patches}
        else:
            # No LayerNorm before the text encoder: the token embedding of <|startoftext|> is the residual.
            bos = int(input_ids[0, 0])
            body.embeddings.token_embedding.weight[bos, massive] = target
            planted[tower] = {"massive_channels": [massive], "massive_tokens": [0], "token_id": bos}
        units = []
        for layer in body.encoder.layers:
            layer.layer_norm1.weight[ln_channels] *= LN_OUTLIER_GAIN
            layer.layer_norm2.weight[ln_channels] *= LN_OUTLIER_GAIN
            hidden = rng.choice(layer.mlp.fc1.out_features, MLP_OUTLIER_UNITS, replace=False)
            layer.mlp.fc1.weight[hidden] *= MLP_OUTLIER_GAIN
            units.append(hidden.tolist())
        planted[tower].update(target_massive_value=round(target, 3), ln_outlier_channels=sorted(ln_channels.tolist()),
                              mlp_outlier_units_layer0=units[0])
    return planted


@torch.no_grad()
def activation_stats(model, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> dict[str, Any]:
    """Per tower: the largest and median |activation| of the residual stream (each layer's output), of
    the matmul inputs after LayerNorm (q/k/v and fc1 read these) and of the MLP's second matmul input;
    each with the largest max/median ratio over layers and the layer, token and channel where it sits."""
    out: dict[str, Any] = {}
    for tower, inputs in (("vision", pixel_values), ("text", input_ids)):
        body = model.vision_model if tower == "vision" else model.text_model
        seen: dict[str, list[torch.Tensor]] = {"residual": [], "layernorm_out": [], "fc2_in": []}
        handles = []
        for layer in body.encoder.layers:
            handles.append(layer.register_forward_hook(lambda m, i, o: seen["residual"].append(o[0] if isinstance(o, tuple) else o)))
            handles.append(layer.layer_norm1.register_forward_hook(lambda m, i, o: seen["layernorm_out"].append(o)))
            handles.append(layer.mlp.fc2.register_forward_pre_hook(lambda m, i: seen["fc2_in"].append(i[0])))
        if tower == "vision":
            model.get_image_features(pixel_values=inputs)
        else:
            model.get_text_features(input_ids=inputs)
        for h in handles:
            h.remove()
        out[tower] = {}
        for kind, tensors in seen.items():
            ratios = [float(t.abs().max() / t.abs().median().clamp_min(1e-12)) for t in tensors]
            worst = int(np.argmax(ratios))
            t = tensors[worst].abs()
            token, channel = np.unravel_index(int(t[0].argmax()), t[0].shape)
            out[tower][kind] = {"max_over_median": round(max(ratios), 1), "layer": worst,
                                "max": round(float(t.max()), 3), "median": round(float(t.median()), 5),
                                "token": int(token), "channel": int(channel)}
    return out


def calibration_inputs(tokenizer_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """Two generated images and two prompts, preprocessed and tokenised exactly as the runtime does."""
    from pickscore_models import model_info
    from pickscore_runtime.preprocess import PreprocessConfig
    from pickscore_runtime.tokenizer import ClipTokenizer

    from .samples import PROMPTS, calibration_pixels

    pixels = calibration_pixels(PreprocessConfig.from_json(model_info()["preprocessing"]), 2)
    ids = ClipTokenizer(tokenizer_dir / "tokenizer.json", 77, "<|endoftext|>")(PROMPTS[:2]).input_ids
    return torch.from_numpy(pixels), torch.from_numpy(ids)
