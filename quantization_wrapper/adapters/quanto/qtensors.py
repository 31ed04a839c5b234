"""optimum-quanto's library handle and qtypes, and quanto weight tensors (``QTensor``) built and
read without quanto's slow detours: CPU bfloat16 int4 (tinygemm) weights straight from quanto's
standard bytes or from a float weight, their standard form back, and the shifts that reload them
exactly. optimum-quanto is imported on first use, not with this module.
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType
from typing import Any

import torch

from ...config import QuantizationMethod
from .layout import cpu_int4pack_layout, int4pack, int4unpack, regroup_halves

__all__ = ["QTYPE_NAMES", "dequantized", "exact_tinygemm_shifts", "map_leaves", "method_qtype", "quanto_module",
           "standard_weight", "tinygemm_quantized", "tinygemm_weight"]

#: quanto's qtype name per method (the names ``optimum.quanto.quantization_map`` writes).
QTYPE_NAMES = {QuantizationMethod.QUANTO_INT2: "qint2", QuantizationMethod.QUANTO_INT4: "qint4",
               QuantizationMethod.QUANTO_INT8: "qint8", QuantizationMethod.QUANTO_FP8: "qfloat8_e4m3fn"}
_MAX_SHIFT_ULPS = 4


@functools.cache
def quanto_module() -> ModuleType:
    """``optimum.quanto``, imported on first use."""
    import optimum.quanto

    return optimum.quanto


def method_qtype(method: QuantizationMethod):
    """quanto's weight qtype for an optimum-quanto ``method``."""
    return quanto_module().qtypes[QTYPE_NAMES[method]]


