"""The no-quantization adapter: the end of every fallback chain.

It does not quantize and says so (one warning per model). What it does do: keep every linear layer
as a plain ``nn.Linear``, in ``config.compute_dtype`` when one is set (``torch.bfloat16`` halves an
fp32 model), so the rest of a training script runs unchanged.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import torch
from torch import nn

from ..config import QuantizationConfig, QuantizationMethod, dtype_to_str
from .base import LayerStateSpec, QuantizationAdapter, autocast_dtype, common_dtype, register_adapter

__all__ = ["FallbackAdapter", "FloatLinear"]


class FloatLinear(nn.Linear):
    """An ``nn.Linear`` whose weights may be in another dtype than its input (like the quantized
    layers: compute in the weights' dtype, return the input's dtype; under ``torch.autocast``, as
    ``nn.Linear``, in the autocast dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == w.dtype or autocast_dtype(x) is not None:
            return super().forward(x)
        return nn.functional.linear(x.to(w.dtype), w, self.bias).to(x.dtype)


@register_adapter(QuantizationMethod.NONE)
class FallbackAdapter(QuantizationAdapter):
    """Keeps weights in floating point (cast to ``config.compute_dtype`` when set)."""

    library = None
    library_module = None

    def _dtype(self, config: QuantizationConfig, current: torch.dtype) -> torch.dtype:
        return config.compute_dtype or current

    def quantize_linear(self, linear: nn.Linear, name: str | None = None, *,
                        config: QuantizationConfig | None = None) -> nn.Linear:
        config = self.layer_config(name, config)
        dtype = self._dtype(config, linear.weight.dtype)
        device = self.device or linear.weight.device
        new = FloatLinear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        # No copy when nothing changes: the new module shares the original tensors.
        new.weight = nn.Parameter(linear.weight.detach().to(device=device, dtype=dtype),
                                  requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().to(device=device, dtype=dtype),
                                    requires_grad=linear.bias.requires_grad)
        return new

    def create_quantized_linear(self, in_features: int, out_features: int, bias: bool = True, *,
                                config: QuantizationConfig | None = None, device=None,
                                dtype: torch.dtype | None = None) -> nn.Linear:
        config = config or self.config
        return FloatLinear(in_features, out_features, bias, device=device or self.device,
                           dtype=config.compute_dtype or dtype)

    def layer_state_spec(self, in_features: int, out_features: int, bias: bool, state: Mapping[str, torch.Tensor],
                         *, config: QuantizationConfig) -> LayerStateSpec:
        """``weight`` ``(out, in)`` and ``bias`` ``(out,)``, both in ``config.compute_dtype`` (else the
        float dtype they hold)."""
        floats = (torch.float32, torch.float16, torch.bfloat16)
        dtype = config.compute_dtype or common_dtype(state, ("weight", "bias"), floats)
        spec = {"weight": (dtype, (out_features, in_features))}
        if bias:
            spec["bias"] = (dtype, (out_features,))
        return spec

    def dequantize_module(self, module: nn.Module) -> nn.Linear:
        if not isinstance(module, nn.Linear):
            raise ValueError(f"FallbackAdapter.dequantize_module expects an nn.Linear, got {type(module).__name__}")
        linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.weight.detach(), requires_grad=module.weight.requires_grad)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach(), requires_grad=module.bias.requires_grad)
        return linear

    def quantize_model(self, model: nn.Module, *, module_filter=None, **kwargs) -> nn.Module:
        model = super().quantize_model(model, module_filter=module_filter, **kwargs)
        plan = model.quantization_plan
        dtype = dtype_to_str(self.config.compute_dtype) or "their original dtype"
        warnings.warn(f"FallbackAdapter does not quantize: {len(plan.converted)} linear layers stay in "
                      f"{dtype} ({plan.bytes_after / 2**20:.1f} MB)", UserWarning, stacklevel=2)
        return model

    def mark_model(self, model: nn.Module) -> None:
        model.is_quantized = False
        model.quantization_method = QuantizationMethod.NONE.value
