"""Building TensorRT engines from the artifacts' ONNX files: the only code here (with the tensorrt
backend) that imports TensorRT, lazily, through the dependency gate.

The network is parsed from the ONNX file's path (so its external-data file is found) and built strongly
typed: TensorRT computes in exactly the types the graph declares, so the fp16 graph with its fp32
islands is the precision plan, as it is for ONNX Runtime. TensorRT 10 is asked for that with the
STRONGLY_TYPED creation flag; TensorRT 11 builds nothing else (the flag is deprecated there and the
weak-typing precision flags are gone). TF32 is switched off, so fp32 parts compute in fp32. The
optimisation profile comes from the tower specs (profiles.py); a persistent timing cache makes
rebuilds fast.
"""

from __future__ import annotations

import logging
import mmap
import re
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np

from ..artifacts import Artifacts
from ..errors import BackendUnavailableError, PickScoreError
from ..optional import require
from ..towers import TOWERS, TowerSpec
from .profiles import BuildFlags, ShapeRange, tower_profile
from .records import EngineEnvironment, EngineKey, EngineRecord
from ..durable import atomic_write
from .store import EngineStore, chunked

log = logging.getLogger("pickscore")

# name-based IO, execute_async_v3, strongly typed networks (10.0); device_memory_size_v2 and
# set_device_memory(ptr, size), for execution contexts that share one memory block (10.1)
MIN_TENSORRT = (10, 1)


class EngineBuildError(PickScoreError):
    """TensorRT could not parse or build a tower."""


_LOGGER: Any = None


def load_tensorrt(feature: str = "building TensorRT engines") -> ModuleType:
    trt = require("tensorrt", feature)
    if tensorrt_version(trt) < MIN_TENSORRT:
        raise BackendUnavailableError(f"{feature} needs TensorRT {'.'.join(map(str, MIN_TENSORRT))} or newer, this is "
                                      f"{trt.__version__}; pip install -U 'pickscore-runtime[tensorrt]'")
    return trt


def tensorrt_version(trt: ModuleType) -> tuple[int, int]:
    """(major, minor) of the TensorRT module."""
    major, minor = (trt.__version__.split(".") + ["0"])[:2]
    return int(major), int(minor)


def tensorrt_major(trt: ModuleType) -> int:
    return tensorrt_version(trt)[0]


def trt_logger(trt: ModuleType) -> Any:
    """One logger for every builder and runtime of the process, as TensorRT expects."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def machine_environment(trt: ModuleType) -> EngineEnvironment:
    from ..cuda_memory import current_device

    device = current_device()
    return EngineEnvironment(trt.__version__, device.name, device.compute_capability)


def build_command(root: Path, precision: str, flags: BuildFlags | None = None) -> str:
    """The command that builds the engines an error is about."""
    cmd = f"pickscore engine build --artifacts {root} --precision {precision}"
    if flags is not None:
        default = BuildFlags()
        for name, option in (("max_batch", "--max-batch"), ("opt_batch", "--opt-batch"), ("opt_level", "--opt-level"),
                             ("workspace_gb", "--workspace-gb")):
            if getattr(flags, name) != getattr(default, name):
                cmd += f" {option} {getattr(flags, name)}"
    return cmd


def default_timing_cache(store: EngineStore, env: EngineEnvironment) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{env.gpu_name}-sm{env.compute_capability}-trt{env.tensorrt_version}")
    return store.target.engine_dir / f"timing-{slug}.cache"


def create_network(trt: ModuleType, builder: Any) -> Any:
    if tensorrt_major(trt) >= 11:
        return builder.create_network(0)  # always strongly typed; STRONGLY_TYPED is deprecated and ignored
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    if not network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED):
        raise EngineBuildError(f"TensorRT {trt.__version__} did not create a strongly typed network")
    return network


def check_network_io(trt: ModuleType, network: Any, spec: TowerSpec, onnx_path: Path) -> None:
    """The parsed network's IO are the tower spec's: same names and dtypes (shapes come from the profile)."""
    have = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    have.update({network.get_output(i).name: network.get_output(i) for i in range(network.num_outputs)})
    for tensor in spec.inputs + spec.outputs:
        if tensor.name not in have:
            raise EngineBuildError(f"{onnx_path} has no tensor {tensor.name!r}; the tower spec expects {tensor.to_json()}")
        dtype = np.dtype(trt.nptype(have[tensor.name].dtype))
        if dtype != np.dtype(tensor.dtype):
            raise EngineBuildError(f"{onnx_path}: {tensor.name} is {dtype} in TensorRT, the tower spec says {tensor.dtype}")


def load_timing_cache(config: Any, path: Path | None) -> None:
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s is from another GPU or TensorRT version (or damaged); starting a new one", path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def build_engine(trt: ModuleType, onnx_path: Path, spec: TowerSpec, flags: BuildFlags,
                 timing_cache: Path | None) -> tuple[Any, dict[str, ShapeRange]]:
    """One tower's serialized engine (a buffer) and its optimisation profile."""
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = create_network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {errors}")
    check_network_io(trt, network, spec, onnx_path)
    config = builder.create_builder_config()
    config.builder_optimization_level = flags.opt_level
    if flags.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(flags.workspace_gb * 2**30))
    if not flags.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = tower_profile(spec, flags)
    trt_profile = builder.create_optimization_profile()
    for name, shapes in profile.items():
        trt_profile.set_shape(name, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(trt_profile)
    load_timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)")
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(timing_cache, [memoryview(config.get_timing_cache().serialize())])
    return plan, profile


