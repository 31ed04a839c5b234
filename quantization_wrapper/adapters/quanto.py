"""optimum-quanto adapter: ``nn.Linear`` -> ``optimum.quanto.nn.QLinear`` with frozen weights.

Every layer goes through quanto's own ``QLinear.from_module`` + ``freeze()``, so the weights are
really stored quantized (quanto tensor subclasses holding packed ``uint8`` / ``int8`` /
``float8_e4m3fn`` data plus scales in the compute dtype), and a layer computes bit for bit what
``optimum.quanto.quantize(model, weights=...)`` + ``freeze(model)`` gives. What this adapter adds:

* **The real group size in the plan.** quanto 0.2.7 fixes it per layer: ``qint2``/``qint4`` use
  128 along ``in_features`` when ``in_features > 128``, else the first of 96, 64, 32 that divides
  ``in_features``; when none does (or ``in_features <= 128``) it quantizes per output row, one
  group of ``in_features``. ``qint8``/``qfloat8`` always use one scale per output row.
  :meth:`QuantoAdapter.fit_group_size` asks quanto and reports exactly that.
* **Two CPU kernel choices of quanto 0.2.7 on torch 2.13 routed around** (:class:`QuantoLinear`,
  a ``QLinear`` subclass): ``qint4`` bfloat16 layers whose ``out_features`` is not a multiple of
  16 (the tinygemm packing raises) keep quanto's kernel-agnostic weight, and bfloat16 inputs to
  ``qint8`` layers whose ``in_features`` is a multiple of 4 but not of 16 (``_weight_int8pack_mm``
  returns garbage or crashes) take quanto's generic matmul. Every other layer runs quanto's code.
* **Exact save/load.** :meth:`QuantoAdapter.layer_state_dict` is quanto's own state dict
  (``weight._data``, ``weight._scale``, ``weight._shift``, ``input_scale``, ``output_scale``,
  ``bias``), loadable by ``optimum.quanto.requantize`` with the map entries of
  :meth:`QuantoAdapter.quantization_map_entry`. quanto converts its CPU bfloat16 int4 (tinygemm)
  weights to that format lossily; the saved shifts are chosen so that reloading rebuilds the
  identical weights.

``storage_dtype`` cannot be honoured: quanto's data lives inside tensor subclasses in its own
dtypes. Under FSDP2 ``fully_shard`` *dequantizes* such weights into full-precision shards; pass the
``QLinear`` parameters as ``ignored_params`` to keep them quantized (replicated on every rank).
``backend_options`` takes no key (activation quantization would need quanto's calibration).
"""

from __future__ import annotations

import copy
import functools
import threading
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from ..config import QuantizationConfig, QuantizationMethod, dtype_to_str
from .base import (LayerStateSpec, QuantizationAdapter, autocast_dtype, common_dtype, leaf_tensors, register_adapter,
                   tensor_nbytes)

if TYPE_CHECKING:  # pragma: no cover
    from backend_manager import Backend

    from ..validation import ValidationIssue

__all__ = ["QuantoAdapter", "quanto_group_size"]

M = QuantizationMethod
#: quanto's qtype name per method (the names ``optimum.quanto.quantization_map`` writes).
_QTYPE_NAMES = {M.QUANTO_INT2: "qint2", M.QUANTO_INT4: "qint4", M.QUANTO_INT8: "qint8",
                M.QUANTO_FP8: "qfloat8_e4m3fn"}
#: The dtype quanto stores each qtype's data in.
_NATIVE_STORAGE = {M.QUANTO_INT2: torch.uint8, M.QUANTO_INT4: torch.uint8, M.QUANTO_INT8: torch.int8,
                   M.QUANTO_FP8: torch.float8_e4m3fn}
_REJECTED_OPTIONS = {
    "activations": "activation quantization needs quanto's calibration pass (optimum.quanto.Calibration), "
                   "which this weight-only adapter does not run",
    "weights": "the weight qtype comes from QuantizationConfig.method (quanto_int2/int4/int8/fp8)",
}
_MAX_SHIFT_ULPS = 4
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: The tensors of a frozen layer that hold the compute dtype.
_COMPUTE_KEYS = ("weight._scale", "weight._shift", "bias", "input_scale", "output_scale")


@functools.cache
def _quanto() -> ModuleType:
    import optimum.quanto

    return optimum.quanto


def _qtype(method: QuantizationMethod):
    return _quanto().qtypes[_QTYPE_NAMES[method]]


