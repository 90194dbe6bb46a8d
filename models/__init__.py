"""What the project knows about each supported model, as data files.

`<name>.json` describes a model (hub ids, dims, preprocessing constants, expected logit scale and the
numerics-gate tolerances per precision); `pickscore_v1/` holds PickScore v1's config, tokenizer and
processor files (no weights; see its PROVENANCE.md), so `--random-init` builds the full-size model
offline; `tiny_clip/config.json` is the tiny random CLIP the tests and the wheel smoke test use (with
the tokenizer files of `pickscore_v1/`). Kept as an import package only so the files ship inside the wheel.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "pickscore_v1"


def model_info(name: str = DEFAULT_MODEL) -> dict[str, Any]:
    """The data file for a known model, e.g. ``model_info("pickscore_v1")["tolerances"]["fp32"]``."""
    path = resources.files(__name__) / f"{name}.json"
    if not path.is_file():
        known = sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))
        raise KeyError(f"unknown model {name!r}; known: {', '.join(known)}")
    return json.loads(path.read_text())


def model_files_dir(name: str = DEFAULT_MODEL) -> Path:
    """The folder of a known model's config, tokenizer and processor files (no weights), inside the
    installed package: a Hugging Face model folder that `--random-init` builds from."""
    folder = Path(str(resources.files(__name__) / name))
    if not (folder / "config.json").is_file():
        raise KeyError(f"no bundled model files for {name!r} (looked in {folder})")
    return folder


def pickscore_v1_dir() -> Path:
    """PickScore v1's config.json, tokenizer and processor files, shipped with the package."""
    return model_files_dir("pickscore_v1")


def tiny_clip_dir() -> Path:
    """The tiny random CLIP's folder (config.json only: the export takes the tokenizer and processor files
    from pickscore_v1_dir(), as for any folder without them). `pickscore export --model DIR --random-init`."""
    return Path(str(resources.files(__name__) / "tiny_clip"))


def tiny_clip_config_path() -> Path:
    return tiny_clip_dir() / "config.json"
