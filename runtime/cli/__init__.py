"""`pickscore`: export, score, verify, bench, cache, info.

One vocabulary for every command: --artifacts DIR, --backend NAME, --precision P, --batch-size N,
--output FILE. Flags are validated before any export starts. Exit codes: 0 all good; 1 some items
unscored or verify failed; 2 usage or setup error (one line, no traceback); 3 internal error (the
traceback only with -v); 130 / 143 stopped by SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from pathlib import Path

from ..artifacts import PRECISION_ORDER
from ..backends import BACKENDS, PRECISIONS
from ..bench import DEFAULT_STAGES as BENCH_DEFAULT_STAGES
from ..bench import STAGES as BENCH_STAGES
from ..engines.profiles import DEFAULT_MAX_BATCH, DEFAULT_OPT_BATCH, DEFAULT_OPT_LEVEL
from ..errors import PickScoreError
from .console import EXIT_INTERNAL, EXIT_USAGE, say

log = logging.getLogger("pickscore")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def path_or_uri(text: str) -> Path | str:
    """A local path, or a URI (s3://, gs://, file://...) kept as written: Path would fold its '//'."""
    return text if "://" in text else Path(text)


def csv_list(choices: tuple[str, ...] | None = None):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if choices is not None and x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices or ())}; got {text!r}")
        return list(dict.fromkeys(items))
    return parse


def backend_spec(text: str) -> list[tuple[str, str | None]]:
    """bench's list of backend[:precision]."""
    out = []
    for item in csv_list()(text):
        name, _, precision = item.partition(":")
        if name not in BACKENDS:
            raise argparse.ArgumentTypeError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        if precision and precision not in BACKENDS[name].precisions:
            raise argparse.ArgumentTypeError(f"backend {name} runs {', '.join(BACKENDS[name].precisions)}, not {precision!r}")
        out.append((name, precision or None))
    return out


def add_source_args(p: argparse.ArgumentParser, default_model: str | None) -> None:
    p.add_argument("--model", default=default_model, metavar="MODEL",
                   help="hub id or local Hugging Face folder" + (f" (default {default_model})" if default_model else ""))
    p.add_argument("--random-init", action="store_true",
                   help="build the model from DIR/config.json with seeded RANDOM weights (offline testing only)")
    p.add_argument("--stress", action="store_true",
                   help="with --random-init: plant trained-ViT-like activation outliers (what makes fp16/int8 fragile)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed for --random-init (default 0)")
    p.add_argument("--revision", default=None, metavar="REV",
                   help="with a hub id: the branch, tag or commit to use (default main; recorded as the commit it resolves to)")


def add_gate_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true",
                   help="skip the numerics gate that ends an export of fp16/int8 (auto then serves fp32 until "
                        "`pickscore verify` passes)")


