"""`pickscore`: export, score, verify, info. Export and verify load torch lazily; scoring never does."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from .errors import PickScoreError

log = logging.getLogger("pickscore")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_source_args(p: argparse.ArgumentParser, default_model: str | None) -> None:
    p.add_argument("--model", default=default_model,
                   help="hub id or local Hugging Face folder" + (f" (default {default_model})" if default_model else ""))
    p.add_argument("--random-init", action="store_true",
                   help="build the model from DIR/config.json with seeded RANDOM weights (offline testing only)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", help="auto | onnx-cpu | onnx-cuda (default auto)")
    p.add_argument("--precision", default=None, help="fp32 | fp16 (default: the most accurate one exported)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pickscore", description="PickScore v1 export, scoring and numerics checks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export the text and vision towers to ONNX")
    _add_source_args(p, default_model="yuvalkirstain/PickScore_v1")
    p.add_argument("--out", required=True, type=Path, help="artifacts directory to create")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, fp16 (default fp32)")
    p.add_argument("--force", action="store_true", help="replace an existing artifacts directory")

    p = sub.add_parser("score", help="score images against a prompt")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--artifacts", type=Path, help="an exported artifacts directory")
    where.add_argument("--model", help="export this model on first use into the user cache (needs [export])")
    p.add_argument("--random-init", action="store_true", help="with --model DIR: RANDOM weights (testing only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", required=True)
    p.add_argument("images", nargs="+", help="image files")
    _add_runtime_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--fast-load", action="store_true", help="check artifact sizes only, skip SHA-256")

    p = sub.add_parser("verify", help="compare the runtime with the PyTorch reference (needs [export])")
    p.add_argument("--artifacts", required=True, type=Path)
    _add_source_args(p, default_model=None)
    p.add_argument("--images", nargs="*", default=[], help="extra images besides the built-in generated set")
    p.add_argument("--backend", default="onnx-cpu")
    p.add_argument("--precision", default=None)
    p.add_argument("--json", type=Path, dest="json_out", help="also write the report here")

    p = sub.add_parser("bench", help="benchmark backends side by side on the same inputs")
    p.add_argument("--artifacts", required=True, type=Path)
    p.add_argument("--backends", default="onnx-fp32", help="comma-separated: torch, onnx-fp32, onnx-fp16, onnx-cuda-fp16")
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--stages", default="vision,text")
    _add_source_args(p, default_model=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-calls", type=int, default=3)
    p.add_argument("--json", type=Path, dest="json_out", help="write rows + machine info here")
    p.add_argument("--markdown", type=Path, help="write a markdown table here")

    p = sub.add_parser("info", help="describe an artifacts directory")
    p.add_argument("artifacts", type=Path)
    return parser


def cmd_export(args) -> int:
    from .export_cache import _export_modules

    ModelSource, export_artifacts = _export_modules()
    from pickscore_export.build import parse_precisions

    export_artifacts(ModelSource(args.model, random_init=args.random_init, seed=args.seed), args.out,
                     parse_precisions(args.precision), force=args.force, progress=_say)
    return 0


def cmd_score(args) -> int:
    from .scorer import RANDOM_WEIGHTS_BANNER, PickScorer

    artifacts = args.artifacts
    if artifacts is None:
        from .export_cache import cached_artifacts

        artifacts = cached_artifacts(args.model, args.random_init, args.seed, args.precision or "fp32", progress=_say)
    elif args.random_init:
        raise PickScoreError("--random-init goes with --model; artifacts record their own source")
    scorer = PickScorer.load(artifacts, backend=args.backend, precision=args.precision,
                             hash_check="size" if args.fast_load else "full")
    if scorer.random_weights:
        _say(f"WARNING: {RANDOM_WEIGHTS_BANNER}")
    result = scorer.score(args.prompt, args.images)
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False, indent=2))
    else:
        print(format_table(result))
    return 1 if any(r.error for r in result.results) else 0


def format_table(result) -> str:
    flag = "   [RANDOM WEIGHTS: scores are meaningless]" if result.random_weights else ""
    lines = [f"prompt: {result.prompt!r}   ({result.backend}/{result.precision}){flag}"]
    if result.truncated:
        lines.append("note: prompt longer than 77 tokens; truncated as the reference does")
    lines.append(f"{'rank':>4}  {'score':>9}  {'prob':>8}  image")
    for r in result.ranked():
        if r.error:
            lines.append(f"{'-':>4}  {'-':>9}  {'-':>8}  {r.image}  ERROR: {r.error}")
        else:
            lines.append(f"{r.rank:>4}  {r.score:>9.4f}  {r.prob:>8.4f}  {r.image}")
    return "\n".join(lines)


def cmd_verify(args) -> int:
    from .export_cache import _export_modules

    ModelSource, _ = _export_modules()
    from pickscore_export.verify import verify

    source = ModelSource(args.model, random_init=args.random_init, seed=args.seed) if args.model else None
    report = verify(args.artifacts, source, backend=args.backend, precision=args.precision, images=args.images,
                    progress=_say)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    _say(("PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"])) +
         f" ({report['backend']}/{report['precision']}, {report['n_prompts']} prompts x {report['n_images']} images)")
    return 0 if report["passed"] else 1


def cmd_bench(args) -> int:
    from .bench import markdown_table, run_bench

    result = run_bench(args.artifacts, _csv(args.backends), [int(b) for b in _csv(args.batch_sizes)], _csv(args.stages),
                       model=args.model, random_init=args.random_init, seed=args.seed, threads=args.threads,
                       min_calls=args.min_calls, progress=_say)
    table = markdown_table(result)
    print(table)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cmd_info(args) -> int:
    from .artifacts import Artifacts

    a = Artifacts.load(args.artifacts, hash_check="size")
    m = a.manifest
    print(json.dumps({
        "artifacts": str(a.root), "random_weights": a.random_weights, "source": m["model"]["source"],
        "precisions": a.precisions, "dims": m["dims"], "logit_scale": m["logit_scale"],
        "created_utc": m.get("created_utc"), "packages": m.get("packages"),
    }, indent=2))
    return 0


COMMANDS = {"export": cmd_export, "score": cmd_score, "verify": cmd_verify, "bench": cmd_bench, "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=logging.WARNING)
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    warnings.simplefilter("ignore")  # the CLI reports random weights itself; library warnings are noise here
    try:
        return COMMANDS[args.command](args)
    except PickScoreError as e:
        _say(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
