"""Size estimates before quantizing anything: bytes per layer and in total for a config.

:func:`estimate_model_size` walks a model's linear layers (a real model, one on the meta device, a
transformers config or a checkpoint directory), decides each layer exactly as
:func:`~quantization_wrapper.surgery.replace_linear_with_quantized` would (skip list,
``layer_configs``, group-size fitting by the layer's adapter) and counts the bytes the quantized
layer will hold with :func:`layer_nbytes`. The per-method formulas in :func:`layer_nbytes` are read
off what the adapters store, and ``tests/test_mixed_precision.py`` checks them byte for byte against
``QuantizationPlan.bytes_after`` of really quantized models:

* **HQQ** (``HQQLinear``): hqq groups the *flattened* weight; the packed ``W_q`` holds
  ``groups / pack`` rows of ``group_size`` bytes (pack = 8, 4, 2, 1 rows for 1, 2, 4, 8 bits);
  3-bit packs 10 rows into ``int32`` words and pads the last word (``ceil(groups / 10) *
  group_size * 4`` bytes). Scale and zero: one each per group, in the compute dtype. Bias: compute
  dtype.
* **MLX** (``MLXQuantizedLinear``): ``out * in * bits / 8`` bytes of ``uint32`` words; scales and
  biases ``out * in / group_size`` each in the compute dtype; bias in the compute dtype.
* **optimum-quanto** int2/int4: ``out * in / group_size`` rows of ``group_size`` values, packed 4
  (int2) or 2 (int4) rows per ``uint8`` row (the last one padded); scale and shift per row of the
  grouped weight; int8/fp8: one byte per weight and one scale per output row. Every layer also
  holds a scalar ``input_scale`` and ``output_scale``; all floats in the compute dtype.
* **bitsandbytes** 4-bit: ``ceil(numel / 2)`` packed bytes, one absmax per block (``uint8`` with
  double quantization, then one fp32 absmax per 256 blocks, a 256-entry fp32 nested quant map and
  an fp32 offset; ``float32`` without), the 16-entry fp32 quant map, bias in the compute dtype.
  INT8: one byte per weight, an fp32 ``SCB`` per output row, the bias in the layer's own dtype.
* **none**: weight and bias in the compute dtype (or the layer's).
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from .methods import method_spec
from .config import bits_per_weight, QuantizationConfig, QuantizationMethod, dtype_to_str
from .patterns import best_match
from .checkpoint.skeleton import model_from_config
from .experts import expert_layer_shapes, iter_fused_experts
from .surgery import LayerPlan, QuantizationPlan, iter_linear_layers
from .units import format_bytes

__all__ = [
    "LinearShape",
    "SizeEstimate",
    "layer_nbytes",
    "linear_layer_shapes",
    "estimate_model_size",
    "parse_memory_size",
    "fit_layer_config",
    "checkpoint_parameter_count",
]

M = QuantizationMethod
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LinearShape:
    """A linear layer as the size model sees it: name, shape, bias and weight dtype."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def nbytes(self) -> int:
        """Bytes of the float weight and bias."""
        return (self.numel + (self.out_features if self.bias else 0)) * self.dtype.itemsize


# ---------------------------------------------------------------------- per-layer bytes
def _compute_dtype(config: QuantizationConfig, weight_dtype: torch.dtype) -> torch.dtype:
    if config.compute_dtype is not None:
        return config.compute_dtype
    return weight_dtype if weight_dtype in _FLOATS else torch.float32


def layer_nbytes(config: QuantizationConfig, in_features: int, out_features: int, bias: bool = True,
                 weight_dtype: torch.dtype = torch.float32) -> int:
    """Bytes a linear layer holds once quantized with ``config`` (already fitted to the shape, see
    :func:`fit_layer_config`): packed weights, every scale, zero point and quant map, and the bias.

    Args:
        config: the layer's effective config (``config.group_size`` must fit the shape).
        in_features, out_features: the layer's shape.
        bias: whether it has a bias.
        weight_dtype: dtype of the float weight; the compute dtype when ``config`` sets none.

    Returns:
        The byte count the adapter's ``module_nbytes`` reports for the quantized layer.
    """
    cdt = _compute_dtype(config, weight_dtype).itemsize
    exact = method_spec(config.method).layer_nbytes
    if exact is not None:
        return int(exact(config, in_features, out_features, bias, weight_dtype, cdt))
    # a backend that declares only its bits per weight: that, and the bias in the compute dtype
    return math.ceil(in_features * out_features * bits_per_weight(config, in_features) / 8) + \
        (out_features * cdt if bias else 0)


