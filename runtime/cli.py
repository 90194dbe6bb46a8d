"""`pickscore`: export, score, verify, info. Export and verify load torch lazily; scoring never does."""

from __future__ import annotations

import argparse
import json
from collections import deque
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
    p.add_argument("--precision", default=None,
                   help="fp32 | fp16 | int8 (default: the most accurate one exported; with --backend auto on a CPU, int8 when exported)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pickscore", description="PickScore v1 export, scoring and numerics checks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export the text and vision towers to ONNX")
    _add_source_args(p, default_model="yuvalkirstain/PickScore_v1")
    p.add_argument("--out", required=True, type=Path, help="artifacts directory to create")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, fp16, int8 (default fp32)")
    p.add_argument("--force", action="store_true", help="replace an existing artifacts directory")

    p = sub.add_parser("score", help="score images against prompts")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--artifacts", type=Path, help="an exported artifacts directory")
    where.add_argument("--model", help="export this model on first use into the user cache (needs [export])")
    p.add_argument("--random-init", action="store_true", help="with --model DIR: RANDOM weights (testing only)")
    p.add_argument("--seed", type=int, default=0)
    work = p.add_mutually_exclusive_group(required=True)
    work.add_argument("--prompt", help="score IMAGE... (files, directories, globs) against this prompt")
    work.add_argument("--input", type=Path, help="CSV / JSONL / Parquet with prompt and image (or images) columns")
    p.add_argument("images", nargs="*", help="image files, directories or globs (with --prompt)")
    p.add_argument("--output", type=Path, help="write result rows here (.csv, .jsonl or .parquet)")
    _add_runtime_args(p)
    p.add_argument("--batch-size", type=int, default=None, help="images per vision call (default: per backend)")
    p.add_argument("--workers", type=int, default=None, help="decode/preprocess threads (default min(4, cores))")
    p.add_argument("--text-cache", type=Path, default=None, help="SQLite file caching text embeddings across runs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (with --prompt)")
    p.add_argument("--fast-load", action="store_true", help="check artifact sizes only, skip SHA-256")

    p = sub.add_parser("cache", help="inspect a text-embedding cache file")
    p.add_argument("action", choices=["stats"])
    p.add_argument("path", type=Path)

    p = sub.add_parser("verify", help="compare the runtime with the PyTorch reference (needs [export])")
    p.add_argument("--artifacts", required=True, type=Path)
    _add_source_args(p, default_model=None)
    p.add_argument("--images", nargs="*", default=[], help="extra images besides the built-in generated set")
    p.add_argument("--backend", default="onnx-cpu")
    p.add_argument("--precision", default=None, help="one or several (fp32,int8): the reference runs once for all")
    p.add_argument("--json", type=Path, dest="json_out", help="also write the report (a list for several precisions) here")

    p = sub.add_parser("bench", help="benchmark backends side by side on the same inputs")
    p.add_argument("--artifacts", required=True, type=Path)
    p.add_argument("--backends", default="onnx-fp32",
                   help="comma-separated: torch, onnx-fp32, onnx-int8, onnx-fp16, onnx-cuda-fp16 (default onnx-fp32)")
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--stages", default="vision,text,text-cached,e2e")
    _add_source_args(p, default_model=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-calls", type=int, default=3)
    p.add_argument("--sequential", action="store_true",
                   help="open one backend at a time (per-backend peak memory) instead of timing all of them in "
                        "interleaved rounds (honest ratios on a machine whose speed drifts; the default)")
    p.add_argument("--json", type=Path, dest="json_out", help="write rows + machine info here")
    p.add_argument("--markdown", type=Path, help="write a markdown table here")
    p.add_argument("--plot", type=Path, help="write a PNG chart here (needs matplotlib)")

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
    from .work_io import Progress, ResultWriter, count_images, expand_images, read_work, result_rows

    if args.prompt is not None and not args.images:
        raise PickScoreError("--prompt needs at least one IMAGE (file, directory or glob)")
    if args.input is not None and args.images:
        raise PickScoreError("give images either on the command line (with --prompt) or in --input, not both")
    artifacts = args.artifacts
    if artifacts is None:
        from .export_cache import cached_artifacts

        artifacts = cached_artifacts(args.model, args.random_init, args.seed, args.precision or "fp32", progress=_say)
    elif args.random_init:
        raise PickScoreError("--random-init goes with --model; artifacts record their own source")
    scorer = PickScorer.load(artifacts, backend=args.backend, precision=args.precision, batch_size=args.batch_size,
                             hash_check="size" if args.fast_load else "full", text_cache=args.text_cache)
    if scorer.random_weights:
        _say(f"WARNING: {RANDOM_WEIGHTS_BANNER}")
    if args.backend == "auto" or args.precision is None:
        exact = "" if scorer.backend.precision == "fp32" else " (pass --precision fp32 for exact scores)"
        _say(f"using {scorer.backend.name}/{scorer.backend.precision}{exact}")
    if args.input is not None:
        work = read_work(args.input)
        total = count_images(args.input)
    else:
        images = expand_images(args.images)
        work, total = iter([(None, args.prompt, images)]), len(images)
    groups: deque = deque()  # results come back in input order, so each pops its own group

    def items():
        for group, prompt, images in work:
            groups.append(group)
            yield prompt, images

    progress = Progress(total)
    failed = 0
    writer = ResultWriter(args.output) if args.output else None
    try:
        for result in scorer.score_many(items(), workers=args.workers, on_images_done=progress.update):
            group = groups.popleft()
            failed += sum(1 for r in result.results if r.error) + (1 if result.error and not result.results else 0)
            if writer:
                for row in result_rows(result, group):
                    writer.write(row)
            if args.input is None and not args.output:
                print(json.dumps(result.to_json(), ensure_ascii=False, indent=2) if args.json else format_table(result))
            elif args.input is not None and not args.output:
                for row in result_rows(result, group):
                    print(json.dumps(row, ensure_ascii=False))
    finally:
        progress.close()
        if writer:
            writer.close()
    if failed:
        _say(f"{failed} item(s) could not be scored; see the error column")
    return 1 if failed else 0


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
    from pickscore_export.verify import verify_precisions

    source = ModelSource(args.model, random_init=args.random_init, seed=args.seed) if args.model else None
    precisions = _csv(args.precision) if args.precision else [None]
    reports = verify_precisions(args.artifacts, precisions, source, backend=args.backend, images=args.images, progress=_say)
    text = json.dumps(reports[0] if len(reports) == 1 else reports, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    for report in reports:
        _say(("PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"])) +
             f" ({report['backend']}/{report['precision']}, {report['n_prompts']} prompts x {report['n_images']} images)")
    return 0 if all(r["passed"] for r in reports) else 1


def cmd_bench(args) -> int:
    from .bench import markdown_table, plot, run_bench

    result = run_bench(args.artifacts, _csv(args.backends), [int(b) for b in _csv(args.batch_sizes)], _csv(args.stages),
                       model=args.model, random_init=args.random_init, seed=args.seed, threads=args.threads,
                       min_calls=args.min_calls, interleave=not args.sequential, progress=_say)
    table = markdown_table(result)
    print(table)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cmd_cache(args) -> int:
    from .text_cache import cache_stats

    try:
        print(json.dumps(cache_stats(args.path), indent=2))
    except FileNotFoundError as e:
        raise PickScoreError(str(e)) from None
    return 0


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


COMMANDS = {"export": cmd_export, "score": cmd_score, "verify": cmd_verify, "bench": cmd_bench, "cache": cmd_cache, "info": cmd_info}


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
