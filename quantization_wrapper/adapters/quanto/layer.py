"""The quantized layer: :class:`QuantoLinear`, optimum-quanto's ``QLinear`` holding its frozen
weight as plain tensors (:mod:`.storage`: packed data as integer parameters FSDP2 shards, scales
as buffers) and rebuilding quanto's tensor from them on use, with the CPU kernel choices of quanto
0.2.7 that fail or crawl on torch 2.13 routed around, and the per-shape frozen templates (and
their state layouts) that empty layers are copied from, under the one lock every QTensor rebuild
through quanto's metadata takes.

This module imports optimum-quanto: the adapter imports it when it first builds a layer.
"""

from __future__ import annotations

import copy
import functools
import threading

import torch
import torch.nn.functional as F
from optimum.quanto import QLinear, QTensor, qint4
from optimum.quanto.tensor import WeightQBitsTensor, quantize_weight
from optimum.quanto.tensor.optimizers import MaxOptimizer, SymmetricOptimizer
from optimum.quanto.tensor.qtype import qtype as QType
from torch import nn

from ...config import QuantizationMethod
from ..base import autocast_dtype
from .qtensors import dequantized, map_leaves, method_qtype, tinygemm_quantized, tinygemm_weight
from .storage import WeightLayout, flatten_weight

__all__ = ["QuantoLinear", "TEMPLATE_LOCK", "frozen_meta_template", "frozen_state_layout", "frozen_state_shapes"]


def _tinygemm_fails(qtype, out_features: int, group_size: int | None, dtype: torch.dtype,
                    device: torch.device) -> bool:
    """quanto 0.2.7 picks tinygemm for CPU bfloat16 qint4 at group 128, whose packing raises
    ``expect N to be dividable by 16`` (torch 2.13)."""
    return (qtype == qint4 and dtype == torch.bfloat16 and group_size == 128
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


class _DequantizedLinear(torch.autograd.Function):
    """``x @ W.T`` with the quantized weight ``W`` dequantized and cast to ``x``'s dtype, in the
    forward and again in the backward: like quanto's ``QuantizedLinearFunction``, it keeps only the
    quantized tensor for the backward, never a dequantized copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return torch.matmul(x, dequantized(weight).to(x.dtype).t())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        (weight,) = ctx.saved_tensors
        return torch.matmul(grad, dequantized(weight).to(grad.dtype)), None


class _KernelLayoutLinear(torch.autograd.Function):
    """quanto's linear function (``QuantizedLinearFunction``: ``x @ W.T + bias``, the bias
    gradient summed over every dimension but the last) for a CPU int4 kernel-layout weight, with
    ``W`` dequantized by :func:`~.qtensors.dequantized` (quanto's ``W.dequantize()``, bit for bit)
    in the forward and again in the backward.

    quanto's own forward multiplies with torch's int4 kernel, 2-3x slower than a bfloat16 matmul
    for a training batch on CPU, and its backward dequantizes ``W`` through a K x K identity
    matmul (0.1-0.4 s per million weights): a QLoRA step spent most of its time there. Only the
    quantized tensor is kept for the backward (no dense copy, and not the input, which quanto
    keeps for a weight gradient a frozen weight never needs)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # not save_for_backward: FSDP refills the data it views before the backward
        output = torch.matmul(x, dequantized(weight).t())
        return output if bias is None else output + bias

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad, dequantized(ctx.weight))
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(tuple(range(grad.ndim - 1)))
        return grad_x, None, grad_bias


def _kernel_layout_training(weight: torch.Tensor, input: torch.Tensor) -> bool:
    """A gradient will flow through a CPU int4 kernel-layout weight: :class:`_KernelLayoutLinear`."""
    return (input.requires_grad and torch.is_grad_enabled() and input.device.type == "cpu"
            and type(weight).__name__ == "TinyGemmWeightQBitsTensor" and input.dtype == weight.dtype)