@functools.lru_cache(maxsize=None)
def _sizing_adapter(method: QuantizationMethod):
    """An adapter of ``method``'s class, used only for its (library-free) group-size fitting."""
    from backend_manager import Backend

    from .registry import get_adapter_class

    return get_adapter_class(method)(QuantizationConfig(method=method, skip_modules=[]), Backend.CPU)


def fit_layer_config(config: QuantizationConfig, in_features: int,
                     out_features: int) -> tuple[QuantizationConfig | None, str | None]:
    """``config`` fitted to a layer's shape by its method's adapter, as model surgery does:
    ``(config, None)``, ``(smaller-group config, reason)`` or ``(None, reason)`` when the layer
    stays in full precision."""
    return _sizing_adapter(config.method).fit_group_size(in_features, out_features, config)


# ---------------------------------------------------------------------- the model's layers
def _model_from_config(model_config: Any, dtype: torch.dtype | None) -> nn.Module:
    """A transformers model built from its config on the meta device (nothing allocated; the one
    skeleton builder, which changes nothing process-wide)."""
    return model_from_config(model_config, dtype=dtype or _config_dtype(model_config) or torch.float32)


def _config_dtype(model_config: Any) -> torch.dtype | None:
    value = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _as_model(model_or_config: Any, dtype: torch.dtype | None) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    if isinstance(model_or_config, (str, os.PathLike)):
        path = os.fspath(model_or_config)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"model_or_config={path!r} is not a directory with a config.json")
        import transformers

        model_or_config = transformers.AutoConfig.from_pretrained(path)
    if hasattr(model_or_config, "to_dict") and hasattr(model_or_config, "model_type"):
        return _model_from_config(model_or_config, dtype)
    raise ValueError(f"model_or_config must be an nn.Module, a transformers config or a checkpoint "
                     f"directory, got {type(model_or_config).__name__}")


def linear_layer_shapes(model: nn.Module, dtype: torch.dtype | None = None) -> list[LinearShape]:
    """The plain ``nn.Linear`` layers of ``model`` (any device, meta included), in module order, then
    each fused MoE expert projection as the layer it becomes when quantized (``experts.3.down_proj``).

    Args:
        model: the model.
        dtype: the weight dtype to assume instead of each layer's own.
    """
    shapes = [LinearShape(name, m.in_features, m.out_features, m.bias is not None, dtype or m.weight.dtype)
              for name, m in iter_linear_layers(model)]
    for name, module in iter_fused_experts(model):  # MoE experts: one layer per expert and projection
        shapes += [LinearShape(layer, i, o, b, dtype or d) for layer, i, o, b, d in expert_layer_shapes(name, module)]
    return shapes


def _other_bytes(model: nn.Module, linear_names: set[str],
                 dtype: torch.dtype | None) -> tuple[int, int, dict[str, int]]:
    """``(bytes, parameters, shared)`` of every tensor that is not only a linear layer's weight or
    bias, each tensor once. ``shared`` maps a linear layer to the bytes of its tensors that another
    module uses too (a tied ``lm_head``): those stay in float whatever happens to the layer."""
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    owners: dict[int, list[str]] = {}
    for name, t in named:
        owners.setdefault(id(t), []).append(name.rpartition(".")[0])

    def size(t: torch.Tensor) -> int:
        return t.numel() * (dtype.itemsize if (dtype is not None and t.is_floating_point()) else t.element_size())

    seen: set[int] = set()
    total = params = 0
    shared: dict[str, int] = {}
    for name, t in named:
        if id(t) in seen:
            continue
        seen.add(id(t))
        linear_owners = [o for o in owners[id(t)] if o in linear_names]
        if len(linear_owners) == len(owners[id(t)]):
            continue  # counted with its linear layer
        total += size(t)
        if isinstance(t, nn.Parameter):
            params += t.numel()
        for owner in linear_owners:
            shared[owner] = shared.get(owner, 0) + size(t)
    return total, params, shared


