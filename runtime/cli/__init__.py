"""`pickscore`: export, score, eval, verify, bench, cache, info, serve, engine.

One vocabulary for every command: --artifacts DIR, --backend NAME, --precision P, --batch-size N,
--output FILE; the scorer's settings come from one declaration (`options.ScorerOptions.add_arguments`).
Flags, extras and backend availability are checked before any export, download or bench starts. Exit
codes: 0 all good; 1 some items unscored or verify failed; 2 usage or setup error (one line and a hint,
no traceback); 3 internal error (the traceback only with -v); 130 / 143 stopped by SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import sys
import traceback
import warnings
from pathlib import Path

from ..argtypes import backend_option, csv_list, path_or_uri, positive_float, positive_int
from ..backends import BACKENDS
from ..bench import DEFAULT_STAGES as BENCH_DEFAULT_STAGES
from ..bench import PRESETS as BENCH_PRESETS
from ..bench import STAGES as BENCH_STAGES
from ..bench import parse_backend_specs
from ..engines.profiles import DEFAULT_MAX_BATCH, DEFAULT_OPT_BATCH, DEFAULT_OPT_LEVEL
from ..errors import PickScoreError
from ..options import ScorerOptions
from ..precisions import EXPORTED, NAMES as PRECISIONS
from ..scorer import DEFAULT_MODEL
from ..console import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, say

log = logging.getLogger("pickscore")


class Parser(argparse.ArgumentParser):
    """argparse with usage errors in one line plus a hint, and close-match suggestions for a misspelt flag
    or command (reported before whatever else the misspelling made argparse miss)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # an abbreviation that works today breaks when a flag is added
        super().__init__(*args, **kwargs)
        self._seen: list[str] = []

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's signature
        self._seen = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def flags(self) -> list[str]:
        return [o for action in self._actions for o in action.option_strings]

    def error(self, message: str):  # noqa: ANN201 - argparse's signature
        known = self.flags()
        has_commands = any(isinstance(a, argparse._SubParsersAction) for a in self._actions)  # noqa: SLF001
        unknown = None
        for token in self._seen:
            if token == "--" or (has_commands and not token.startswith("-")):
                break  # what follows the command is the command's parser's to judge
            flag = token.split("=", 1)[0]
            if flag.startswith("--") and flag not in known:
                unknown = flag
                break
        if unknown is not None:
            close = difflib.get_close_matches(unknown, known, n=1)
            message = f"unknown flag {unknown}" + (f" (did you mean {close[0]}?)" if close else "")
        else:
            choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
            if choice:
                options = re.findall(r"'([^']*)'", choice.group(2))
                close = difflib.get_close_matches(choice.group(1), options, n=1)
                if close:
                    message += f"; did you mean {close[0]}?"
        say(f"{self.prog}: error: {message}")
        say(f"hint: `{self.prog} --help` lists the flags")
        self.exit(EXIT_USAGE)


def once(action_class=argparse._StoreAction):  # noqa: ANN001, ANN201, SLF001 - argparse's own store action
    """A store action that refuses being given twice (argparse keeps the last one silently)."""
    class Once(action_class):
        def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
            if getattr(namespace, f"_given_{self.dest}", False):
                parser.error(f"{option_string} given twice; one per command")
            setattr(namespace, f"_given_{self.dest}", True)
            super().__call__(parser, namespace, values, option_string)
    return Once


def backend_spec(text: str) -> list:
    """bench's list of backend[:precision[:option=value,...]] (bench.parse_backend_specs checks each)."""
    try:
        return parse_backend_specs(text)
    except PickScoreError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_source_args(p: argparse.ArgumentParser, default_model: str | None, group: argparse._ActionsContainer | None = None) -> None:
    (group or p).add_argument("--model", default=default_model, metavar="MODEL",
                              help="hub id or local Hugging Face folder" + (f" (default {default_model})" if default_model else
                                                                             " (default: the artifacts' own source)"))
    p.add_argument("--random-init", action="store_true",
                   help="build the model from its config with seeded RANDOM weights (offline testing only; the "
                        "PickScore config ships with the package)")
    p.add_argument("--stress", action="store_true",
                   help="with --random-init: plant trained-ViT-like activation outliers (what makes fp16/int8 fragile)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed for --random-init (default 0)")
    p.add_argument("--revision", default=None, metavar="REV",
                   help="with a hub id: the branch, tag or commit to use (default main; recorded as the commit it resolves to)")


