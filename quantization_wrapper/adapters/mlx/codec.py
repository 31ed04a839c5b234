"""MLX's affine packed format (what ``mx.quantize`` returns and mlx-lm saves) in PyTorch: bit packing,
a quantizer bit-identical to ``mx.quantize`` and a dequantizer bit-identical to ``mx.dequantize``;
and the bridge to MLX itself (is it usable here, tensors to ``mx.array`` and back, ``mx.quantize``).
"""

from __future__ import annotations

import functools

import torch

from backend_manager import Backend, get_library_status, is_library_usable

__all__ = ["FLOAT_DTYPES", "MLX_BITS", "MLX_GROUP_SIZES", "affine_dequantize", "affine_quantize", "check_format",
           "mlx_core", "mlx_quantize", "pack_bits", "to_mx", "to_torch", "unpack_bits"]

MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)
#: The dtypes scales, biases and the compute can have.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows of a weight quantized at once by the PyTorch quantizer: bounds its float32 temporaries.
_CHUNK_ELEMENTS = 1 << 22
# Bit widths that do not divide 32 are packed as E values in B bytes (MLX: 8 in 3, 8 in 5, 4 in 3).
_ODD_PACKS = {3: (8, 3), 5: (8, 5), 6: (4, 3)}


# ---------------------------------------------------------------------- MLX availability
@functools.lru_cache(maxsize=None)
def mlx_core(device_type: str = "cpu"):
    """``mlx.core`` when MLX can compute on tensors of ``device_type`` here, else ``None``.

    Cached: the answer cannot change within a process, and the forward pass asks every call.
    """
    if device_type not in ("cpu", "mps"):
        return None
    if not is_library_usable("mlx", Backend.MPS if device_type == "mps" else Backend.CPU):
        return None
    import mlx.core as mx

    return mx


def to_mx(mx, tensor: torch.Tensor):
    """A torch tensor as an ``mx.array``: one copy (MLX cannot import CPU memory without one).

    Through DLPack, not ``tensor.numpy()``: exporting to numpy marks the tensor's storage
    non-resizable for good, and FSDP frees unsharded parameters by resizing their storage.
    """
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if hasattr(mx, "from_dlpack"):
        return mx.from_dlpack(t)
    t = t.clone()  # older mlx: go through numpy, on a private copy
    if t.dtype is torch.bfloat16:  # numpy has no bfloat16: move the bits, then reinterpret them
        return mx.array(t.view(torch.uint16).numpy()).view(mx.bfloat16)
    return mx.array(t.numpy())


def to_torch(mx, array) -> torch.Tensor:
    """An ``mx.array`` as a CPU torch tensor sharing its memory (evaluates it; no copy)."""
    import numpy as np

    if array.dtype == mx.bfloat16:
        return torch.from_numpy(np.asarray(array.view(mx.uint16))).view(torch.bfloat16)
    return torch.from_numpy(np.asarray(array))


# ---------------------------------------------------------------------- the format, in PyTorch
def check_format(bits: int, group_size: int, in_features: int | None = None) -> None:
    if bits not in MLX_BITS:
        raise ValueError(f"bits={bits!r} is not supported by MLX; allowed: {', '.join(map(str, MLX_BITS))}")
    if group_size not in MLX_GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not supported by MLX; allowed: "
                         f"{', '.join(map(str, MLX_GROUP_SIZES))}")
    if in_features is not None and in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}; "
                         f"MLX quantizes whole groups along the input dimension")


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values ``q`` (``(rows, n)``, each in ``[0, 2**bits)``) as MLX does.

    Values are laid out from the least significant bit up as one bit stream per row, which is
    MLX's layout for every width (3, 5 and 6 bits straddle 32-bit words).

    Returns:
        ``uint8`` bytes of shape ``(rows, n * bits / 8)``; ``.view(torch.uint32)`` gives MLX's
        ``uint32`` words on a little-endian machine.
    """
    rows, n = q.shape
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    if bits in (2, 4):
        per = 8 // bits
        q = q.reshape(rows, n // per, per)
        out = q[..., 0].clone()
        for k in range(1, per):
            out |= q[..., k] << (k * bits)
        return out
    values, nbytes = _ODD_PACKS[bits]
    word_dtype = torch.int32 if nbytes * 8 < 32 else torch.int64
    v = q.reshape(rows, n // values, values).to(word_dtype)
    shifts = torch.arange(values, dtype=word_dtype, device=q.device) * bits
    word = (v << shifts).sum(-1, dtype=word_dtype)  # disjoint bit ranges: the sum is an OR
    byte_shifts = torch.arange(nbytes, dtype=word_dtype, device=q.device) * 8
    return ((word[..., None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(rows, n * bits // 8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8`` values ``(rows, n)`` from MLX's packed words
    (``uint32`` of shape ``(rows, n * bits / 32)``, or the same bytes in any dtype)."""
    rows = packed.shape[0]
    data = packed.contiguous().view(torch.uint8).reshape(rows, -1)
    if data.shape[1] * 8 != n * bits:
        raise ValueError(f"packed weight holds {data.shape[1] * 8} bits per row; {n} values of {bits} "
                         f"bits need {n * bits}")
    if bits == 8:
        return data
    mask = (1 << bits) - 1
    if bits in (2, 4):  # a stack of shifts is ~2x faster than one broadcast shift here
        return torch.stack([(data >> s) & mask for s in range(0, 8, bits)], -1).reshape(rows, n)
    values, nbytes = _ODD_PACKS[bits]
    word_dtype = torch.int32 if nbytes * 8 < 32 else torch.int64
    b = data.reshape(rows, -1, nbytes).to(word_dtype)
    byte_shifts = torch.arange(nbytes, dtype=word_dtype, device=data.device) * 8
    word = (b << byte_shifts).sum(-1, dtype=word_dtype)
    shifts = torch.arange(values, dtype=word_dtype, device=data.device) * bits
    return ((word[..., None] >> shifts) & mask).to(torch.uint8).reshape(rows, n)


