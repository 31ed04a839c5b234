"""The quantized layer: :class:`QuantoLinear`, optimum-quanto's ``QLinear`` with the CPU kernel
choices of quanto 0.2.7 that fail on torch 2.13 routed around, and the per-shape frozen templates
(and their state layouts) that empty layers are copied from, under the one lock every QTensor
rebuild takes.

This module imports optimum-quanto: the adapter imports it when it first builds a layer.
"""

from __future__ import annotations

import copy
import functools
import threading

import torch
from optimum.quanto import QLinear, QTensor, qint4
from optimum.quanto.tensor import WeightQBitsTensor, quantize_weight
from optimum.quanto.tensor.optimizers import MaxOptimizer, SymmetricOptimizer
from optimum.quanto.tensor.qtype import qtype as QType
from torch import nn

from ...config import QuantizationMethod
from ..base import autocast_dtype
from .qtensors import map_leaves, method_qtype, tinygemm_quantized, tinygemm_weight

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
        return torch.matmul(x, weight.dequantize().to(x.dtype).t())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        (weight,) = ctx.saved_tensors
        return torch.matmul(grad, weight.dequantize().to(grad.dtype)), None


class QuantoLinear(QLinear):
    """optimum-quanto's ``QLinear`` with the two CPU kernel choices of quanto 0.2.7 that fail on
    torch 2.13 routed around (see the package docstring), and under ``torch.autocast`` computing
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
