"""What the numerics gate found, kept beside the artifacts (`gate.json`): written by `pickscore verify`
and by export's own gate. `auto` serves a precision other than fp32 only when a record says that it
passed gate v3 on these very towers, and never one that failed on the backend asked for.

Records are keyed by backend and precision and carry the artifacts' fingerprint, so a record made for
other towers (the directory re-exported) is ignored rather than trusted. A pass on any backend counts
for the towers' precision (the gate judges the exported graph); a failure counts for its own backend.
"""

from __future__ import annotations

import json
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


def read_gate_records(root: str | Path) -> dict[str, dict[str, Any]]:
    """{"backend/precision": record}; nothing when absent or unreadable (a record is advice, not an artifact)."""
    try:
        records = json.loads((Path(root) / GATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def record_gate_results(root: str | Path, fingerprint: str, reports: Iterable[Mapping[str, Any]]) -> Path:
    """Add verify reports to the directory's records (replacing older ones for the same backend/precision).
    Raises OSError where the directory cannot be written."""
    records = read_gate_records(root)
    for r in reports:
        records[f"{r['backend']}/{r['precision']}"] = {
            "passed": bool(r["passed"]), "failures": list(r.get("failures", [])), "gate_version": r.get("gate_version"),
            "weights": r.get("weights"), "fingerprint": fingerprint}
    path = Path(root) / GATE_FILE
    write_json_atomically(path, records)
    return path


def gate_status(root: str | Path, fingerprint: str, backend: str, precision: str) -> GateStatus:
    """Whether `precision` may be served by `auto` on `backend` for the towers with this fingerprint."""
    mine = {key: rec for key, rec in read_gate_records(root).items()
            if isinstance(rec, dict) and rec.get("fingerprint") == fingerprint and key.endswith(f"/{precision}")}
    own = mine.get(f"{backend}/{precision}")
    if own is not None and own.get("passed") is False:
        return GateStatus("failed", tuple(own.get("failures") or ()), backend)
    for key, rec in mine.items():
        if rec.get("passed") is True and (rec.get("gate_version") or 0) >= GATE_VERSION:
            return GateStatus("passed", backend=key.split("/", 1)[0])
    return GateStatus("ungated")
