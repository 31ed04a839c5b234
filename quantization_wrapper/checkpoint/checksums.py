"""Checksums of a checkpoint: sha256 of every file, CRC-32 per 64 MiB block of a file and per
tensor of a single-file checkpoint; recorded when saving and verified on up to 4 threads."""

from __future__ import annotations

import hashlib
import mmap
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..errors import ChecksumError
from .description import QUANT_CONFIG_NAME, read_checkpoint_info
from .files import confined_file
from .safetensors_io import SafetensorsReader, tensor_bytes

__all__ = ["HASH_BLOCK", "file_record", "tensor_crc32", "verify_checkpoint"]


#: Files are hashed whole (``sha256``, what ``sha256sum`` prints) and checksummed in blocks of
#: this size (``block_crc32``), which loading verifies on every core at once. The sums are stored
#: unsigned next to the data, so they guard against accidents (truncation, bit rot, a partial
#: copy), not against someone who can rewrite the description too; for that CRC-32 per 64 MiB
#: (every burst of <= 32 flipped bits caught, anything else missed with probability 2**-32) does
#: the job at 2.2 GB/s per core against sha256's 1.3 GB/s. ``verify_checkpoint(path, full=True)``
#: checks the sha256s as well.
HASH_BLOCK = 64 * 2**20


class _Sha256:
    name = "sha256"

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, data: Any) -> None:
        self._h.update(data)

    def result(self) -> str:
        return self._h.hexdigest()


class _Crc32:
    name = "CRC-32"

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: Any) -> None:
        self._crc = zlib.crc32(data, self._crc)

    def result(self) -> int:
        return self._crc


_BLOCK_SUMS = {"block_crc32": _Crc32, "block_sha256": _Sha256}  # (sha256 blocks: read, not written)


def _sum_range(fd: int, offset: int, length: int, algorithm: type = _Sha256) -> Any:
    """Checksum (``_Sha256`` or ``_Crc32``) of ``length`` bytes at ``offset`` of ``fd``.

    The range is memory-mapped and summed in 64 MiB calls (hashlib and zlib release the GIL for
    each: a thread that takes the GIL back every few MB loses most of its time waiting for it while
    a loader works in the main thread), then unmapped with its pages released, so checking a file
    adds at most one slice per thread to the resident memory.
    """
    h = algorithm()
    if length == 0:
        return h.result()
    start = offset // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    try:
        mapped = mmap.mmap(fd, length + offset - start, access=mmap.ACCESS_READ, offset=start)
    except (OSError, ValueError) as e:  # the file is shorter than the range
        raise ChecksumError(f"cannot read {length} bytes at {offset} ({e})") from e
    with mapped, memoryview(mapped) as view:
        step = 64 << 20
        for pos in range(offset - start, offset - start + length, step):
            end = min(pos + step, offset - start + length)
            h.update(view[pos:end])
            if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                first = pos // mmap.PAGESIZE * mmap.PAGESIZE
                mapped.madvise(mmap.MADV_DONTNEED, first, end - first)
    return h.result()


def _threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _sha256(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _sum_range(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def file_record(path: Path) -> dict[str, Any]:
    """Size, whole-file sha256 and per-block CRC-32 of ``path``, summed on up to 4 threads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        with ThreadPoolExecutor(_threads()) as pool:
            whole = pool.submit(_sum_range, fd, 0, size)
            blocks = [pool.submit(_sum_range, fd, o, min(HASH_BLOCK, size - o), _Crc32)
                      for o in range(0, size, HASH_BLOCK)]
            record = {"sha256": whole.result(), "size": size}
            if len(blocks) > 1:
                record["block_size"] = HASH_BLOCK
                record["block_crc32"] = [b.result() for b in blocks]
        return record
    finally:
        os.close(fd)


def tensor_crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes, as they lie in the safetensors file."""
    return zlib.crc32(tensor_bytes(t))


def verify_checkpoint(path: str | os.PathLike, *, full: bool = False) -> dict[str, str]:
    """Check every recorded file's size and checksums. Returns ``{file: "ok"}``.

    Files saved with block checksums are verified block by block on up to 4 threads (1.2 GB in
    about 0.3 s on 2 cores); others by their whole-file sha256. A single-file checkpoint is
    checked tensor by tensor against the CRC-32s in its metadata.

    Args:
        path: the checkpoint directory or single file.
        full: also check every file's whole sha256 (what ``sha256sum`` prints), besides its blocks.

    Raises:
        ChecksumError: naming the file whose size or checksum differs (and the byte range or
            tensor), or that is missing.
        UnsafePathError: a listed file lies outside the checkpoint directory.
    """
    path = Path(path)
    info = read_checkpoint_info(path)
    if path.is_file():
        return {path.name: _verify_single_file(path, info)}
    records = info["files"]
    fds: dict[str, int] = {}
    try:
        jobs = []
        for name, rec in records.items():
            f = confined_file(path, name, f"{QUANT_CONFIG_NAME} 'files'")
            if not f.is_file():
                raise ChecksumError(f"{f}: file listed in {QUANT_CONFIG_NAME} is missing")
            if f.stat().st_size != rec["size"]:
                raise ChecksumError(f"{f}: size {f.stat().st_size} bytes, expected {rec['size']} "
                                    f"(truncated or modified)")
            fds[name] = os.open(f, os.O_RDONLY)
            block = rec.get("block_size")
            sums = rec.get("block_crc32")
            if block and sums:
                jobs += [(name, i * block, min(block, rec["size"] - i * block), want, _Crc32)
                         for i, want in enumerate(sums)]
                if full:
                    jobs.append((name, 0, rec["size"], rec["sha256"], _Sha256))
            else:
                jobs.append((name, 0, rec["size"], rec["sha256"], _Sha256))
        with ThreadPoolExecutor(_threads()) as pool:
            futures = [(job, pool.submit(_sum_range, fds[job[0]], job[1], job[2], job[4])) for job in jobs]
            for (name, offset, length, want, algorithm), future in futures:
                try:
                    got = future.result()
                except ChecksumError as e:
                    raise ChecksumError(f"{path / name}: {e}") from None
                if got != want:
                    where = "" if length == records[name]["size"] else f" in bytes {offset}-{offset + length}"
                    for _, other in futures:
                        other.cancel()
                    raise ChecksumError(f"{path / name}: {algorithm.name} mismatch{where} (the file was modified "
                                        f"after saving)")
    finally:
        for fd in fds.values():
            os.close(fd)
    return {name: "ok" for name in records}


def _verify_single_file(path: Path, info: dict[str, Any]) -> str:
    """Check every tensor of a single-file checkpoint against its recorded CRC-32."""
    sums = info["tensor_crc32"]
    try:
        reader = SafetensorsReader(path, mmap=False)
    except ValueError as e:
        raise ChecksumError(str(e)) from e
    with reader:
        names = set(reader.keys())
        if names != set(sums):
            extra, missing = sorted(names - set(sums)), sorted(set(sums) - names)
            raise ChecksumError(f"{path}: the tensors do not match the recorded checksums (unrecorded: "
                                f"{extra[:5]}, missing: {missing[:5]})")
        fd = reader.fileno()
        for name in sorted(names):
            begin, end = reader.byte_range(name)
            got = _sum_range(fd, begin, end - begin, _Crc32)
            if got != sums[name]:
                raise ChecksumError(f"{path}: CRC-32 mismatch in tensor {name!r} (bytes "
                                    f"{begin}-{end}; the file was modified after saving)")
    return "ok (CRC-32 of every tensor)"
