"""What `pickscore verify` found, kept beside the artifacts (`gate.json`): `auto` never picks a precision
that failed its gate on these very artifacts (stress weights fail int8, say), and says so.

Records are keyed by backend and precision and carry the artifacts' fingerprint, so a record made for
other towers (the directory re-exported) is ignored rather than trusted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from .durable import write_json_atomically

GATE_FILE = "gate.json"


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


def failed_gates(root: str | Path, fingerprint: str, backend: str) -> dict[str, list[str]]:
    """{precision: failures} for this backend on these towers."""
    return {key.split("/", 1)[1]: rec.get("failures", []) for key, rec in read_gate_records(root).items()
            if key.startswith(f"{backend}/") and isinstance(rec, dict) and rec.get("passed") is False
            and rec.get("fingerprint") == fingerprint}
