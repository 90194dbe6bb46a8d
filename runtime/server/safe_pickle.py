"""Pickle for the reward-server convention of DDPO/GRPO-style trainers, without running anyone's code.

Unpickling is where pickle executes code: every class, function or callable a payload uses is looked
up by name through `find_class` (GLOBAL, STACK_GLOBAL, INST, the copyreg extension codes), and only
such a callable can be invoked (REDUCE, NEWOBJ, BUILD). `RestrictedUnpickler.find_class` refuses every
name, so what can come out is only what pickle builds without one: dicts, lists, tuples, sets, str,
bytes, bytearray, int, float, complex, bool and None (protocol 3 and later; protocol 0-2 pickles
encode bytes through a function, so they are refused too). Persistent ids and out-of-band buffers are
refused as well.

Before unpickling, the opcodes are walked once (`check_opcodes`): CPython's unpickler grows its memo table to
twice any index a PUT names, so a 9-byte pickle naming index 2**29 would make it allocate and fill 8 GB. An
index is refused unless an earlier opcode could have made it (a pickler numbers its memo from 0), and so is a
pickle of more opcodes than any request needs (the walk is Python: its cost is bounded by that cap).
"""

from __future__ import annotations

import io
import pickle
import pickletools
from typing import Any

from .http_errors import BadRequest

PLAIN = "only plain containers, strings, bytes and numbers are accepted (pickle protocol 3 or later)"
# A request of 1024 images with prompts and metadata is ~10k opcodes; walking this many takes ~0.2 s.
MAX_OPCODES = 1 << 18
MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})


class RefusedPickle(BadRequest):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise RefusedPickle(f"pickle refused: it names {module}.{name}; {PLAIN}. Send images as encoded bytes and "
                            "numbers as Python floats (e.g. array.tolist()), not numpy or torch objects")

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle(f"pickle refused: it uses a persistent id; {PLAIN}")


def check_opcodes(data: bytes) -> None:
    """RefusedPickle for a memo index no pickler would write, or more than MAX_OPCODES opcodes."""
    for count, (opcode, arg, at) in enumerate(pickletools.genops(data)):
        if count >= MAX_OPCODES:
            raise RefusedPickle(f"pickle refused: over {MAX_OPCODES:,} opcodes; {PLAIN}, and no more of them than a "
                                "request needs")
        if opcode.name in MEMO_OPCODES and arg > count:
            raise RefusedPickle(f"pickle refused: {opcode.name} at byte {at} names memo entry {arg:,}, which no "
                                "earlier opcode could have made")


def safe_loads(data: bytes) -> Any:
    """Unpickle `data` built only from plain values; BadRequest naming what was refused or malformed."""
    try:
        check_opcodes(data)
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except RefusedPickle:
        raise
    except Exception as e:  # noqa: BLE001 - any other failure is a malformed payload, reported as such
        raise BadRequest(f"malformed pickle: {type(e).__name__}: {e}") from None


def dumps(value: Any) -> bytes:
    """Responses hold plain values only, so a client's plain pickle.loads never meets a class of ours."""
    return pickle.dumps(value, protocol=4)
