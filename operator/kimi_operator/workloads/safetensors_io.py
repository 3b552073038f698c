"""Streaming access to safetensors files without holding a shard in memory.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
``{dtype, shape, data_offsets}`` (offsets relative to the end of the header), then the data. Reading
maps the file and hands out views; writing lays out the header from the planned tensors first and
then appends each tensor's bytes in order, so one tensor's output is the most ever held at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# numpy views of the raw bytes; BF16 is handled as its 16-bit pattern.
NUMPY_VIEWS: dict[str, Any] = {
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "U16": np.uint16,
    "F16": np.float16,
    "BF16": np.uint16,
    "I32": np.int32,
    "U32": np.uint32,
    "F32": np.float32,
    "I64": np.int64,
    "U64": np.uint64,
    "F64": np.float64,
}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """The file is not a well-formed safetensors file; the message names the file and tensor."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _expected_bytes(dtype: str, shape: Iterable[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * DTYPE_SIZES[dtype]


class Reader:
    """A memory-mapped safetensors file; ``view`` returns numpy views of tensors' bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("rb")
        try:
            self._parse()
        except BaseException:
            self._file.close()
            raise

    def _parse(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise SafetensorsError(f"{self.path}: {size} bytes is too short for a safetensors file")
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        if header_len > MAX_HEADER or 8 + header_len > size:
            raise SafetensorsError(f"{self.path}: header length {header_len} does not fit a {size}-byte file")
        try:
            header = json.loads(self._file.read(header_len))
        except ValueError as exc:
            raise SafetensorsError(f"{self.path}: header is not JSON ({exc})") from exc
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        data_len = size - self.data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            dtype, shape = entry.get("dtype"), tuple(entry.get("shape", ()))
            start, end = entry.get("data_offsets", (0, 0))
            if dtype not in DTYPE_SIZES:
                raise SafetensorsError(f"{self.path}: tensor {name}: unknown dtype {dtype!r}")
            if end - start != _expected_bytes(dtype, shape):
                raise SafetensorsError(
                    f"{self.path}: tensor {name}: {end - start} bytes for {dtype}{list(shape)}, "
                    f"expected {_expected_bytes(dtype, shape)}"
                )
            if end > data_len:
                raise SafetensorsError(
                    f"{self.path}: tensor {name} ends at byte {end} of the data but the file holds "
                    f"{data_len} (truncated file?)"
                )
            self.tensors[name] = TensorInfo(name, dtype, shape, start, end)
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def view(self, name: str) -> np.ndarray[Any, Any]:
        info = self.tensors[name]
        if info.dtype not in NUMPY_VIEWS:
            raise SafetensorsError(f"{self.path}: tensor {name}: dtype {info.dtype} has no numpy view")
        assert self._map is not None
        raw = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=self.data_start + info.start)
        view: np.ndarray[Any, Any] = raw.view(NUMPY_VIEWS[info.dtype]).reshape(info.shape)
        return view

    def raw(self, name: str) -> memoryview:
        info = self.tensors[name]
        assert self._map is not None
        start = self.data_start + info.start
        return memoryview(self._map)[start : start + info.nbytes]

    def close(self) -> None:
        if self._map is not None:
            # Views handed out may still be alive; then the mapping goes when they do.
            with contextlib.suppress(BufferError):
                self._map.close()
        self._file.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _expected_bytes(self.dtype, self.shape)


def header_bytes(tensors: Iterable[PlannedTensor], metadata: Mapping[str, str] | None = None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
    encoded += b" " * (-(8 + len(encoded)) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def planned_size(tensors: Iterable[PlannedTensor], metadata: Mapping[str, str] | None = None) -> int:
    tensors = list(tensors)
    return len(header_bytes(tensors, metadata)) + sum(t.nbytes for t in tensors)


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


class Writer:
    """Write a planned file tensor by tensor, in plan order, to ``<path>.partial``; ``commit`` renames."""

    def __init__(self, path: Path, plan: list[PlannedTensor], metadata: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self._plan: Iterator[PlannedTensor] = iter(plan)
        self._fh: BinaryIO = self.partial.open("wb")
        # Hashed as written: the manifest needs every file's sha256 and must not read 2 TB again.
        self.sha256 = hashlib.sha256()
        self._emit(header_bytes(plan, metadata))

    def _emit(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        self.sha256.update(data)

    def write(self, name: str, data: bytes | memoryview | np.ndarray[Any, Any]) -> None:
        expected = next(self._plan, None)
        if expected is None or expected.name != name:
            raise SafetensorsError(f"{self.path}: wrote {name} out of plan order (expected {expected})")
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
        buf = memoryview(data).cast("B")
        if buf.nbytes != expected.nbytes:
            raise SafetensorsError(f"{self.path}: tensor {name} has {buf.nbytes} bytes, planned {expected.nbytes}")
        self._emit(buf)

    def commit(self) -> None:
        leftover = next(self._plan, None)
        if leftover is not None:
            raise SafetensorsError(f"{self.path}: tensor {leftover.name} was never written")
        # No fsync here: flushing each shard would stall the conversion on the disk. The caller
        # syncs everything once before writing the completion manifest, and a resumed run
        # re-checks finished shards against their recorded digests.
        self._fh.close()
        # The digest is kept beside the file before the file gets its final name, which appears
        # only for a complete file.
        digest_path(self.path).write_text(self.sha256.hexdigest() + "\n")
        self.partial.rename(self.path)

    def abort(self) -> None:
        self._fh.close()
        self.partial.unlink(missing_ok=True)
