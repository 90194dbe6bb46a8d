"""What it costs a CPU core to turn a generator's output file into CLIP pixels (decode + convert + bicubic
resize + crop + normalise, the runtime's ImagePreparer), and how many cores feed one GPU.

    python benchmarks/experiments/decode_cost.py [--n 24] [--json benchmarks/results/DATE-MACHINE/decode_cost.json]

For 512x512 and 1024x1024 JPEG (quality 90), PNG and WEBP (quality 90) images of generated content, on
disk: ms per image on one thread; img/s with every core as threads (PIL releases the GIL while it
decodes and resizes) and as processes; the same for the opt-in fast paths (JPEG draft, reducing_gap).
From the single-core cost, the cores one GPU needs at the GPU issue's TARGET throughput (TensorRT fp16,
2,000 img/s per H100: a target, not a measurement) and at the measured CPU int8 rate.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from pickscore_export.samples import synthetic_image
from pickscore_models import model_info
from pickscore_runtime.image_preparer import ImagePreparer
from pickscore_runtime.preprocess import PreprocessConfig, Preprocessor

FORMATS = {"JPEG": {"quality": 90}, "PNG": {}, "WEBP": {"quality": 90}}
SIZES = (512, 1024)
MODES = {"exact": {}, "jpeg-draft": {"jpeg_draft": True}, "reducing-gap-2": {"reducing_gap": 2.0}}
GPU_TARGET_IMG_S = 2000.0  # the GPU issue's target for TensorRT fp16 on one H100 (not measured here)


def preparer(mode: str) -> ImagePreparer:
    return ImagePreparer(Preprocessor(PreprocessConfig.from_json(model_info()["preprocessing"])), **MODES[mode])


def prepare_all(args: tuple[str, list[str]]) -> int:
    mode, paths = args
    prep = preparer(mode)
    for p in paths:
        prep(p, p)
    return len(paths)


def throughput(mode: str, paths: list[str], workers: int, processes: bool) -> float:
    chunks = [paths[i::workers] for i in range(workers)]
    pool_type = ProcessPoolExecutor if processes else ThreadPoolExecutor
    with pool_type(workers) as pool:
        list(pool.map(prepare_all, [(mode, paths[:2])] * workers))  # warm-up (imports, first decode)
        t0 = time.perf_counter()
        done = sum(pool.map(prepare_all, [(mode, c) for c in chunks]))
        return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24, help="images per (format, size)")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="decode-cost-") as tmp:
        for size in SIZES:
            images = [synthetic_image(size, size, seed=700 + i) for i in range(args.n)]
            for fmt, options in FORMATS.items():
                paths = []
                for i, img in enumerate(images):
                    paths.append(str(Path(tmp) / f"{size}_{i}.{fmt.lower()}"))
                    img.save(paths[-1], fmt, **options)
                mb = sum(os.path.getsize(p) for p in paths) / len(paths) / 2**20
                for mode in MODES:
                    if mode == "jpeg-draft" and fmt != "JPEG":
                        continue
                    prep = preparer(mode)
                    prep(paths[0], paths[0])
                    t0 = time.perf_counter()
                    for p in paths:
                        prep(p, p)
                    ms = (time.perf_counter() - t0) / len(paths) * 1000
                    row = {"format": fmt, "size": size, "mode": mode, "file_mb": round(mb, 3), "ms_per_img_1_core": round(ms, 2),
                           "img_s_1_core": round(1000 / ms, 1),
                           f"img_s_{cores}_threads": round(throughput(mode, paths, cores, False), 1),
                           f"img_s_{cores}_processes": round(throughput(mode, paths, cores, True), 1),
                           "cores_per_gpu_at_2000_img_s_target": round(GPU_TARGET_IMG_S * ms / 1000, 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"cores": cores, "gpu_target_img_s": GPU_TARGET_IMG_S, "rows": rows},
                                                  indent=1) + "\n")


if __name__ == "__main__":
    main()