def engine_key(artifacts: Artifacts, tower: str, precision: str, env: EngineEnvironment, flags: BuildFlags) -> EngineKey:
    return EngineKey(tower, precision, artifacts.tower_sha256(tower, precision), env, flags)


def build_and_store(trt: ModuleType, store: EngineStore, key: EngineKey, spec: TowerSpec, timing_cache: Path | None,
                    progress: Callable[[str], None]) -> tuple[EngineRecord, Path]:
    artifacts = store.artifacts
    onnx_path = artifacts.tower_file(key.tower, key.precision)
    shapes = tower_profile(spec, key.flags)
    progress(f"building the TensorRT engine for the {key.tower} tower ({key.precision}, batch 1-{key.flags.max_batch}, "
             f"optimisation level {key.flags.opt_level}) on {key.environment.gpu_name}: this takes minutes "
             f"(profile {', '.join(f'{n} {list(s.min)}..{list(s.max)}' for n, s in shapes.items())})")
    t0 = time.perf_counter()
    plan, profile = build_engine(trt, onnx_path, spec, key.flags, timing_cache)
    seconds = round(time.perf_counter() - t0, 1)
    record, path = store.add(key, chunked(plan), profile, onnx_path.relative_to(artifacts.root).as_posix(), seconds)
    progress(f"built {path} ({record.size / 2**20:.0f} MiB) in {seconds:.0f} s")
    return record, path


def build_engines(artifacts: Artifacts, precision: str, flags: BuildFlags, timing_cache: Path | None = None,
                  force: bool = False, progress: Callable[[str], None] = log.info,
                  towers: tuple[str, ...] = TOWERS) -> list[tuple[EngineRecord, Path, bool]]:
    """`pickscore engine build`: an engine per tower for this machine, unless one with these flags is
    stored already (force: build anyway). Returns (record, path, built) per tower."""
    trt = load_tensorrt()
    env = machine_environment(trt)
    store = EngineStore(artifacts)
    timing_cache = timing_cache or default_timing_cache(store, env)
    specs = artifacts.specs()
    out = []
    for tower in towers:
        key = engine_key(artifacts, tower, precision, env, flags)
        with store.build_lock(key):
            found = None if force else store.lookup(key, exact_flags=True).found
            if found is not None:
                progress(f"{tower} ({precision}): an engine for this machine and these flags exists: {store.path(found)}")
                out.append((found, store.path(found), False))
                continue
            record, path = build_and_store(trt, store, key, specs[tower], timing_cache, progress)
            out.append((record, path, True))
    return out


def ensure_engine(trt: ModuleType, store: EngineStore, key: EngineKey, batch_size: int, exact_flags: bool,
                  build: bool, progress: Callable[[str], None]) -> tuple[EngineRecord, Path]:
    """The engine to load for `key` (any stored flags whose profile holds batch_size, unless
    exact_flags), built first when none fits and `build` allows; otherwise refused, saying why and how
    to build one."""
    rebuild = build_command(store.artifacts.root, key.precision, key.flags if exact_flags else None)
    lookup = store.lookup(key, batch_size, exact_flags)
    if lookup.found is None and build:
        with store.build_lock(key):
            lookup = store.lookup(key, batch_size, exact_flags)  # another process may have built it meanwhile
            if lookup.found is None:
                if lookup.unusable:
                    progress(f"the stored {key.tower} engine(s) cannot be used here ({lookup.reasons()}); "
                             "building one for this machine")
                build_and_store(trt, store, key, store.artifacts.specs()[key.tower],
                                default_timing_cache(store, key.environment), progress)
                lookup = store.lookup(key, batch_size, exact_flags)
    if lookup.found is None:
        raise lookup.error(rebuild)
    return lookup.found, store.checked_path(lookup.found, rebuild)


def read_engine(path: Path) -> mmap.mmap:
    """The engine file mapped read-only (TensorRT copies what it needs while deserializing)."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
