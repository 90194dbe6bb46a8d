"""What the numerics gate found, kept beside the artifacts (`gate.json`): written by `pickscore verify`
and by export's own gate. `auto` serves a precision other than fp32 only when a record says that it
passed gate v3 on these very towers, and never one that failed on the backend asked for.

Records are keyed by backend and precision and carry the artifacts' fingerprint, so a record made for
other towers (the directory re-exported) is ignored rather than trusted. A pass on any backend counts
for the towers' precision (the gate judges the exported graph); a failure counts for its own backend.
A precision a backend derives at load (openvino's int8 and bf16, from the fp32 files) is another
computation: only that backend's own record counts, and only on a CPU with the SIMD flags it was made on
(its kernels differ with them), so each record also keeps what ran (`runs`) and those flags (`simd`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .durable import write_json_atomically

GATE_FILE = "gate.json"
GATE_VERSION = 3  # records from an older gate do not make a precision eligible for `auto`


@dataclass(frozen=True)
class GateStatus:
    state: str  # "passed", "failed" or "ungated"
    failures: tuple[str, ...] = ()
    backend: str | None = None  # where the deciding record was made
    note: str | None = None  # why a record that exists was not taken as a verdict here


class GateWarning(UserWarning):
    """auto passed over a precision that failed its numerics gate on these artifacts, or was never gated; or a
    gate record could not be read (it then counts as no verdict)."""


def record_problem(key: Any, record: Any) -> str | None:
    """Why one entry of gate.json is not a record this module wrote, or None."""
    if not isinstance(key, str) or key.count("/") != 1:
        return "its key is not backend/precision"
    if not isinstance(record, dict):
        return f"it is {type(record).__name__}, not an object"
    for field, ok in (("passed", lambda v: isinstance(v, bool)),
                      ("failures", lambda v: v is None or (isinstance(v, list) and all(isinstance(f, str) for f in v))),
                      ("gate_version", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool))),
                      ("fingerprint", lambda v: isinstance(v, str)),
                      ("simd", lambda v: v is None or (isinstance(v, list) and all(isinstance(f, str) for f in v)))):
        if not ok(record.get(field)):
            return f"its {field!r} is {record.get(field)!r}"
    return None


def read_gate_records(root: str | Path) -> dict[str, dict[str, Any]]:
    """{"backend/precision": record}; nothing when absent or unreadable (a record is advice, not an artifact).
    A malformed record is left out with a GateWarning naming the file and the field: it is no verdict, so
    `auto` serves fp32 for that precision rather than trusting or crashing on it."""
    path = Path(root) / GATE_FILE
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as e:
        warnings.warn(f"{path} cannot be read ({type(e).__name__}: {e}); its gate verdicts are ignored", GateWarning, stacklevel=2)
        return {}
    if not isinstance(records, dict):
        warnings.warn(f"{path} is {type(records).__name__}, not an object; its gate verdicts are ignored",
                      GateWarning, stacklevel=2)
        return {}
    good = {}
    for key, record in records.items():
        problem = record_problem(key, record)
        if problem:
            warnings.warn(f"{path}: the record {key!r} is ignored (no verdict): {problem}", GateWarning, stacklevel=2)
        else:
            good[key] = record
    return good


def record_gate_results(root: str | Path, fingerprint: str, reports: Iterable[Mapping[str, Any]]) -> Path:
    """Add verify reports to the directory's records (replacing older ones for the same backend/precision).
    Raises OSError where the directory cannot be written."""
    records = read_gate_records(root)
    for r in reports:
        records[f"{r['backend']}/{r['precision']}"] = {
            "passed": bool(r["passed"]), "failures": list(r.get("failures", [])), "gate_version": r.get("gate_version"),
            "weights": r.get("weights"), "fingerprint": fingerprint, "runs": r.get("runs"),
            "simd": (r.get("machine") or {}).get("simd")}
    path = Path(root) / GATE_FILE
    write_json_atomically(path, records)
    return path


def gate_status(root: str | Path, fingerprint: str, backend: str, precision: str,
                derived_on: list[str] | None = None, deriving: Iterable[str] = ()) -> GateStatus:
    """Whether `precision` may be served by `auto` on `backend` for the towers with this fingerprint.
    derived_on: for a precision the backend derives at load, this CPU's SIMD flags (machine.simd_flags): only
    the backend's own record counts, and only one made with the same flags. deriving: the backends that derive
    `precision` themselves, whose passes vouch for nobody else's."""
    not_vouching = set(deriving) - {backend}
    mine = {key: rec for key, rec in read_gate_records(root).items()
            if rec["fingerprint"] == fingerprint and key.endswith(f"/{precision}")
            and key.split("/", 1)[0] not in not_vouching}
    own = mine.get(f"{backend}/{precision}")
    if own is not None and own.get("passed") is False:
        return GateStatus("failed", tuple(own.get("failures") or ()), backend)
    if derived_on is not None:
        if own is None or (own.get("gate_version") or 0) < GATE_VERSION:
            return GateStatus("ungated")
        if own.get("simd") != derived_on:
            return GateStatus("ungated", note=f"its record was made on a CPU with other SIMD flags "
                                              f"({', '.join(own.get('simd') or ['none recorded'])}; here: {', '.join(derived_on)})")
        return GateStatus("passed", backend=backend)
    for key, rec in mine.items():
        if rec.get("passed") is True and (rec.get("gate_version") or 0) >= GATE_VERSION:
            return GateStatus("passed", backend=key.split("/", 1)[0])
    return GateStatus("ungated")
