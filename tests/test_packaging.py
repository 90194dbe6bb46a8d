"""A fresh clone, or the wheel alone, is the whole product: every package and model file is declared (and
the built wheel holds them), PickScore's own config and tokenizer files ship inside it so `--random-init`
works offline with no path, there is one version, and one ONNX Runtime: [cpu] or [gpu], never both. Each GPU
stack's pins hold together: a TensorRT variant and cuda-python of one CUDA major, no cuda-python without
`cuda.bindings`, an onnxruntime-gpu with the options onnx-cuda sets."""

from __future__ import annotations

import hashlib
import itertools
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from argparse import Namespace
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"runtime": "pickscore_runtime", "export": "pickscore_export", "models": "pickscore_models"}
PICKSCORE_FILES = ("config.json", "merges.txt", "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer_config.json", "vocab.json")
HUB_ID = "yuvalkirstain/PickScore_v1"


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def source_files() -> dict[str, Path]:
    """Every file the wheel must hold, by its path inside the wheel: each .py of the three packages and each
    data file of the models package."""
    out = {}
    for folder, package in ROOTS.items():
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and (path.suffix == ".py" or folder == "models"):
                out["/".join((package, *path.relative_to(REPO / folder).parts))] = path
    return out


# ---- the declarations (no build) ----------------------------------------------------------------------
def test_every_folder_with_code_or_model_files_is_a_declared_package():
    setuptools = pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == {package: folder for folder, package in ROOTS.items()}
    folders = {str(Path(name).parent).replace("/", ".") for name in source_files()}
    missing = folders - set(setuptools["packages"])
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_one_version_source():
    import pickscore_runtime

    project = pyproject()["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pickscore_runtime.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", pickscore_runtime.__version__)


def test_extras_pair_the_onnxruntimes_and_build_on_each_other():
    extras = pyproject()["project"]["optional-dependencies"]
    base = pyproject()["project"]["dependencies"]
    assert not [r for r in base if r.startswith("onnxruntime")], "the base install takes neither onnxruntime"
    assert extras["cpu"] == ["onnxruntime>=1.17"] and extras["gpu"] == ["onnxruntime-gpu>=1.18"]
    assert extras["test"][0] == "pickscore-runtime[cpu,all,testing]"
    assert extras["all"] == ["pickscore-runtime[export,parquet,ray,bench,server,serve-ray]"]


def test_the_pickscore_model_files_ship_in_the_package_as_provenance_records_them():
    from pickscore_models import pickscore_v1_dir

    folder = pickscore_v1_dir()
    provenance = (folder / "PROVENANCE.md").read_text()
    recorded = dict(re.findall(r"^\| (\S+) \| ([0-9a-f]{64}) \|$", provenance, re.M))
    assert sorted(recorded) == sorted(PICKSCORE_FILES)
    for name, digest in recorded.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert "does not commit" not in provenance


