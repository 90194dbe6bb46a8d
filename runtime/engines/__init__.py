"""TensorRT engines: build flags and optimisation profiles derived from the tower specs (profiles), keys
and records with the compatibility check (records), where engines are stored and how they are written
(store), all free of TensorRT and CUDA; the build itself (build), which imports TensorRT lazily; and running
a loaded engine on a CUDA stream, eagerly or through CUDA graphs (contexts), for the tensorrt backend."""

from .profiles import BuildFlags, ShapeRange, tower_profile
from .records import EngineEnvironment, EngineKey, EngineLookup, EngineMismatchError, EngineRecord, find_engine
from ..durable import atomic_write
from .store import EngineStore, EngineWriteError

__all__ = ["BuildFlags", "EngineEnvironment", "EngineKey", "EngineLookup", "EngineMismatchError", "EngineRecord",
           "EngineStore", "EngineWriteError", "ShapeRange", "atomic_write", "find_engine", "tower_profile"]
