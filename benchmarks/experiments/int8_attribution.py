"""Where does the int8 vision tower's error come from, and which plan removes it? Emulation in PyTorch.

    python benchmarks/experiments/int8_attribution.py --model DIR --random-init [--stress] [--seed N] --json OUT \
        [--attribute [--keep 1,2,4,8]] [--variants ROLE=MODE[+ROLE=MODE],...] [--check-against ARTIFACTS]

Building one ONNX Runtime int8 tower takes 2-4 minutes at full size, so quantising one block at a time
with the real quantiser (32 builds, then 32 gates) does not fit a session. This emulates, in the
reference model itself, what the shipped plan (export/onnx_export.INT8_PLAN's SmoothQuant settings, then
per-tensor int8 weights) does to each Linear of the vision tower:
- SmoothQuant: each input whose calibration channel maxima reach the plan's outlier ratio is divided by
  s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (max |W_j| over every Linear that reads that input), the
  weight's column j multiplied by it (export/smooth.py does the same to the ONNX graph);
- dynamic int8: the activation quantised per call to uint8 with one asymmetric scale for the whole
  tensor (ONNX Runtime's DynamicQuantizeLinear), the weight with one symmetric int8 scale, or as any
  scheme of export/onnx_export.WEIGHT_SCHEMES (--variants).
It does not emulate integer kernels' saturation (AVX2 without VNNI); `--check-against ARTIFACTS` also
reports the artifacts' real int8 tower, and benchmarks/QUANTIZATION.md compares the two.

Reported, against the fp32 reference on the 18 verify images and 9 prompts (gate v2's numbers, and the
image-embedding error energy: mean ||e_int8 - e_fp32||^2 of the unit embeddings):
- the whole int8 tower;
- --variants: whole plans, each ROLE=MODE item (ROLE: qkv, attn_out, mlp_up, mlp_down, projection, all;
  MODE: fp32 or a weight scheme) applied in order over the shipped plan;
- --attribute: each role alone in every block, each block alone (the rest fp32; these errors add up to
  about the whole tower's), and the whole tower with the --keep most-attributed blocks kept fp32.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pickscore_export.gate import compare_scores, cosine_rows, failures
from pickscore_export.onnx_export import INT8_CALIBRATION_IMAGES, INT8_PLAN, WEIGHT_SCHEMES
from pickscore_export.reference import Reference
from pickscore_export.samples import PROMPTS, calibration_pixels, write_images
from pickscore_export.smooth import outlier_ratio, smoothing_divisors
from pickscore_export.source import ModelSource
from pickscore_models import model_info
from pickscore_runtime.preprocess import PreprocessConfig

ROLES = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn_out": ("self_attn.out_proj",),
         "mlp_up": ("mlp.fc1",), "mlp_down": ("mlp.fc2",)}


def fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """uint8, one asymmetric scale for the whole tensor, the range always holding 0 (DynamicQuantizeLinear)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255 or 1.0
    zero = float(np.clip(np.round(-lo / scale), 0, 255))
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


WEIGHT_MODES = tuple(WEIGHT_SCHEMES)


def fake_quant_weight(w: torch.Tensor, mode: str = "tensor") -> torch.Tensor:
    """quantize_dynamic's weights under a WEIGHT_SCHEMES entry: int8 symmetric in [-127, 127] ([-64, 64] with
    reduce_range) or uint8 asymmetric in [0, 255] ([0, 127]); one scale per matrix or per output row."""
    per_channel, reduce_range, weight_type = WEIGHT_SCHEMES[mode]
    w = w.detach()
    dims = {"dim": 1, "keepdim": True} if per_channel else {}
    if weight_type == "uint8":
        top = 127 if reduce_range else 255
        lo, hi = w.amin(**dims).clamp_max(0), w.amax(**dims).clamp_min(0)
        scale = ((hi - lo) / top).clamp_min(1e-12)
        zero = torch.round(-lo / scale).clamp(0, top)
        return (torch.clamp(torch.round(w / scale) + zero, 0, top) - zero) * scale
    levels = 64 if reduce_range else 127
    scale = (w.abs().amax(**dims) / levels).clamp_min(1e-12)
    return torch.clamp(torch.round(w / scale), -levels, levels) * scale


class EmulatedInt8Linear(torch.nn.Module):
    """A Linear that runs fp32 or as an int8 plan would run it (smoothed, then fake-quantised); `mode` is
    None (fp32) or one of WEIGHT_MODES."""

    def __init__(self, linear: torch.nn.Linear, smooth: torch.Tensor | None):
        super().__init__()
        self.linear, self.smooth = linear, smooth
        self.mode: str | None = None
        self.int8_weight: torch.Tensor | None = None
        self.weight_mode: str | None = None

    def set_mode(self, mode: str | None) -> None:
        self.mode = mode
        if mode is not None and mode != self.weight_mode:
            w = self.linear.weight if self.smooth is None else self.linear.weight * self.smooth[None, :]
            self.int8_weight, self.weight_mode = fake_quant_weight(w, mode), mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is None:
            return self.linear(x)
        x = x if self.smooth is None else x / self.smooth
        return torch.nn.functional.linear(fake_quant_activation(x), self.int8_weight, self.linear.bias)


