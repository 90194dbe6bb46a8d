"""Pickle for the reward-server convention of DDPO/GRPO-style trainers, without running anyone's code.

Unpickling is where pickle executes code: every class, function or callable a payload uses is looked
up by name through `find_class` (GLOBAL, STACK_GLOBAL, INST, the copyreg extension codes), and only
such a callable can be invoked (REDUCE, NEWOBJ, BUILD). `RestrictedUnpickler.find_class` refuses every
name, so what can come out is only what pickle builds without one: dicts, lists, tuples, sets, str,
bytes, bytearray, int, float, complex, bool and None (protocol 3 and later; protocol 0-2 pickles
encode bytes through a function, so they are refused too). Persistent ids and out-of-band buffers are
refused as well.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from .http_errors import BadRequest

PLAIN = "only plain containers, strings, bytes and numbers are accepted (pickle protocol 3 or later)"


class RefusedPickle(BadRequest):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise RefusedPickle(f"pickle refused: it names {module}.{name}; {PLAIN}. Send images as encoded bytes and "
                            "numbers as Python floats (e.g. array.tolist()), not numpy or torch objects")

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle(f"pickle refused: it uses a persistent id; {PLAIN}")


def safe_loads(data: bytes) -> Any:
    """Unpickle `data` built only from plain values; BadRequest naming what was refused or malformed."""
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except RefusedPickle:
        raise
    except Exception as e:  # noqa: BLE001 - any other failure is a malformed payload, reported as such
        raise BadRequest(f"malformed pickle: {type(e).__name__}: {e}") from None


def dumps(value: Any) -> bytes:
    """Responses hold plain values only, so a client's plain pickle.loads never meets a class of ours."""
    return pickle.dumps(value, protocol=4)