# ---------------------------------------------------------------------- the estimate
@dataclass
class SizeEstimate:
    """Predicted sizes of a model quantized with a config.

    Attributes:
        plan: the predicted :class:`~quantization_wrapper.surgery.QuantizationPlan`, layer by layer
            (the same table ``model.quantization_plan`` holds after quantizing).
        other_bytes: bytes of every tensor that is not a linear layer (embeddings, norms, buffers).
        num_parameters: parameters of the whole model.
        float_parameter_bytes: what the whole model holds before quantization.
    """

    plan: QuantizationPlan
    other_bytes: int
    num_parameters: int
    float_parameter_bytes: int
    dtype: str = "float32"
    shared_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def layers(self) -> list[LayerPlan]:
        return self.plan.layers

    @property
    def linear_bytes_before(self) -> int:
        return self.plan.bytes_before

    @property
    def linear_bytes_after(self) -> int:
        return self.plan.bytes_after

    @property
    def quantized_bytes(self) -> int:
        """Bytes of the layers the config quantizes (what the budget of a mixed plan counts)."""
        return sum(layer.bytes_after for layer in self.plan.quantized)

    @property
    def total_bytes(self) -> int:
        """The whole model after quantization: linear layers plus everything else (a tensor a
        skipped layer shares with another module, e.g. a tied ``lm_head``, counted once)."""
        shared = sum(b for name, b in self.shared_bytes.items() if self.plan[name].status == "skipped")
        return self.plan.bytes_after + self.other_bytes - shared

    @property
    def fp32_bytes(self) -> int:
        return self.num_parameters * 4

    @property
    def fp16_bytes(self) -> int:
        return self.num_parameters * 2

    @property
    def compression_ratio(self) -> float:
        """Against the model as it is now (its own dtype)."""
        return self.float_parameter_bytes / self.total_bytes

    @property
    def compression_ratio_fp32(self) -> float:
        return self.fp32_bytes / self.total_bytes

    @property
    def compression_ratio_fp16(self) -> float:
        return self.fp16_bytes / self.total_bytes

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight of the quantized layers (scales, zeros, maps and bias included)."""
        return self.plan.bits_per_weight

    def to_dict(self) -> dict[str, Any]:
        """The numbers, including the keys of the design document's ``estimate_model_size``."""
        return {
            "total_parameters": self.num_parameters,
            "fp32_bytes": self.fp32_bytes,
            "fp16_bytes": self.fp16_bytes,
            "mixed_precision_bytes": self.total_bytes,
            "total_bytes": self.total_bytes,
            "linear_bytes_before": self.linear_bytes_before,
            "linear_bytes_after": self.linear_bytes_after,
            "quantized_bytes": self.quantized_bytes,
            "other_bytes": self.other_bytes,
            "compression_ratio": self.compression_ratio,
            "compression_ratio_fp32": self.compression_ratio_fp32,
            "compression_ratio_fp16": self.compression_ratio_fp16,
            "bits_per_weight": self.bits_per_weight,
            "layers": [layer.__dict__.copy() for layer in self.plan.layers],
        }

    def summary(self) -> str:
        return (f"{self.num_parameters / 1e6:.1f}M parameters: {format_bytes(self.float_parameter_bytes)} "
                f"({self.dtype}) -> {format_bytes(self.total_bytes)} (linear layers "
                f"{format_bytes(self.linear_bytes_before)} -> {format_bytes(self.linear_bytes_after)}, "
                f"{self.bits_per_weight:.3f} bits/weight quantized; other tensors "
                f"{format_bytes(self.other_bytes)}); {self.compression_ratio_fp16:.2f}x smaller than fp16, "
                f"{self.compression_ratio_fp32:.2f}x smaller than fp32")

    def __str__(self) -> str:
        return self.plan.table() + "\n" + self.summary()


def plan_layer(shape: LinearShape, config: QuantizationConfig,
               skip: Iterable[str] | None = None) -> LayerPlan:
    """The :class:`LayerPlan` model surgery would record for one layer under ``config``."""
    skip = config.skip_modules if skip is None else list(skip)
    before = shape.nbytes
    args = (shape.name, shape.in_features, shape.out_features, shape.bias)
    pattern = best_match(shape.name, skip)
    if pattern is not None:
        return LayerPlan(*args, "none", None, None, before, before, "skipped", f"skip_modules: {pattern!r}")
    layer_cfg = config.for_layer(shape.name)
    if layer_cfg.method is M.NONE and config.method is not M.NONE:
        override = best_match(shape.name, config.layer_configs)
        return LayerPlan(*args, "none", None, None, before, before, "skipped",
                         f"layer_configs[{override!r}] sets method 'none'")
    fitted, reason = fit_layer_config(layer_cfg, shape.in_features, shape.out_features)
    if fitted is None:
        return LayerPlan(*args, "none", None, None, before, before, "skipped", reason)
    after = layer_nbytes(fitted, shape.in_features, shape.out_features, shape.bias, shape.dtype)
    bits, status = fitted.bits, "quantized"
    if fitted.method is M.NONE:
        bits, status = _compute_dtype(fitted, shape.dtype).itemsize * 8, "float"
    return LayerPlan(*args, fitted.method.value, bits, fitted.group_size, before, after, status, reason)


