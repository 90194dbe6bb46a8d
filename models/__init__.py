"""What the project knows about each supported model, as data files.

`<name>.json` describes a model (hub ids, dims, preprocessing constants, expected logit scale and the
numerics-gate tolerances per precision); `tiny_clip/config.json` is the tiny random CLIP the tests use.
Kept as an import package only so the files ship inside the wheel.
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


def tiny_clip_config_path() -> Path:
    return Path(str(resources.files(__name__) / "tiny_clip" / "config.json"))