def linear_groups(vision, projection) -> list[list[tuple[str, torch.nn.Linear]]]:
    """Linears that read the same tensor (and so share SmoothQuant's divisor), by name."""
    groups = []
    for i, layer in enumerate(vision.encoder.layers):
        groups += [[(f"{i}.{n}", layer.get_submodule(n)) for n in names] for names in ROLES.values()]
    return groups + [[("projection", projection)]]


@torch.inference_mode()
def channel_maxima(model, linears: dict[str, torch.nn.Linear], calib: np.ndarray) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            m = args[0].abs().amax(dim=tuple(range(args[0].dim() - 1)))
            seen[name] = torch.maximum(seen[name], m) if name in seen else m
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    for start in range(0, len(calib), 4):
        model.get_image_features(pixel_values=torch.from_numpy(calib[start:start + 4]))
    for h in handles:
        h.remove()
    return seen


def install_emulation(model, calib: np.ndarray, alpha: float, min_ratio: float) -> dict[str, EmulatedInt8Linear]:
    groups = linear_groups(model.vision_model, model.visual_projection)
    maxima = channel_maxima(model, {n: m for g in groups for n, m in g}, calib)
    emulated = {}
    for group in groups:
        x_max = maxima[group[0][0]]
        smooth = None
        if outlier_ratio(x_max.numpy()) >= min_ratio:
            w_max = torch.stack([m.weight.detach().abs().amax(dim=0) for _, m in group]).amax(dim=0)
            smooth = torch.from_numpy(smoothing_divisors(x_max.numpy(), w_max.numpy(), alpha))
        for name, linear in group:
            emulated[name] = EmulatedInt8Linear(linear, smooth)
    for i, layer in enumerate(model.vision_model.encoder.layers):
        for names in ROLES.values():
            for n in names:
                parent, _, attr = n.rpartition(".")
                setattr(layer.get_submodule(parent), attr, emulated[f"{i}.{n}"])
    model.visual_projection = emulated["projection"]
    return emulated


class VisionRunner:
    """The vision tower run image by image (dynamic quantisation's scale is per call), from any block on,
    the fp32 inputs of every block cached once."""

    def __init__(self, model, pixels: torch.Tensor):
        self.model, self.vision = model, model.vision_model
        self.blocks = list(self.vision.encoder.layers)
        self.cache: list[list[torch.Tensor]] = []  # [image][block] -> that block's fp32 input; [-1]: the output
        with torch.inference_mode():
            for px in pixels:
                hidden = [self.vision.pre_layrnorm(self.vision.embeddings(px[None]))]
                for block in self.blocks:
                    hidden.append(block(hidden[-1], None))
                self.cache.append(hidden)

    @torch.inference_mode()
    def embeddings(self, first_block: int) -> np.ndarray:
        out = []
        for hidden in self.cache:
            h = hidden[first_block]
            for block in self.blocks[first_block:]:
                h = block(h, None)
            e = self.model.visual_projection(self.vision.post_layernorm(h[:, 0]))
            out.append((e / e.norm(dim=-1, keepdim=True))[0].numpy())
        return np.stack(out)