def estimate_model_size(model_or_config: Any, config: QuantizationConfig, *,
                        dtype: torch.dtype | str | None = None) -> SizeEstimate:
    """Bytes per layer and in total of ``model_or_config`` quantized with ``config``, computed
    from the shapes alone (nothing is quantized; a meta-device model is fine).

    Args:
        model_or_config: an ``nn.Module`` (real or on the meta device), a transformers config
            (``PretrainedConfig``; the class named in its ``architectures`` is built on the meta
            device, else ``AutoModel``'s base model) or a checkpoint directory with a
            ``config.json``.
        config: the quantization config (``skip_modules`` and ``layer_configs`` apply).
        dtype: the float dtype the model will be loaded in; default: each tensor's own (for a
            transformers config: its ``dtype``, else float32).

    Returns:
        A :class:`SizeEstimate`; ``estimate.plan`` equals, layer by layer, the
        ``model.quantization_plan`` that quantizing with ``config`` records.
    """
    from .config import parse_dtype

    if not isinstance(config, QuantizationConfig):
        raise ValueError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    dtype = parse_dtype(dtype, "dtype")
    model = _as_model(model_or_config, dtype)
    shapes = linear_layer_shapes(model, dtype)
    plan = QuantizationPlan(method=config.method.value, config=config.to_dict())
    plan.layers = [plan_layer(shape, config) for shape in shapes]
    counted = {s.name for s in shapes} | {name for name, _ in iter_fused_experts(model)}
    other, other_params, shared = _other_bytes(model, counted, dtype)
    num_params = other_params + sum(s.numel + (s.out_features if s.bias else 0) for s in shapes
                                    if s.name not in shared)
    float_bytes = other + sum(s.nbytes for s in shapes if s.name not in shared)
    dtypes = sorted({dtype_to_str(s.dtype) for s in shapes}) or [dtype_to_str(dtype or torch.float32)]
    return SizeEstimate(plan=plan, other_bytes=other, num_parameters=num_params,
                        float_parameter_bytes=float_bytes, dtype="/".join(dtypes), shared_bytes=shared)


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_memory_size(value: str) -> int:
    """``"12MB"`` -> bytes. Units are binary, as everywhere in this package (``"1KB"`` and
    ``"1KiB"`` are 1024 bytes, ``"1GB"`` is ``2**30``); no unit means bytes.

    Raises:
        ValueError: naming the value and the accepted form.
    """
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS:
            size = float(match.group(1)) * _UNITS[match.group(2).lower()]
            if size > 0:
                return int(size)
    raise ValueError(f"memory size {value!r} is not valid; write a positive number with a unit, e.g. "
                     f"'12MB', '1.5GB', '800KiB' (units are binary: 1MB = 2**20 bytes)")


def checkpoint_parameter_count(checkpoint_dir: str | os.PathLike) -> int:
    """Parameters stored in the ``*.safetensors`` files of ``checkpoint_dir``, counted from their
    headers (8-byte length + JSON); no tensor is read.

    Raises:
        ValueError: when the directory holds no safetensors file or a header is malformed (the
            file is named).
    """
    import glob

    from .checkpoint.safetensors_io import SafetensorsReader

    path = os.fspath(checkpoint_dir)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint_dir={path!r} is not a directory")
    from .checkpoint.files import confined_file

    files = [confined_file(path, os.path.basename(f), "the directory listing")
             for f in sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))]
    if not files:
        raise ValueError(f"checkpoint_dir={path!r} holds no *.safetensors file to count parameters from")
    total = 0
    for file in files:
        with SafetensorsReader(file) as reader:  # raises ValueError naming the file
            total += sum(math.prod(reader.shape(k)) for k in reader.keys())
    return total
