"""TensorRT engines, everything that needs no GPU: optimisation profiles derived from the tower specs,
engine keys and records, the refusal of an engine built for another GPU, compute capability, TensorRT
version or ONNX file, the store (records in the manifest, or in the cache when the artifacts are
read-only; atomic writes: an interrupted or failed write leaves no record and no partial file), and the
errors when TensorRT, CUDA or onnxruntime-gpu are missing. Building and running engines needs a GPU:
tests/test_gpu.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
import types

import pytest

from helpers import mounted_tmpfs, run_cli
from pickscore_runtime.artifacts import MANIFEST, Artifacts
from pickscore_runtime.backends import BACKENDS
from pickscore_runtime.engines import (BuildFlags, EngineEnvironment, EngineKey, EngineMismatchError, EngineRecord,
                                       EngineStore, EngineWriteError, atomic_write, tower_profile)
from pickscore_runtime.engines.build import build_command
from pickscore_runtime.errors import BackendUnavailableError, MissingExtraError, PickScoreError
from pickscore_runtime.towers import DYNAMIC_AXES

H100 = EngineEnvironment("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_GPU = BACKENDS["torch-cuda"].unavailable() is None or BACKENDS["onnx-cuda"].unavailable() is None


@pytest.fixture
def artifacts(tiny_artifacts, tmp_path) -> Artifacts:
    """A private copy: these tests write engine records into its manifest."""
    return Artifacts.load(shutil.copytree(tiny_artifacts, tmp_path / "art"))


def key_for(artifacts: Artifacts, tower: str = "vision", env: EngineEnvironment = H100, **flags) -> EngineKey:
    return EngineKey(tower, "fp16", artifacts.tower_sha256(tower, "fp16"), env, BuildFlags(**flags))


def store_engine(store: EngineStore, key: EngineKey, payload: bytes = b"serialized engine " * 64):
    profile = tower_profile(store.artifacts.specs()[key.tower], key.flags)
    return store.add(key, [payload[: len(payload) // 2], payload[len(payload) // 2:]], profile, f"{key.tower}.fp16.onnx", 1.0)


def test_profiles_are_derived_from_the_tower_specs(artifacts):
    specs = artifacts.specs()
    batch_lo, _ = DYNAMIC_AXES["batch"]
    seq_lo, seq_hi = DYNAMIC_AXES["sequence"]
    text = tower_profile(specs["text"], BuildFlags(max_batch=128, opt_batch=32))
    assert list(text) == ["input_ids"]
    assert (text["input_ids"].min, text["input_ids"].opt, text["input_ids"].max) == (
        (batch_lo, seq_lo), (32, seq_hi), (128, seq_hi))
    size = artifacts.manifest["dims"]["image_size"]
    vision = tower_profile(specs["vision"], BuildFlags())
    assert (vision["pixel_values"].min, vision["pixel_values"].opt, vision["pixel_values"].max) == (
        (batch_lo, 3, size, size), (64, 3, size, size), (256, 3, size, size))


@pytest.mark.parametrize("flags,message", [
    ({"opt_batch": 300}, "--opt-batch must be in"),
    ({"max_batch": DYNAMIC_AXES["batch"][1] + 1}, "--max-batch must be in"),
    ({"max_batch": 0}, "--max-batch must be in"),
    ({"opt_level": 6}, "--opt-level must be in"),
    ({"workspace_gb": 0}, "--workspace-gb must be positive"),
])
def test_build_flags_are_checked(flags, message):
    with pytest.raises(PickScoreError, match=message):
        BuildFlags(**flags)


def test_the_key_changes_with_everything_an_engine_depends_on(artifacts):
    base = key_for(artifacts)
    assert key_for(artifacts).digest == base.digest and base.file_name.startswith("vision.fp16.")
    variants = [
        dataclasses.replace(base, tower="text"), dataclasses.replace(base, precision="fp32"),
        dataclasses.replace(base, onnx_sha256="0" * 64),
        dataclasses.replace(base, environment=dataclasses.replace(H100, tensorrt_version="11.1.0.106")),
        dataclasses.replace(base, environment=dataclasses.replace(H100, gpu_name="NVIDIA A100-SXM4-80GB")),
        dataclasses.replace(base, environment=dataclasses.replace(H100, compute_capability="8.0")),
        dataclasses.replace(base, flags=BuildFlags(max_batch=128)), dataclasses.replace(base, flags=BuildFlags(opt_level=5)),
        dataclasses.replace(base, flags=BuildFlags(workspace_gb=8)),
    ]
    assert len({base.digest, *(v.digest for v in variants)}) == len(variants) + 1


def test_engines_are_recorded_in_the_manifest_atomically(artifacts):
    store = EngineStore(artifacts)
    assert store.target.kind == "artifacts"
    record, path = store_engine(store, key_for(artifacts))
    assert path == artifacts.root / "engines" / record.key.file_name and path.read_bytes() == b"serialized engine " * 64
    manifest = json.loads((artifacts.root / MANIFEST).read_text())
    (entry,) = manifest["engines"]
    assert entry["sha256"] == record.sha256 and entry["size"] == path.stat().st_size
    assert (entry["gpu_name"], entry["compute_capability"], entry["tensorrt_version"]) == (H100.gpu_name, "9.0", "10.8.0.43")
    assert entry["onnx_sha256"] == artifacts.tower_sha256("vision", "fp16") and entry["onnx_file"] == "vision.fp16.onnx"
    assert entry["flags"] == BuildFlags().to_json() and entry["profiles"]["pixel_values"]["max"][0] == 256
    assert EngineRecord.from_json(entry) == record
    Artifacts.load(artifacts.root)  # still a valid artifacts directory, every tower hash unchanged
    store_engine(store, key_for(artifacts), b"rebuilt")  # the same key replaces its record
    assert len(json.loads((artifacts.root / MANIFEST).read_text())["engines"]) == 1
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("field,value,says", [
    ("gpu_name", "NVIDIA A100-SXM4-80GB", "built on a NVIDIA H100 80GB HBM3, this GPU is a NVIDIA A100-SXM4-80GB"),
    ("compute_capability", "8.0", "built for compute capability 9.0, this GPU has 8.0"),
    ("tensorrt_version", "11.1.0.106", "built with TensorRT 10.8.0.43, this is TensorRT 11.1.0.106"),
    ("onnx_sha256", "f" * 64, "built from an ONNX file with SHA-256"),
])
def test_an_engine_for_another_gpu_tensorrt_or_onnx_is_refused_saying_which(artifacts, field, value, says):
    store = EngineStore(artifacts)
    record, _ = store_engine(store, key_for(artifacts))
    want = key_for(artifacts)
    want = (dataclasses.replace(want, onnx_sha256=value) if field == "onnx_sha256" else
            dataclasses.replace(want, environment=dataclasses.replace(H100, **{field: value})))
    lookup = store.lookup(want, batch_size=64)
    assert lookup.found is None and [r for r, _ in lookup.unusable] == [record]
    message = str(lookup.error(build_command(artifacts.root, "fp16")))
    assert "refusing to load the TensorRT engine for the vision tower (fp16)" in message and says in message
    assert f"pickscore engine build --artifacts {artifacts.root} --precision fp16" in message
    assert store.lookup(key_for(artifacts), batch_size=64).found == record  # the machine it was built for loads it


def test_any_stored_flags_that_hold_the_batch_are_used_unless_exact_flags_are_asked(artifacts):
    store = EngineStore(artifacts)
    small, _ = store_engine(store, key_for(artifacts, max_batch=32, opt_batch=8))
    big, _ = store_engine(store, key_for(artifacts, max_batch=512, opt_batch=128))
    assert store.lookup(key_for(artifacts), batch_size=16).found == big  # newest of those that fit
    assert store.lookup(key_for(artifacts), batch_size=64).found == big
    assert store.lookup(key_for(artifacts, max_batch=32, opt_batch=8), batch_size=16).found == small  # preferred flags
    exact = store.lookup(key_for(artifacts), exact_flags=True)
    assert exact.found is None and all("other flags" in why[0] for _, why in exact.unusable)
    assert "no TensorRT engine for the text tower (fp16) has been built" in str(
        store.lookup(key_for(artifacts, tower="text")).error("pickscore engine build ..."))


def test_an_interrupted_write_leaves_no_record_and_no_partial_file(artifacts):
    store = EngineStore(artifacts)

    def interrupted():
        yield b"x" * 4096
        raise KeyboardInterrupt  # Ctrl-C (or any failure) in the middle of writing the engine

    with pytest.raises(KeyboardInterrupt):
        store.add(key_for(artifacts), interrupted(), {}, "vision.fp16.onnx")
    assert list((artifacts.root / "engines").iterdir()) == []
    assert "engines" not in json.loads((artifacts.root / MANIFEST).read_text())
    # a killed writer's temp file is never taken for an engine, and the next write of that key removes it
    (artifacts.root / "engines" / f".{key_for(artifacts).file_name}.tmp-killed").write_bytes(b"half")
    assert store.records() == []
    store_engine(store, key_for(artifacts))
    assert sorted(p.name for p in (artifacts.root / "engines").iterdir()) == [key_for(artifacts).file_name]


def test_a_full_disk_leaves_no_record_and_no_partial_file(artifacts):
    with mounted_tmpfs(artifacts.root / "engines", "64k") as fs:
        if fs is None:
            pytest.skip("cannot mount a small tmpfs here")
        store = EngineStore(artifacts)
        with pytest.raises(EngineWriteError, match="cannot write engine .*nothing was recorded"):
            store_engine(store, key_for(artifacts), b"\0" * 400_000)
        assert list(fs.iterdir()) == [] and store.records() == []


def test_atomic_write_on_a_full_disk_keeps_the_old_file_whole(tmp_path):
    with mounted_tmpfs(tmp_path / "fs", "64k") as fs:
        if fs is None:
            pytest.skip("cannot mount a small tmpfs here")
        (fs / "f").write_bytes(b"old")
        with pytest.raises(OSError):
            atomic_write(fs / "f", [b"\0" * 400_000])
        assert (fs / "f").read_bytes() == b"old" and [p.name for p in fs.iterdir()] == ["f"]


def test_read_only_artifacts_keep_their_engines_in_the_cache(tiny_artifacts, tmp_path, monkeypatch):
    monkeypatch.setenv("PICKSCORE_CACHE_DIR", str(tmp_path / "cache"))
    with mounted_tmpfs(tmp_path / "ro", "64m") as fs:
        if fs is None:
            pytest.skip("cannot mount a file system to make read-only here (root ignores file modes)")
        shutil.copytree(tiny_artifacts, fs / "art")
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        artifacts = Artifacts.load(fs / "art")
        store = EngineStore(artifacts)
        assert store.target.kind == "cache" and store.target.root == tmp_path / "cache" / "engines" / artifacts.fingerprint
        record, path = store_engine(store, key_for(artifacts))
        index = json.loads((store.target.root / "index.json").read_text())
        assert index["fingerprint"] == artifacts.fingerprint and index["engines"][0]["key"] == record.key.digest
        assert path.parent == store.target.root and EngineStore(artifacts).lookup(key_for(artifacts)).found == record
        assert "engines" not in json.loads((fs / "art" / MANIFEST).read_text())


def test_a_modified_engine_file_is_never_loaded(artifacts):
    store = EngineStore(artifacts)
    record, path = store_engine(store, key_for(artifacts))
    assert store.checked_path(record, "REBUILD") == path
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    with pytest.raises(EngineMismatchError, match="does not match its record .*REBUILD"):
        store.checked_path(record, "REBUILD")
    path.unlink()
    with pytest.raises(EngineMismatchError, match="recorded but missing"):
        store.checked_path(record, "REBUILD")


def test_engine_list_needs_neither_tensorrt_nor_cuda(artifacts):
    store_engine(EngineStore(artifacts), key_for(artifacts))
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorrt", "cuda", "torch"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import pickscore_runtime.backends.tensorrt, pickscore_runtime.engines  # importable without them
        from pickscore_runtime.cli import main
        sys.exit(main(["engine", "list", "--artifacts", {str(artifacts.root)!r}]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = json.loads(out.stdout)
    assert row["gpu_name"] == H100.gpu_name and row["present"] is True and row["loadable_here"] is None
    assert "tensorrt" in row["why_not"][0]


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_engine_build_without_tensorrt_exits_2_naming_the_extra(artifacts):
    out = run_cli("engine", "build", "--artifacts", str(artifacts.root))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "needs tensorrt, which is not installed: pip install 'pickscore-runtime[tensorrt]'" in out.stderr


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_the_tensorrt_backend_without_tensorrt_names_the_extra(artifacts):
    from pickscore_runtime.backends.tensorrt import create

    with pytest.raises(MissingExtraError, match=r"the tensorrt backend needs tensorrt.*\[tensorrt\]"):
        create(artifacts, "tensorrt", "fp16", 8)


@pytest.mark.skipif(HAS_GPU, reason="a GPU is usable here")
@pytest.mark.parametrize("backend,extra,says", [
    ("tensorrt", "tensorrt", "no NVIDIA GPU found"),
    ("onnx-cuda", "gpu", "replace it with the GPU build"),
    ("torch-cuda", "torch", "no NVIDIA GPU found"),
])
def test_gpu_backends_that_cannot_run_exit_2_naming_why_and_the_extra(tiny_artifacts, sample_images, backend, extra, says):
    no_build = ["--no-build"] if backend == "tensorrt" else []  # tensorrt's own option: the others refuse it
    out = run_cli("score", "--artifacts", str(tiny_artifacts), "--backend", backend, *no_build, "--prompt", "a cat",
                  str(sample_images[0]))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"backend {backend} cannot run here" in out.stderr and says in out.stderr and f"[{extra}]" in out.stderr


def test_tensorrt_older_than_10_1_is_refused_naming_the_version(monkeypatch):
    """Execution contexts that share one memory block need TensorRT 10.1's set_device_memory(ptr, size).
    (cuda-python without a driver: tests/test_tensorrt_logic.py.)"""
    from pickscore_runtime.engines.build import load_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.0.1.6"))
    with pytest.raises(BackendUnavailableError, match=r"the tensorrt backend needs TensorRT 10\.1 or newer, this is 10\.0\.1\.6"):
        load_tensorrt("the tensorrt backend")


def test_the_engine_build_command_in_messages_has_the_flags_that_differ(tmp_path):
    assert build_command(tmp_path, "fp16") == f"pickscore engine build --artifacts {tmp_path} --precision fp16"
    assert build_command(tmp_path, "fp32", BuildFlags(max_batch=512, opt_batch=128)).endswith(
        "--precision fp32 --max-batch 512 --opt-batch 128")