def _check_options(config: QuantizationConfig) -> None:
    if not config.backend_options:
        return
    problems = [f"{key!r}: {_REJECTED_OPTIONS.get(key, 'unknown option')}" for key in config.backend_options]
    raise ValueError(f"backend_options={config.backend_options!r} is not valid for {config.method.value}: "
                     f"the optimum-quanto adapter takes no backend_options ({'; '.join(problems)}). "
                     f"Remove them")


@functools.lru_cache(maxsize=None)
def quanto_group_size(in_features: int, method: QuantizationMethod | str) -> int | None:
    """The group size optimum-quanto uses for a layer with ``in_features`` inputs.

    Asked from quanto itself (a ``QLinear`` on the meta device), so it is the truth for the
    installed version.

    Returns:
        The group size along ``in_features``, or ``None`` for one scale per output row (always for
        ``qint8``/``qfloat8``; for ``qint2``/``qint4`` when no allowed group divides the row).
    """
    method = QuantizationMethod.parse(method)
    if method not in _QTYPE_NAMES:
        raise ValueError(f"method={method.value!r} is not an optimum-quanto method; allowed: "
                         f"{', '.join(m.value for m in _QTYPE_NAMES)}")
    probe = _quanto().QLinear(in_features, 1, False, device="meta", weights=_qtype(method))
    return probe.weight_group_size


def _tinygemm_fails(qtype, out_features: int, group_size: int | None, dtype: torch.dtype,
                    device: torch.device) -> bool:
    """quanto 0.2.7 picks tinygemm for CPU bfloat16 qint4 at group 128, whose packing raises
    ``expect N to be dividable by 16`` (torch 2.13)."""
    return (qtype == _quanto().qint4 and dtype == torch.bfloat16 and group_size == 128
            and device.type == "cpu" and out_features % 16 != 0)


def _int8pack_fails(weight: torch.Tensor, input: torch.Tensor) -> bool:
    """quanto 0.2.7 sends CPU bfloat16 inputs to ``torch._weight_int8pack_mm`` when
    ``in_features % 4 == 0``; on torch 2.13 that kernel is only right when it is a multiple of 16."""
    if input.dtype != torch.bfloat16 or input.device.type != "cpu":
        return False
    data = getattr(weight, "_data", None)
    in_features = weight.shape[-1]
    return (isinstance(data, torch.Tensor) and data.dtype == torch.int8
            and in_features % 4 == 0 and in_features % 16 != 0)


# ------------------------------------------------------------------ torch's CPU int4 packing
# quanto's CPU bfloat16 qint4 weights (``TinyGemmWeightQBitsTensor``) hold their nibbles in the
# layout of ``torch._convert_weight_to_int4pack_for_cpu``, which depends on the CPU kernel torch
# dispatches to. quanto converts to it through an int32 copy of the weight (4x its bytes) and back
# from it through a matmul with a K x K identity (minutes per GB on a CPU). The three layouts of
# torch's kernel (aten/src/ATen/native/cpu/int4mm_kernel.cpp) are plain nibble pairings:
#   AVX512: blocks of 64 rows stored [K, 32], byte j = row j | row j+32 << 4
#   AVX2:   blocks of 32 rows stored [K, 16], byte j = row j | row j+16 << 4
#   other:  blocks of 32 rows stored [K, 16], byte j = row 2j | row 2j+1 << 4
# and a last partial block pairs adjacent rows. The layout in use is identified once per process
# by packing probes with torch's own kernel; when none matches (a future torch), quanto's own
# conversions are used.
_INT4PACK_CANDIDATES = ((64, True), (32, True), (32, False))


def _int4pack(w: torch.Tensor, block: int, halves: bool) -> torch.Tensor:
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


