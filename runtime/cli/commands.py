"""The commands other than `score`. Export and verify reach the export package through its one seam
(`optional.export_tools`), so a runtime-only install says which extra it lacks."""

from __future__ import annotations

import json
from typing import Any

from ..artifacts import Artifacts
from ..backends.registry import check_backend_options
from ..errors import InputError
from ..gate_records import read_gate_records, record_gate_results
from ..optional import export_tools, require
from ..scorer import DEFAULT_MODEL
from ..console import EXIT_OK, EXIT_UNSCORED, say
from .engine import cmd_engine
from .evaluate import cmd_eval
from .score import cmd_score


def model_source(tools: Any, args: Any):
    """The model a command names (--random-init alone: PickScore's own config, shipped with the package),
    or None: the artifacts' own source."""
    if args.stress and not args.random_init:
        raise InputError("--stress plants outliers into random weights: it needs --random-init")
    model = args.model or (DEFAULT_MODEL if args.random_init else None)
    if model is None:
        return None
    return tools.ModelSource(model, random_init=args.random_init, seed=args.seed, stress=args.stress,
                             revision=args.revision).resolved()


def cmd_export(args: Any) -> int:
    tools = export_tools()
    tools.export_artifacts(model_source(tools, args), args.out, args.precision, force=args.force, progress=say,
                           int8_plan_name=args.int8_plan, gate=not args.no_verify)
    say(f"exported {', '.join(args.precision)} to {args.out}")
    failed = [key for key, rec in read_gate_records(args.out).items() if rec.get("passed") is False]
    if failed:
        say(f"the numerics gate failed for {', '.join(failed)} (see {args.out}/gate.json): `auto` serves fp32 instead")
        return EXIT_UNSCORED
    return EXIT_OK


def cmd_verify(args: Any) -> int:
    backend_options = dict(args.backend_options)
    check_backend_options(args.backend, backend_options)  # before the minutes of loading the reference
    tools = export_tools()
    reports = tools.verify_precisions(args.artifacts, args.precision or [None], model_source(tools, args),
                                      backend=args.backend, images=args.images, progress=say,
                                      reference_device=args.reference_device, reference_cache=args.reference_cache,
                                      backend_options=backend_options)
    text = json.dumps(reports[0] if len(reports) == 1 else reports, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    for report in reports:
        say(("PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"])) +
            f" ({report['backend']}/{report['precision']}, {report['n_prompts']} prompts x {report['n_images']} images)")
    try:  # what `auto` reads: it never picks a precision that failed here
        fingerprint = Artifacts.load(args.artifacts, hash_check="size").fingerprint
        say(f"recorded in {record_gate_results(args.artifacts, fingerprint, reports)}")
    except OSError as e:
        say(f"warning: could not record the results beside the artifacts ({e}); `auto` will not know them")
    return EXIT_OK if all(r["passed"] for r in reports) else EXIT_UNSCORED


def cmd_bench(args: Any) -> int:
    from ..bench import DEFAULT_STAGES, markdown_table, plot, preset, run_bench
    from ..colocated import check_colocate

    if args.colocate:
        check_colocate()  # before the model, the artifacts or any backend loads
    if args.plot:
        require("matplotlib", "bench --plot", extra="bench")  # before the bench, not after it
    source = model_source(export_tools("the torch backends", ("torch", "transformers"), "torch"), args) \
        if args.model or args.random_init or args.stress else None
    chosen = preset(args.preset) if args.preset else None

    def setting(flag: Any, from_preset: Any, default: Any) -> Any:
        return flag if flag is not None else from_preset if chosen is not None else default

    result = run_bench(
        args.artifacts, setting(args.backends, chosen and list(chosen.backends), [("onnx-cpu", "fp32")]),
        setting(args.batch_sizes, chosen and list(chosen.batch_sizes), [1, 4, 8]),
        setting(args.stages, chosen and list(chosen.stages), DEFAULT_STAGES), model_source=source, threads=args.threads,
        workers=args.workers, min_calls=setting(args.min_calls, chosen and chosen.min_calls, 3),
        min_seconds=setting(args.min_seconds, chosen and chosen.min_seconds, 2.0), interleave=not args.sequential,
        n_jpegs=setting(args.e2e_images, chosen and chosen.e2e_images, None), progress=say, output=args.output,
        colocate=args.colocate)
    table = markdown_table(result)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.plot:
        plot(result, args.plot)
    failed = [row for row in result["rows"] if row.get("error")]
    if failed:
        say(f"{len(failed)} cell(s) failed (error rows in the table); the rest were measured")
        return EXIT_UNSCORED
    return EXIT_OK


def cmd_cache(args: Any) -> int:
    from ..text_cache import cache_stats

    print(json.dumps(cache_stats(args.path), indent=2))
    return EXIT_OK


def cmd_info(args: Any) -> int:
    a = Artifacts.load(args.artifacts, hash_check="size")
    print(json.dumps({
        "artifacts": str(a.root), "random_weights": a.random_weights, "source": a.source, "precisions": a.precisions,
        "dims": a.dims, "logit_scale": a.logit_scale, "created_utc": a.created_utc, "packages": a.packages or None,
    }, indent=2))
    return EXIT_OK


def cmd_serve(args: Any) -> int:
    from ..server.command import cmd_serve as serve  # the server stack loads only for this command

    return serve(args)


COMMANDS = {"export": cmd_export, "score": cmd_score, "eval": cmd_eval, "verify": cmd_verify, "bench": cmd_bench, "cache": cmd_cache,
            "info": cmd_info, "serve": cmd_serve, "engine": cmd_engine}
