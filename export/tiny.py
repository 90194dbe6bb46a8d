"""The tiny random CLIP used by tests and benchmark smoke runs: models/tiny_clip/config.json with the
real PickScore tokenizer/processor files (shipped in the package beside it), so every code path but the
sizes is the real one. Nothing here reads outside the installed package or touches the network."""

from __future__ import annotations

import shutil
from pathlib import Path

from pickscore_models import pickscore_v1_dir, tiny_clip_config_path

from .source import SLOW_TOKENIZER_FILES, TOKENIZER_FILES


def make_tiny_model_dir(dest: Path, tokenizer_dir: Path | None = None) -> Path:
    """A Hugging Face model folder at `dest`: the tiny config plus the tokenizer/processor files of
    `tokenizer_dir` (default: PickScore's own, shipped with the package)."""
    tokenizer_dir = pickscore_v1_dir() if tokenizer_dir is None else Path(tokenizer_dir)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tiny_clip_config_path(), dest / "config.json")
    for name in TOKENIZER_FILES + SLOW_TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, dest / name)
    return dest
