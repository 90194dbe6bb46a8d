"""Where the model comes from: a hub id, a local Hugging Face folder, or seeded random weights built
from a folder's config.json (for machines without the weights; loudly labelled everywhere).

PickScore's own config, tokenizer and processor files ship with the package (`pickscore_models`): the
PickScore hub id with random weights builds from them, and the processor's tokenizer files come from
them, so neither touches the network."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pickscore_models import model_info, pickscore_v1_dir
from pickscore_runtime.artifacts import sha256_file
from pickscore_runtime.errors import PickScoreError

log = logging.getLogger("pickscore")

# What the runtime and the reference read; the slow tokenizer's files come along when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json")
SLOW_TOKENIZER_FILES = ("vocab.json", "merges.txt")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
KNOWN = model_info("pickscore_v1")


class ModelSourceError(PickScoreError):
    """The model (weights, config or tokenizer files) cannot be loaded from the given source."""


@dataclass(frozen=True)
class ModelSource:
    model: str = KNOWN["hub_id"]  # hub id or local folder (None: the hub id)
    random_init: bool = False
    seed: int = 0
    stress: bool = False  # with random_init: plant trained-ViT-like activation outliers (see stress.py)
    revision: str | None = None  # a hub branch, tag or commit, as asked for
    processor: str = KNOWN["processor_hub_id"]  # tokenizer/processor files when the model folder lacks them
    commit: str | None = None  # the hub commit `revision` resolved to (see resolved()); what is loaded

    def __post_init__(self) -> None:
        if self.model is None:  # no --model: PickScore itself (with random_init, its bundled files)
            object.__setattr__(self, "model", KNOWN["hub_id"])
        if self.stress and not self.random_init:
            raise ModelSourceError("--stress plants outliers into random weights: it needs --random-init")

    @property
    def weights_kind(self) -> str:
        """'trained', 'random' or 'random+stress': what verify reports the gate ran on."""
        return "trained" if not self.random_init else "random+stress" if self.stress else "random"

    @property
    def bundled_dir(self) -> Path | None:
        """The package's own copy of PickScore's config and tokenizer files, when it is what this source
        builds from: the PickScore hub id with random weights (no weights to fetch, so no hub revision to
        pin: the config is the published architecture). A hub revision asked for goes to the hub."""
        if self.random_init and self.model == KNOWN["hub_id"] and self.revision is None and self.commit is None:
            return pickscore_v1_dir()
        return None

    @property
    def local_dir(self) -> Path | None:
        """The folder the model is read from: a local folder, or the bundled files (see bundled_dir)."""
        path = Path(self.model).expanduser()
        return path if path.is_dir() else self.bundled_dir

    def resolved(self) -> "ModelSource":
        """This source with a hub revision pinned to the commit it names now (a local folder as it is). The
        export cache is keyed on the commit, so a moved branch is a new export, never a stale one."""
        if self.local_dir is not None or self.commit is not None:
            return self
        return dataclasses.replace(self, commit=hub_snapshot(self.model, self.revision).name)

    def describe(self) -> dict[str, Any]:
        """The manifest's `source` section: where the weights came from and their hashes."""
        d: dict[str, Any] = {"model": self.model}
        local = self.local_dir
        if local is not None and local == self.bundled_dir:  # no path: the installed package's, wherever it is
            d["kind"] = "bundled"
            d["files"] = "pickscore_models/" + local.name
            d["config_sha256"] = sha256_file(local / "config.json")
        elif local is not None:
            d["kind"] = "local"
            d["path"] = str(local.resolve())
            d["config_sha256"] = sha256_file(local / "config.json")
            if not self.random_init:
                d["weights_sha256"] = {p.name: sha256_file(p) for p in _weight_files(local)}
        else:
            d["kind"] = "hub"
            d["revision"] = self.revision or "main"
            if self.commit is not None:
                d["commit"] = self.commit
                d["weights_sha256"] = hub_weight_hashes(hub_snapshot(self.model, self.commit))
        if self.random_init:
            d["random_init"] = {"seed": self.seed, "logit_scale": KNOWN["logit_scale"], "stress": self.stress}
        return d

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "ModelSource":
        """The source an artifacts directory was exported from, as its manifest records it."""
        src = manifest["model"]["source"]
        random = src.get("random_init")
        hub = src.get("kind") == "hub"
        return cls(model=src.get("path") or src["model"], random_init=bool(random),
                   seed=int(random["seed"]) if random else 0, stress=bool(random and random.get("stress")),
                   revision=src.get("revision") if hub else None, commit=src.get("commit") if hub else None)

    def cache_key(self, content_hash=sha256_file) -> dict[str, Any]:
        """Identity for the user export cache: the hub commit, or the content hashes of a local folder's
        config and weights (`content_hash`: a memoised sha256 for gigabytes of weights)."""
        key: dict[str, Any] = {"model": self.model, "random_init": self.random_init, "seed": self.seed,
                               "stress": self.stress}
        local = self.local_dir
        if local is not None:
            files = [local / "config.json"] + ([] if self.random_init else _weight_files(local))
            key["sha256"] = {p.name: content_hash(p) for p in files if p.exists()}
        else:
            key["commit"] = self.resolved().commit
        return key


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern))


