"""The PyTorch reference: the PickScore model card's code path through transformers, fp32 (on the CPU, or
on a GPU: `device="cuda"`, each model call in plain fp32, TF32 off and SDPA's math kernel, the caller's
settings given back after it: torch_towers.EXACT_FP32).

    inputs = processor(images=..., return_tensors="pt"); processor(text=prompt, padding=True, truncation=True, max_length=77)
    embs = model.get_*_features(**inputs); embs = embs / torch.norm(embs, dim=-1, keepdim=True)
    scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]; probs = torch.softmax(scores, dim=-1)

The image processor is built as CLIPImageProcessorPil on purpose: it is the PIL processor the model
card ran (transformers < 5 called it CLIPImageProcessor); transformers 5's default CLIPImageProcessor
is a torchvision re-implementation with its own resize kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from pickscore_runtime.torch_towers import features, numerics

from .source import ModelSource, load_clip, tokenizer_files

class Reference:
    def __init__(self, source: ModelSource, model=None, device: str = "cpu"):
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPProcessor

        files = tokenizer_files(source)
        self.device = device
        self.numerics = numerics(device)  # fp32 means fp32 on a GPU too, inside our calls only
        self.model = (model if model is not None else load_clip(source)).to(device)
        self.processor = CLIPProcessor(
            image_processor=CLIPImageProcessorPil.from_pretrained(files), tokenizer=AutoTokenizer.from_pretrained(files)
        )

    @torch.inference_mode()
    def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        out = []
        for prompt in prompts:  # one prompt per call, as the model card scores
            inputs = self.processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
            with self.numerics:
                embs = features(self.model.get_text_features(**inputs.to(self.device)))
            out.append((embs / torch.norm(embs, dim=-1, keepdim=True)).cpu().numpy())
        return np.concatenate(out)

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[str | Path | Image.Image], batch_size: int = 8) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            batch = [Image.open(x) if isinstance(x, (str, Path)) else x for x in images[start : start + batch_size]]
            inputs = self.processor(images=batch, return_tensors="pt")
            with self.numerics:
                embs = features(self.model.get_image_features(**inputs.to(self.device)))
            out.append((embs / torch.norm(embs, dim=-1, keepdim=True)).cpu().numpy())
        return np.concatenate(out)

    @property
    def logit_scale_exp(self) -> np.float32:
        return np.float32(self.model.logit_scale.detach().cpu().exp().item())

    @torch.inference_mode()
    def calc_probs(self, text_emb: np.ndarray, image_embs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        text, imgs = torch.from_numpy(text_emb[None]), torch.from_numpy(image_embs)
        scores = self.model.logit_scale.cpu().exp() * (text @ imgs.T)[0]  # scoring stays on the CPU
        return scores.numpy(), torch.softmax(scores, dim=-1).numpy()