class QuantoLinear(QLinear):
    """optimum-quanto's ``QLinear`` whose frozen weight is stored as plain tensors that FSDP can
    shard (:mod:`.storage`), with the CPU kernel choices of quanto 0.2.7 that fail on torch 2.13
    routed around (see the package docstring), CPU int4 kernel-layout weights trained through
    :class:`_KernelLayoutLinear`, and under ``torch.autocast`` computing in, and returning, the
    autocast dtype as ``nn.Linear`` does; otherwise it computes what ``QLinear`` does.

    ``layer.weight`` is quanto's weight tensor (a ``QTensor`` once frozen), rebuilt on each access
    from the module's parameters ``weight_data`` (the quantized data) and buffers ``weight_scale``,
    ``weight_shift`` / ``weight_scale_shift``; assigning a ``QTensor`` (or a parameter holding
    one: quanto's ``freeze``) stores its tensors the same way. ``state_dict()`` is quanto's
    (``weight._data``, ``weight._scale``, ...), except while FSDP shards the layer, when it holds
    the sharded tensors under their own names.
    """

    # ------------------------------------------------------------------ storage
    @property
    def weight(self) -> torch.Tensor:
        layout = self.__dict__.get("_qw_layout")
        if layout is not None:
            return layout.build(self._leaf, TEMPLATE_LOCK)
        weight = self.__dict__.get("_parameters", {}).get("weight")
        if weight is None and "weight" not in self.__dict__.get("_parameters", {}):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute 'weight'")
        return weight

    def _leaf(self, name: str) -> torch.Tensor:
        param = self._parameters.get(name)
        return self._buffers[name] if param is None else param.detach()

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":
            if isinstance(value, QTensor):
                self._store_weight(value)
                return
            if "_qw_layout" in self.__dict__:  # unfreezing: nn.Module's rules for a "weight" parameter
                self._drop_weight()
                self._parameters["weight"] = None
        super().__setattr__(name, value)

    def map_stored(self, fn) -> None:
        """Replace each stored tensor of the frozen weight by ``fn(tensor)`` (same role, e.g. new
        storage on another device; the caller keeps the layout valid)."""
        for name in self.__dict__["_qw_layout"].names:
            param = self._parameters.get(name)
            if param is None:
                self._buffers[name] = fn(self._buffers[name])
            else:
                self._parameters[name] = nn.Parameter(fn(param.detach()), requires_grad=False)

    def _store_weight(self, weight: torch.Tensor) -> None:
        """Hold quanto's ``weight`` as the module's plain tensors (views of its own, no copy)."""
        layout, tensors = flatten_weight(weight)
        self._drop_weight()
        params = self._parameters
        ordered = {}
        for name, (tensor, packed) in tensors.items():
            if packed:
                ordered[name] = nn.Parameter(tensor, requires_grad=False)
            else:
                self._buffers[name] = tensor
        # the packed data first, where ``weight`` was (FSDP and optimizers see parameters in order)
        rest = dict(params)
        params.clear()
        params.update(ordered)
        params.update(rest)
        self.__dict__["_qw_layout"] = layout

    def _drop_weight(self) -> None:
        layout: WeightLayout | None = self.__dict__.pop("_qw_layout", None)
        if layout is not None:
            for name in layout.names:
                self._parameters.pop(name, None)
                self._buffers.pop(name, None)
        params = self.__dict__.get("_parameters")
        if params is not None:
            params.pop("weight", None)

    def _sharded(self) -> bool:
        """The stored tensors are FSDP2 shards (``DTensor``) right now."""
        layout = self.__dict__.get("_qw_layout")
        if layout is None:
            return False
        from torch.distributed.tensor import DTensor

        return any(isinstance(self._parameters.get(name), DTensor) for name in layout.names)

    @property
    def frozen(self) -> bool:
        return "_qw_layout" in self.__dict__ or isinstance(self._parameters.get("weight"), QTensor)

    @property
    def qweight(self):
        layout = self.__dict__.get("_qw_layout")
        if layout is not None:
            return layout.build(self._leaf, TEMPLATE_LOCK)
        return super().qweight

    def _apply(self, fn, recurse: bool = True):
        # As when quanto's tensor was the parameter: ``fn`` (``to``, ``cuda``, ``half``, ...) is
        # applied to quanto's tensor, which moves between devices in its own way (its kernel
        # layouts are per device type) and refuses dtype changes. While FSDP shards the layer,
        # the stored tensors are FSDP's and are treated as plain tensors.
        layout = self.__dict__.get("_qw_layout")
        if layout is None or self._sharded():
            return super()._apply(fn, recurse)
        weight = self.weight
        applied = fn(weight)  # raises before anything changed, as quanto's own tensor did
        stored = {name: (self._parameters.pop(name, None), self._buffers.pop(name, None)) for name in layout.names}
        try:
            result = super()._apply(fn, recurse)  # everything else (bias, activation scales)
        finally:
            for name, (param, buffer) in stored.items():
                if param is not None:
                    self._parameters[name] = param
                else:
                    self._buffers[name] = buffer
        if applied is weight:  # e.g. ``to`` the device it is on: the same tensors
            return result
        if isinstance(applied, QTensor):
            self._store_weight(applied)
        else:  # e.g. to_empty: a plain tensor, as quanto's fallback gives
            self.weight = nn.Parameter(applied, requires_grad=False)
        return result

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._sharded():  # FSDP's shards under their own names (distributed checkpoints)
            return nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        return super()._save_to_state_dict(destination, prefix, keep_vars)

    def _tinygemm_fails(self, dtype: torch.dtype, device: torch.device) -> bool:
        return _tinygemm_fails(self.weight_qtype, self.out_features, self.weight_group_size, dtype, device)

    def freeze(self) -> None:
        weight = self.weight
        if self.weight_qtype is None or self.frozen or isinstance(self.optimizer, SymmetricOptimizer):
            return super().freeze()
        fails = self._tinygemm_fails(weight.dtype, weight.device)
        # quanto's CPU bfloat16 int4 kernel layout, built by the one-pass regroup rather than
        # through an int32 copy of the weight (bit for bit the same; ~12 ms less per 11M weights)
        regroup = (not fails and self.weight_qtype == qint4 and self.weight_group_size == 128
                   and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
                   and self.activation_qtype is None)
        if not (fails or regroup):
            return super().freeze()
        if regroup and type(self.optimizer) is MaxOptimizer:  # per-group statistics: sliceable
            with torch.no_grad():
                kernel = tinygemm_quantized(self.weight_qtype, self.optimizer, weight.detach(), 128)
            if kernel is None:  # unknown kernel layout: quanto's own conversion
                return super().freeze()
            self.weight = nn.Parameter(kernel)
            return
        scale, shift = self.optimizer(weight, qtype=self.weight_qtype, axis=0,
                                      group_size=self.weight_group_size)
        frozen = quantize_weight(weight, qtype=self.weight_qtype, axis=0, scale=scale, shift=shift,
                                 group_size=self.weight_group_size, optimized=False)
        if regroup:
            kernel = tinygemm_weight(self.weight_qtype, 128, weight.size(), weight.stride(),
                                     frozen._data._data, frozen._scale, frozen._shift)
            if kernel is None:  # unknown kernel layout: quanto's own conversion
                return super().freeze()
            frozen = kernel
        self.weight = nn.Parameter(frozen)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dtype = autocast_dtype(input)
        if dtype is not None:
            return self._forward_autocast(input, dtype)
        layout = self.__dict__.get("_qw_layout")
        if layout is None:  # not frozen: quanto's dynamic quantization
            return super().forward(input)
        weight = layout.build(self._leaf, TEMPLATE_LOCK)
        if _int8pack_fails(weight, input):
            # quanto's generic CPU path (library/qbytes_mm.py: qbytes_mm), then the bias
            output = torch.matmul(input.to(weight.dtype), weight.dequantize().t())
            return output + self.bias if self.bias is not None else output
        if _kernel_layout_training(weight, input):
            return _KernelLayoutLinear.apply(input, weight, self.bias)
        return F.linear(input, weight, bias=self.bias)  # QLinear.forward: quanto's kernels

    def _forward_autocast(self, input: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # As nn.Linear under autocast: computed in, and returned as, the autocast dtype. quanto's
        # autograd function would run its forward under autocast but its backward outside it (a
        # low-precision gradient times the compute-dtype weight: a dtype error); with autocast
        # off, a layer in ``dtype`` runs quanto's own path and any other multiplies by its
        # weight dequantized and cast to ``dtype``.
        with torch.autocast(device_type=input.device.type, enabled=False):
            weight = self.qweight
            if weight.dtype == dtype:
                return self.forward(input.to(dtype))
            out = _DequantizedLinear.apply(input.to(dtype), weight)
            return out if self.bias is None else out + self.bias.to(dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        layout = self.__dict__.get("_qw_layout")
        if layout is not None and any(prefix + name in state_dict for name in layout.names):
            # the stored tensors under their own names (what a sharded layer's state_dict holds)
            return nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                                   unexpected_keys, error_msgs)
        scale = state_dict.get(prefix + "weight._scale")
        data = state_dict.get(prefix + "weight._data._data")
        shift = state_dict.get(prefix + "weight._shift")
        if (self.weight_qtype == qint4 and self.weight_group_size == 128 and scale is not None
                and data is not None and shift is not None and scale.dtype == torch.bfloat16
                and data.device.type == "cpu" and not self._tinygemm_fails(scale.dtype, scale.device)):
            # What quanto's loader builds (WeightQBitsTensor.optimize -> tinygemm), minus its
            # int32 copy of every weight: 5x faster, bit for bit the same.
            weight = tinygemm_weight(self.weight_qtype, 128, self.weight.size(), self.weight.stride(),
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
                value = {name: (copy.deepcopy(p, memo) if p is None or not isinstance(p, QTensor) else
                                nn.Parameter(map_leaves(p.detach(), torch.clone), requires_grad=p.requires_grad))
                         for name, p in value.items()}
            elif not isinstance(value, QType):  # quanto's qtypes are shared constants
                value = copy.deepcopy(value, memo)
            new.__dict__[key] = value
        return new


TEMPLATE_LOCK = threading.RLock()  # held around every QTensor rebuild in restore (see below)


@functools.lru_cache(maxsize=256)
def frozen_meta_template(in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                         method: QuantizationMethod) -> nn.Module:
    # One at a time: quanto rebuilds QTensors through ast.literal_eval (detach, clone, deepcopy,
    # freeze), and CPython 3.11 parses non-reentrantly ("AST constructor recursion depth mismatch"
    # with two restore threads).
    with TEMPLATE_LOCK:
        qlinear = QuantoLinear(in_features, out_features, bias, device="meta", dtype=dtype,
                               weights=method_qtype(method))
        with torch.no_grad():
            qlinear.freeze()
    return qlinear


@functools.lru_cache(maxsize=256)
def frozen_state_shapes(in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                        method: QuantizationMethod) -> dict[str, tuple[int, ...]]:
    """The state-dict key shapes of a frozen layer (what :meth:`QuantoAdapter.layer_state_dict`
    gives for it)."""
    return {k: shape for k, (_, shape) in frozen_state_layout(in_features, out_features, bias, dtype, method).items()}


@functools.lru_cache(maxsize=256)
def frozen_state_layout(in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                        method: QuantizationMethod) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{key: (dtype, shape)}`` of a frozen layer's state dict."""
    template = frozen_meta_template(in_features, out_features, bias, dtype, method)
    with TEMPLATE_LOCK:  # state_dict() detaches QTensors: ast.literal_eval inside quanto
        return {k: (v.dtype, tuple(v.shape)) for k, v in template.state_dict().items()}
