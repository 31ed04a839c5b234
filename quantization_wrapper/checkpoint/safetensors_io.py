"""safetensors files: the reader (header checked against the file size; tensors as views of a private
memory map or as copies), the weight files of a transformers checkpoint directory, and the streaming
writer that produces, byte for byte, what ``safetensors.torch.save_file`` writes.

Files are memory-mapped privately (copy-on-write, as safetensors does): a tensor is a view of the
OS page cache, read without a copy. Every page of a mapping that is touched counts in the
process' resident memory until it is unmapped, so readers hand pages back
(:meth:`SafetensorsReader.release`, ``madvise(MADV_DONTNEED)``) once their tensors are done with.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import struct
import sys
import zlib
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .files import confined_file

__all__ = [
    "SafetensorsReader",
    "CheckpointFiles",
    "SAFETENSORS_DTYPES",
    "parse_size",
    "tensor_bytes",
    "pwrite_all",
    "write_safetensors",
]

logger = logging.getLogger(__name__)


def parse_size(size: int | str) -> int:
    """Bytes in ``size`` (an int, or text such as ``"500MB"``, ``"2GiB"``), as ``max_shard_size`` takes it.

    Raises:
        ValueError: not a size, or not positive and finite (naming ``max_shard_size`` and the value).
    """
    allowed = "a positive number of bytes or a size such as 500MB, 2GB or 1GiB"
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"max_shard_size={size!r} is not a size; use {allowed}")
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size={size} must be positive; use {allowed}")
        return size
    text = size.strip().upper().replace(" ", "")
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1, "": 1}
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            number = text[: len(text) - len(unit)]
            try:
                value = float(number)
            except ValueError:
                continue
            if not math.isfinite(value) or value * factor < 1:
                raise ValueError(f"max_shard_size={size!r} must be a positive, finite size; use {allowed}")
            return int(value * factor)
    raise ValueError(f"max_shard_size={size!r} is not a size; use {allowed}")


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_MAX_HEADER = 100 * 2**20


class SafetensorsReader:
    """Tensors of one ``.safetensors`` file, as views of a private memory map or as copies.

    The header (an 8-byte little-endian length, then JSON) is parsed and checked against the
    file size. :meth:`view` gives a tensor backed by the file's pages (no copy; writes stay private
    to this process), :meth:`read` a tensor in process memory, :meth:`release` hands pages back.

    Args:
        path: the file.
        mmap: map the file (default). ``False`` reads every tensor with positioned reads; views are
            then copies.
    """

    def __init__(self, path: str | os.PathLike, *, mmap: bool = True):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise ValueError(f"{self.path}: cannot open ({e.strerror})") from e
        self._map: Any = None
        self._bytes: torch.Tensor | None = None
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) != 8:
            self.close()
            raise ValueError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            self.close()
            raise ValueError(f"{self.path}: not a safetensors file or truncated (header length {n} bytes, "
                             f"file {size} bytes)")
        try:
            header = json.loads(self._file.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.close()
            raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            self.close()
            raise ValueError(f"{self.path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            self.close()
            raise ValueError(f"{self.path}: corrupt safetensors header ('__metadata__' is not an object)")
        self.metadata: dict[str, str] = metadata
        self._start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                begin, end = info["data_offsets"]
                shape = tuple(int(d) for d in info["shape"])
                if not (type(begin) is int and type(end) is int and 0 <= begin <= end) or min(shape, default=0) < 0:
                    raise ValueError(f"data_offsets {info['data_offsets']!r} / shape {info['shape']!r} are not valid")
            except (KeyError, TypeError, ValueError) as e:
                self.close()
                raise ValueError(f"{self.path}: bad header entry for {name!r} ({e})") from e
            if end - begin != math.prod(shape) * dtype.itemsize or self._start + end > size:
                self.close()
                raise ValueError(f"{self.path}: tensor {name!r} lies outside the file or has the wrong size "
                                 f"(file truncated or corrupt)")
            self.entries[name] = (dtype, shape, begin, end)
        if mmap and size > self._start:
            try:
                self._map = _mmap_private(self._file.fileno())
                self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
            except (OSError, ValueError) as e:  # e.g. a file system that cannot map: read instead
                logger.debug("%s: cannot memory-map (%s); reading instead", self.path, e)
                self._map = self._bytes = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def fileno(self) -> int:
        """The open file's descriptor."""
        return self._file.fileno()

    def byte_range(self, name: str) -> tuple[int, int]:
        """``(start, end)``: where the bytes of tensor ``name`` lie in the file."""
        _, _, begin, end = self.entries[name]
        return self._start + begin, self._start + end

    def mapped_span(self) -> tuple[int, int] | None:
        """``(lo, hi)``: the addresses of the file's memory map (a view of it points inside), or
        ``None`` when the file is not mapped."""
        if self._bytes is None:
            return None
        lo = self._bytes.data_ptr()
        return lo, lo + self._bytes.numel()

    def view(self, name: str) -> torch.Tensor:
        """The tensor ``name`` backed by the mapped file (a copy when the file is not mapped or the
        tensor is not aligned to its element size). Valid after :meth:`close`: the mapping lives
        as long as a view does."""
        stored, shape, begin, end = self.entries[name]
        offset = self._start + begin
        if self._bytes is None or end == begin or offset % stored.itemsize:
            return self.read(name)
        return self._bytes[offset:self._start + end].view(stored).reshape(shape)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name`` in process memory (converted to ``dtype`` when given)."""
        stored, shape, begin, end = self.entries[name]
        if self._bytes is not None and end > begin and (self._start + begin) % stored.itemsize == 0:
            t = self.view(name)
            return t.clone() if dtype is None or dtype == stored or not stored.is_floating_point else t.to(dtype)
        buf = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            view = memoryview(buf.numpy())
            got = os.preadv(self._file.fileno(), [view], self._start + begin) if hasattr(os, "preadv") else None
            if got is None:
                self._file.seek(self._start + begin)
                got = self._file.readinto(view)
            if got != end - begin:
                raise ValueError(f"{self.path}: tensor {name!r} is truncated")
        t = buf.view(stored).reshape(shape)
        return t if dtype is None or dtype == stored or not stored.is_floating_point else t.to(dtype)

    def release(self, names: Any) -> None:
        """Hand the pages that lie wholly inside the tensors ``names`` back to the OS: the resident
        memory their views cost drops, and touching them again re-reads the file (private writes
        to those pages are lost, so only release tensors that are done with)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        for name in names:
            _, _, begin, end = self.entries[name]
            first = -(-(self._start + begin) // page) * page
            last = (self._start + end) // page * page
            if last > first:
                self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        """Close the file. The mapping is unmapped when its last view dies (each view's storage
        holds a reference to it), at once when none is alive; never explicitly, which would pull
        the pages from under a view."""
        self._bytes = None
        self._map = None
        self._file.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _mmap_private(fileno: int) -> mmap.mmap:
    """A copy-on-write mapping of the whole file (writes never reach the file)."""
    if hasattr(mmap, "MAP_PRIVATE"):
        return mmap.mmap(fileno, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return mmap.mmap(fileno, 0, access=mmap.ACCESS_COPY)  # Windows


class CheckpointFiles:
    """The weight files of a transformers checkpoint directory: one ``model.safetensors`` or the
    shards named by ``model.safetensors.index.json``, validated before anything is read."""

    def __init__(self, directory: str | os.PathLike, *, mmap: bool = True):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ValueError(f"checkpoint directory not found: {self.directory}")
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a valid safetensors index (needs a 'weight_map') ({e})") from e
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
            self.files = [confined_file(self.directory, n, f"{index.name} 'weight_map'")
                          for n in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in self.files if not f.exists()]
            if missing:
                raise ValueError(f"{index} names shards that are missing: {missing}")
            self.weight_map = dict(weight_map)
        else:
            files = [confined_file(self.directory, f.name, "the directory listing")
                     for f in sorted(self.directory.glob("*.safetensors"))]
            if not files:
                raise ValueError(f"{self.directory}: no .safetensors weights (and no model.safetensors.index.json)")
            self.files = files
            self.weight_map = {}
        self.readers: list[SafetensorsReader] = []
        try:  # a check that fails closes what was opened (files and mappings)
            for f in self.files:
                self.readers.append(SafetensorsReader(f, mmap=mmap))
            seen: dict[str, Path] = {}
            for reader in self.readers:
                for key in reader.keys():
                    if key in seen:
                        raise ValueError(f"tensor {key!r} is in both {seen[key].name} and {reader.path.name}")
                    seen[key] = reader.path
                    listed = self.weight_map.get(key)
                    if self.weight_map and listed != reader.path.name:
                        raise ValueError(f"{index.name}: tensor {key!r} is listed in {listed!r} but stored in "
                                         f"{reader.path.name!r}; the index does not match the shards")
            if self.weight_map:
                absent = sorted(set(self.weight_map) - set(seen))
                if absent:
                    raise ValueError(f"{index.name} lists tensors no shard contains: {absent[:5]}")
        except BaseException:
            self.close()
            raise
        self.location = seen

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: r.shape(k) for r in self.readers for k in r.keys()}

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def __enter__(self) -> "CheckpointFiles":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


#: safetensors' name of each dtype, in the order ``safetensors.torch.save_file`` lays tensors out
#: (widest first, then by name), which keeps every tensor aligned to its element size.
SAFETENSORS_DTYPES = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64",
    torch.float32: "F32", torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.uint16: "U16", torch.int16: "I16", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(SAFETENSORS_DTYPES)}