def add_scorer_source_args(p: argparse.ArgumentParser) -> None:
    """--artifacts DIR | --model M with the first-use flags, for the commands that score (score.open_scorer)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--artifacts", type=Path, metavar="DIR", help="an exported artifacts directory")
    where.add_argument("--model", metavar="MODEL",
                       help=f"hub id or local folder (default {DEFAULT_MODEL}): exported on first use into the user cache "
                            "with what the backend runs fast (CPU: fp32 + int8; GPU: fp32 + fp16), gated, then reused "
                            "(needs [export])")
    p.add_argument("--random-init", action="store_true",
                   help="RANDOM weights from the model's config (testing only; the PickScore config ships with the package)")
    p.add_argument("--stress", action="store_true", help="with --random-init: plant trained-ViT-like activation outliers")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed for --random-init (default 0)")
    p.add_argument("--revision", default=None, metavar="REV",
                   help="with --model HUB_ID: the branch, tag or commit (default main; the cache is keyed on the commit)")
    add_gate_arg(p)


def add_ray_args(p: argparse.ArgumentParser, about: str) -> None:
    """--ray and its settings (scale.cli.RaySession reads them)."""
    p.add_argument("--ray", action="store_true", help=about)
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="with --ray: the cluster to join (default: Ray's own choice)")
    p.add_argument("--ray-all-interfaces", action="store_true",
                   help="with --ray and no --ray-address: let the local cluster it starts listen on every network "
                        "interface (default: 127.0.0.1 only)")
    p.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="with --ray: GPUs per scorer actor (default 1 where the cluster has GPUs; 0: CPU scorers of --threads cores)")


def add_eval_run_args(p: argparse.ArgumentParser) -> None:
    """Where an evaluation writes its report and keeps its per-image scores (resumable)."""
    p.add_argument("--output", type=Path, metavar="FILE",
                   help="write the report: .json (everything: per-pair errors, flipped pairs) or .csv (one row per "
                        "precision or model); a table is printed either way")
    p.add_argument("--work", type=Path, default=None, metavar="DIR",
                   help="keep the per-image scores here as Parquet, committed in parts (default: FILE.work beside "
                        "--output; without --output, a temporary folder)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="keep the scores --work already holds; score only the rest")
    again.add_argument("--overwrite", action="store_true", help="replace the scores --work holds")
    p.add_argument("--commit-rows", type=positive_int, default=2000, metavar="N",
                   help="commit the scores every N rows or 10 s (default 2000): a crash loses at most that")


def add_gate_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true",
                   help="skip the numerics gate that ends an export of fp16/int8 (auto then serves fp32 until "
                        "`pickscore verify` passes)")


def add_loudness(p: argparse.ArgumentParser, default: object) -> None:
    """-v / -q, before the command or after it (a subcommand's default must not undo the top level's)."""
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="log details (why a backend was chosen), show library warnings and tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="hide warnings (errors are still printed)")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="pickscore", description="PickScore v1: export, fast scoring, numerics checks")
    parser.add_argument("--version", action="version", version=f"pickscore-runtime {__version__}")
    add_loudness(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(name: str, about: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=about, description=about)
        add_loudness(p, default=argparse.SUPPRESS)
        return p

    p = command("export", "export the text and vision towers to ONNX")
    add_source_args(p, default_model=DEFAULT_MODEL)
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="artifacts directory to create")
    p.add_argument("--precision", default=["fp32"], type=csv_list(EXPORTED),
                   help="comma-separated: fp32, fp16, int8 (default fp32)")
    p.add_argument("--force", action="store_true", help="replace an existing artifacts directory (nothing else)")
    add_gate_arg(p)
    p.add_argument("--int8-plan", default="default", metavar="NAME",
                   help="how the int8 vision tower is quantised: default (passes gate v3 on plain and stress weights) "
                        "or fast (~25 %% faster on an AVX2 CPU; fails stress weights narrowly): the gate at export judges either")

    p = command("score", "score images against prompts")
    add_scorer_source_args(p)
    work = p.add_mutually_exclusive_group(required=True)
    work.add_argument("--prompt", action=once(), metavar="TEXT",
                      help="score IMAGE... (files, directories, globs) against this prompt")
    work.add_argument("--input", type=path_or_uri, metavar="FILE", help="CSV / JSONL / Parquet with prompt and image (or images) columns, "
                                                 "optional id and group")
    p.add_argument("images", nargs="*", help="image files, directories or quoted globs (with --prompt)")
    p.add_argument("--output", type=path_or_uri, metavar="FILE", help="write result rows here (.csv, .jsonl or .parquet), committed in parts")
    p.add_argument("--commit-rows", type=positive_int, default=2000, metavar="N",
                   help="commit --output every N rows or 10 s, whichever comes first (default 2000): a crash loses at most that")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="keep the rows --output already holds; score only the rest")
    again.add_argument("--overwrite", action="store_true", help="replace an existing --output (atomically, at the end)")
    ScorerOptions.add_arguments(p)
    p.add_argument("--json", action="store_true",
                   help="with --prompt: print JSON instead of a table (docs/cli.md: its keys, `skipped` included)")
    add_ray_args(p, "scale out on a Ray cluster: --input SRC (a file or a directory of CSV / JSONL / Parquet / WebDataset "
                    ".tar files) -> --output OUT_DIR (Parquet files); --workers: scorer actors (default one per GPU); "
                    "resumable with --resume (needs the [ray] extra)")

    p = command("eval", "evaluate with PickScore: preference accuracy on Pick-a-Pic data, or models compared")
    actions = p.add_subparsers(dest="eval_action", required=True, metavar="ACTION", parser_class=Parser)
    e = actions.add_parser("preference", help="the Pick-a-Pic paper's preference accuracy (tie threshold, ties excluded, CI)")
    add_loudness(e, default=argparse.SUPPRESS)
    add_scorer_source_args(e)
    e.add_argument("--data", required=True, metavar="PATH",
                   help="the test split: Pick-a-Pic Parquet (a file, a folder of shards or a quoted glob) or a "
                        "datasets.save_to_disk folder of one split (caption, jpg_0, jpg_1, label_0, ...)")
    threshold = e.add_mutually_exclusive_group(required=True)
    threshold.add_argument("--validation", metavar="PATH", help="the split the tie threshold is chosen on, as the paper "
                                                                "does (validation_unique); the same formats as --data")
    threshold.add_argument("--tie-threshold", type=float, metavar="T",
                           help="predict a tie when |p1 - p0| <= T instead of choosing T on a validation split")
    add_eval_run_args(e)
    add_ray_args(e, "score the pairs on a Ray cluster (the `score --ray` job; --artifacts on storage every node reads; "
                    "the split is copied once into --work as the job's input; needs the [ray] extra)")
    ScorerOptions.add_arguments(e, several_precisions=True)
    e = actions.add_parser("compare", help="models' generations for the same prompts: mean PickScore and win rates with CIs")
    add_loudness(e, default=argparse.SUPPRESS)
    add_scorer_source_args(e)
    given = e.add_mutually_exclusive_group(required=True)
    given.add_argument("--manifest", type=path_or_uri, metavar="FILE",
                       help="CSV / JSONL / Parquet with prompt, model and image (a path, or bytes in Parquet) columns")
    given.add_argument("--generations", metavar="DIR",
                       help="a folder per model: DIR/<model>/<prompt id>.png, <prompt id>_<k>.png or <prompt id>/*.png "
                            "(with --prompts)")
    e.add_argument("--prompts", metavar="FILE",
                   help="with --generations: a .txt file (line i is prompt id i, from 0) or CSV / JSONL with id and prompt")
    e.add_argument("--per-prompt", choices=["best", "mean"], default="best",
                   help="a model's value for a prompt: its best image's score (default) or its images' mean")
    e.add_argument("--plot", type=Path, metavar="FILE", help="a PNG of the mean per model with 95%% CIs (needs [bench])")
    add_eval_run_args(e)
    ScorerOptions.add_arguments(e)

    p = command("cache", "inspect a text-embedding cache file")
    p.add_argument("action", choices=["stats"], help="what to do")
    p.add_argument("path", type=Path, help="the SQLite cache file")

    p = command("verify", "compare the runtime with the PyTorch reference (needs [export])")
    p.add_argument("--artifacts", required=True, type=Path, metavar="DIR", help="the exported artifacts directory to check")
    add_source_args(p, default_model=None)
    p.add_argument("--images", nargs="*", default=[], help="extra images besides the built-in generated set")
    p.add_argument("--backend", default="onnx-cpu", choices=list(BACKENDS), help="backend to check (default onnx-cpu)")
    p.add_argument("--precision", default=None, type=csv_list(PRECISIONS),
                   help="one or several (fp32,int8): the reference runs once for all (default: the backend's first)")
    p.add_argument("--backend-option", dest="backend_options", action="append", type=backend_option, default=[],
                   metavar="KEY=VALUE", help="an option the backend declares, e.g. compile=true (torch, torch-cuda) or "
                                            "cuda_graphs=true; repeat for several: the path gated is the path that runs")
    p.add_argument("--reference-device", choices=["cpu", "cuda"], default="cpu",
                   help="where the fp32 reference runs (cuda: on the GPU with TF32 off; default cpu)")
    p.add_argument("--reference-cache", type=Path, default=None, metavar="DIR",
                   help="keep the reference's embeddings here and reuse them when the same model and images come again")
    p.add_argument("--output", type=Path, metavar="FILE", help="also write the report (a list for several precisions) here as JSON")

    p = command("bench", "benchmark backends side by side on the same inputs")
    p.add_argument("--artifacts", required=True, type=Path, metavar="DIR", help="the exported artifacts directory")
    p.add_argument("--preset", choices=BENCH_PRESETS, default=None,
                   help="a named scenario (" + "; ".join(f"{k}: {v.about}" for k, v in BENCH_PRESETS.items())
                        + "); flags given beside it replace its values")
    p.add_argument("--backends", default=None, type=backend_spec,
                   help="comma-separated backend[:precision[:option=value,...]], e.g. torch:fp32,torch:bf16,onnx-cpu:int8 or "
                        "torch-cuda:fp16:compile=true,cuda_graphs=true; `auto` is what score would serve here "
                        "(default onnx-cpu:fp32)")
    p.add_argument("--batch-sizes", default=None, type=lambda t: [positive_int(x) for x in csv_list()(t)],
                   help="comma-separated batch sizes (default 1,4,8)")
    p.add_argument("--stages", default=None, type=csv_list(BENCH_STAGES),
                   help=f"comma-separated, from {','.join(BENCH_STAGES)} (default {','.join(BENCH_DEFAULT_STAGES)})")
    p.add_argument("--e2e-images", type=positive_int, default=None, metavar="N",
                   help="images in the e2e folders (JPEG and PNG, 640x480; default twice the largest batch)")
    add_source_args(p, default_model=None)
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help="CPU threads per backend (default: all cores)")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="image decoding threads in the e2e stages (default: cores, at most 8)")
    p.add_argument("--min-calls", type=positive_int, default=None, metavar="N", help="timed calls per cell at least (default 3)")
    p.add_argument("--min-seconds", type=float, default=None, metavar="S",
                   help="and at least this much timed time per cell (default 2.0)")
    p.add_argument("--sequential", action="store_true",
                   help="open one backend at a time (per-backend peak memory) instead of timing all of them in "
                        "interleaved rounds (honest ratios on a machine whose speed drifts; the default)")
    p.add_argument("--colocate", action="store_true",
                   help="also time every cell beside a stand-in for a trainer's step on the same GPU (a bf16 8192x8192 "
                        "matmul loop on its own CUDA stream, in a background thread): its iterations/s alone and during "
                        "the cell (colocated_slowdown) and the cell's items/s under contention (needs an NVIDIA GPU and a "
                        "CUDA build of torch; refused up front elsewhere)")
    p.add_argument("--output", type=Path, metavar="FILE",
                   help="write rows, commit, command and machine here as JSON (rewritten as each block is measured; each "
                        "row is also appended to FILE with a .jsonl suffix as it is measured)")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="write a markdown table here")
    p.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG chart here (needs the [bench] extra)")

    p = command("engine", "build or list TensorRT engines for an artifacts directory")
    actions = p.add_subparsers(dest="engine_action", required=True, metavar="ACTION", parser_class=Parser)
    e = actions.add_parser("build", help="build one engine per tower for this GPU and TensorRT (needs [tensorrt]; minutes)")
    add_loudness(e, default=argparse.SUPPRESS)
    e.add_argument("--artifacts", required=True, type=Path, metavar="DIR", help="the exported artifacts directory")
    e.add_argument("--precision", default="fp16", choices=BACKENDS["tensorrt"].precisions,
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
    add_loudness(e, default=argparse.SUPPRESS)
    e.add_argument("--artifacts", required=True, type=Path, metavar="DIR", help="the exported artifacts directory")

    p = command("serve", "serve scores over HTTP, batched across requests (needs [server])")
    p.add_argument("--artifacts", required=True, type=Path, metavar="DIR", help="the exported artifacts directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    ScorerOptions.add_arguments(p, batch_flags=("--max-batch", "--batch-size"))
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="M",
                   help="at most this long a ready image waits for images still being decoded to fill its batch (default 5)")
    p.add_argument("--max-queue", type=positive_int, default=64, metavar="Q",
                   help="requests in flight at most; more get 503 with Retry-After (default 64)")
    p.add_argument("--max-body-mb", type=float, default=64.0, metavar="N", help="request size limit, 413 above it (default 64)")
    p.add_argument("--request-timeout-s", type=float, default=300.0, metavar="S",
                   help="a request not answered in S seconds once its body has arrived gets 504 (default 300)")
    p.add_argument("--body-timeout-s", type=float, default=60.0, metavar="S",
                   help="a request body not in full within S seconds gets 408: slow clients hold no queue place (default 60)")
    p.add_argument("--max-images", type=positive_int, default=1024, metavar="N",
                   help="images (and prompts) in one request at most, 413 above it (default 1024)")
    p.add_argument("--api-key-file", type=Path, default=None, metavar="F",
                   help="require `Authorization: Bearer KEY` with a key from this file (one per line)")
    p.add_argument("--reward-divide-by", type=positive_float, default=26.0, metavar="D",
                   help="the trainers' wire formats (POST / and /score, cosmos-rl's /api/reward/*) answer score / D, "
                        "as flow_grpo, verl-omni and cosmos-rl divide (default 26; 1 for raw scores)")
    p.add_argument("--result-ttl-s", type=positive_float, default=600.0, metavar="S",
                   help="cosmos-rl's /api/reward/pull: keep a ready result S seconds (default 600)")
    ray = p.add_argument_group("replicas on Ray Serve (needs [serve-ray])")
    ray.add_argument("--ray", metavar="ADDRESS", default=None,
                     help="run as a Ray Serve deployment: 'local' starts a local Ray, else a cluster address ('auto', ray://...)")
    ray.add_argument("--replicas", type=positive_int, default=1, metavar="N", help="replicas (default 1)")
    ray.add_argument("--replica-gpus", type=float, default=None, metavar="G", help="GPUs per replica (default 1 for GPU backends, else 0)")
    ray.add_argument("--replica-cpus", type=float, default=None, metavar="C", help="CPU cores per replica (default 1 with a GPU, else 2)")
    ray.add_argument("--ray-cpus", type=positive_int, default=None, metavar="N", help="with --ray local: cores Ray may use (default all)")
    ray.add_argument("--ray-object-store-mb", type=positive_int, default=None, metavar="M",
                     help="with --ray local: object store size (default Ray's)")

    p = command("info", "describe an artifacts directory")
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

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `pickscore`
        parser.print_help()
        return EXIT_OK
    if args.verbose and args.quiet:
        parser.error("-v and -q contradict each other; give one")
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
