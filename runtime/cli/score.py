"""`pickscore score`: images from the command line or rows from a file -> scores, to a table, JSON, or
a resumable output file. SIGINT / SIGTERM finish the work in flight, leave a valid output and say how
to resume; a second signal stops at once (committed parts are kept for --resume)."""

from __future__ import annotations

import itertools
import json
import logging
import signal
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..backends import runnable_backend
from ..errors import InputError
from ..optional import require
from ..options import ScorerOptions
from ..pipeline import WorkItem
from ..results import RANDOM_WEIGHTS_BANNER, PromptResult
from ..scale.cli import cmd_score_ray, ray_requested
from ..text_cache import check_cache_file
from ..work_io import InputRow, PartedOutput, Progress, count_images, expand_images, read_rows, read_work, result_rows
from ..work_io.outputs import same_file
from ..work_io.runs import file_identity, model_identity, record_path, selection_identity
from ..console import EXIT_OK, EXIT_UNSCORED, say

log = logging.getLogger("pickscore")


class GracefulStop:
    """The first SIGINT/SIGTERM stops new work from starting; the second interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        for s in self.SIGNALS:
            self._saved[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        say(f"\n{signal.Signals(signum).name}: finishing the work in flight (send it again to stop at once)")

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)

    def until_stopped(self, items: Iterable[WorkItem]) -> Iterator[WorkItem]:
        for item in items:
            if self.signum is not None:
                return
            yield item

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)


def check_args(args: Any) -> ScorerOptions:
    """Everything that can be checked before an export or a model load; the scorer's options."""
    options = ScorerOptions.from_args(args)
    if args.prompt is not None and not args.images:
        raise InputError("--prompt needs at least one IMAGE (file, directory or glob)")
    if args.input is not None and args.images:
        raise InputError("give images either on the command line (with --prompt) or in --input, not both")
    if (args.resume or args.overwrite) and args.output is None:
        raise InputError("--resume and --overwrite go with --output")
    if args.json and args.input is not None:
        raise InputError("--json goes with --prompt; with --input, rows go to stdout as JSONL or to --output")
    if args.json and args.output is not None:
        raise InputError("--json prints the comparison; --output writes rows to a file: give one of them")
    check_scorer_source(args)
    for flag, path in (("--input", args.input), ("--output", args.output)):
        if path is not None and str(path).lower().endswith(".parquet") and not args.ray:
            require("pyarrow", f"{flag} *.parquet", extra="parquet")
    if options.text_cache_file is not None:
        check_text_cache_path(Path(options.text_cache_file), args)
    return options


def check_scorer_source(args: Any) -> None:
    """--artifacts or --model with its first-use flags (add_scorer_source_args), checked before anything loads."""
    if args.artifacts is not None and args.artifacts.is_file():
        raise InputError(f"--artifacts {args.artifacts} is a file; it takes the directory `pickscore export` made")
    if args.random_init and args.artifacts is not None:
        raise InputError("--random-init goes with --model; artifacts record their own source")
    if args.stress and not args.random_init:
        raise InputError("--stress plants outliers into random weights: it needs --random-init")
    if args.artifacts is not None and (args.revision is not None or args.no_verify):
        raise InputError("--revision and --no-verify go with --model; artifacts record their own source and gate")
    if args.artifacts is None and args.backend != "auto":
        runnable_backend(args.backend)  # before the first use's export, not after


def open_scorer(args: Any, options: ScorerOptions) -> Any:
    """The PickScorer --artifacts or --model names (a model is exported and gated on first use)."""
    from ..scorer import DEFAULT_MODEL, PickScorer

    if args.artifacts is not None:
        return PickScorer.load(args.artifacts, options=options)
    return PickScorer.from_pretrained(args.model or DEFAULT_MODEL, revision=args.revision, random_init=args.random_init,
                                      seed=args.seed, stress=args.stress, verify=not args.no_verify, progress=say,
                                      options=options)


def check_text_cache_path(cache: Path, args: Any) -> None:
    """--text-cache may name neither the run's own files nor any existing file but a text cache: SQLite
    would write into it, and a file it cannot read would be moved aside."""
    ours = []
    if args.input is not None:
        ours.append(("the --input file", Path(args.input)))
    if args.output is not None:
        out = Path(args.output)
        ours += [("the --output file", out), ("--output's parts directory", out.with_name(out.name + ".parts")),
                 ("--output's run record", record_path(out)), ("--output's lock", out.with_name(f".{out.name}.lock"))]
    target = cache.absolute().resolve()
    for what, path in ours:
        if same_file(cache, path) or path.absolute().resolve() in target.parents:
            raise InputError(f"--text-cache {cache} is {what}: the cache would overwrite it; give the cache its own file")
    check_cache_file(cache)


