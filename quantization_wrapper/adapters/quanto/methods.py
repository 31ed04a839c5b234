"""What the package knows about the four optimum-quanto methods, declared to
:mod:`quantization_wrapper.methods`: allowed values, where they run, fallbacks, FSDP, size model,
mixed-precision candidates, presets. Imported first by the package."""

from __future__ import annotations

import math

import torch

from ...config import QuantizationConfig, register_config
from ...methods import FSDPSupport, MethodSpec, QuantizationMethod, Support, register_method, replace_spec

__all__ = ["QUANTO_METHOD_SPECS"]

M = QuantizationMethod
_TORCH = Support(True, "optimum-quanto runs wherever PyTorch does.", True)
_MLX = Support(False, "On the MLX backend the matmul runs in MLX, and optimum-quanto has no MLX "
                      "kernels; use MLX_INT4/MLX_INT8, or the MPS backend for quanto.", False)
_SUPPORT = {"cuda": _TORCH, "mps": _TORCH, "mlx": _MLX, "cpu": _TORCH}
#: quanto's packed data is a plain integer parameter of QuantoLinear (see adapters/quanto/storage.py).
_QUANTO_STORAGE = ("ignored: the packed data is an integer parameter (uint8 for int2/int4, int8, qfloat8's bytes as "
                   "uint8), never cast")
_SAME_LAYER = ("same layer type as quanto_int4; tests/test_fsdp.py: plain fully_shard (1 rank); "
               "benchmarks/fsdp_bytes.py: FSDP2 (2 ranks)")


def _grouped_bits(config: QuantizationConfig, in_features: int) -> float:
    meta_bits = 8 * (config.compute_dtype or torch.float16).itemsize
    return config.bits + 2 * meta_bits / 128  # scale + shift per group of 128


def _row_bits(config: QuantizationConfig, in_features: int) -> float:
    meta_bits = 8 * (config.compute_dtype or torch.float16).itemsize
    return 8 + meta_bits / in_features  # one scale per output row


def _grouped_nbytes(config: QuantizationConfig, in_features: int, out_features: int, bias: bool,
                    weight_dtype: torch.dtype, cdt: int) -> int:
    group = config.group_size or in_features
    rows = in_features * out_features // group
    pack = 4 if config.bits == 2 else 2
    return math.ceil(rows / pack) * group + 2 * rows * cdt + (out_features * cdt if bias else 0) + 2 * cdt


def _row_nbytes(config: QuantizationConfig, in_features: int, out_features: int, bias: bool,
                weight_dtype: torch.dtype, cdt: int) -> int:
    return in_features * out_features + out_features * cdt + (out_features * cdt if bias else 0) + 2 * cdt


def _fixed_group(config: QuantizationConfig) -> list[tuple[str, str, str]]:
    if config.group_size == 128:
        return []
    return [("group_size", f"group_size={config.group_size} cannot be honoured: optimum-quanto fixes the "
                           f"group size of {config.method.value} at 128.",
             "use group_size=128, or method='hqq' for another group size.")]


_INT2 = MethodSpec(
    "optimum-quanto", (2,), 2, None, 128, "optimum-quanto qint2 weights",
    support=_SUPPORT,
    fallback=((M.HQQ, 2), (M.MLX_INT4, 2), (M.NONE, None)),
    fsdp=FSDPSupport("sharded", "replicated", _QUANTO_STORAGE,
                     "QuantoLinear keeps quanto's packed data as a plain integer parameter (weight_data, sharded "
                     "along dim 0) and its scales/shifts as buffers (whole on each rank); the forward rebuilds "
                     "quanto's tensor from the gathered data. FSDP1 cannot flatten integers: left out of its units",
                     _SAME_LAYER),
    bits_per_weight=_grouped_bits,
    layer_nbytes=_grouped_nbytes,
    option_warnings=_fixed_group,
)
#: The quanto methods as this package declares them.
QUANTO_METHOD_SPECS = {
    M.QUANTO_INT2: _INT2,
    M.QUANTO_INT4: replace_spec(
        _INT2, bits=(4,), default_bits=4, description="optimum-quanto qint4 weights",
        fallback=((M.HQQ, 4), (M.MLX_INT4, 4), (M.BNB_NF4, 4), (M.NONE, None)),
        fsdp=FSDPSupport("sharded", "replicated", _QUANTO_STORAGE, "as quanto_int2",
                         "tests/test_fsdp.py: FSDP2 (Llama float32 and bfloat16, Mixtral with quanto experts), "
                         "FSDP1, plain fully_shard"),
        mixed_precision=tuple(dict(method=m) for m in ("quanto_int2", "quanto_int4", "quanto_int8")),
        precision_tiers={"high": {"method": "quanto_int8"}, "low": {"method": "quanto_int4"},
                         "default": {"method": "quanto_int8"}}),
    M.QUANTO_INT8: replace_spec(
        _INT2, bits=(8,), default_bits=8, default_group_size=None,
        description="optimum-quanto qint8 weights, per output channel",
        fallback=((M.HQQ, 8), (M.BNB_INT8, 8), (M.MLX_INT8, 8), (M.NONE, None)),
        fsdp=FSDPSupport("sharded", "replicated", _QUANTO_STORAGE, "as quanto_int2", _SAME_LAYER),
        bits_per_weight=_row_bits, layer_nbytes=_row_nbytes, option_warnings=None),
    M.QUANTO_FP8: replace_spec(
        _INT2, bits=(8,), default_bits=8, default_group_size=None,
        description="optimum-quanto qfloat8 (e4m3) weights",
        support={k: Support(v.supported, v.reason, None) for k, v in _SUPPORT.items()},
        fallback=((M.QUANTO_INT8, 8), (M.HQQ, 8), (M.MLX_INT8, 8), (M.NONE, None)),
        fsdp=FSDPSupport("sharded", "replicated", _QUANTO_STORAGE, "as quanto_int2", _SAME_LAYER),
        bits_per_weight=_row_bits, layer_nbytes=_row_nbytes, option_warnings=None),
}
for _method, _spec in QUANTO_METHOD_SPECS.items():
    register_method(_method, _spec)
register_config("quanto4", dict(method="quanto_int4"))
register_config("quanto8", dict(method="quanto_int8"))
