"""The tiny random CLIP used by tests and benchmark smoke runs: models/tiny_clip/config.json with the
real PickScore tokenizer/processor files, so every code path but the sizes is the real one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pickscore_models import tiny_clip_config_path

from .source import SLOW_TOKENIZER_FILES, TOKENIZER_FILES

REPO = Path(__file__).resolve().parents[1]


def shared_model_dir() -> Path:
    """The real PickScore config and tokenizer files (no weights): $PICKSCORE_SHARED_MODEL_DIR, else the
    project's ../shared/models/pickscore_v1 beside a source checkout."""
    return Path(os.environ.get("PICKSCORE_SHARED_MODEL_DIR", REPO.parent / "shared" / "models" / "pickscore_v1"))


def make_tiny_model_dir(dest: Path, tokenizer_dir: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tiny_clip_config_path(), dest / "config.json")
    for name in TOKENIZER_FILES + SLOW_TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, dest / name)
    return dest
