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

from ..config import QuantizationConfig, QuantizationMethod, dtype_to_str, register_config
from ..methods import FSDPSupport, MethodSpec, RecommendationCandidate, Support, register_method
from ..tensors import FloatLinear
from .base import LayerStateSpec, QuantizationAdapter, autocast_dtype, common_dtype, register_adapter

__all__ = ["FallbackAdapter", "FloatLinear", "NONE_METHOD_SPEC"]


def _float_bits(config: QuantizationConfig, in_features: int) -> float:
    return float(torch.finfo(config.compute_dtype or torch.float16).bits)


_NONE = Support(True, "No quantization: weights stay in floating point.", None)
#: No quantization, as this module declares it to :mod:`quantization_wrapper.methods`.
NONE_METHOD_SPEC = MethodSpec(
    None, (1, 2, 3, 4, 5, 6, 8, 16, 32), 16, None, None, "no quantization (fallback): weights stay in float",
    support={"cuda": _NONE, "mps": _NONE, "mlx": _NONE, "cpu": _NONE},
    fsdp=FSDPSupport("sharded", "sharded", "not used", "plain float weights", "by hand: FSDP2, FSDP1"),
    bits_per_weight=_float_bits,
    layer_nbytes=lambda config, in_features, out_features, bias, weight_dtype, cdt:
        (in_features * out_features + (out_features if bias else 0)) * cdt,
    candidates=(RecommendationCandidate(("cpu",), 0, dict(compute_dtype=torch.float32)),
                RecommendationCandidate(("cuda", "mps", "mlx", "cpu"), 10, {})),
)
register_method(QuantizationMethod.NONE, NONE_METHOD_SPEC)
register_config("none", dict(method="none"))


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
