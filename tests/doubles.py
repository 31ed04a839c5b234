"""Test doubles of adapters: real per-row int8 quantization in plain torch, so the registry,
factory and model walker are tested with numbers, independent of any third-party library."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantization_wrapper.adapters.base import QuantizationAdapter


class RowInt8Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, 1, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def dequantized(self):
        return self.qweight.to(self.scale.dtype) * self.scale

    def forward(self, x):
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class RowInt8Adapter(QuantizationAdapter):
    """Registered by tests (``register_adapter(...)(RowInt8Adapter)``) for a method of their choice."""

    library = None
    library_module = None
    calls: list[str]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    @classmethod
    def quantized_module_types(cls):
        return (RowInt8Linear,)

    def quantize_linear(self, linear, name=None, *, config=None):
        self.calls.append(name)
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        q = RowInt8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                          device=w.device, dtype=w.dtype)
        q.qweight.copy_(torch.round(w / scale).to(torch.int8))
        q.scale.copy_(scale)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def create_quantized_linear(self, in_features, out_features, bias=True, *, config=None, device=None, dtype=None):
        return RowInt8Linear(in_features, out_features, bias, device=device, dtype=dtype or torch.float32)

    def dequantize_module(self, module):
        lin = nn.Linear(module.in_features, module.out_features, module.bias is not None)
        lin.weight.data = module.dequantized()
        if module.bias is not None:
            lin.bias.data = module.bias.detach().clone()
        return lin


class FailingAdapter(RowInt8Adapter):
    """Fails on the layer named ``fail_on`` -- to test all-or-nothing conversion."""

    fail_on = "layers.1.mlp.up_proj"

    def quantize_linear(self, linear, name=None, *, config=None):
        if name == self.fail_on:
            raise RuntimeError("simulated kernel failure")
        return super().quantize_linear(linear, name, config=config)
