"""What the package knows about the two MLX methods, declared to :mod:`quantization_wrapper.methods`:
allowed values, where they run, fallbacks, FSDP, size model, recommendation and mixed-precision
candidates, presets. Imported first by the package (configs of these methods need it)."""

from __future__ import annotations

import math

import torch

from ...config import QuantizationConfig, register_config
from ...methods import (
    WORD_PACKED_FSDP_STORAGE,
    FSDPSupport,
    MethodSpec,
    QuantizationMethod,
    RecommendationCandidate,
    Support,
    register_method,
    replace_spec,
)

__all__ = ["MLX_METHOD_SPECS"]

M = QuantizationMethod
_BITS = (2, 3, 4, 5, 6, 8)
_GROUPS = (32, 64, 128)
_CUDA = Support(False, "MLX runs on Apple GPUs and CPUs, not on CUDA tensors; HQQ stores the same "
                       "affine group format and runs on CUDA.", False)
_APPLE = Support(True, "MLX packed format, mx.quantized_matmul on the Apple GPU.", True)
_CPU = Support(True, "MLX packed format; mx.quantized_matmul with mlx[cpu] on Linux, otherwise the "
                     "pure-torch path. The design document predates mlx[cpu].", False)


def _bits(config: QuantizationConfig, in_features: int) -> float:
    meta_bits = 8 * (config.compute_dtype or torch.float16).itemsize  # scale and bias in the compute dtype
    return config.bits + 2 * meta_bits / config.group_size


def _layer_nbytes(config: QuantizationConfig, in_features: int, out_features: int, bias: bool,
                  weight_dtype: torch.dtype, cdt: int) -> int:
    numel = in_features * out_features
    groups = numel // config.group_size
    return numel * config.bits // 8 + 2 * groups * cdt + (out_features * cdt if bias else 0)


_INT4 = MethodSpec(
    "mlx", _BITS, 4, _GROUPS, 64, "MLX affine packed format (mx.quantize)", library_required=False,
    support={"cuda": _CUDA, "mps": _APPLE, "mlx": _APPLE, "cpu": _CPU},
    fallback=((M.HQQ, None), (M.QUANTO_INT4, 4), (M.BNB_NF4, 4), (M.NONE, None)),
    fsdp=FSDPSupport("sharded", "sharded", WORD_PACKED_FSDP_STORAGE, "packed weight, scales and biases all sharded",
                     "tests/test_fsdp.py: FSDP2 (uint8); by hand: FSDP2 (float32), FSDP1 (float32)"),
    bits_per_weight=_bits,
    layer_nbytes=_layer_nbytes,
    candidates=(RecommendationCandidate(("mps", "mlx"), 30, dict(bits=4, group_size=64)),
                RecommendationCandidate(("mps", "mlx"), 40, dict(bits=3, group_size=64)),
                RecommendationCandidate(("mps", "mlx"), 50, dict(bits=2, group_size=32))),
    mixed_precision=tuple(dict(method="mlx_int4", bits=b, group_size=g) for b in _BITS for g in _GROUPS),
    precision_tiers={"high": {"method": "mlx_int4", "bits": 8, "group_size": 64},
                     "low": {"method": "mlx_int4", "bits": 4, "group_size": 64},
                     "default": {"method": "mlx_int4", "bits": 8, "group_size": 64}},
)
#: The MLX methods as this package declares them.
MLX_METHOD_SPECS = {
    M.MLX_INT4: _INT4,
    M.MLX_INT8: replace_spec(
        _INT4, default_bits=8, description="MLX affine packed format, 8-bit",
        fallback=((M.HQQ, None), (M.QUANTO_INT8, 8), (M.BNB_INT8, 8), (M.NONE, None)),
        fsdp=FSDPSupport("sharded", "sharded", "as mlx_int4", "as mlx_int4", "same layer type as mlx_int4"),
        candidates=(RecommendationCandidate(("mps", "mlx"), 20, dict(group_size=64), inference_only=True),),
        mixed_precision=(), precision_tiers={}),
}
for _method, _spec in MLX_METHOD_SPECS.items():
    register_method(_method, _spec)
register_config("mlx4", dict(method="mlx_int4", bits=4, group_size=64, compute_dtype="float16"))
register_config("mlx8", dict(method="mlx_int8", bits=8, group_size=64, compute_dtype="float16"))