def add_backend_args(p: argparse.ArgumentParser, default_backend: str = "auto") -> None:
    p.add_argument("--backend", default=default_backend, choices=["auto", *BACKENDS],
                   help=f"inference backend (default {default_backend}; auto = the fastest that can run here, "
                        f"in the order {' > '.join(n for n in BACKENDS if BACKENDS[n].device == 'cuda')} > onnx-cpu)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="fp32 (exact) | fp16 | int8 | bf16 (torch backends); default: the backend's first that the "
                        "artifacts carry (with --backend auto on a CPU: int8 when exported)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help="CPU threads per backend (default: all cores)")
    p.add_argument("--hash-check", choices=["full", "size"], default="full",
                   help="full: check every artifact's SHA-256 on load (default); size: sizes only, faster")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="pickscore", description="PickScore v1: export, fast scoring, numerics checks")
    parser.add_argument("--version", action="version", version=f"pickscore-runtime {__version__}")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="log details, show library warnings and tracebacks")
    loud.add_argument("-q", "--quiet", action="store_true", help="hide warnings (errors are still printed)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="export the text and vision towers to ONNX")
    add_source_args(p, default_model="yuvalkirstain/PickScore_v1")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="artifacts directory to create")
    p.add_argument("--precision", default=["fp32"], type=csv_list(PRECISION_ORDER),
                   help="comma-separated: fp32, fp16, int8 (default fp32)")
    p.add_argument("--force", action="store_true", help="replace an existing artifacts directory (nothing else)")
    add_gate_arg(p)
    p.add_argument("--int8-plan", default="default", metavar="NAME",
                   help="how the int8 vision tower is quantised: default (passes gate v3 on plain and stress weights) "
                        "or fast (~25 %% faster on an AVX2 CPU; fails stress weights narrowly): the gate at export judges either")

    p = sub.add_parser("score", help="score images against prompts")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--artifacts", type=Path, metavar="DIR", help="an exported artifacts directory")
    where.add_argument("--model", metavar="MODEL",
                       help="hub id or local folder: exported on first use into the user cache with what the backend "
                            "runs fast (CPU: fp32 + int8; GPU: fp32 + fp16), gated, then reused (needs [export])")
    p.add_argument("--random-init", action="store_true", help="with --model DIR: RANDOM weights (testing only)")
    p.add_argument("--stress", action="store_true", help="with --random-init: plant trained-ViT-like activation outliers")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed for --random-init (default 0)")
    p.add_argument("--revision", default=None, metavar="REV",
                   help="with --model HUB_ID: the branch, tag or commit (default main; the cache is keyed on the commit)")
    add_gate_arg(p)
    work = p.add_mutually_exclusive_group(required=True)
    work.add_argument("--prompt", metavar="TEXT", help="score IMAGE... (files, directories, globs) against this prompt")
    work.add_argument("--input", type=path_or_uri, metavar="FILE", help="CSV / JSONL / Parquet with prompt and image (or images) columns, "
                                                 "optional id and group")
    p.add_argument("images", nargs="*", help="image files, directories or quoted globs (with --prompt)")
    p.add_argument("--output", type=path_or_uri, metavar="FILE", help="write result rows here (.csv, .jsonl or .parquet), committed in parts")
    p.add_argument("--commit-rows", type=positive_int, default=2000, metavar="N",
                   help="commit --output every N rows or 10 s, whichever comes first (default 2000): a crash loses at most that")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="keep the rows --output already holds; score only the rest")
    again.add_argument("--overwrite", action="store_true", help="replace an existing --output (atomically, at the end)")
    add_backend_args(p)
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N", help="images per backend call (default: per backend)")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="image decoding threads (default: cores, at most 8); with --ray: scorer actors")
    p.add_argument("--text-cache", type=Path, default=None, metavar="FILE", help="SQLite file caching text embeddings across runs")
    p.add_argument("--max-image-pixels", type=positive_int, default=None, metavar="N",
                   help="refuse images with more pixels than this (default 8192x8192)")
    p.add_argument("--jpeg-draft", action="store_true",
                   help="fast decoding, not exact: decode large JPEGs at 1/2-1/8 scale in the DCT domain (README: effect)")
    p.add_argument("--reducing-gap", type=float, default=None, metavar="G",
                   help="fast resizing, not exact: PIL's reducing_gap (e.g. 2 or 3; README: effect on scores)")
    p.add_argument("--json", action="store_true", help="with --prompt: print JSON instead of a table")
    p.add_argument("--ray", action="store_true",
                   help="scale out on a Ray cluster: --input SRC (a file or a directory of CSV / JSONL / Parquet / WebDataset "
                        ".tar files) -> --output OUT_DIR (Parquet files); --workers: scorer actors (default one per GPU); "
                        "resumable with --resume (needs the [ray] extra)")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="with --ray: the cluster to join (default: Ray's own choice)")
    p.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="with --ray: GPUs per scorer actor (default 1 where the cluster has GPUs; 0: CPU scorers of --threads cores)")
    p.add_argument("--no-build", action="store_true",
                   help="with --backend tensorrt: refuse (exit 2) instead of building a missing engine (which takes minutes)")

    p = sub.add_parser("cache", help="inspect a text-embedding cache file")
    p.add_argument("action", choices=["stats"], help="what to do")
    p.add_argument("path", type=Path, help="the SQLite cache file")

    p = sub.add_parser("verify", help="compare the runtime with the PyTorch reference (needs [export])")
    p.add_argument("--artifacts", required=True, type=Path, metavar="DIR", help="the exported artifacts directory to check")
    add_source_args(p, default_model=None)
    p.add_argument("--images", nargs="*", default=[], help="extra images besides the built-in generated set")
    p.add_argument("--backend", default="onnx-cpu", choices=list(BACKENDS), help="backend to check (default onnx-cpu)")
    p.add_argument("--precision", default=None, type=csv_list(PRECISIONS),
                   help="one or several (fp32,int8): the reference runs once for all (default: the backend's first)")
    p.add_argument("--reference-device", choices=["cpu", "cuda"], default="cpu",
                   help="where the fp32 reference runs (cuda: on the GPU with TF32 off; default cpu)")
    p.add_argument("--reference-cache", type=Path, default=None, metavar="DIR",
                   help="keep the reference's embeddings here and reuse them when the same model and images come again")
    p.add_argument("--output", type=Path, metavar="FILE", help="also write the report (a list for several precisions) here as JSON")

    p = sub.add_parser("bench", help="benchmark backends side by side on the same inputs")
    p.add_argument("--artifacts", required=True, type=Path, metavar="DIR", help="the exported artifacts directory")
    p.add_argument("--backends", default=[("onnx-cpu", "fp32")], type=backend_spec,
                   help="comma-separated backend[:precision], e.g. torch:fp32,torch:bf16,onnx-cpu:int8")
    p.add_argument("--batch-sizes", default=[1, 4, 8], type=lambda t: [positive_int(x) for x in csv_list()(t)],
                   help="comma-separated batch sizes (default 1,4,8)")
    p.add_argument("--stages", default=None, type=csv_list(BENCH_STAGES),
                   help=f"comma-separated, from {','.join(BENCH_STAGES)} (default {','.join(BENCH_DEFAULT_STAGES)})")
    p.add_argument("--e2e-images", type=positive_int, default=None, metavar="N",
                   help="images in the e2e folders (JPEG and PNG, 640x480; default twice the largest batch)")
    add_source_args(p, default_model=None)
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help="CPU threads per backend (default: all cores)")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="image decoding threads in the e2e stages (default: cores, at most 8)")
    p.add_argument("--min-calls", type=positive_int, default=3, metavar="N", help="timed calls per cell at least (default 3)")
    p.add_argument("--min-seconds", type=float, default=2.0, metavar="S",
                   help="and at least this much timed time per cell (default 2.0)")
    p.add_argument("--sequential", action="store_true",
                   help="open one backend at a time (per-backend peak memory) instead of timing all of them in "
                        "interleaved rounds (honest ratios on a machine whose speed drifts; the default)")
    p.add_argument("--output", type=Path, metavar="FILE", help="write rows + machine info here as JSON")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="write a markdown table here")
    p.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG chart here (needs the [bench] extra)")

    p = sub.add_parser("engine", help="build or list TensorRT engines for an artifacts directory")
    actions = p.add_subparsers(dest="engine_action", required=True, metavar="ACTION")
    e = actions.add_parser("build", help="build one engine per tower for this GPU and TensorRT (needs [tensorrt]; minutes)")
    e.add_argument("--artifacts", required=True, type=Path, metavar="DIR", help="the exported artifacts directory")
    e.add_argument("--precision", default="fp16", choices=["fp16", "fp32"],
                   help="which ONNX towers to build from (default fp16: the GPU precision plan)")
    e.add_argument("--max-batch", type=positive_int, default=DEFAULT_MAX_BATCH, metavar="N",
                   help=f"largest batch the engines take (default {DEFAULT_MAX_BATCH})")
    e.add_argument("--opt-batch", type=positive_int, default=DEFAULT_OPT_BATCH, metavar="N",
                   help=f"batch the engines are tuned for (default {DEFAULT_OPT_BATCH})")
    e.add_argument("--opt-level", type=int, default=DEFAULT_OPT_LEVEL, choices=range(6), metavar="0-5",
                   help=f"TensorRT builder optimisation level (default {DEFAULT_OPT_LEVEL}; higher builds longer)")
    e.add_argument("--workspace-gb", type=float, default=None, metavar="G",
                   help="builder workspace limit in GiB (default: TensorRT's, the device's memory)")
    e.add_argument("--timing-cache", type=Path, default=None, metavar="FILE",
                   help="persistent timing cache (default: beside the engines, per GPU and TensorRT version)")
    e.add_argument("--force", action="store_true", help="rebuild even if an engine with these settings exists")
    e.add_argument("--hash-check", choices=["full", "size"], default="full",
                   help="full: check every artifact's SHA-256 first (default); size: sizes only")
    e = actions.add_parser("list", help="list the recorded engines and whether this machine can load them")
    e.add_argument("--artifacts", required=True, type=Path, metavar="DIR", help="the exported artifacts directory")

    p = sub.add_parser("serve", help="serve scores over HTTP, batched across requests (needs [server])")
    p.add_argument("--artifacts", required=True, type=Path, metavar="DIR", help="the exported artifacts directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    add_backend_args(p)
    p.add_argument("--max-batch", type=positive_int, default=None, metavar="N",
                   help="images per backend call, taken from concurrent requests (default: the backend's batch size)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="M",
                   help="at most this long a ready image waits for images still being decoded to fill its batch (default 5)")
    p.add_argument("--max-queue", type=positive_int, default=64, metavar="Q",
                   help="requests in flight at most; more get 503 with Retry-After (default 64)")
    p.add_argument("--max-body-mb", type=float, default=64.0, metavar="N", help="request size limit, 413 above it (default 64)")
    p.add_argument("--request-timeout-s", type=float, default=300.0, metavar="S",
                   help="a request not answered in S seconds gets 504 (default 300)")
    p.add_argument("--api-key-file", type=Path, default=None, metavar="F",
                   help="require `Authorization: Bearer KEY` with a key from this file (one per line)")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N", help="image decoding threads (default: cores, at most 8)")
    p.add_argument("--text-cache", type=Path, default=None, metavar="FILE", help="SQLite file caching text embeddings across runs")
    p.add_argument("--max-image-pixels", type=positive_int, default=None, metavar="N",
                   help="refuse images with more pixels than this (default 8192x8192)")
    ray = p.add_argument_group("replicas on Ray Serve (needs [serve-ray])")
    ray.add_argument("--ray", metavar="ADDRESS", default=None,
                     help="run as a Ray Serve deployment: 'local' starts a local Ray, else a cluster address ('auto', ray://...)")
    ray.add_argument("--replicas", type=positive_int, default=1, metavar="N", help="replicas (default 1)")
    ray.add_argument("--replica-gpus", type=float, default=None, metavar="G", help="GPUs per replica (default 1 for GPU backends, else 0)")
    ray.add_argument("--replica-cpus", type=float, default=None, metavar="C", help="CPU cores per replica (default 1 with a GPU, else 2)")
    ray.add_argument("--ray-cpus", type=positive_int, default=None, metavar="N", help="with --ray local: cores Ray may use (default all)")
    ray.add_argument("--ray-object-store-mb", type=positive_int, default=None, metavar="M",
                     help="with --ray local: object store size (default Ray's)")

    p = sub.add_parser("info", help="describe an artifacts directory")
    p.add_argument("--artifacts", required=True, type=Path, metavar="DIR", help="the artifacts directory")
    return parser


def _show_warnings(verbose: bool, quiet: bool) -> None:
    """Our warnings as one `warning:` line each (-q hides them); other libraries' only with -v. The random-
    weights warning is left out: the score command prints its own banner."""
    from ..results import RandomWeightsWarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings' API
        ours = category.__module__.startswith("pickscore")
        if issubclass(category, RandomWeightsWarning) or quiet or not (ours or verbose):
            return
        say(f"warning: {message}")

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    from .commands import COMMANDS

    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=logging.WARNING)
    log.setLevel(logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING)
    saved = warnings.showwarning
    _show_warnings(args.verbose, args.quiet)
    try:
        return COMMANDS[args.command](args)
    except PickScoreError as e:
        say(f"error: {e}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: a short message, the traceback on request
        if args.verbose:
            traceback.print_exc()
        say(f"internal error: {type(e).__name__}: {e}" + ("" if args.verbose else " (run with -v for the traceback)"))
        return EXIT_INTERNAL
    finally:
        warnings.showwarning = saved