def affine_quantize(weight: torch.Tensor, group_size: int = 64,
                    bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLX's affine quantization in PyTorch, bit-identical to ``mx.quantize`` (any device).

    Per group it follows MLX's CPU kernel step for step in float32: the scale spans min..max, its
    sign and the bias are chosen so that the endpoint of larger magnitude is represented exactly,
    and values round half to even.

    Args:
        weight: ``(out, in)`` float32/float16/bfloat16; ``in`` a multiple of ``group_size``.
        group_size: 32, 64 or 128.
        bits: 2, 3, 4, 5, 6 or 8.

    Returns:
        ``(packed, scales, biases)``: ``uint32`` ``(out, in * bits / 32)``, and two
        ``(out, in / group_size)`` tensors in ``weight.dtype``.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight dtype {weight.dtype} cannot be quantized; allowed: float32, float16, bfloat16")
    out_features, in_features = weight.shape
    check_format(bits, group_size, in_features)
    device, n_bins = weight.device, float((1 << bits) - 1)
    packed = torch.empty(out_features, in_features * bits // 32, dtype=torch.uint32, device=device)
    scales = torch.empty(out_features, in_features // group_size, dtype=weight.dtype, device=device)
    biases = torch.empty_like(scales)
    eps = torch.tensor(1e-7, dtype=torch.float32, device=device)
    step = max(1, _CHUNK_ELEMENTS // in_features)
    with torch.no_grad():
        for start in range(0, out_features, step):
            stop = min(start + step, out_features)
            w = weight[start:stop].detach().to(torch.float32).reshape(stop - start, -1, group_size)
            w_max, w_min = w.amax(-1), w.amin(-1)
            mask = w_min.abs() > w_max.abs()
            scale = torch.maximum((w_max - w_min) / n_bins, eps)
            scale = torch.where(mask, scale, -scale)
            edge = torch.where(mask, w_min, w_max)
            q0 = torch.round(edge / scale)
            nonzero = q0 != 0
            scale = torch.where(nonzero, edge / q0, scale)
            bias = torch.where(nonzero, edge, torch.zeros_like(edge))
            q = torch.clamp(torch.round((w - bias[..., None]) / scale[..., None]), 0, n_bins)
            packed[start:stop].view(torch.uint8).copy_(pack_bits(q.reshape(stop - start, in_features), bits))
            scales[start:stop] = scale.to(weight.dtype)
            biases[start:stop] = bias.to(weight.dtype)
    return packed, scales, biases


def affine_dequantize(packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor,
                      group_size: int = 64, bits: int = 4) -> torch.Tensor:
    """``scales * q + biases`` per group, in ``scales.dtype``; bit-identical to ``mx.dequantize``
    (a multiply then an add, each rounded to the dtype, as MLX does)."""
    out_features, groups = scales.shape
    in_features = groups * group_size
    w = unpack_bits(packed, bits, in_features).to(scales.dtype).reshape(out_features, groups, group_size)
    return w.mul_(scales[..., None]).add_(biases[..., None]).reshape(out_features, in_features)


def mlx_quantize(weight: torch.Tensor, group_size: int = 64, bits: int = 4):
    """Quantize with ``mx.quantize``; returns the three ``mx.array`` outputs (evaluated).

    Raises:
        ImportError: when MLX cannot run here (with the install command).
    """
    mx = mlx_core("cpu")
    if mx is None:
        status = get_library_status("mlx", Backend.CPU)
        raise ImportError(f"mlx is not usable here: {status.reason}. Fix: {status.install_hint}")
    check_format(bits, group_size, weight.shape[-1])
    arrays = mx.quantize(to_mx(mx, weight), group_size=group_size, bits=bits)
    mx.eval(*arrays)
    return arrays
