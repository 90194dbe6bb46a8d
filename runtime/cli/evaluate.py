"""`pickscore eval preference | compare`: flags checked and data found before any model loads, the scores
kept resumable under --work, the report printed as a table and written as JSON or CSV. Exit codes as
`score`'s: 1 when rows could not be scored or judged (listed in the report), 128+N when stopped by signal N
(rerun the same command with --resume)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..console import EXIT_OK, EXIT_UNSCORED, say
from ..durable import write_json_atomically
from ..errors import InputError
from ..optional import require
from ..options import ScorerOptions
from ..results import RANDOM_WEIGHTS_BANNER
from ..scale.cli import check_cluster_args, check_shared_artifacts, ray_requested
from ..text_cache import check_cache_file
from ..work_io.outputs import same_file
from .score import GracefulStop, check_scorer_source, open_scorer

REPORT_SUFFIXES = (".json", ".csv")


def cmd_eval(args: Any) -> int:
    return eval_preference(args) if args.eval_action == "preference" else eval_compare(args)


def check_eval_args(args: Any) -> Path | None:
    """The checks both commands share; the work directory (None: a temporary one)."""
    check_scorer_source(args)
    require("pyarrow", "pickscore eval (its scores are Parquet)", extra="parquet")
    if args.output is not None and args.output.suffix.lower() not in REPORT_SUFFIXES:
        raise InputError(f"--output {args.output}: the report is written as .json or .csv")
    if args.output is not None and args.output.is_dir():
        raise InputError(f"--output {args.output} is a directory; give a file name ending in .json or .csv")
    work = args.work or (args.output.with_name(args.output.name + ".work") if args.output is not None else None)
    if (args.resume or args.overwrite) and work is None:
        raise InputError("--resume and --overwrite go with --work DIR or --output FILE (whose scores are kept in FILE.work)")
    if work is not None and work.is_file():
        raise InputError(f"--work {work} is a file; it takes a directory for the scores")
    if args.text_cache_file is not None:
        check_cache_file(Path(args.text_cache_file))
    return work


PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def check_outputs(args: Any, work: Path | None, inputs: list[Path], tree: Path | None = None) -> None:
    """Before any scoring: the report (and plot) can be written where asked, and nothing this run writes is an
    input (`tree`: a folder of generations, where a new folder would read as a model's)."""
    written = [("--output", args.output), ("--plot", getattr(args, "plot", None))]
    for flag, out in written:
        if out is None:
            continue
        if not out.absolute().parent.is_dir():
            raise InputError(f"{flag} {out}: the folder {out.absolute().parent} does not exist")
        if flag == "--plot" and out.suffix.lower() not in PLOT_SUFFIXES:
            raise InputError(f"--plot {out}: the plot is written as {', '.join(PLOT_SUFFIXES)}")
        for f in inputs:
            if same_file(out, f):
                raise InputError(f"{flag} {out} is the input file {f}: writing it would destroy the input")
        if work is not None and (same_file(out, work) or work.absolute() in out.absolute().parents):
            raise InputError(f"{flag} {out} is inside --work {work}; write the report beside it")
    if work is not None:
        here = work.absolute().resolve()
        for f in inputs + ([tree] if tree is not None else []):
            there = f.absolute().resolve()
            if here == there or here in there.parents or (f is tree and there in here.parents):
                raise InputError(f"--work {work} and the input {f} overlap; give the scores a folder of their own")


def stopped(exit_code: int, work: Path | None) -> int:
    """The last word of a run a signal stopped: what is kept, and how to finish it."""
    say("stopped: " + (f"the scores committed so far are kept in {work}; rerun the same command with --resume to finish"
                       if work is not None else "nothing is kept (give --output or --work to make an evaluation resumable)"))
    return exit_code


def write_report(doc: dict[str, Any], output: Path | None, csv_rows: list[dict[str, Any]]) -> None:
    if output is None:
        return
    if output.suffix.lower() == ".json":
        write_json_atomically(output, doc)
    else:
        from ..eval.tables import write_csv

        write_csv(output, csv_rows)
    say(f"report written to {output}")


def eval_preference(args: Any) -> int:
    from ..eval.pickapic import Split
    from ..eval.preference import preference_json
    from ..eval.tables import preference_csv_rows, preference_table

    if args.tie_threshold is not None and not 0 <= args.tie_threshold <= 1:
        raise InputError(f"--tie-threshold is compared with |p1 - p0|, between 0 and 1; got {args.tie_threshold}")
    options = ScorerOptions.per_precision(args)
    work = check_eval_args(args)
    on_ray = ray_requested(args)
    if on_ray:
        check_cluster_args(args)
        check_shared_artifacts(args)
    test = Split(args.data, "test")  # columns, rows and labels checked before any model loads
    validation = Split(args.validation, "validation") if args.validation is not None else None
    splits = [test] + ([validation] if validation is not None else [])
    for split in splits:
        split.check_labels()
    check_outputs(args, work, [f for split in splits for f in split.files])
    results = preference_on_ray(args, options, work, splits) if on_ray \
        else preference_here(args, options, work, test, validation)
    if isinstance(results, int):
        return results  # stopped by a signal
    doc = preference_json(results, args.data, args.validation)
    print(preference_table(doc))
    write_report(doc, args.output, preference_csv_rows(doc))
    errors = max(r["n_errors"] + (r["validation_n_errors"] or 0) for r in (doc["by_precision"] or [doc]))
    if errors:
        say(f"{errors} row(s) could not be scored or judged and are left out of the accuracy (listed in the report)")
    return EXIT_UNSCORED if errors else EXIT_OK


def preference_here(args: Any, options: list[ScorerOptions], work: Path | None, test: Any, validation: Any) -> list | int:
    """Each precision's PreferenceResult, scored in this process; an exit code when stopped by a signal."""
    from ..eval.preference import evaluate_preference

    results = []
    with GracefulStop() as stop, tempfile.TemporaryDirectory(prefix="pickscore-eval-") as tmp:
        for opts in options:
            with open_scorer(args, opts) as scorer:
                if scorer.random_weights:
                    say(f"WARNING: {RANDOM_WEIGHTS_BANNER}")
                result = evaluate_preference(scorer, test, validation=validation, tie_threshold=args.tie_threshold,
                                             options=opts, work_dir=work or Path(tmp), resume=args.resume,
                                             overwrite=args.overwrite, commit_rows=args.commit_rows,
                                             until=stop.until_stopped, progress=say)
            if result is None:
                return stopped(stop.exit_code, work)
            results.append(result)
    return results


def preference_on_ray(args: Any, options: list[ScorerOptions], work: Path | None, splits: list[Any]) -> list | int:
    """Each precision's PreferenceResult, scored by the Ray job; an exit code when stopped."""
    from ..eval.on_ray import score_split_on_ray
    from ..eval.preference import evaluate_scores, read_split_scores
    from ..scale.cli import RaySession

    results = []
    with RaySession(args) as session, tempfile.TemporaryDirectory(prefix="pickscore-eval-") as tmp:
        root = work or Path(tmp)
        for opts in options:
            job_options = session.job_options(opts)
            scored = []
            for split in splits:
                try:
                    out = score_split_on_ray(session, job_options, split, root, resume=args.resume, overwrite=args.overwrite,
                                             progress=say)
                except KeyboardInterrupt:
                    return stopped(session.exit_code, work)
                scored.append(read_split_scores(out, split))
            results.append(evaluate_scores(scored[0], scored[1] if len(scored) > 1 else None, args.tie_threshold,
                                           backend=f"ray:{opts.backend}"))
    return results


def eval_compare(args: Any) -> int:
    from ..eval.compare import compare_generations, folder_generations, manifest_generations, plot_comparison
    from ..eval.tables import compare_csv_rows, compare_table

    if args.generations is not None and args.prompts is None:
        raise InputError("--generations needs --prompts FILE (the prompt text of each prompt id)")
    if args.manifest is not None and args.prompts is not None:
        raise InputError("--prompts goes with --generations; a manifest has its own prompt column")
    if args.plot is not None:
        require("matplotlib", "eval compare --plot", extra="bench")  # before the scoring, not after it
    options = ScorerOptions.from_args(args)
    work = check_eval_args(args)
    generations = manifest_generations(args.manifest) if args.manifest is not None else \
        folder_generations(args.generations, args.prompts)
    inputs = [Path(args.manifest)] if args.manifest is not None else [Path(args.prompts)]
    check_outputs(args, work, inputs, tree=Path(args.generations) if args.generations is not None else None)
    with GracefulStop() as stop, open_scorer(args, options) as scorer:
        if scorer.random_weights:
            say(f"WARNING: {RANDOM_WEIGHTS_BANNER}")
        doc = compare_generations(scorer, generations, per_prompt=args.per_prompt, options=options, work_dir=work,
                                  resume=args.resume, overwrite=args.overwrite, commit_rows=args.commit_rows,
                                  until=stop.until_stopped, progress=say)
    if doc is None:
        return stopped(stop.exit_code, work)
    print(compare_table(doc))
    write_report(doc, args.output, compare_csv_rows(doc))
    if args.plot is not None:
        plot_comparison(doc, args.plot)
        say(f"plot written to {args.plot}")
    missing = sum(len(m["missing"]) for m in doc["models"])
    if doc["n_errors"] or missing:
        say(f"{doc['n_errors']} generation(s) could not be scored and {missing} (model, prompt) pair(s) have no "
            "usable image (listed in the report)")
    return EXIT_UNSCORED if doc["n_errors"] or missing else EXIT_OK