def summary(emb: np.ndarray, ref_img: np.ndarray, ref_text: np.ndarray, scale: float, tol: dict) -> dict:
    def scores(img):
        out = []
        for t in ref_text:
            s = scale * (img @ t)
            p = np.exp(s - s.max())
            out.append((s, p / p.sum()))
        return out

    gate = compare_scores(scores(ref_img), scores(emb), tol["max_abs_score_diff"])
    report = {"error_energy": float(((emb - ref_img) ** 2).sum(-1).mean()),
              "min_cosine_image": float(cosine_rows(ref_img, emb).min()),
              **{k: gate[k] for k in ("max_abs_score_diff", "mean_abs_score_diff", "max_abs_prob_diff",
                                      "pairwise_order_agreement", "n_decisive_pairs", "decisive_pair_flips",
                                      "decisive_top1_agreement", "rank_agreement", "best_of_n_regret_mean",
                                      "best_of_n_regret_max")}}
    report["gate_failures"] = failures({**gate, **report}, tol)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--stress", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attribute", action="store_true", help="each role and each block alone, then --keep")
    ap.add_argument("--keep", default="1,2,4,8", help="numbers of most-attributed blocks to keep fp32, each run whole")
    ap.add_argument("--variants", default="", help="plans to emulate whole, separated by commas: ROLE=MODE items "
                    "joined by '+', applied in order over the shipped plan; ROLE: qkv, attn_out, mlp_up, mlp_down, "
                    "projection or all; MODE: fp32 or a weight mode (tensor, channel, channel7, channel_u8)")
    ap.add_argument("--check-against", help="artifacts dir: also embed the verify images with its int8 ONNX tower")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    source = ModelSource(model=args.model, random_init=args.random_init, seed=args.seed, stress=args.stress)
    ref = Reference(source)
    model = ref.model
    tol = model_info()["tolerances"]["int8"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp))
        ref_img, ref_text = ref.image_embeddings(paths), ref.text_embeddings(PROMPTS)
        pixels = ref.processor(images=[Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
        onnx_int8 = None
        if args.check_against:
            from pickscore_runtime.scorer import PickScorer

            scorer = PickScorer.load(args.check_against, backend="onnx-cpu", precision="int8")
            onnx_int8 = scorer.embed_images([str(p) for p in paths])
            scorer.close()
    scale = float(model.logit_scale.detach().exp())
    calib = calibration_pixels(PreprocessConfig.from_json(model_info()["preprocessing"]), INT8_CALIBRATION_IMAGES)
    emulated = install_emulation(model, calib, INT8_PLAN["smooth_alpha"], INT8_PLAN["smooth_min_outlier_ratio"])
    runner = VisionRunner(model, pixels)
    n_blocks = len(runner.blocks)
    result: dict = {"weights": source.weights_kind, "plan": INT8_PLAN, "n_blocks": n_blocks,
                    "smoothed_inputs": sum(m.smooth is not None for m in emulated.values()),
                    "fp32_check": summary(runner.embeddings(0), ref_img, ref_text, scale, tol)}
    print(f"[{time.perf_counter() - t0:.0f}s] fp32 through the runner: max |dscore| {result['fp32_check']['max_abs_score_diff']:.2g}", flush=True)
    if onnx_int8 is not None:
        result["onnx_int8"] = summary(onnx_int8, ref_img, ref_text, scale, tol)

    def role_of(name: str) -> str:
        return name if name == "projection" else next(r for r, names in ROLES.items() if name.split(".", 1)[1] in names)

    def run(modes: dict[str, str | None], label: str) -> dict:
        """modes: Linear name -> weight mode; the others run fp32."""
        for name, m in emulated.items():
            m.set_mode(modes.get(name))
        first = min((int(n.split(".")[0]) for n, mode in modes.items() if mode and n != "projection"), default=n_blocks)
        r = summary(runner.embeddings(first), ref_img, ref_text, scale, tol)
        print(f"[{time.perf_counter() - t0:.0f}s] {label}: energy {r['error_energy']:.3e} min cos {r['min_cosine_image']:.5f} "
              f"max |dscore| {r['max_abs_score_diff']:.3f} pairwise {r['pairwise_order_agreement']:.4f} "
              f"flips {r['decisive_pair_flips']} gate {'passes' if not r['gate_failures'] else 'fails'}", flush=True)
        return r

    def shipped(names) -> dict[str, str]:
        return {n: "tensor" for n in names}

    everything = set(emulated)
    result["all_int8"] = run(shipped(everything), "all int8")
    result["variants"] = {}
    for spec in (v for v in args.variants.split(",") if v):
        modes = shipped(everything)
        for item in spec.split("+"):
            role, _, mode = item.partition("=")
            if mode not in WEIGHT_MODES + ("fp32",) or role not in (*ROLES, "projection", "all"):
                raise SystemExit(f"variant {spec!r}: {item!r} is not ROLE=MODE")
            modes.update({n: None if mode == "fp32" else mode for n in everything if role in ("all", role_of(n))})
        result["variants"][spec] = run(modes, spec)
    if not args.attribute:
        return finish(result, args.json, t0)
    result["roles_alone"] = {role: run(shipped(n for n in everything if role_of(n) == role), f"only {role}")
                             for role in (*ROLES, "projection")}
    result["blocks_alone"] = [run(shipped(n for n in everything if n.startswith(f"{i}.")), f"only block {i}")
                              for i in range(n_blocks)]
    order = sorted(range(n_blocks), key=lambda i: -result["blocks_alone"][i]["error_energy"])
    result["blocks_by_energy"] = order
    result["sum_of_blocks_alone"] = sum(b["error_energy"] for b in result["blocks_alone"])
    result["keep_fp32"] = {}
    for k in (int(x) for x in args.keep.split(",") if x):
        kept = set(order[:k])
        r = run(shipped(n for n in everything if n == "projection" or int(n.split(".")[0]) not in kept), f"blocks {sorted(kept)} fp32")
        result["keep_fp32"][k] = {"blocks": sorted(kept), **r}
    finish(result, args.json, t0)


def finish(result: dict, out: str, t0: float) -> None:
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
