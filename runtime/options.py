"""One typed set of scorer settings, shared by `PickScorer`, the CLI, the server and the Ray job: each
setting is declared once here, checked once (before anything is exported, loaded or started), and
reaches every entry point through `ScorerOptions` and its one argparse helper (`add_arguments` /
`from_args`). Backend options are declared by each backend (`backends.registry.BackendInfo.options`);
an option no candidate backend declares is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .argtypes import csv_list, positive_float, positive_int
from .backends.registry import AUTO_ORDER, BACKENDS, backend_info, check_backend_options
from .errors import PickScoreError
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .precisions import NAMES as PRECISION_NAMES

HASH_CHECKS = ("full", "size")


@dataclass(frozen=True)
class DecodeOptions:
    """How images become pixels. The defaults follow the reference's arithmetic exactly; jpeg_draft and
    reducing_gap are opt-in speed-ups that change scores slightly (docs/reliability.md: their effect)."""

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images are refused by name
    jpeg_draft: bool = False  # decode large JPEGs at 1/2-1/8 scale in the DCT domain
    reducing_gap: float | None = None  # PIL's reducing_gap for the resize (e.g. 2 or 3)
    apply_exif_orientation: bool = False  # rotate by the EXIF tag (the reference does not)

    def __post_init__(self) -> None:
        if not isinstance(self.max_image_pixels, int) or self.max_image_pixels < 1:
            raise PickScoreError(f"max_image_pixels must be a whole number of at least 1, got {self.max_image_pixels!r}")
        if self.reducing_gap is not None and not self.reducing_gap >= 1.0:
            raise PickScoreError(f"reducing_gap must be 1.0 or more, got {self.reducing_gap!r}")

    def preparer_options(self) -> dict[str, Any]:
        """ImagePreparer's keyword arguments."""
        return dataclasses.asdict(self)


DECODE_FIELDS = tuple(f.name for f in dataclasses.fields(DecodeOptions))


