"""Pickle for the reward-server convention of DDPO/GRPO-style trainers, without running anyone's code.

Unpickling is where pickle executes code: every class, function or callable a payload uses is looked
up by name through `find_class` (GLOBAL, STACK_GLOBAL, INST, the copyreg extension codes), and only
such a callable can be invoked (REDUCE, NEWOBJ, BUILD). `RestrictedUnpickler.find_class` refuses every
name, so what can come out is only what pickle builds without one: dicts, lists, tuples, sets, str,
bytes, bytearray, int, float, complex, bool and None (protocol 3 and later; protocol 0-2 pickles
encode bytes through a function, so they are refused too). Persistent ids and out-of-band buffers are
refused as well.

One exception, because trainers send their prompts that way (`np.array_split` of a list of prompts
gives numpy arrays of str): a numpy array of str (dtype `<U`/`>U`, any shape) and a numpy str scalar
come out as a list of str and a str. The names numpy's pickles use for them (`_reconstruct`, `ndarray`,
`dtype`, `scalar`) resolve to stand-ins of ours that only ever decode UTF-32 text; numpy is never
imported and no other dtype is accepted.

Before unpickling, the opcodes are walked once (`check_opcodes`): CPython's unpickler grows its memo table to
twice any index a PUT names, so a 9-byte pickle naming index 2**29 would make it allocate and fill 8 GB. An
index is refused unless an earlier opcode could have made it (a pickler numbers its memo from 0), and so is a
pickle of more opcodes than any request needs (the walk is Python: its cost is bounded by that cap).
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import re
import sys
from typing import Any

from .http_errors import BadRequest

PLAIN = "only plain containers, strings, bytes and numbers are accepted (pickle protocol 3 or later)"
# A request of 1024 images with prompts and metadata is ~10k opcodes; walking this many takes ~0.2 s.
MAX_OPCODES = 1 << 18
MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})


class RefusedPickle(BadRequest):
    pass


class TextDType:
    """numpy's `dtype('U<n>')`, and nothing else: the UTF-32 text of a numpy str array."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True):
        if not isinstance(spec, str) or not re.fullmatch(r"U[0-9]{1,6}", spec):
            raise RefusedPickle(f"pickle refused: a numpy array of dtype {str(spec)[:20]!r}; only str arrays (dtype U) "
                                f"are accepted; {PLAIN}")
        self.chars, self.encoding = int(spec[1:]), "utf-32-le" if sys.byteorder == "little" else "utf-32-be"

    def __setstate__(self, state: Any) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        if order not in ("<", ">", "=", "|"):
            raise RefusedPickle(f"pickle refused: a numpy str dtype with byte order {str(order)[:10]!r}")
        if order in "<>":
            self.encoding = "utf-32-le" if order == "<" else "utf-32-be"

    def decode(self, raw: bytes) -> str:
        return raw.decode(self.encoding).rstrip("\x00")  # numpy pads str items with NULs


NDARRAY = object()  # what numpy.ndarray names: only an argument to _reconstruct, never called


class TextArray(list):
    """A numpy str array (any shape), unpickled as the flat list of its str items."""

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], TextDType)
                and isinstance(state[4], bytes) and isinstance(state[1], tuple)
                and all(isinstance(d, int) and d >= 0 for d in state[1])):
            raise RefusedPickle(f"pickle refused: a numpy array that is not one of str; {PLAIN}")
        shape, dtype, raw = state[1], state[2], state[4]
        width = 4 * dtype.chars
        if width == 0 or len(raw) != math.prod(shape) * width:
            raise RefusedPickle("pickle refused: a numpy str array whose data does not match its shape")
        self[:] = [dtype.decode(raw[at:at + width]) for at in range(0, len(raw), width)]


def reconstruct(cls: Any, shape: Any = None, typecode: Any = None) -> TextArray:
    if cls is not NDARRAY:
        raise RefusedPickle(f"pickle refused: numpy _reconstruct of something other than an array; {PLAIN}")
    return TextArray()


def text_scalar(dtype: Any, raw: Any = b"") -> str:
    if not isinstance(dtype, TextDType) or not isinstance(raw, bytes) or len(raw) > 4 * max(dtype.chars, 1):
        raise RefusedPickle(f"pickle refused: a numpy scalar that is not a str; {PLAIN}")
    return dtype.decode(raw)


NUMPY_TEXT = {("numpy._core.multiarray", "_reconstruct"): reconstruct, ("numpy.core.multiarray", "_reconstruct"): reconstruct,
              ("numpy._core.multiarray", "scalar"): text_scalar, ("numpy.core.multiarray", "scalar"): text_scalar,
              ("numpy", "ndarray"): NDARRAY, ("numpy", "dtype"): TextDType}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in NUMPY_TEXT:
            return NUMPY_TEXT[(module, name)]
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
    except UnicodeDecodeError as e:
        raise BadRequest(f"malformed pickle: a numpy str array that is not valid UTF-32 ({e.reason})") from None
    except Exception as e:  # noqa: BLE001 - any other failure is a malformed payload, reported as such
        raise BadRequest(f"malformed pickle: {type(e).__name__}: {e}") from None


def dumps(value: Any) -> bytes:
    """Responses hold plain values only, so a client's plain pickle.loads never meets a class of ours."""
    return pickle.dumps(value, protocol=4)