def run_identity(args: Any, scorer: Any, options: ScorerOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """(input, model): what --resume must find unchanged (the model part: runs.model_identity)."""
    if args.input is not None:
        source = file_identity(args.input)
    else:
        source = selection_identity(args.prompt, expand_images(args.images).images)
    return source, model_identity(scorer, options)


def work_rows(args: Any) -> tuple[Iterator[InputRow], int | None]:
    """Input rows (with identities) and, when cheaply known, how many images they hold."""
    if args.input is not None:
        rows = read_rows(args.input)
        first = next(rows, None)  # reading the header now reports a file that is unusable as a whole
        return (itertools.chain([first], rows) if first is not None else iter(()), count_images(args.input))
    selection = expand_images(args.images)
    rows = [InputRow(i, str(i), prompt=args.prompt, images=[image]) for i, image in enumerate(selection.images, 1)]
    n = len(rows)
    rows += [InputRow(n + i, str(n + i), prompt=args.prompt, images=[name], error=f"{name}: {why}")
             for i, (name, why) in enumerate(selection.problems.items(), 1)]
    return iter(rows), len(selection.images)


def cmd_score(args: Any) -> int:
    options = check_args(args)
    if ray_requested(args):  # scale-out: imports ray only then
        return cmd_score_ray(args, options)
    rows, total = work_rows(args)
    output = PartedOutput(args.output, resume=args.resume, overwrite=args.overwrite, part_rows=args.commit_rows,
                          inputs=[args.input] if args.input else []) if args.output else None
    try:
        tally = Tally()
        if output is not None and output.committed:
            tally.earlier_rows, tally.earlier_errors = output.earlier_rows, output.earlier_errors
            say(f"resuming: {args.output} already holds {len(output.committed)} input row(s); scoring the rest")
            total = max(total - len(output.committed), 0) if total is not None else None
        scorer = open_scorer(args, options)
        if output is not None:
            output.begin(*run_identity(args, scorer, options), rows=lambda: work_rows(args)[0])
        if scorer.random_weights:
            say(f"WARNING: {RANDOM_WEIGHTS_BANNER}")
        if args.backend == "auto" or args.precision is None:
            exact = "" if scorer.backend.precision == "fp32" else "; --precision fp32 for exact scores"
            say(f"using {scorer.backend.name}/{scorer.backend.precision} "
                f"({'auto' if args.backend == 'auto' else 'its first precision'}{exact})")
            log.info("backend: %s", scorer.backend_choice)
        progress = Progress(total)
        with scorer, GracefulStop() as stop:
            items = stop.until_stopped(read_work(rows, skip=output.is_committed if output else lambda row: False))
            shown: list[PromptResult] = []
            try:
                for result in scorer.score_many(items, on_images_done=progress.update):
                    tally.add(result)
                    if output is not None:
                        output.write(result)
                    elif args.input is not None:
                        for row in result_rows(result):
                            print(json.dumps(row, ensure_ascii=False, allow_nan=False))
                    else:
                        shown.append(result)
            finally:
                progress.close()
        if output is not None:
            output.finish()
            output = None
        if shown:
            print_prompt_results(shown, args.json)
            tally.where = "the JSON's error fields" if args.json else "the ERROR lines above"
    except BaseException:
        if output is not None:
            output.abandon()
            if output.rows_written or output.committed:
                say(f"stopped: the rows committed so far are kept in {output.parts_dir}; "
                    "rerun the same command with --resume to finish")
        raise
    say(tally.summary())
    if stop.signum is not None:
        say(f"stopped by {signal.Signals(stop.signum).name}: " + (
            f"{args.output} holds the rows finished so far; rerun the same command with --resume to finish"
            if args.output else "the output above is incomplete"))
        return stop.exit_code
    return EXIT_UNSCORED if tally.unscored + tally.earlier_errors else EXIT_OK


class Tally:
    """What a run did, for its last line and its exit code (a resumed run counts the rows it kept too)."""

    def __init__(self) -> None:
        self.images = self.unscored = self.comparisons = self.earlier_rows = self.earlier_errors = 0
        self.where = "the error column"  # where a failed item's reason is

    def add(self, result: PromptResult) -> None:
        self.comparisons += 1
        self.images += sum(1 for r in result.results if r.score is not None)
        self.unscored += result.n_failed

    def summary(self) -> str:
        text = f"scored {self.images} image(s) in {self.comparisons} comparison(s)"
        if self.unscored:
            text += f"; {self.unscored} item(s) could not be scored (see {self.where})"
        if self.earlier_rows:
            text += f"; kept {self.earlier_rows} row(s) from the earlier run, {self.earlier_errors} of them errors"
        return text


def print_prompt_results(results: list[PromptResult], as_json: bool) -> None:
    """The --prompt output: the comparison, then whatever on the command line was not an image."""
    main, skipped = results[0], results[1:]
    if as_json:
        doc = main.to_json() if main.error is None or main.results else skipped[0].to_json()
        if skipped:
            doc["skipped"] = [{"image": r.results[0].image if r.results else None, "error": r.error} for r in skipped]
        print(json.dumps(doc, ensure_ascii=False, indent=2, allow_nan=False))
        return
    print(format_table(main))
    for r in skipped:
        print(f"{'-':>4}  {'-':>9}  {'-':>8}  {r.results[0].image if r.results else ''}  ERROR: {r.error}")


def format_table(result: PromptResult) -> str:
    flag = "   [RANDOM WEIGHTS: scores are meaningless]" if result.random_weights else ""
    lines = [f"prompt: {result.prompt!r}   ({result.backend}/{result.precision}){flag}"]
    if result.truncated:
        lines.append("note: prompt longer than 77 tokens; truncated as the reference does")
    if result.error:
        lines.append(f"ERROR: {result.error}")
    lines.append(f"{'rank':>4}  {'score':>9}  {'prob':>8}  image")
    for r in result.ranked():
        if r.error:
            lines.append(f"{'-':>4}  {'-':>9}  {'-':>8}  {r.image}  ERROR: {result.error or r.error}")
        else:
            lines.append(f"{r.rank:>4}  {r.score:>9.4f}  {r.prob:>8.4f}  {r.image}")
    return "\n".join(lines)
