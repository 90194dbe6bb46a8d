"""Pickle for the reward-server convention of DDPO/GRPO-style trainers, without running anyone's code.

Unpickling is where pickle executes code: every class, function or callable a payload uses is looked
up by name through `find_class` (GLOBAL, STACK_GLOBAL, INST, the copyreg extension codes), and only
such a callable can be invoked (REDUCE, NEWOBJ, BUILD). `RestrictedUnpickler.find_class` refuses every
name, so what can come out is only what pickle builds without one: dicts, lists, tuples, sets, str,
bytes, bytearray, int, float, complex, bool and None (protocol 3 and later; protocol 0-2 pickles
encode bytes through a function, so they are refused too). Persistent ids and out-of-band buffers are
refused as well.

One exception, because trainers send their prompts that way (`np.array_split` of a list of prompts
gives numpy arrays of str): a numpy array of str (dtype `<U`/`>U`, C order, protocol 4 or 5) and a numpy
str scalar come out as a list of str and a str. The names numpy's pickles use for them (`_reconstruct`,
`_frombuffer`, `ndarray`, `dtype`, `scalar`) resolve to stand-ins of ours that only ever decode UTF-32
text, all of one load charged to one budget (the pickle's size, so memo gets cannot multiply it), never
turning a refused value into text; numpy is never imported, no other dtype is accepted, and a value that
still holds a stand-in (check_plain) is refused.

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


MAX_DIMS = 8  # a prompt array is 1-D (np.array_split) or 2-D; more dimensions than this is no prompt array
PLAIN_TYPES = (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, complex, bool, type(None))


class TextDType:
    """numpy's `dtype('U<n>')`, and nothing else: the UTF-32 text of a numpy str array. Nothing from the
    payload is ever turned into text here: a refused value is named by its type (a nested list's text can
    be made exponentially long by a small pickle)."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True):
        if not isinstance(spec, str) or not re.fullmatch(r"U[0-9]{1,6}", spec):
            shown = repr(spec[:20]) if isinstance(spec, str) else f"of type {type(spec).__name__}"
            raise RefusedPickle(f"pickle refused: a numpy array of dtype {shown}; only str arrays (dtype U) are "
                                f"accepted; {PLAIN}")
        self.chars, self.encoding = int(spec[1:]), "utf-32-le" if sys.byteorder == "little" else "utf-32-be"

    def __setstate__(self, state: Any) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        if not isinstance(order, str) or order not in ("<", ">", "=", "|"):
            raise RefusedPickle("pickle refused: a numpy str dtype with a malformed byte order")
        if order in "<>":
            self.encoding = "utf-32-le" if order == "<" else "utf-32-be"


NDARRAY = object()  # what numpy.ndarray names: only an argument to _reconstruct, never called


class TextArray(list):
    """A numpy str array (any shape, C order), unpickled as the flat list of its str items."""

    def __init__(self, decoder: "NumpyText"):
        super().__init__()
        self._decoder = decoder

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise RefusedPickle(f"pickle refused: a numpy array that is not one of str; {PLAIN}")
        _, shape, dtype, fortran, raw = state
        self[:] = self._decoder.items(dtype, raw, shape, fortran is True)


