"""What loading an artifacts directory must know of an ONNX file before any runtime opens it: the graph's
inputs and outputs (name, element type, dims) and every external-data file its tensors point at.

Read straight from the protobuf wire format, so the lean runtime needs no `onnx` package, and lazily: a
tensor's weights are skipped by their length, never read (the file is memory-mapped), so a gigabyte tower
costs milliseconds. Anything that does not parse (a truncated or foreign file) is a ValueError.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

# onnx.proto field numbers (stable across IR versions) of the messages walked here
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_SPARSE_INITIALIZER = 1, 5, 11, 12, 15
NODE_ATTRIBUTE = 5
ATTR_TENSOR, ATTR_GRAPH, ATTR_TENSORS, ATTR_GRAPHS, ATTR_SPARSE_TENSOR, ATTR_SPARSE_TENSORS = 5, 6, 10, 11, 22, 23
SPARSE_VALUES, SPARSE_INDICES = 1, 2
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14
ENTRY_KEY, ENTRY_VALUE = 1, 2
VALUE_NAME, VALUE_TYPE = 1, 2
TYPE_TENSOR = 1
TENSOR_TYPE_ELEM, TENSOR_TYPE_SHAPE = 1, 2
SHAPE_DIM = 1
DIM_VALUE, DIM_PARAM = 1, 2
EXTERNAL = 1  # TensorProto.DataLocation

# TensorProto.DataType -> numpy's dtype name (the ones a tower's IO may have)
ELEM_TYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
              11: "float64", 16: "bfloat16"}


@dataclass(frozen=True)
class GraphValue:
    name: str
    dtype: str  # numpy's name, or "type N" for an element type a tower never has
    shape: tuple[int | str, ...] | None  # an int per fixed dim, the parameter's name (or "?") per dynamic one


@dataclass(frozen=True)
class OnnxSummary:
    inputs: tuple[GraphValue, ...]  # graph inputs that are not initializers
    outputs: tuple[GraphValue, ...]
    external_data: tuple[str, ...]  # every `location` a tensor names, as written (relative to the model's folder)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("ends inside a field (truncated?)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of one message: an int for varints and fixed-size fields, a view for the rest."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0: not a protobuf message")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(buf):
                raise ValueError("ends inside a field (truncated?)")
            value, pos = int.from_bytes(buf[pos:pos + size], "little"), pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("a field runs past the end of its message (truncated?)")
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"wire type {wire}: not an ONNX model")
        yield number, value


def _text(value: int | memoryview) -> str:
    if not isinstance(value, memoryview):
        raise ValueError("a string field holds a number")
    return bytes(value).decode("utf-8", errors="replace")


def _message(value: int | memoryview) -> memoryview:
    if not isinstance(value, memoryview):
        raise ValueError("a message field holds a number")
    return value


def _tensor(buf: memoryview) -> tuple[str, list[str]]:
    """(name, external-data locations) of a TensorProto."""
    name, locations, external = "", [], False
    for number, value in _fields(buf):
        if number == TENSOR_NAME:
            name = _text(value)
        elif number == TENSOR_DATA_LOCATION:
            external = value == EXTERNAL
        elif number == TENSOR_EXTERNAL_DATA:
            entry = dict(_fields(_message(value)))
            if _text(entry.get(ENTRY_KEY, memoryview(b""))) == "location":
                locations.append(_text(entry.get(ENTRY_VALUE, memoryview(b""))))
    if external and not locations:
        raise ValueError(f"tensor {name!r} keeps its data outside the file but names no location")
    return name, locations


def _value(buf: memoryview) -> GraphValue:
    name, dtype, shape = "", "undefined", None
    for number, value in _fields(buf):
        if number == VALUE_NAME:
            name = _text(value)
        elif number == VALUE_TYPE:
            for n, tensor_type in _fields(_message(value)):
                if n != TYPE_TENSOR:
                    continue
                for m, v in _fields(_message(tensor_type)):
                    if m == TENSOR_TYPE_ELEM:
                        dtype = ELEM_TYPES.get(int(v), f"type {v}")  # type: ignore[arg-type]
                    elif m == TENSOR_TYPE_SHAPE:
                        shape = tuple(_dim(_message(d)) for k, d in _fields(_message(v)) if k == SHAPE_DIM)
    return GraphValue(name, dtype, shape)


def _dim(buf: memoryview) -> int | str:
    for number, value in _fields(buf):
        if number == DIM_VALUE and isinstance(value, int):
            return value
        if number == DIM_PARAM:
            return _text(value)
    return "?"


def _walk_graph(buf: memoryview, locations: list[str]) -> tuple[list[GraphValue], list[GraphValue]]:
    """A GraphProto's inputs (initializers left out) and outputs; external locations of every tensor in it
    and in its subgraphs (If / Loop bodies) are appended to `locations`."""
    inputs, outputs, initializers = [], [], set()
    for number, value in _fields(buf):
        if number == GRAPH_INITIALIZER:
            name, found = _tensor(_message(value))
            initializers.add(name)
            locations += found
        elif number == GRAPH_SPARSE_INITIALIZER:
            for n, part in _fields(_message(value)):
                if n in (SPARSE_VALUES, SPARSE_INDICES):
                    name, found = _tensor(_message(part))
                    initializers.add(name)
                    locations += found
        elif number == GRAPH_NODE:
            for n, attribute in _fields(_message(value)):
                if n == NODE_ATTRIBUTE:
                    _walk_attribute(_message(attribute), locations)
        elif number == GRAPH_INPUT:
            inputs.append(_value(_message(value)))
        elif number == GRAPH_OUTPUT:
            outputs.append(_value(_message(value)))
    return [v for v in inputs if v.name not in initializers], outputs


def _walk_attribute(buf: memoryview, locations: list[str]) -> None:
    for number, value in _fields(buf):
        if number in (ATTR_TENSOR, ATTR_TENSORS):
            locations += _tensor(_message(value))[1]
        elif number in (ATTR_SPARSE_TENSOR, ATTR_SPARSE_TENSORS):
            for n, part in _fields(_message(value)):
                if n in (SPARSE_VALUES, SPARSE_INDICES):
                    locations += _tensor(_message(part))[1]
        elif number in (ATTR_GRAPH, ATTR_GRAPHS):
            _walk_graph(_message(value), locations)


def read_onnx_summary(path: str | Path) -> OnnxSummary:
    """The IO and external-data locations of the ONNX model at `path`; ValueError if it is not one."""
    with open(path, "rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise ValueError("the file is empty") from None
    # Not closed explicitly: views of it may outlive a parse error's traceback; it goes with the last of them.
    view = memoryview(mapped)
    graphs = [_message(v) for n, v in _fields(view) if n == MODEL_GRAPH]
    if len(graphs) != 1:
        raise ValueError("no graph in the file" if not graphs else "several graphs in the file")
    locations: list[str] = []
    inputs, outputs = _walk_graph(graphs[0], locations)
    return OnnxSummary(tuple(inputs), tuple(outputs), tuple(dict.fromkeys(locations)))
