"""torch's CPU int4 packing (``torch._convert_weight_to_int4pack_for_cpu``) as plain nibble pairings:
pack, unpack, identify this process' layout, and regroup quanto's standard int4 bytes into it.

quanto's CPU bfloat16 qint4 weights (``TinyGemmWeightQBitsTensor``) hold their nibbles in the
layout of ``torch._convert_weight_to_int4pack_for_cpu``, which depends on the CPU kernel torch
dispatches to. quanto converts to it through an int32 copy of the weight (4x its bytes) and back
from it through a matmul with a K x K identity (minutes per GB on a CPU). The three layouts of
torch's kernel (aten/src/ATen/native/cpu/int4mm_kernel.cpp) are plain nibble pairings:
  AVX512: blocks of 64 rows stored [K, 32], byte j = row j | row j+32 << 4
  AVX2:   blocks of 32 rows stored [K, 16], byte j = row j | row j+16 << 4
  other:  blocks of 32 rows stored [K, 16], byte j = row 2j | row 2j+1 << 4
and a last partial block pairs adjacent rows. The layout in use is identified once per process
by packing probes with torch's own kernel; when none matches (a future torch), quanto's own
conversions are used.

Plain torch: nothing here imports optimum-quanto.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["INT4PACK_CANDIDATES", "cpu_int4pack_layout", "int4pack", "int4unpack", "regroup_halves"]

#: ``(rows per block, halves pairing)`` of each layout torch's CPU int4 kernel may use.
INT4PACK_CANDIDATES = ((64, True), (32, True), (32, False))


def int4pack(w: torch.Tensor, block: int, halves: bool) -> torch.Tensor:
    """``uint8`` nibbles ``[N, K]`` -> torch's CPU int4pack bytes ``[N, K // 2]``."""
    n, k = w.shape
    full = n // block * block
    parts = []
    if full:
        wb = w[:full].view(n // block, block, k)
        lo, hi = (wb[:, :block // 2], wb[:, block // 2:]) if halves else (wb[:, 0::2], wb[:, 1::2])
        parts.append((lo | (hi << 4)).transpose(1, 2).reshape(-1))
    if full < n:
        rest = w[full:]
        parts.append((rest[0::2] | (rest[1::2] << 4)).t().reshape(-1))
    return (torch.cat(parts) if len(parts) > 1 else parts[0]).view(n, k // 2)


def int4unpack(packed: torch.Tensor, n: int, k: int, block: int, halves: bool) -> torch.Tensor:
    """Inverse of :func:`int4pack`."""
    flat = packed.reshape(-1)
    full = n // block * block
    out = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    if full:
        x = flat[:full * k // 2].view(n // block, k, block // 2).transpose(1, 2)
        blocks = out[:full].view(n // block, block, k)
        lo, hi = (blocks[:, :block // 2], blocks[:, block // 2:]) if halves else (blocks[:, 0::2], blocks[:, 1::2])
        lo.copy_(x & 15)
        hi.copy_(x >> 4)
    if full < n:
        x = flat[full * k // 2:].view(k, (n - full) // 2).t()
        out[full::2] = x & 15
        out[full + 1::2] = x >> 4
    return out


# 0x0F in every byte of an int64 (as a signed value)
_LOW_NIBBLES = int.from_bytes(b"\x0f" * 8, "little", signed=True)


@functools.cache
def cpu_int4pack_layout() -> tuple[int, bool] | None:
    """``(rows per block, halves pairing)`` of this process' ``_convert_weight_to_int4pack_for_cpu``,
    checked on probes with full and partial blocks; ``None`` when no known layout matches."""
    convert = getattr(torch, "_convert_weight_to_int4pack_for_cpu", None)
    if convert is None:
        return None
    g = torch.Generator().manual_seed(0)
    probes = [torch.randint(0, 16, (n, 64), dtype=torch.uint8, generator=g) for n in (176, 128)]
    try:
        refs = [convert(p.to(torch.int32), innerKTiles=2) for p in probes]
    except RuntimeError:
        return None
    for block, halves in INT4PACK_CANDIDATES:
        if all(r.shape == (p.shape[0], p.shape[1] // 2) and torch.equal(int4pack(p, block, halves), r)
               for p, r in zip(probes, refs)):
            return block, halves
    return None


def regroup_halves(data: torch.Tensor, out_features: int, in_features: int, block: int) -> torch.Tensor:
    """quanto's standard int4 bytes ``[N/2, K]`` -> the kernel's halves-layout bytes ``[N, K/2]``
    for ``block`` rows per kernel block (``N`` a multiple of ``2 * block``).

    quanto pairs row ``n`` with row ``n + N/2`` in a byte; the kernel pairs row ``j`` of a block
    with row ``j + block/2`` and runs its bytes along the input dimension. Both rows of a kernel
    byte lie in the same half of the weight, so each block's two halves are transposed once, into
    the result, and their nibbles paired there eight bytes at a time (no nibble tensor).
    """
    blocks = out_features // 2 // block
    kernel = torch.empty(2, blocks, in_features, block // 2, dtype=torch.uint8, device=data.device)
    kernel.copy_(data.reshape(blocks, 2, block // 2, in_features).permute(1, 0, 3, 2))
    words = kernel.view(torch.int64)  # [0]: rows of each block's first half, [1]: its second half
    first, second = words[0], words[1]
    low_of_second = torch.bitwise_and(second, _LOW_NIBBLES).bitwise_left_shift_(4)
    high_of_first = torch.bitwise_right_shift(first, 4).bitwise_and_(_LOW_NIBBLES)
    second.bitwise_and_(~_LOW_NIBBLES).bitwise_or_(high_of_first)  # the kernel's second block
    first.bitwise_and_(_LOW_NIBBLES).bitwise_or_(low_of_second)  # the kernel's first block
    return kernel.view(out_features, in_features // 2)