def _safetensors_header(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                        metadata: dict[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """The header ``safetensors.torch.save_file`` writes for tensors of these dtypes and shapes (its
    length as 8 bytes little-endian, then the JSON padded with spaces to a multiple of 8), and the
    offset in the file of each tensor's bytes."""
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    offsets: dict[str, int] = {}
    end = 0
    for name in sorted(specs, key=lambda n: (_DTYPE_RANK[specs[n][0]], n)):
        dtype, shape = specs[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [end, end + size]}
        offsets[name] = end
        end += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {name: start + o for name, o in offsets.items()}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` as safetensors stores them (row-major, little-endian): a view of a
    contiguous CPU tensor's memory, else of one copy."""
    t = t.detach().resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    data = t.view(torch.uint8)
    if sys.byteorder == "big" and t.element_size() > 1:
        data = data.view(-1, t.element_size()).flip(-1).reshape(-1)
    return memoryview(data.numpy())


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (one call writes at most 2 GiB on Linux)."""
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def write_safetensors(saved: Any, files: dict[Path, tuple[list[str], dict[str, str]]]) -> None:
    """Write safetensors files, ``{path: (tensor names, metadata)}``, byte for byte as
    ``safetensors.torch.save_file`` would: every header first (the survey gave each tensor's dtype
    and shape), then each tensor at its offset as ``saved.tensors()`` produces it.

    ``saved`` is what a save surveyed (:class:`~quantization_wrapper.checkpoint.save.SavedTensors`):
    ``specs`` (name -> (dtype, shape)), ``nbytes(name)``, ``crc32`` (name -> CRC-32, or ``None``)
    and ``tensors()``, which yields ``(name, tensor)`` for every name in ``specs``.

    Raises:
        CheckpointError: a tensor differs from its survey in dtype, shape or (single file) CRC-32.
    """
    place: dict[str, tuple[int, int]] = {}
    with ExitStack() as stack:
        for path, (names, metadata) in files.items():
            header, offsets = _safetensors_header({n: saved.specs[n] for n in names}, metadata)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            stack.callback(os.close, fd)
            pwrite_all(fd, memoryview(header), 0)
            os.ftruncate(fd, len(header) + sum(saved.nbytes(n) for n in names))
            place.update({name: (fd, offset) for name, offset in offsets.items()})
        left = set(place)
        for name, t in saved.tensors():
            if (t.dtype, tuple(t.shape)) != saved.specs[name]:
                raise CheckpointError(f"tensor {name!r} is {t.dtype} {tuple(t.shape)} when written but was "
                                      f"{saved.specs[name][0]} {saved.specs[name][1]} when surveyed; its "
                                      f"adapter's layer_state_dict is not deterministic")
            data = tensor_bytes(t)
            del t
            if saved.crc32 is not None and zlib.crc32(data) != saved.crc32[name]:
                raise CheckpointError(f"tensor {name!r} has other bytes when written than when its CRC-32 was "
                                      f"taken; its adapter's layer_state_dict is not deterministic")
            fd, offset = place[name]
            pwrite_all(fd, data, offset)
            del data
            left.discard(name)
        if left:
            raise CheckpointError(f"tensors {sorted(left)[:5]} were surveyed but not produced again for writing; "
                                  f"their adapter's layer_state_dict is not deterministic")
