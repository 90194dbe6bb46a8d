"""What a run of `pickscore score --output` was: its input and the model settings its scores depend on,
recorded beside the output (`.OUT.run.json`) when the run starts and kept after it ends, so that
`--resume` can only finish the same run. The Ray job keeps the same record in its output directory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from ..durable import write_json_atomically
from ..errors import InputError
from ..optional import require

RUN_FORMAT = "pickscore-cli-run/1"
CHUNK = 1 << 20


def record_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.run.json")


def file_identity(path: Path) -> dict[str, Any]:
    """An input file's content (SHA-256 of every byte: one sequential read, about a second per GB) and
    size, plus its lines (or Parquet rows), which say how it changed when it did. Any kind of file."""
    path = Path(path)
    digest, size, lines = hashlib.sha256(), 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            lines += chunk.count(b"\n")
    counted = {"lines": lines}
    if path.suffix.lower() == ".parquet":
        counted = {"rows": require("pyarrow.parquet", "Parquet input").ParquetFile(path).metadata.num_rows}
    return {"path": str(path.absolute()), "size": size, "sha256": digest.hexdigest(), **counted}


def selection_identity(prompt: str | None, images: Iterable[str]) -> dict[str, Any]:
    """Images named on the command line: the prompt and the list of names (the files' bytes are not read)."""
    images = list(images)
    text = json.dumps([prompt, images], ensure_ascii=True)  # ascii: lone surrogates in a name stay encodable
    return {"prompt and images": hashlib.sha256(text.encode()).hexdigest(), "images": len(images)}


def model_identity(scorer: Any, options: Any) -> dict[str, Any]:
    """What scores depend on: the artifacts, the backend and precision actually running (not 'auto'), and
    the decoding options (`ScorerOptions.identity`); the shape the Ray job records (JobOptions.identity)."""
    return {"artifacts": scorer.artifacts.fingerprint, **options.identity(),
            "backend": scorer.backend.name, "precision": scorer.backend.precision}


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, as the record reads back


def changes(then: dict[str, Any], now: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """'key: old -> new' for every setting that differs."""
    then, now = _normal(then), _normal(now)
    return [f"{key}: {then.get(key, '(none)')!r} -> {now.get(key, '(none)')!r}"
            for key in sorted(set(then) | set(now)) if key not in ignore and then.get(key) != now.get(key)]


def load_record(output: Path) -> dict[str, Any] | None:
    path = record_path(output)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise InputError(f"--resume: the run record {path} cannot be read ({e}); use a new --output, or --overwrite") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise InputError(f"--resume: {path} is not a run record of this version; use a new --output, or --overwrite")
    if not (isinstance(record.get("input"), dict) and isinstance(record.get("model"), dict)):
        raise InputError(f"--resume: the run record {path} is damaged (no input or model); use a new --output, or --overwrite")
    return record


def save_record(output: Path, input_identity: dict[str, Any], model: dict[str, Any], replacing: bool = False) -> None:
    """replacing: the file at `output` is not this run's but the one an --overwrite run replaces when it finishes."""
    write_json_atomically(record_path(output), {"format": RUN_FORMAT, "input": input_identity, "model": model,
                                                "replacing": replacing})