def _int4unpack(packed: torch.Tensor, n: int, k: int, block: int, halves: bool) -> torch.Tensor:
    """Inverse of :func:`_int4pack`."""
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
    for block, halves in _INT4PACK_CANDIDATES:
        if all(r.shape == (p.shape[0], p.shape[1] // 2) and torch.equal(_int4pack(p, block, halves), r)
               for p, r in zip(probes, refs)):
            return block, halves
    return None


def _regroup_halves(data: torch.Tensor, out_features: int, in_features: int, block: int) -> torch.Tensor:
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


def _tinygemm_weight(qtype, group_size: int, size: torch.Size, stride: tuple[int, ...], data: torch.Tensor,
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
        kernel_bytes = _regroup_halves(data, out_features, in_features, block)
    else:
        grouped = PackedTensor(data, qtype.bits, (out_features * in_features // group_size, group_size),
                               (group_size, 1)).unpack()
        kernel_bytes = _int4pack(grouped.reshape(out_features, in_features), block, halves)
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


def _tinygemm_quantized(qtype, optimizer, weight: torch.Tensor, group_size: int) -> Any:
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
    return _tinygemm_tensor(qtype, group_size, weight.size(), weight.stride(), _int4pack(nibbles, *layout),
                            torch.cat(scales), torch.cat(shifts))


def _standard_weight(weight: Any) -> Any:
    """quanto's kernel-agnostic ``WeightQBitsTensor`` of a CPU tinygemm weight: what
    ``weight.weight_qbits_tensor()`` returns, with the nibbles read by :func:`_int4unpack`
    instead of quanto's identity matmul. ``None`` when the layout is unknown."""
    layout = cpu_int4pack_layout()
    if layout is None or weight.device.type != "cpu":
        return None
    from optimum.quanto.tensor import WeightQBitsTensor

    out_features, in_features = weight.shape
    nibbles = _int4unpack(weight._data._data, out_features, in_features, *layout)
    data = nibbles.reshape(-1, weight._group_size)
    n_scales = weight._scale_shift.numel() // 2
    scale = weight._scale_shift[:, :, 0].t().reshape((n_scales, 1))
    mid = weight._scale_shift[:, :, 1].t().reshape((n_scales, 1))
    shift = 2 ** (weight.qtype.bits - 1) * scale - mid
    return WeightQBitsTensor(weight.qtype, weight.axis, weight._group_size, weight.size(), weight.stride(),
                             data, scale, shift)


def _map_leaves(t: torch.Tensor, fn) -> torch.Tensor:
    """(Possibly nested) quanto tensor ``t`` rebuilt with ``fn`` applied to each plain tensor inside."""
    if getattr(type(t), "__tensor_flatten__", None) is None:
        return fn(t)
    names, meta = t.__tensor_flatten__()
    inner = {name: _map_leaves(getattr(t, name), fn) for name in names}
    return type(t).__tensor_unflatten__(inner, meta, t.size(), t.stride())


class _DequantizedLinear(torch.autograd.Function):
    """``x @ W.T`` with the quantized weight ``W`` dequantized and cast to ``x``'s dtype, in the
    forward and again in the backward: like quanto's ``QuantizedLinearFunction``, it keeps only the
    quantized tensor for the backward, never a dequantized copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return torch.matmul(x, weight.dequantize().to(x.dtype).t())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        (weight,) = ctx.saved_tensors
        return torch.matmul(grad, weight.dequantize().to(grad.dtype)), None


@functools.cache
def _quanto_linear_class() -> type:
    """Define :class:`QuantoLinear` on first use (it subclasses quanto's ``QLinear``)."""
    q = _quanto()
    from optimum.quanto.tensor import WeightQBitsTensor, quantize_weight
    from optimum.quanto.tensor.optimizers import MaxOptimizer, SymmetricOptimizer
    from optimum.quanto.tensor.qtype import qtype

    class QuantoLinear(q.QLinear):
        """optimum-quanto's ``QLinear`` with the two CPU kernel choices of quanto 0.2.7 that fail on
        torch 2.13 routed around (see the module docstring), and under ``torch.autocast`` computing
        in, and returning, the autocast dtype as ``nn.Linear`` does; identical to ``QLinear``
        elsewhere."""

        def _tinygemm_fails(self, dtype: torch.dtype, device: torch.device) -> bool:
            return _tinygemm_fails(self.weight_qtype, self.out_features, self.weight_group_size, dtype, device)

        def freeze(self) -> None:
            weight = self.weight
            if self.weight_qtype is None or self.frozen or isinstance(self.optimizer, SymmetricOptimizer):
                return super().freeze()
            fails = self._tinygemm_fails(weight.dtype, weight.device)
            # quanto's CPU bfloat16 int4 kernel layout, built by the one-pass regroup rather than
            # through an int32 copy of the weight (bit for bit the same; ~12 ms less per 11M weights)
            regroup = (not fails and self.weight_qtype == q.qint4 and self.weight_group_size == 128
                       and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
                       and self.activation_qtype is None)
            if not (fails or regroup):
                return super().freeze()
            if regroup and type(self.optimizer) is MaxOptimizer:  # per-group statistics: sliceable
                with torch.no_grad():
                    kernel = _tinygemm_quantized(self.weight_qtype, self.optimizer, weight.detach(), 128)
                if kernel is None:  # unknown kernel layout: quanto's own conversion
                    return super().freeze()
                self.weight = nn.Parameter(kernel)
                return
            scale, shift = self.optimizer(weight, qtype=self.weight_qtype, axis=0,
                                          group_size=self.weight_group_size)
            frozen = quantize_weight(weight, qtype=self.weight_qtype, axis=0, scale=scale, shift=shift,
                                     group_size=self.weight_group_size, optimized=False)
            if regroup:
                kernel = _tinygemm_weight(self.weight_qtype, 128, weight.size(), weight.stride(),
                                          frozen._data._data, frozen._scale, frozen._shift)
                if kernel is None:  # unknown kernel layout: quanto's own conversion
                    return super().freeze()
                frozen = kernel
            self.weight = nn.Parameter(frozen)

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            dtype = autocast_dtype(input)
            if dtype is not None:
                return self._forward_autocast(input, dtype)
            if self.frozen and _int8pack_fails(self.weight, input):
                # quanto's generic CPU path (library/qbytes_mm.py: qbytes_mm), then the bias
                output = torch.matmul(input.to(self.weight.dtype), self.weight.dequantize().t())
                return output + self.bias if self.bias is not None else output
            return super().forward(input)

        def _forward_autocast(self, input: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            # As nn.Linear under autocast: computed in, and returned as, the autocast dtype. quanto's
            # autograd function would run its forward under autocast but its backward outside it (a
            # low-precision gradient times the compute-dtype weight: a dtype error); with autocast
            # off, a layer in ``dtype`` runs quanto's own path and any other multiplies by its
            # weight dequantized and cast to ``dtype``.
            with torch.autocast(device_type=input.device.type, enabled=False):
                if self.weight.dtype == dtype:
                    return self.forward(input.to(dtype))
                out = _DequantizedLinear.apply(input.to(dtype), self.qweight)
                return out if self.bias is None else out + self.bias.to(dtype)

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            scale = state_dict.get(prefix + "weight._scale")
            data = state_dict.get(prefix + "weight._data._data")
            shift = state_dict.get(prefix + "weight._shift")
            if (self.weight_qtype == q.qint4 and self.weight_group_size == 128 and scale is not None
                    and data is not None and shift is not None and scale.dtype == torch.bfloat16
                    and data.device.type == "cpu" and not self._tinygemm_fails(scale.dtype, scale.device)):
                # What quanto's loader builds (WeightQBitsTensor.optimize -> tinygemm), minus its
                # int32 copy of every weight: 5x faster, bit for bit the same.
                weight = _tinygemm_weight(self.weight_qtype, 128, self.weight.size(), self.weight.stride(),
                                          data, scale, shift)
                if weight is not None:
                    self.weight = nn.Parameter(weight, requires_grad=False)
                    nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, False,
                                                    missing_keys, unexpected_keys, error_msgs)
                    return
            if (self.weight_qtype is None or scale is None
                    or not self._tinygemm_fails(scale.dtype, scale.device)):
                return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                     missing_keys, unexpected_keys, error_msgs)
            # quanto's loader would call .optimize() and hit the failing tinygemm packing
            weight = WeightQBitsTensor.load_from_state_dict(
                state_dict, prefix + "weight.", qtype=self.weight_qtype, axis=0,
                group_size=self.weight_group_size, size=self.weight.size(), stride=self.weight.stride(),
                missing_keys=missing_keys)
            if weight is not None:
                self.weight = nn.Parameter(weight)
            nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, False,
                                            missing_keys, unexpected_keys, error_msgs)

        def __deepcopy__(self, memo: dict) -> "QuantoLinear":
            # quanto's tensors cannot be deep-copied (their clone() dequantizes); copy their insides
            new = type(self).__new__(type(self))
            memo[id(self)] = new
            for key, value in self.__dict__.items():
                if key == "_parameters":
                    value = {name: (copy.deepcopy(p, memo) if p is None or not isinstance(p, q.QTensor) else
                                    nn.Parameter(_map_leaves(p.detach(), torch.clone), requires_grad=p.requires_grad))
                             for name, p in value.items()}
                elif not isinstance(value, qtype):  # quanto's qtypes are shared constants
                    value = copy.deepcopy(value, memo)
                new.__dict__[key] = value
            return new

    QuantoLinear.__module__ = __name__
    QuantoLinear.__qualname__ = "QuantoLinear"
    return QuantoLinear


def __getattr__(name: str) -> Any:
    # ``QuantoLinear`` exists once optimum-quanto is imported; this makes it importable (and
    # picklable by name) without importing quanto when this module loads.
    if name == "QuantoLinear":
        return _quanto_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _exact_tinygemm_shifts(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
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


_TEMPLATE_LOCK = threading.RLock()  # held around every QTensor rebuild in restore (see below)


@functools.lru_cache(maxsize=256)
def _frozen_meta_template(in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                          method: QuantizationMethod) -> nn.Module:
    # One at a time: quanto rebuilds QTensors through ast.literal_eval (detach, clone, deepcopy,
    # freeze), and CPython 3.11 parses non-reentrantly ("AST constructor recursion depth mismatch"
    # with two restore threads).
    with _TEMPLATE_LOCK:
        qlinear = _quanto_linear_class()(in_features, out_features, bias, device="meta", dtype=dtype,
                                         weights=_qtype(method))
        with torch.no_grad():
            qlinear.freeze()
    return qlinear


@functools.lru_cache(maxsize=256)
def _frozen_state_shapes(in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                         method: QuantizationMethod) -> dict[str, tuple[int, ...]]:
    """The state-dict key shapes of a frozen layer (what :meth:`QuantoAdapter.layer_state_dict`
    gives for it)."""
    return {k: shape for k, (_, shape) in _frozen_state_layout(in_features, out_features, bias, dtype, method).items()}


@functools.lru_cache(maxsize=256)
def _frozen_state_layout(in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                         method: QuantizationMethod) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{key: (dtype, shape)}`` of a frozen layer's state dict."""
    template = _frozen_meta_template(in_features, out_features, bias, dtype, method)
    with _TEMPLATE_LOCK:  # state_dict() detaches QTensors: ast.literal_eval inside quanto
        return {k: (v.dtype, tuple(v.shape)) for k, v in template.state_dict().items()}


@register_adapter(M.QUANTO_INT2, M.QUANTO_INT4, M.QUANTO_INT8, M.QUANTO_FP8)
class QuantoAdapter(QuantizationAdapter):
    """Quantizes linear layers into optimum-quanto ``QLinear`` layers with frozen ``qint2``,
    ``qint4``, ``qint8`` or ``qfloat8`` (e4m3) weights.

    The compute dtype (dtype of the scales, the bias and the matmul) is ``config.compute_dtype``,
    else the layer's own dtype. quanto fixes the group size (see :func:`quanto_group_size`).

    Raises:
        ValueError: at construction, for any ``backend_options`` (in the config or in a
            ``layer_configs`` override for a quanto method).
    """

    library = "optimum-quanto"
    library_module = "optimum.quanto"
    fill_after_verification = True  # CPU bfloat16 int4 is regrouped for torch's int4 kernel

    def __init__(self, config: QuantizationConfig | None = None, backend=None, *, device=None):
        super().__init__(config, backend, device=device)
        _check_options(self.config)
        for pattern, overrides in self.config.layer_configs.items():
            layer = self.config._merged(overrides)
            if layer.method in self.methods:
                try:
                    _check_options(layer)
                except ValueError as e:
                    raise ValueError(f"layer_configs[{pattern!r}]: {e}") from e

    # ------------------------------------------------------------------ hooks
    @classmethod
    def quantized_module_types(cls) -> tuple[type, ...]:
        return (_quanto().QLinear,)

    @classmethod
    def quantization_map_entry(cls, config: QuantizationConfig | nn.Module) -> dict[str, str]:
        """quanto's ``quantization_map`` entry for a layer quantized with ``config`` (or for a
        ``QLinear`` module), e.g. ``{"weights": "qint4", "activations": "none"}``."""
        if isinstance(config, nn.Module):
            if not hasattr(config, "weight_qtype"):
                raise ValueError(f"{type(config).__name__} is not an optimum-quanto module")
            qtype, activations = config.weight_qtype, getattr(config, "activation_qtype", None)
            return {"weights": "none" if qtype is None else qtype.name,
                    "activations": "none" if activations is None else activations.name}
        if not isinstance(config, QuantizationConfig) or config.method not in _QTYPE_NAMES:
            got = config.method.value if isinstance(config, QuantizationConfig) else type(config).__name__
            raise ValueError(f"quantization_map_entry needs a config of an optimum-quanto method "
                             f"({', '.join(m.value for m in _QTYPE_NAMES)}), got {got}")
        return {"weights": _QTYPE_NAMES[config.method], "activations": "none"}

    @classmethod
    def check_config(cls, config: QuantizationConfig, backend: "Backend") -> list["ValidationIssue"]:
        from ..validation import Severity, ValidationIssue

        issues = []
        # The top-level config, then each override for what it sets itself (inherited problems are
        # reported once, on the top-level field).
        layers = [("", config, {"backend_options", "storage_dtype"})]
        for pattern, overrides in config.layer_configs.items():
            layers.append((f"layer_configs[{pattern!r}].", config._merged(overrides),
                           {"backend_options", "storage_dtype"} if "method" in overrides else set(overrides)))
        for prefix, layer, fields in layers:
            if layer.method not in cls.methods:
                continue
            if "backend_options" in fields and layer.backend_options:
                try:
                    _check_options(layer)
                except ValueError as e:
                    issues.append(ValidationIssue(Severity.ERROR, prefix + "backend_options", str(e),
                                                  "remove backend_options (optimum-quanto takes none)."))
            storage, native = layer.storage_dtype, _NATIVE_STORAGE[layer.method]
            if "storage_dtype" in fields and storage is not None and storage != native:
                issues.append(ValidationIssue(
                    Severity.WARNING, prefix + "storage_dtype",
                    f"storage_dtype={dtype_to_str(storage)} cannot be honoured: optimum-quanto stores "
                    f"{_QTYPE_NAMES[layer.method]} data as {dtype_to_str(native)} inside its own tensor type "
                    f"(scales in the compute dtype), and FSDP2 fully_shard would dequantize such weights "
                    f"into full-precision shards.",
                    "leave storage_dtype unset; with FSDP2 pass the QLinear parameters to fully_shard as "
                    "ignored_params (they stay quantized, replicated on each rank), or use method='hqq' "
                    "with storage_dtype for shardable quantized weights."))
        return issues

    def fit_group_size(self, in_features: int, out_features: int,
                       config: QuantizationConfig) -> tuple[QuantizationConfig | None, str | None]:
        """quanto's own group size for this shape (:func:`quanto_group_size`); a per-row layer
        reports ``group_size=in_features``. Never skips: every shape quantizes correctly."""
        asked = config.group_size
        if config.method in (M.QUANTO_INT8, M.QUANTO_FP8):
            if asked is None:
                return config, None
            return (config.replace(group_size=None),
                    f"group_size={asked} ignored: optimum-quanto {_QTYPE_NAMES[config.method]} uses one scale "
                    f"per output row")
        group = quanto_group_size(in_features, config.method)
        effective = group if group is not None else in_features
        if effective == asked:
            return config, None
        if group is None:
            why = "in_features <= 128" if in_features <= 128 else "no group of 128, 96, 64 or 32 divides it"
            reason = (f"optimum-quanto quantizes this layer per output row (group_size=in_features="
                      f"{in_features}): {why}")
        elif asked == 128 or asked is None:
            reason = f"group_size=128 does not divide in_features={in_features}; optimum-quanto uses {group}"
        else:
            reason = f"group_size={asked} cannot be honoured: optimum-quanto uses {group} for this shape"
        return config.replace(group_size=effective), reason

    def module_nbytes(self, module: nn.Module) -> int:
        """Bytes of the plain tensors inside quanto's weight (packed data, scale, shift), the bias
        and the ``input_scale``/``output_scale`` buffers."""
        tensors = [leaf for t in list(module.parameters()) + list(module.buffers()) for leaf in leaf_tensors(t)]
        return tensor_nbytes(tensors)

    # ------------------------------------------------------------------ layer level
    def _checked(self, config: QuantizationConfig) -> QuantizationConfig:
        if config.method not in self.methods:
            raise ValueError(f"QuantoAdapter cannot quantize with method={config.method.value!r}; it serves "
                             f"{', '.join(m.value for m in self.methods)}")
        _check_options(config)
        return config

    def quantize_linear(self, linear: nn.Linear, name: str | None = None, *,
                        config: QuantizationConfig | None = None) -> nn.Module:
        config = self._checked(self.layer_config(name, config))
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"QuantoAdapter.quantize_linear expects an nn.Linear, got {type(linear).__name__}")
        if linear.weight.device.type == "meta":
            raise ValueError("the layer is on the meta device (no weights to quantize); use "
                             "create_quantized_linear and load_layer_state")
        device = self.device or linear.weight.device
        dtype = config.compute_dtype or linear.weight.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"optimum-quanto computes in float32, float16 or bfloat16; the layer is {dtype}. "
                             f"Set QuantizationConfig.compute_dtype to one of them")
        # A stand-in that from_module may take tensors from: the caller's layer stays untouched
        # (the weight is only read; the bias is a copy, since the quantized layer keeps it).
        source = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        source.weight = nn.Parameter(linear.weight.detach().to(device=device, dtype=dtype), requires_grad=False)
        if linear.bias is not None:
            source.bias = nn.Parameter(linear.bias.detach().to(device=device, dtype=dtype, copy=True),
                                       requires_grad=linear.bias.requires_grad)
        with torch.no_grad():
            qlinear = _quanto_linear_class().from_module(source, weights=_qtype(config.method))
            qlinear.freeze()
        qlinear.weight.requires_grad_(False)  # frozen quantized data has no gradient path
        return qlinear

    def create_quantized_linear(self, in_features: int, out_features: int, bias: bool = True, *,
                                config: QuantizationConfig | None = None,
                                device: torch.device | str | None = None,
                                dtype: torch.dtype | None = None) -> nn.Module:
        """A frozen ``QuantoLinear`` whose quantized tensors have their final shapes and dtypes
        (uninitialized; nothing allocated on ``device="meta"``), to be filled by
        :meth:`load_layer_state`."""
        config = self._checked(config or self.config)
        device = torch.device(device) if device is not None else (self.device or torch.device("cpu"))
        dtype = config.compute_dtype or dtype or torch.get_default_dtype()
        # Freezing runs quanto's quantization on meta tensors (~10 ms of Python per layer): do it
        # once per shape and copy the template (quantized tensor types and shapes, no data).
        template = _frozen_meta_template(in_features, out_features, bool(bias), dtype, config.method)
        with _TEMPLATE_LOCK:  # copying QTensors runs quanto's ast.literal_eval: one thread at a time (see above)
            qlinear = copy.deepcopy(template)
        if device.type != "meta":
            qlinear.weight = nn.Parameter(_map_leaves(qlinear.weight, lambda t: torch.empty_like(t, device=device)))
            if bias:
                qlinear.bias = nn.Parameter(torch.empty_like(qlinear.bias, device=device))
            qlinear.input_scale = torch.ones_like(qlinear.input_scale, device=device)
            qlinear.output_scale = torch.ones_like(qlinear.output_scale, device=device)
        qlinear.weight.requires_grad_(False)
        return qlinear

    def layer_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """quanto's own state dict of the layer (the names ``optimum.quanto.requantize`` loads)."""
        if not self.is_quantized_module(module) or not module.frozen:
            raise ValueError(f"layer_state_dict expects a frozen optimum-quanto QLinear, got {type(module).__name__}")
        tinygemm = "_scale_shift" in module.weight.__tensor_flatten__()[0]
        standard = _standard_weight(module.weight) if tinygemm else None
        if standard is not None:
            # quanto's own state_dict() unpacks CPU int4 through a K x K identity matmul (~1 s per
            # 11M-weight layer); the same state from a direct unpack of the nibbles.
            state: dict[str, torch.Tensor] = {}
            standard.save_to_state_dict(state, "weight.", False)
            if module.bias is not None:
                state["bias"] = module.bias.detach()
            state["input_scale"] = module.input_scale.detach()
            state["output_scale"] = module.output_scale.detach()
        else:
            state = module.state_dict()
        state = {k: v.detach().contiguous() for k, v in state.items()}
        if tinygemm:
            state["weight._shift"] = _exact_tinygemm_shifts(module.weight, state["weight._scale"],
                                                            state["weight._shift"])
        return state

    def layer_state_spec(self, in_features: int, out_features: int, bias: bool, state: Mapping[str, torch.Tensor],
                         *, config: QuantizationConfig) -> LayerStateSpec:
        """quanto's state dict of a frozen layer of this shape and qtype (asked from quanto, on meta):
        packed data in the qtype's storage dtype, scales, shifts, bias and the activation scales in
        the compute dtype (``config.compute_dtype``, else the dtype most of them hold)."""
        config = self._checked(config)
        compute = config.compute_dtype or common_dtype(state, _COMPUTE_KEYS, _FLOAT_DTYPES)
        probe = compute if isinstance(compute, torch.dtype) else torch.float32
        layout = _frozen_state_layout(in_features, out_features, bool(bias), probe, config.method)
        return {k: (compute if dtype == probe else dtype, shape) for k, (dtype, shape) in layout.items()}

    def restore_linear(self, in_features: int, out_features: int, bias: bool, state: dict[str, torch.Tensor], *,
                       config: QuantizationConfig | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """A CPU bfloat16 ``qint4`` layer is built straight from its state (the standard bytes
        regrouped for the kernel); every other layer through :meth:`load_layer_state`.

        Raises:
            CheckpointError: ``state`` does not match :meth:`layer_state_spec`.
        """
        config = self._checked(config or self.config)
        self.check_layer_state(in_features, out_features, bias, state, config=config)
        scale, data, shift = (state.get(f"weight.{k}") for k in ("_scale", "_data._data", "_shift"))
        # As quanto's loader does, the saved scales decide the layer's dtype (and its kernel).
        if (config.method is M.QUANTO_INT4 and scale is not None
                and data is not None and shift is not None and scale.dtype == torch.bfloat16
                and data.device.type == "cpu" and (self.device is None or self.device.type == "cpu")
                and quanto_group_size(in_features, config.method) == 128 and out_features % 16 == 0):
            dtype = torch.bfloat16
            expected = _frozen_state_shapes(in_features, out_features, bool(bias), dtype, config.method)
            if {k: tuple(v.shape) for k, v in state.items()} == expected:
                weight = _tinygemm_weight(_qtype(config.method), 128, torch.Size((out_features, in_features)),
                                          (in_features, 1), data, scale, shift)
                if weight is not None:  # the regroup above runs in parallel; QTensor handling below does not
                    with _TEMPLATE_LOCK:
                        qlinear = _quanto_linear_class()(in_features, out_features, bias, device="meta",
                                                         dtype=dtype, weights=_qtype(config.method))
                        qlinear.weight = nn.Parameter(weight, requires_grad=False)
                        if bias:
                            qlinear.bias = nn.Parameter(state["bias"])
                        qlinear.input_scale = state["input_scale"]
                        qlinear.output_scale = state["output_scale"]
                    return qlinear
        # quanto rebuilds QTensors through ast.literal_eval (detach, deepcopy, load_state_dict), which
        # CPython 3.11 cannot run in two threads at once: these restores are cheap, one at a time.
        with _TEMPLATE_LOCK:
            empty = self.create_quantized_linear(in_features, out_features, bias, config=config, device="meta",
                                                 dtype=dtype)
            return self.load_layer_state(empty, state)

    def load_layer_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
        """Fill a layer from :meth:`create_quantized_linear` with :meth:`layer_state_dict` output
        (tensors are taken, not copied).

        Raises:
            ValueError: when keys are missing or unexpected, or a tensor has the wrong shape.
        """
        if not self.is_quantized_module(module):
            raise ValueError(f"load_layer_state expects an optimum-quanto QLinear, got {type(module).__name__}")
        if not module.frozen:
            with torch.no_grad():
                module.freeze()
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(f"{k}: {tuple(state[k].shape)} instead of {shape}" for k, shape in expected.items()
                       if k in state and tuple(state[k].shape) != shape)
        if missing or unexpected or wrong:
            raise ValueError(f"state does not fit this {module.out_features}x{module.in_features} "
                             f"{module.weight_qtype.name} layer: missing {missing}, unexpected {unexpected}, "
                             f"wrong shapes {wrong}")
        # torch's CPU int8 weight-only kernel (quanto's int8 matmul) reads its weight with aligned
        # vector loads: a view of a memory-mapped checkpoint at an offset that is not a multiple of
        # 16 crashed the process (SIGSEGV). Such packed tensors get a copy (64-byte aligned).
        state = {k: v.clone() if not v.is_floating_point() and v.device.type == "cpu" and v.data_ptr() % 64 else v
                 for k, v in state.items()}
        module.load_state_dict(state, strict=True, assign=True)
        module.weight.requires_grad_(False)
        return module

    def dequantize_module(self, module: nn.Module) -> nn.Linear:
        if not self.is_quantized_module(module):
            raise ValueError(f"QuantoAdapter.dequantize_module expects an optimum-quanto QLinear, got "
                             f"{type(module).__name__}")
        with torch.no_grad():
            weight = module.qweight.dequantize() if module.frozen else module.weight.detach()
        linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return linear