class NumpyText:
    """The stand-ins for numpy's names in one load. Every decode is charged to one budget, the pickle's own
    size, so a pickle that names the same bytes many times (memo gets) cannot make more text than it holds."""

    def __init__(self, budget: int):
        self.left = budget

    def names(self) -> dict[tuple[str, str], Any]:
        found: dict[tuple[str, str], Any] = {("numpy", "ndarray"): NDARRAY, ("numpy", "dtype"): TextDType}
        for module in ("numpy._core", "numpy.core"):
            found.update({(f"{module}.multiarray", "_reconstruct"): self.reconstruct,
                          (f"{module}.multiarray", "scalar"): self.scalar,
                          (f"{module}.numeric", "_frombuffer"): self.from_buffer})  # protocol 5
        return found

    def reconstruct(self, cls: Any, shape: Any = None, typecode: Any = None) -> TextArray:
        if cls is not NDARRAY:
            raise RefusedPickle(f"pickle refused: numpy _reconstruct of something other than an array; {PLAIN}")
        return TextArray(self)

    def scalar(self, dtype: Any, raw: Any = b"") -> str:
        if not isinstance(dtype, TextDType) or not isinstance(raw, bytes) or len(raw) > 4 * max(dtype.chars, 1):
            raise RefusedPickle(f"pickle refused: a numpy scalar that is not a str; {PLAIN}")
        return self.decode(dtype, raw)

    def from_buffer(self, buffer: Any, dtype: Any, shape: Any, order: Any = "C") -> TextArray:
        array = TextArray(self)
        array[:] = self.items(dtype, bytes(buffer) if isinstance(buffer, bytearray) else buffer, shape, order == "F")
        return array

    def items(self, dtype: Any, raw: Any, shape: Any, fortran: bool) -> list[str]:
        if not isinstance(dtype, TextDType) or not isinstance(raw, bytes):
            raise RefusedPickle(f"pickle refused: a numpy array that is not one of str; {PLAIN}")
        if not (isinstance(shape, tuple) and len(shape) <= MAX_DIMS
                and all(type(d) is int and 0 <= d <= len(raw) for d in shape)):
            raise RefusedPickle("pickle refused: a numpy str array with a malformed shape")
        if fortran and sum(d > 1 for d in shape) > 1:
            raise RefusedPickle("pickle refused: a Fortran-ordered numpy str array (a transposed one); send "
                                "np.ascontiguousarray(prompts) or a list")
        width = 4 * dtype.chars
        if width == 0 or len(raw) != math.prod(shape) * width:
            raise RefusedPickle("pickle refused: a numpy str array whose data does not match its shape")
        return [self.decode(dtype, raw[at:at + width]) for at in range(0, len(raw), width)]

    def decode(self, dtype: TextDType, raw: bytes) -> str:
        self.left -= len(raw)
        if self.left < 0:
            raise RefusedPickle("pickle refused: it decodes the same numpy text over and over (more text than "
                                "the request holds)")
        return raw.decode(dtype.encoding).rstrip("\x00")  # numpy pads str items with NULs


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self._numpy = NumpyText(len(data)).names()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._numpy:
            return self._numpy[(module, name)]
        raise RefusedPickle(f"pickle refused: it names {module[:80]}.{name[:80]}; {PLAIN}. Send images as "
                            "encoded bytes and numbers as Python floats (e.g. array.tolist()), not numpy or torch objects")

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle(f"pickle refused: it uses a persistent id; {PLAIN}")


def check_plain(value: Any) -> None:
    """RefusedPickle unless `value` is built only of plain values (and str arrays holding only str): a
    stand-in of ours (a dtype, the ndarray placeholder, a function) must not leave the unpickler."""
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, TextArray):
            if not all(type(x) is str for x in item):
                raise RefusedPickle("pickle refused: a numpy str array holding something other than str")
        elif type(item) not in PLAIN_TYPES:
            raise RefusedPickle(f"pickle refused: it builds a {type(item).__name__!a}; {PLAIN}")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)


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
        value = RestrictedUnpickler(data).load()
        check_plain(value)
        return value
    except RefusedPickle:
        raise
    except UnicodeDecodeError as e:
        what = "a numpy str array that is not valid UTF-32" if e.encoding.startswith("utf-32") else f"text that is not valid {e.encoding}"
        raise BadRequest(f"malformed pickle: {what} ({e.reason})") from None
    except Exception as e:  # noqa: BLE001 - any other failure is a malformed payload, reported as such
        raise BadRequest(f"malformed pickle: {type(e).__name__}: {e}") from None


def dumps(value: Any) -> bytes:
    """Responses hold plain values only, so a client's plain pickle.loads never meets a class of ours."""
    return pickle.dumps(value, protocol=4)
