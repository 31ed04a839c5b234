"""A fifth backend in one file, installed from outside the package: row-wise absmax int8 in pure
PyTorch ("toy_int8"). Everything the package needs to know about it is declared here; nothing in
``quantization_wrapper/`` names it. ``install()`` adds it, ``uninstall()`` removes every trace."""

from __future__ import annotations

import torch
from torch import nn

from quantization_wrapper.adapters.base import QuantizationAdapter
from quantization_wrapper.config import QuantizationConfig, register_config, unregister_config
from quantization_wrapper.methods import (
    FSDPSupport,
    MethodSpec,
    QuantizationMethod,
    RecommendationCandidate,
    Support,
    register_method,
    unregister_method,
)
from quantization_wrapper.registry import register_adapter, unregister_adapter

METHOD = "toy_int8"


class ToyInt8Linear(nn.Module):
    """int8 weights with one float32 scale per output row; computes in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(out_features, 1), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def load_float_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
        self.qweight = nn.Parameter(torch.round(w / scale).to(torch.int8), requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantize().to(x.dtype), bias)


_CPU = Support(True, "pure PyTorch")
SPEC = MethodSpec(
    None, (8,), 8, None, None, "toy row-wise absmax int8 (tests/toy_backend.py)", library_required=False,
    support={"cpu": _CPU, "cuda": _CPU, "mps": _CPU, "mlx": Support(False, "no MLX kernels")},
    fallback=((QuantizationMethod.NONE, None),),
    fsdp=FSDPSupport("replicated", "replicated", "ignored (int8)", "toy layer: kept whole on each rank", "not verified"),
    bits_per_weight=lambda config, in_features: 8 + 32 / in_features,
    candidates=(RecommendationCandidate(("cpu",), 25, {}),),
)


class ToyAdapter(QuantizationAdapter):
    def create_quantized_linear(self, in_features: int, out_features: int, bias: bool = True, *,
                                config=None, device=None, dtype=None) -> nn.Module:
        with torch.device(device or "cpu"):
            return ToyInt8Linear(in_features, out_features, bias)

    @classmethod
    def quantized_module_types(cls) -> tuple[type, ...]:
        return (ToyInt8Linear,)

    @classmethod
    def lora_layer_types(cls) -> tuple[type, ...]:
        return (ToyInt8Linear,)

    @classmethod
    def config_of_layer(cls, module: nn.Module) -> QuantizationConfig | None:
        return QuantizationConfig(method=METHOD, skip_modules=[]) if isinstance(module, ToyInt8Linear) else None


def install() -> QuantizationMethod:
    method = register_method(METHOD, SPEC)
    register_adapter(METHOD)(ToyAdapter)
    register_config("toy8", dict(method=METHOD))
    return method


def uninstall() -> None:
    unregister_config("toy8")
    unregister_adapter(METHOD, ToyAdapter)
    unregister_method(METHOD)
