"""`pickscore engine build | list`: TensorRT engines for an artifacts directory."""

from __future__ import annotations

import json
from typing import Any

from ..artifacts import Artifacts
from ..errors import ArtifactError, PickScoreError
from ..console import EXIT_OK, say


def cmd_engine(args: Any) -> int:
    if args.engine_action == "build":
        return engine_build(args)
    return engine_list(args)


def engine_build(args: Any) -> int:
    from ..engines.build import build_engines, load_tensorrt
    from ..engines.profiles import BuildFlags

    load_tensorrt()  # a missing TensorRT is named (with its extra) before the artifacts are hashed
    flags = BuildFlags(max_batch=args.max_batch, opt_batch=args.opt_batch, opt_level=args.opt_level,
                       workspace_gb=args.workspace_gb)
    artifacts = Artifacts.load(args.artifacts, hash_check=args.hash_check)
    if args.precision not in artifacts.precisions:
        raise PickScoreError(f"{args.artifacts} has no {args.precision} towers (has: {', '.join(artifacts.precisions)}); "
                             f"export them with `pickscore export --precision {args.precision}`")
    done = build_engines(artifacts, args.precision, flags, args.timing_cache, force=args.force, progress=say)
    print(json.dumps([{**record.to_json(), "path": str(path), "built_now": built} for record, path, built in done], indent=2))
    return EXIT_OK


def engine_list(args: Any) -> int:
    """Every recorded engine and, where TensorRT and a GPU are here, whether this machine can load it."""
    from ..engines.records import EngineKey, differences
    from ..engines.store import EngineStore

    artifacts = Artifacts.load(args.artifacts, hash_check="size")
    env, why_not = None, None
    try:
        from ..engines.build import load_tensorrt, machine_environment

        env = machine_environment(load_tensorrt("checking which engines this machine can load"))
    except PickScoreError as e:
        why_not = str(e)
    rows = []
    for record, path in EngineStore(artifacts).records():
        row = {**record.to_json(), "path": str(path), "present": path.is_file()}
        if env is not None:
            key = record.key
            try:
                onnx_sha256 = artifacts.tower_sha256(key.tower, key.precision)
            except ArtifactError:
                onnx_sha256 = "(no such tower in the artifacts now)"
            row["why_not"] = differences(record, EngineKey(key.tower, key.precision, onnx_sha256, env, key.flags))
            row["loadable_here"] = not row["why_not"]
        else:
            row["loadable_here"], row["why_not"] = None, [why_not]
        rows.append(row)
    print(json.dumps(rows, indent=2))
    if not rows:
        say(f"no engines recorded for {args.artifacts}; build them with `pickscore engine build --artifacts {args.artifacts}`")
    return EXIT_OK