@dataclass(frozen=True)
class ScorerOptions:
    """Everything a scorer is opened with besides the artifacts. Frozen and plain data: it pickles to Ray
    actors and server replicas. Build one with keyword arguments, or flat with `ScorerOptions.of(...)`
    (decode settings and backend options by name)."""

    backend: str = "auto"  # a registry name, or "auto": the fastest that can run here
    precision: str | None = None  # None: the backend's first that the artifacts carry (auto: gated ones only)
    batch_size: int | None = None  # images per backend call (None: the backend's default)
    threads: int | None = None  # CPU threads per backend (None: all cores)
    workers: int | None = None  # image decoding threads (None: cores, at most 8)
    hash_check: str = "full"  # "size": skip the artifacts' SHA-256 on load (sizes still checked)
    text_cache_file: str | None = None  # SQLite file keeping text embeddings across runs and processes
    text_cache_size: int = 4096  # the in-memory LRU of text embeddings
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    backend_options: Mapping[str, Any] = field(default_factory=dict, hash=False)  # declared by the backends (registry)

    def __post_init__(self) -> None:
        if self.backend != "auto":
            backend_info(self.backend)  # an unknown name is refused there, with a suggestion
        if self.precision is not None and self.precision not in PRECISION_NAMES:
            raise PickScoreError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISION_NAMES)}")
        if self.precision is not None and self.backend != "auto" and self.precision not in BACKENDS[self.backend].precisions:
            raise PickScoreError(f"backend {self.backend} runs {', '.join(BACKENDS[self.backend].precisions)}, "
                                 f"not {self.precision}")
        if self.precision is not None and self.backend == "auto" and \
                not any(self.precision in BACKENDS[n].precisions for n in AUTO_ORDER):
            raise PickScoreError(f"no backend auto may pick runs {self.precision}; name one with backend=")
        for name in ("batch_size", "threads", "workers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise PickScoreError(f"{name} must be a whole number of at least 1, got {value!r}")
        if not isinstance(self.text_cache_size, int) or self.text_cache_size < 0:
            raise PickScoreError(f"text_cache_size must be a whole number, got {self.text_cache_size!r}")
        if self.hash_check not in HASH_CHECKS:
            raise PickScoreError(f"hash_check must be one of {', '.join(HASH_CHECKS)}, got {self.hash_check!r}")
        if self.text_cache_file is not None:
            object.__setattr__(self, "text_cache_file", os.fspath(self.text_cache_file))
        if not isinstance(self.decode, DecodeOptions):
            raise PickScoreError(f"decode must be DecodeOptions, got {type(self.decode).__name__}")
        object.__setattr__(self, "backend_options", dict(self.backend_options))
        check_backend_options(self.backend, self.backend_options)

    # ---- building ---------------------------------------------------------------------------------
    @classmethod
    def of(cls, **settings: Any) -> "ScorerOptions":
        """From flat keyword arguments: ScorerOptions fields, DecodeOptions fields (max_image_pixels, ...)
        and backend options (e.g. tensorrt's build=False) by name."""
        return cls().replace(**settings)

    def replace(self, **settings: Any) -> "ScorerOptions":
        """A copy with flat settings changed (as `of` takes them); backend options are merged."""
        own = {f.name for f in dataclasses.fields(self)} - {"decode", "backend_options"}
        mine = {k: v for k, v in settings.items() if k in own}
        decode = {k: v for k, v in settings.items() if k in DECODE_FIELDS}
        if "decode" in settings:
            mine["decode"] = settings["decode"]
        backend_options = {**self.backend_options, **settings.get("backend_options", {}),
                           **{k: v for k, v in settings.items() if k not in own | set(DECODE_FIELDS)
                              | {"decode", "backend_options"}}}
        base = mine.pop("decode", self.decode)
        return dataclasses.replace(self, **mine, decode=dataclasses.replace(base, **decode),
                                   backend_options=backend_options)

    # ---- what depends on it -----------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """The settings scores depend on (a resumed run refuses to mix others)."""
        return {"backend": self.backend, "precision": self.precision, **self.decode.preparer_options()}

    def backend_kwargs(self) -> dict[str, Any]:
        """`open_backend`'s keyword arguments."""
        return {"batch_size": self.batch_size, "threads": self.threads, **self.backend_options}

    # ---- the one argparse helper ------------------------------------------------------------------
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, *, batch_flags: tuple[str, ...] = ("--batch-size",),
                      backend_choices: tuple[str, ...] | None = None, several_precisions: bool = False) -> None:
        """The scorer's flags, the same on `score` and `serve` (and the Ray job, through `score --ray`).
        several_precisions: --precision takes a comma-separated list (`eval preference`; see `per_precision`)."""
        names = backend_choices or ("auto", *BACKENDS)
        gpu = " > ".join(n for n in AUTO_ORDER if BACKENDS[n].device == "cuda")
        group = parser.add_argument_group("scorer")
        group.add_argument("--backend", default="auto", choices=names,
                           help=f"inference backend (default auto: the fastest that can run here, {gpu} > openvino (int8 "
                                "where it passed `pickscore verify` on this CPU, which has VNNI) > onnx-cpu)")
        about = ("fp32 (exact) | fp16 | int8 | bf16 (torch backends); default: the backend's first that the artifacts "
                 "carry (auto: int8 on a CPU where it passed the gate)")
        if several_precisions:
            group.add_argument("--precision", default=None, type=csv_list(PRECISION_NAMES), metavar="P[,P...]",
                               help="one or several, comma-separated, evaluated side by side: " + about)
        else:
            group.add_argument("--precision", default=None, choices=PRECISION_NAMES, help=about)
        group.add_argument(*batch_flags, dest="batch_size", type=positive_int, default=None, metavar="N",
                           help="images per backend call (default: per backend)")
        group.add_argument("--threads", type=positive_int, default=None, metavar="N",
                           help="CPU threads per backend (default: all cores)")
        group.add_argument("--workers", type=positive_int, default=None, metavar="N",
                           help="image decoding threads (default: cores, at most 8); with score --ray: scorer actors")
        group.add_argument("--hash-check", choices=HASH_CHECKS, default="full",
                           help="full: check every artifact's SHA-256 on load (default); size: sizes only, faster")
        group.add_argument("--text-cache", dest="text_cache_file", default=None, metavar="FILE",
                           help="SQLite file caching text embeddings across runs and processes")
        group.add_argument("--max-image-pixels", type=positive_int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                           help="refuse images with more pixels than this (default 8192x8192)")
        group.add_argument("--jpeg-draft", action="store_true",
                           help="fast decoding, not exact: decode large JPEGs at 1/2-1/8 scale (docs/reliability.md)")
        group.add_argument("--reducing-gap", type=positive_float, default=None, metavar="G",
                           help="fast resizing, not exact: PIL's reducing_gap, 1.0 or more (e.g. 2 or 3)")
        group.add_argument("--no-build", action="store_true",
                           help="with --backend tensorrt: refuse (exit 2) instead of building a missing engine (minutes)")

    @classmethod
    def per_precision(cls, args: argparse.Namespace) -> list["ScorerOptions"]:
        """One ScorerOptions per precision of a several_precisions --precision (one with none given)."""
        base = cls.from_args(argparse.Namespace(**{**vars(args), "precision": None}))
        return [base.replace(precision=p) for p in args.precision] if args.precision else [base]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ScorerOptions":
        """The options `add_arguments`' flags describe (checked: a bad combination raises PickScoreError)."""
        return cls(backend=args.backend, precision=args.precision, batch_size=args.batch_size, threads=args.threads,
                   workers=args.workers, hash_check=args.hash_check, text_cache_file=args.text_cache_file,
                   decode=DecodeOptions(max_image_pixels=args.max_image_pixels, jpeg_draft=args.jpeg_draft,
                                        reducing_gap=args.reducing_gap),
                   backend_options={"build": False} if args.no_build else {})
