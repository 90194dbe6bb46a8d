"""`pickscore score --ray`: the flags checked before anything starts, then the job on a Ray cluster.
Imports nothing heavy until the job runs (the plain CLI imports this module)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

from ..console import EXIT_OK, EXIT_UNSCORED, say
from ..errors import InputError, PickScoreError
from ..optional import require
from ..options import ScorerOptions

RAY_ONLY = (("ray_address", "--ray-address"), ("gpus_per_worker", "--gpus-per-worker"))


def check_ray_args(args: Any) -> None:
    """Flag combinations, before a cluster or a model is touched."""
    if not args.ray:
        given = [flag for name, flag in RAY_ONLY if getattr(args, name, None) is not None]
        raise InputError(f"{', '.join(given)} go(es) with --ray")
    if args.input is None or args.output is None:
        raise InputError("--ray needs --input SRC (a file or a directory of them) and --output OUT_DIR")
    if args.images:
        raise InputError("--ray reads its work from --input, not from IMAGE arguments")
    if args.artifacts is None:
        raise InputError("--ray needs --artifacts DIR on storage every node can read (export it first with "
                         "`pickscore export`)")
    if args.overwrite:
        raise InputError("--ray does not replace an output: give a new or empty OUT_DIR, or --resume to finish one")
    if str(args.output).lower().endswith((".csv", ".jsonl", ".ndjson")):
        raise InputError(f"--ray writes a directory of Parquet files; --output {args.output} looks like a file name")
    if args.json:
        raise InputError("--json goes with --prompt")


def cmd_score_ray(args: Any, scorer: ScorerOptions) -> int:
    """Score --input into the --output directory on Ray with the scorer's options; exit codes as
    `pickscore score`'s."""
    check_ray_args(args)  # flag mistakes are reported as such, with or without the [ray] extra
    ray = require("ray", "scoring on Ray (--ray)")
    from ..artifacts import Artifacts
    from ..results import RANDOM_WEIGHTS_BANNER
    from .job import JobOptions, ScaleJob

    if Artifacts.load(args.artifacts, hash_check=scorer.hash_check).random_weights:  # a bad directory: exit 2 now
        say(f"WARNING: {RANDOM_WEIGHTS_BANNER}")
    options = JobOptions(os.fspath(args.artifacts), scorer, gpus_per_worker=args.gpus_per_worker,
                         commit_rows=args.commit_rows)
    stopped: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        stopped.append(signum)
        raise KeyboardInterrupt

    with ScaleJob(str(args.input), str(args.output), options, resume=args.resume) as job:  # checked before Ray starts
        if not job.done:
            _quiet_ray(args.verbose)
            ray.init(address=args.ray_address, log_to_driver=args.verbose, logging_level=logging.WARNING,
                     **({} if args.ray_address else {"include_dashboard": False}))
        saved = signal.signal(signal.SIGTERM, stop)
        try:
            tally = job.run(progress=say)
        except KeyboardInterrupt:
            say(f"stopped: the images scored so far are kept in {args.output}; rerun the same command with --resume "
                "to finish")
            return 128 + (stopped[0] if stopped else signal.SIGINT)
        except Exception as e:  # noqa: BLE001 - a user error raised inside a Ray task arrives wrapped
            raise _user_error(e) or e
        finally:
            signal.signal(signal.SIGTERM, saved)
            if ray.is_initialized():
                ray.shutdown()
    say(tally.summary())
    return EXIT_UNSCORED if tally.errors else EXIT_OK


def _user_error(error: BaseException) -> PickScoreError | None:
    """The PickScoreError (a bad input file, say) that a Ray task raised, out of Ray's wrappers."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, PickScoreError):
            return error
        seen.add(id(error))
        error = getattr(error, "cause", None) or error.__cause__
    return None


def _quiet_ray(verbose: bool) -> None:
    """Ray Data's progress bars on a terminal; its periodic progress log lines only with -v."""
    ray_data = require("ray.data", "scoring on Ray (--ray)")
    context = ray_data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    if not verbose:
        logging.getLogger("ray").setLevel(logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