# ---- --random-init with no path, offline --------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    """Any hub access fails the test."""
    import huggingface_hub

    from pickscore_export import source

    def refuse(*args, **kwargs):
        raise AssertionError(f"touched the hub: {args} {kwargs}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(source, "hub_snapshot", refuse)


def test_random_init_of_the_pickscore_hub_id_builds_from_the_bundled_files_offline(no_network):
    from pickscore_export.build import first_use_estimate
    from pickscore_export.source import ModelSource, read_preprocessing, tokenizer_files
    from pickscore_models import pickscore_v1_dir

    src = ModelSource(HUB_ID, random_init=True, seed=3)
    assert src.local_dir == src.bundled_dir == pickscore_v1_dir()
    assert src.resolved() is src
    described = src.describe()
    assert described["kind"] == "bundled" and "path" not in described  # no site-packages path in a manifest
    assert described["random_init"]["seed"] == 3
    assert ModelSource.from_manifest({"model": {"source": described}}) == src
    assert "sha256" in src.cache_key()
    assert tokenizer_files(src) == pickscore_v1_dir()
    assert read_preprocessing(tokenizer_files(src))["crop_size"] == 224
    assert "GB of disk" in first_use_estimate(src, ["fp32"])

    from transformers import CLIPConfig

    config = CLIPConfig.from_pretrained(src.local_dir)  # what load_clip builds the random model from
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (1280, 32)


def test_the_cli_random_init_without_model_is_the_bundled_pickscore(no_network):
    from pickscore_export import api
    from pickscore_runtime.cli.commands import model_source

    src = model_source(api, Namespace(model=None, random_init=True, seed=0, stress=False, revision=None))
    assert src.model == HUB_ID and src.bundled_dir is not None and src.commit is None
    from pickscore_export.source import ModelSource

    assert ModelSource(None, random_init=True) == ModelSource(HUB_ID, random_init=True) == src


def test_first_use_with_random_init_and_no_model_exports_the_bundled_pickscore(no_network, monkeypatch, tmp_path):
    """PickScorer.from_pretrained(random_init=True) / `pickscore score --random-init` up to the export itself
    (the full-size export is CI's slow check, not this one)."""
    from pickscore_export import api
    from pickscore_runtime.export_cache import cached_artifacts
    from pickscore_runtime.scorer import DEFAULT_MODEL

    asked = []

    def export(source, target, precisions, **kw):
        asked.append((source, target, precisions))
        raise KeyboardInterrupt  # stop before building ViT-H

    monkeypatch.setenv("PICKSCORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(api, "export_artifacts", export)
    said = []
    with pytest.raises(KeyboardInterrupt):
        cached_artifacts(DEFAULT_MODEL, ["fp32"], random_init=True, progress=said.append)
    ((source, target, precisions),) = asked
    assert source.model == HUB_ID and source.bundled_dir is not None and source.random_init
    assert target.parent == tmp_path / "cache" and target.name.startswith("PickScore_v1-random0-fp32-")
    assert "first use of" in said[0] and "GB of disk" in said[0]


def test_trained_weights_or_a_pinned_revision_still_go_to_the_hub():
    from pickscore_export.source import ModelSource

    assert ModelSource(HUB_ID).local_dir is None
    assert ModelSource(HUB_ID, random_init=True, revision="main").bundled_dir is None


def test_a_folder_with_only_a_config_takes_the_bundled_tokenizer_files(no_network):
    from pickscore_export.source import ModelSource, tokenizer_files
    from pickscore_models import pickscore_v1_dir, tiny_clip_dir

    assert sorted(p.name for p in tiny_clip_dir().iterdir()) == ["config.json"]
    assert tokenizer_files(ModelSource(str(tiny_clip_dir()), random_init=True)) == pickscore_v1_dir()


def test_make_tiny_model_dir_needs_nothing_outside_the_package(tmp_path):
    from pickscore_export.tiny import make_tiny_model_dir

    folder = make_tiny_model_dir(tmp_path / "tiny")
    assert {"config.json", "tokenizer.json", "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}


# ---- without any onnxruntime --------------------------------------------------------------------------
def test_without_onnxruntime_the_runtime_imports_and_the_onnx_backends_name_both_extras():
    code = textwrap.dedent("""
        import sys
        sys.modules["onnxruntime"] = None  # as if neither [cpu] nor [gpu] were installed
        import pickscore_runtime
        from pickscore_runtime.cli import main
        from pickscore_runtime.backends.registry import BACKENDS, open_backend, select_backend
        from pickscore_runtime.errors import BackendUnavailableError, MissingExtraError
        from pickscore_runtime.optional import export_tools

        assert BACKENDS["onnx-cpu"].unavailable() == "onnxruntime not installed (pip extra [cpu] or [gpu])"
        assert BACKENDS["onnx-cuda"].unavailable() == "onnxruntime-gpu not installed"
        for name in ("onnx-cpu", "onnx-cuda"):
            try:
                open_backend(BACKENDS[name], None, "fp32")
            except MissingExtraError as e:
                assert e.extra == "cpu" and "[cpu]" in str(e) and "[gpu]" in str(e), e
            else:
                raise AssertionError("opened without onnxruntime")
        try:
            select_backend(None, "onnx-cpu")
        except BackendUnavailableError as e:
            assert "[cpu] or [gpu]" in str(e), e
        try:
            export_tools()
        except MissingExtraError as e:
            assert e.module == "onnxruntime" and e.extra == "cpu", e
        assert "onnxruntime" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("NO_ORT_OK")
    """)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "NO_ORT_OK" in out.stdout, out.stderr[-3000:]


# ---- the GPU stacks' pins ------------------------------------------------------------------------------
def requirements_of(reqs: list, extras: set[str]) -> list:
    """The requirements a `pip install pickscore-runtime[extras]` resolves to directly, as packaging
    Requirements (self-references expanded); `reqs`: the Requires-Dist lines, markers and all."""
    from packaging.utils import canonicalize_name

    todo, seen, out = list(extras) + [""], set(), []
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in reqs:
            if (req.marker is None) if extra == "" else (req.marker is not None and req.marker.evaluate({"extra": extra})):
                if canonicalize_name(req.name) == "pickscore-runtime":
                    todo += sorted(req.extras)
                else:
                    out.append(req)
    return out


def required_distributions(metadata: str, extras: set[str]) -> set[str]:
    """The distributions a `pip install pickscore-runtime[extras]` requires directly (self-references expanded)."""
    from packaging.utils import canonicalize_name

    return {canonicalize_name(r.name) for r in requirements_of(metadata_requirements(metadata), extras)}


def metadata_requirements(metadata: str) -> list:
    from packaging.requirements import Requirement

    return [Requirement(r) for r in Parser().parsestr(metadata).get_all("Requires-Dist")]


def pyproject_requirements() -> list:
    """pyproject.toml's dependencies as the wheel's METADATA writes them (each extra's with its marker)."""
    from packaging.requirements import Requirement

    project = pyproject()["project"]
    return [Requirement(r) for r in project["dependencies"]] + [
        Requirement(f'{r}; extra == "{extra}"') for extra, rs in project["optional-dependencies"].items() for r in rs]


def majors(specifier, candidates: range) -> set[int]:
    """The major versions a specifier admits some release of (x.0.0 ... x.19.9 tried)."""
    return {m for m in candidates if any(specifier.contains(f"{m}.{n}.{p}") for n in range(20) for p in range(10))}


def check_gpu_pins(reqs: list) -> None:
    """[tensorrt-cu12] and [tensorrt-cu13]: TensorRT 10/11 built for CUDA N and cuda-python N.x, the same N;
    [tensorrt] is the CUDA 13 one; no cuda-python anywhere admits 12.6.0 (no cuda.bindings); onnxruntime-gpu
    is 1.18 or later (the CUDA provider's use_tf32)."""
    from packaging.utils import canonicalize_name

    base = {canonicalize_name(r.name) for r in requirements_of(reqs, set())}

    def pins(extra: str) -> dict:  # what the extra adds to the base install
        return {canonicalize_name(r.name): r.specifier for r in requirements_of(reqs, {extra})
                if canonicalize_name(r.name) not in base}

    for major in (12, 13):
        got = pins(f"tensorrt-cu{major}")
        assert set(got) == {f"tensorrt-cu{major}", "cuda-python"}, got
        assert majors(got["cuda-python"], range(10, 16)) == {major}, got
        assert majors(got[f"tensorrt-cu{major}"], range(8, 14)) == {10, 11}, got
    assert pins("tensorrt") == pins("tensorrt-cu13")
    cuda_pythons = [r for r in reqs if canonicalize_name(r.name) == "cuda-python"]
    assert cuda_pythons and not [r for r in cuda_pythons if r.specifier.contains("12.6.0")], cuda_pythons
    assert all(r.specifier.contains("12.6.2") or r.specifier.contains("13.0.0") for r in cuda_pythons)
    (ort_gpu,) = [r for r in reqs if canonicalize_name(r.name) == "onnxruntime-gpu"]
    assert not ort_gpu.specifier.contains("1.17.3") and ort_gpu.specifier.contains("1.18.0"), ort_gpu


def test_each_gpu_stack_pins_one_cuda_major():
    check_gpu_pins(pyproject_requirements())


# ---- the wheel itself ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (so no stale build/ folder of the checkout leaks in)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for folder in ROOTS:
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                            "-w", str(out)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "SetuptoolsDeprecationWarning" not in build.stderr, build.stderr
    (path,) = out.glob("pickscore_runtime-*.whl")
    return path


@pytest.mark.integration
def test_the_wheel_holds_every_module_and_model_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(set(source_files()) - names)
    assert not missing, f"missing from the wheel: {missing}"
    assert {f"pickscore_models/pickscore_v1/{n}" for n in PICKSCORE_FILES} <= names


@pytest.mark.integration
def test_the_wheel_metadata_has_one_version_and_one_onnxruntime(wheel):
    import pickscore_runtime

    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    parsed = Parser().parsestr(metadata)
    assert parsed["Version"] == pickscore_runtime.__version__
    assert wheel.name.startswith(f"pickscore_runtime-{pickscore_runtime.__version__}-")
    assert parsed["License-Expression"] == "Apache-2.0"
    extras = set(parsed.get_all("Provides-Extra"))
    assert {"cpu", "gpu", "export", "all", "test", "testing", "tensorrt", "tensorrt-cu12", "tensorrt-cu13"} <= extras
    check_gpu_pins(metadata_requirements(metadata))  # as pip resolves them from the wheel

    base = required_distributions(metadata, set())
    assert not base & {"onnxruntime", "onnxruntime-gpu"}, base
    assert required_distributions(metadata, {"cpu"}) - base == {"onnxruntime"}
    assert required_distributions(metadata, {"gpu"}) - base == {"onnxruntime-gpu"}
    assert "onnxruntime-gpu" not in required_distributions(metadata, {"test"})
    # every combination with [gpu] (bar [cpu] itself and [test], the CPU test stack) requires no CPU onnxruntime
    others = sorted(extras - {"gpu", "cpu", "test"})
    for k in range(len(others) + 1):
        for combo in itertools.combinations(others, k):
            required = required_distributions(metadata, {"gpu", *combo})
            assert "onnxruntime" not in required, f"pickscore-runtime[gpu,{','.join(combo)}] requires onnxruntime"
