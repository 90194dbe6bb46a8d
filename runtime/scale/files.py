"""Where inputs and outputs live: local paths, file:// URIs, and every file system pyarrow opens from a URI
(s3://, gs://, abfs://, hdfs://), plus fsspec's (hf:// through huggingface_hub) when fsspec is installed.
Only pyarrow is needed here, never ray: the driver's checks run before a cluster is touched."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from ..errors import InputError
from ..optional import require


def is_uri(location: str) -> bool:
    return "://" in location


def local_path(location: str, base_dir: str | None = None) -> str | None:
    """The local path that `location` names (a plain path, relative to `base_dir`, or a file:// URI), or None
    for a remote URI."""
    if location.startswith("file://"):
        return unquote(urlparse(location).path)
    if is_uri(location):
        return None
    return os.path.join(base_dir, location) if base_dir and not os.path.isabs(location) else os.path.abspath(location)


@dataclass(frozen=True)
class Location:
    """A file system and a path on it (pickled into read tasks, so remote file systems travel with them)."""

    fs: Any  # pyarrow.fs.FileSystem
    path: str
    uri: str  # as the user wrote it (for messages)

    @property
    def is_local(self) -> bool:
        return type(self.fs).__name__ == "LocalFileSystem"

    def child(self, name: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, name), posixpath.join(self.uri, name))

    def info(self) -> Any:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type.name != "NotFound"

    def is_dir(self) -> bool:
        return self.info().type.name == "Directory"

    def listing(self, recursive: bool = False) -> list[Any]:
        pafs = require("pyarrow.fs", "reading and writing datasets")
        return self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True))

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def write_bytes(self, data: bytes) -> None:
        """Written under a temporary name and moved into place (a rename on a local or shared file system)."""
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self.path)


def locate(location: str, base_dir: str | None = None) -> Location:
    """A Location for a path or URI; InputError for a scheme nothing here can open."""
    path = local_path(location, base_dir)
    pafs = require("pyarrow.fs", "reading and writing datasets")
    if path is not None:
        return Location(pafs.LocalFileSystem(), path, location)
    try:
        fs, inner = pafs.FileSystem.from_uri(location)
        return Location(fs, inner, location)
    except Exception as pyarrow_error:  # noqa: BLE001 - pyarrow raises several types for an unknown scheme
        try:
            fsspec = require("fsspec", f"reading {location.split('://')[0]}:// URIs")
            fs, inner = fsspec.core.url_to_fs(location)
        except Exception as e:  # noqa: BLE001 - fsspec too: unknown protocol, missing implementation
            raise InputError(f"cannot open {location}: pyarrow says {pyarrow_error}; fsspec says {e}") from None
        return Location(pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner, location)


class RemoteFiles:
    """Reads whole remote files by URI for the image stage, opening one file system per scheme and host
    (opening one per image would redo credential lookups for every image)."""

    def __init__(self) -> None:
        self._roots: dict[str, Location] = {}

    def read(self, uri: str) -> bytes:
        parsed = urlparse(uri)
        root = f"{parsed.scheme}://{parsed.netloc}"
        if root not in self._roots:
            self._roots[root] = locate(root + "/")
        base = self._roots[root]
        # Object stores (s3, gs, hf) name files "bucket/key" inside their file system; hdfs-like ones "/path".
        bucket_style = base.path.strip("/") == parsed.netloc
        path = unquote(parsed.path)
        inner = parsed.netloc + path if bucket_style else path
        return Location(base.fs, inner, uri).read_bytes()