def tinygemm_weight(qtype, group_size: int, size: torch.Size, stride: tuple[int, ...], data: torch.Tensor,
                    scale: torch.Tensor, shift: torch.Tensor) -> Any:
    """A CPU ``TinyGemmWeightQBitsTensor`` from quanto's standard packed bytes, scales and shifts:
    what quanto's loader builds (bit for bit), without its int32 detour. ``None`` when the int4pack
    layout is unknown."""
    layout = cpu_int4pack_layout()
    if layout is None:
        return None
    from optimum.quanto.tensor.packed import PackedTensor

    out_features, in_features = size
    block, halves = layout
    if halves and out_features % (2 * block) == 0 and data.numel() * 2 == out_features * in_features:
        kernel_bytes = regroup_halves(data, out_features, in_features, block)
    else:
        grouped = PackedTensor(data, qtype.bits, (out_features * in_features // group_size, group_size),
                               (group_size, 1)).unpack()
        kernel_bytes = int4pack(grouped.reshape(out_features, in_features), block, halves)
    return _tinygemm_tensor(qtype, group_size, size, stride, kernel_bytes, scale, shift)


def _tinygemm_tensor(qtype, group_size: int, size: torch.Size, stride: tuple[int, ...], kernel_bytes: torch.Tensor,
                     scale: torch.Tensor, shift: torch.Tensor) -> Any:
    """A CPU ``TinyGemmWeightQBitsTensor`` from its kernel-layout bytes and quanto's scales and shifts."""
    from optimum.quanto.tensor.weights.tinygemm import TinyGemmWeightQBitsTensor
    from optimum.quanto.tensor.weights.tinygemm.packed import TinyGemmPackedTensor

    out_features, in_features = size
    packed = TinyGemmPackedTensor(kernel_bytes, size, (in_features, 1))
    # quanto's TinyGemmWeightQBitsTensor.__init__: scale and mid-point shift in one tensor
    scale = scale.reshape(out_features, in_features // group_size, 1)
    shift = shift.reshape(out_features, in_features // group_size, 1)
    if not shift.dtype.is_floating_point:
        shift = scale * shift
    mid = -shift + 2 ** (qtype.bits - 1) * scale
    scale_shift = torch.cat([scale, mid], 2).transpose(0, 1).contiguous()
    return TinyGemmWeightQBitsTensor(qtype, 0, group_size, size, stride, packed, scale_shift)


#: Weights per call of quanto's optimizer and quantize_affine when freezing a CPU int4 layer.
_QUANTIZE_SLICE = 1 << 18


def tinygemm_quantized(qtype, optimizer, weight: torch.Tensor, group_size: int) -> Any:
    """quanto's freeze of a CPU weight (max optimizer, ``quantize_affine``) straight to the int4
    kernel layout; ``None`` when the layout is unknown.

    quanto's ops are whole-tensor torch code with a temporary per step; they work group by group
    (``group_size`` weights of one row), so they run on slices of 256K weights, whose temporaries
    stay in cache (25% faster), and the nibbles are packed once, for the kernel, instead of
    packed for quanto's format and regrouped. The same bytes, scales and shifts as quanto's
    ``freeze`` (tested).
    """
    layout = cpu_int4pack_layout()
    if layout is None:
        return None
    out_features, in_features = weight.shape
    nibbles = torch.empty(out_features, in_features, dtype=torch.uint8, device=weight.device)
    scales, shifts = [], []
    step = max(1, _QUANTIZE_SLICE // in_features)
    for start in range(0, out_features, step):
        part = weight[start:start + step]
        scale, shift = optimizer(part, qtype=qtype, axis=0, group_size=group_size)
        nibbles[start:start + step] = torch.ops.quanto.quantize_affine(
            part, bits=qtype.bits, axis=0, group_size=group_size, scale=scale, shift=shift).view(-1, in_features)
        scales.append(scale)
        shifts.append(shift)
    return _tinygemm_tensor(qtype, group_size, weight.size(), weight.stride(), int4pack(nibbles, *layout),
                            torch.cat(scales), torch.cat(shifts))


def standard_weight(weight: Any) -> Any:
    """quanto's kernel-agnostic ``WeightQBitsTensor`` of a CPU tinygemm weight: what
    ``weight.weight_qbits_tensor()`` returns, with the nibbles read by :func:`int4unpack`
    instead of quanto's identity matmul. ``None`` when the layout is unknown."""
    layout = cpu_int4pack_layout()
    if layout is None or weight.device.type != "cpu":
        return None
    from optimum.quanto.tensor import WeightQBitsTensor

    out_features, in_features = weight.shape
    nibbles = int4unpack(weight._data._data, out_features, in_features, *layout)
    data = nibbles.reshape(-1, weight._group_size)
    n_scales = weight._scale_shift.numel() // 2
    scale = weight._scale_shift[:, :, 0].t().reshape((n_scales, 1))
    mid = weight._scale_shift[:, :, 1].t().reshape((n_scales, 1))
    shift = 2 ** (weight.qtype.bits - 1) * scale - mid
    return WeightQBitsTensor(weight.qtype, weight.axis, weight._group_size, weight.size(), weight.stride(),
                             data, scale, shift)


def dequantized(weight: Any) -> torch.Tensor:
    """``weight.dequantize()``, bit for bit, without quanto's detour for CPU int4 kernel weights.

    quanto dequantizes a CPU ``TinyGemmWeightQBitsTensor`` by converting it back to its standard
    form, reading the nibbles with a matmul of a K x K identity through torch's int4 kernel (about
    0.1-0.4 s per million weights); here they are read by :func:`int4unpack` and the same
    arithmetic follows in the same dtype (``scale * q - (2**(bits-1) * scale - mid)``, per group):
    ~1 ms per million weights, the same bits (tested). Every other weight: quanto's own.
    """
    layout = cpu_int4pack_layout() if weight.device.type == "cpu" else None
    if layout is None or type(weight).__name__ != "TinyGemmWeightQBitsTensor":
        return weight.dequantize()
    out_features, in_features = weight.shape
    group = weight._group_size
    nibbles = int4unpack(weight._data._data, out_features, in_features, *layout)
    scale_shift = weight._scale_shift  # [in_features / group, out_features, 2]
    scale = scale_shift[:, :, 0].t().unsqueeze(-1)
    mid = scale_shift[:, :, 1].t().unsqueeze(-1)
    shift = 2 ** (weight.qtype.bits - 1) * scale - mid  # quanto's weight_qbits_tensor()
    out = nibbles.view(out_features, in_features // group, group) * scale  # quanto's QBitsDequantizer
    out -= shift
    return out.view(out_features, in_features)


def map_leaves(t: torch.Tensor, fn) -> torch.Tensor:
    """(Possibly nested) quanto tensor ``t`` rebuilt with ``fn`` applied to each plain tensor inside."""
    if getattr(type(t), "__tensor_flatten__", None) is None:
        return fn(t)
    names, meta = t.__tensor_flatten__()
    inner = {name: map_leaves(getattr(t, name), fn) for name in names}
    return type(t).__tensor_unflatten__(inner, meta, t.size(), t.stride())


def exact_tinygemm_shifts(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shifts that make quanto rebuild ``weight`` (a tinygemm tensor) exactly when reloaded.

    tinygemm stores ``mid = -shift + 2**(bits-1) * scale``; quanto saves ``2**(bits-1) * scale - mid``,
    and in bfloat16 that does not always give ``mid`` back. The original shift did (it produced
    ``mid``), and it lies within a few ulps of the saved one: search there.
    """
    n = scale.numel()
    target = weight._scale_shift[:, :, 1].t().reshape(n, 1)
    half_range = 2 ** (weight.qtype.bits - 1) * scale
    shift = shift.clone()
    wrong = (-shift + half_range) != target
    for direction in (float("inf"), float("-inf")):
        candidate = shift.clone()
        for _ in range(_MAX_SHIFT_ULPS):
            if not wrong.any():
                return shift
            candidate = torch.nextafter(candidate, torch.full_like(candidate, direction))
            hit = wrong & ((-candidate + half_range) == target)
            shift[hit] = candidate[hit]
            wrong &= ~hit
    if wrong.any():
        warnings.warn(f"{int(wrong.sum())} of {n} bfloat16 int4 shifts cannot be saved exactly; after "
                      f"reloading, outputs may differ in the last bit", RuntimeWarning, stacklevel=3)
    return shift
