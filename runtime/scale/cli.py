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
# Ray's own switch between a cluster of machines and one machine: off, a cluster started here takes the
# loopback address as its node address, so GCS, raylet, object manager and workers listen on 127.0.0.1
# only (on, they listen on every interface, and a Ray cluster runs whatever code reaches it).
RAY_MULTI_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ray_requested(args: Any) -> bool:
    """Whether the command asked for Ray at all (--ray or any of its settings: check_cluster_args judges them)."""
    return bool(args.ray or args.ray_address is not None or args.gpus_per_worker is not None or args.ray_all_interfaces)


def check_cluster_args(args: Any) -> None:
    """The Ray flags every command that takes them (add_ray_args) shares: its settings only with --ray, one way
    to reach a cluster."""
    everywhere = getattr(args, "ray_all_interfaces", False)
    if not args.ray:
        given = [flag for name, flag in RAY_ONLY if getattr(args, name, None) is not None]
        raise InputError(f"{', '.join(given + ['--ray-all-interfaces'] * everywhere)} go(es) with --ray")
    if everywhere and args.ray_address is not None:
        raise InputError("--ray-all-interfaces is for the local cluster --ray starts; with --ray-address the cluster "
                         "is already running")


def check_shared_artifacts(args: Any) -> None:
    if args.artifacts is None:
        raise InputError("--ray needs --artifacts DIR on storage every node can read (export it first with "
                         "`pickscore export`)")


def check_ray_args(args: Any) -> None:
    """Flag combinations, before a cluster or a model is touched."""
    check_cluster_args(args)
    if args.input is None or args.output is None:
        raise InputError("--ray needs --input SRC (a file or a directory of them) and --output OUT_DIR")
    if args.images:
        raise InputError("--ray reads its work from --input, not from IMAGE arguments")
    check_shared_artifacts(args)
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
    with RaySession(args) as session:
        from .job import ScaleJob

        options = session.job_options(scorer)
        with ScaleJob(str(args.input), str(args.output), options, resume=args.resume) as job:  # checked before Ray starts
            try:
                tally = session.run(job, progress=say)
            except KeyboardInterrupt:
                say(f"stopped: the images scored so far are kept in {args.output}; rerun the same command with --resume "
                    "to finish")
                return session.exit_code
    say(tally.summary())
    return EXIT_UNSCORED if tally.errors else EXIT_OK


class RaySession:
    """The Ray cluster a command's jobs run on (--ray-address, or a local one on 127.0.0.1 only), started at
    the first job that has work left and shut down at the end; SIGTERM stops a job as SIGINT does
    (KeyboardInterrupt: the job's committed work is kept for --resume)."""

    def __init__(self, args: Any):
        self.args = args
        self.local = args.ray_address is None and not os.environ.get("RAY_ADDRESS") and not args.ray_all_interfaces
        if self.local:  # ray.init() starts a cluster of its own (with RAY_ADDRESS set, it joins that one)
            loopback_only()
        self.ray = require("ray", "scoring on Ray (--ray)")
        self.signals: list[int] = []
        self._saved: Any = None

    def job_options(self, scorer: ScorerOptions) -> Any:
        """The job's options for --artifacts (a bad directory is exit 2 now; random weights are announced)."""
        from ..artifacts import Artifacts
        from ..results import RANDOM_WEIGHTS_BANNER
        from .job import JobOptions

        if Artifacts.load(self.args.artifacts, hash_check=scorer.hash_check).random_weights:
            say(f"WARNING: {RANDOM_WEIGHTS_BANNER}")
        return JobOptions(os.fspath(self.args.artifacts), scorer, gpus_per_worker=self.args.gpus_per_worker,
                          commit_rows=self.args.commit_rows)

    def __enter__(self) -> "RaySession":
        def stop(signum: int, frame: Any) -> None:
            self.signals.append(signum)
            raise KeyboardInterrupt

        self._saved = signal.signal(signal.SIGTERM, stop)
        return self

    def run(self, job: Any, progress: Any = say) -> Any:
        """Run a ScaleJob (opened: its checks are done) on the cluster; its Tally."""
        if not job.done and not self.ray.is_initialized():
            _quiet_ray(self.args.verbose)
            self.ray.init(address=self.args.ray_address, log_to_driver=self.args.verbose, logging_level=logging.WARNING,
                          **({} if self.args.ray_address else {"include_dashboard": False}))
            if self.local:
                check_loopback(self.ray)
        try:
            return job.run(progress=progress)
        except Exception as e:  # noqa: BLE001 - a user error raised inside a Ray task arrives wrapped
            raise _user_error(e) or e

    @property
    def exit_code(self) -> int:
        return 128 + (self.signals[0] if self.signals else signal.SIGINT)

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._saved)
        if self.ray.is_initialized():
            self.ray.shutdown()


def loopback_only() -> None:
    """Have the local cluster that ray.init() starts listen on 127.0.0.1 only. Ray reads the switch when it is
    imported, so this comes first; a process that imported ray already gets check_loopback's refusal."""
    os.environ[RAY_MULTI_NODE_ENV] = "0"


def check_loopback(ray: Any) -> None:
    """Refuse to run on a local cluster that listens beyond this machine without being asked to."""
    host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0].strip("[]")
    if host not in ("127.0.0.1", "::1", "localhost"):
        ray.shutdown()
        raise InputError(f"the local Ray cluster started at {host}, not on 127.0.0.1 (ray was imported before "
                         f"{RAY_MULTI_NODE_ENV}=0 could be set); pass --ray-all-interfaces to allow that")


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
