"""The tiny random CLIP used by tests and benchmark smoke runs: models/tiny_clip/config.json with the
real PickScore tokenizer/processor files, so every code path but the sizes is the real one."""

from __future__ import annotations

import shutil
from pathlib import Path

from pickscore_models import tiny_clip_config_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "preprocessor_config.json", "vocab.json", "merges.txt")


def make_tiny_model_dir(dest: Path, tokenizer_dir: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tiny_clip_config_path(), dest / "config.json")
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, dest / name)
    return dest