@functools.lru_cache(maxsize=32)
def hub_snapshot(model: str, revision: str | None) -> Path:
    """The local snapshot folder of `model` at `revision` (its name is the commit). Online this asks the hub
    where the revision points now; offline it reads the local cache's record of it. Asked once per process:
    resolving, describing, the tokenizer files and the cost estimate of one export all need it."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, allow_patterns=["config.json"]))
    except Exception as e:  # noqa: BLE001 - hub errors vary by version; all mean "cannot resolve it"
        source = ModelSource(model, revision=revision)
        raise ModelSourceError(_no_weights_message(source, str(e).splitlines()[0] if str(e) else type(e).__name__)) from None


def hub_weight_hashes(snapshot: Path) -> dict[str, str]:
    """SHA-256 of the weight files present in a hub snapshot. The hub cache stores large files as blobs
    named by their SHA-256, so those are read from the link, not hashed again."""
    out = {}
    for path in _weight_files(snapshot):
        blob = path.resolve().name
        out[path.name] = blob if re.fullmatch(r"[0-9a-f]{64}", blob) else sha256_file(path)
    return out


def _no_weights_message(source: ModelSource, detail: str) -> str:
    return (
        f"cannot load the weights of {source.model!r} ({detail}). "
        "Without network access, download the model elsewhere and pass --model DIR (a Hugging Face folder "
        "with config.json and weights), or, to exercise every code path offline with meaningless scores, "
        "pass --random-init (PickScore's own config, shipped with the package; or --model DIR --random-init "
        "where DIR holds a config.json)."
    )


def load_clip(source: ModelSource):
    """The transformers CLIPModel (eval, fp32) for `source`."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    local = source.local_dir
    if source.random_init:
        if local is None or not (local / "config.json").is_file():
            raise ModelSourceError(f"--random-init builds from a config.json: give --model DIR with one, or no --model "
                                   f"(PickScore's own, shipped with the package); {source.model!r} is not such a folder")
        config = CLIPConfig.from_pretrained(local)
        log.warning("building %s with RANDOM weights (seed %d): scores will be meaningless", source.model, source.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(source.seed)
            model = CLIPModel(config)
        with torch.no_grad():
            model.logit_scale.fill_(KNOWN["logit_scale"])
        model.eval()
        if source.stress:
            from . import stress

            log.warning("planting trained-ViT-like activation outliers (--stress)")
            model.pickscore_stress = stress.plant_outliers(model, source.seed, *stress.calibration_inputs(tokenizer_files(source)))
        return model
    if local is not None and not _weight_files(local):
        raise ModelSourceError(_no_weights_message(source, f"no *.safetensors or *.bin in {local}"))
    try:
        model = CLIPModel.from_pretrained(str(local or source.model), revision=source.commit or source.revision)
    except (OSError, ValueError) as e:  # huggingface_hub's offline/not-found errors are OSErrors
        raise ModelSourceError(_no_weights_message(source, str(e).splitlines()[0])) from None
    return model.eval()


def tokenizer_files(source: ModelSource, dest: Path | None = None) -> Path:
    """A folder holding tokenizer.json and preprocessor_config.json for `source`: the model folder when
    it has them, else the processor repo (the model card takes them from laion's ViT-H-14 repo; the
    package ships byte-identical copies of those, used instead of the hub)."""
    local = source.local_dir
    if local is None and source.commit is not None:
        local = hub_snapshot(source.model, source.commit)  # a hub repo that carries its own tokenizer files
    if local is not None and (local / "tokenizer.json").is_file():
        return local
    if source.processor == KNOWN["processor_hub_id"]:
        return pickscore_v1_dir()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.processor, allow_patterns=list(TOKENIZER_FILES)))
    except Exception as e:  # noqa: BLE001 - hub errors vary by version; all mean "cannot get the files"
        raise ModelSourceError(
            f"cannot get tokenizer/processor files from {source.processor!r} ({str(e).splitlines()[0]}); "
            "pass --model DIR where DIR also holds tokenizer.json and preprocessor_config.json"
        ) from None


def read_preprocessing(files: Path) -> dict[str, Any]:
    """preprocessor_config.json in the runtime's normalised form (falls back to the known constants)."""
    path = files / "preprocessor_config.json"
    known = dict(KNOWN["preprocessing"])
    if not path.is_file():
        return known
    cfg = json.loads(path.read_text())
    size, crop = cfg.get("size", known["shortest_edge"]), cfg.get("crop_size", known["crop_size"])
    resample = {2: "bilinear", 3: "bicubic"}.get(cfg.get("resample", 3))
    if resample is None:
        raise ModelSourceError(f"{path}: unsupported resample {cfg.get('resample')!r}")
    return {
        "shortest_edge": size["shortest_edge"] if isinstance(size, dict) else int(size),
        "crop_size": crop["height"] if isinstance(crop, dict) else int(crop),
        "resample": resample,
        "rescale_factor": cfg.get("rescale_factor", known["rescale_factor"]),
        "image_mean": cfg.get("image_mean", known["image_mean"]),
        "image_std": cfg.get("image_std", known["image_std"]),
    }


def read_tokenizer_settings(files: Path, model_max_positions: int) -> dict[str, Any]:
    cfg_path = files / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    pad = cfg.get("pad_token", "<|endoftext|>")
    pad = pad["content"] if isinstance(pad, dict) else pad
    max_length = min(int(cfg.get("model_max_length", model_max_positions)), model_max_positions)
    return {"max_length": max_length, "pad_token": pad, "padding": "longest", "truncation": True}

