"""The MLX adapter: :class:`MLXAdapter` (``backend_options``, building, saving and loading
:class:`~.layer.MLXQuantizedLinear` layers).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from backend_manager import Backend, get_library_status

from ...config import QuantizationConfig, QuantizationMethod
from ..base import LayerStateSpec, QuantizationAdapter, common_dtype, register_adapter
from . import codec  # codec.mlx_core is looked up per call: the package may replace it (tests simulate no MLX)
from .codec import FLOAT_DTYPES, affine_quantize, mlx_quantize, to_mx
from .layer import KERNELS, MLXQuantizedLinear

if TYPE_CHECKING:  # pragma: no cover
    from ...validation import ValidationIssue

__all__ = ["MLX_BACKEND_OPTIONS", "MLXAdapter"]

logger = logging.getLogger(__name__)

#: Accepted ``backend_options`` and what they do.
MLX_BACKEND_OPTIONS: dict[str, str] = {
    "kernel": "forward path: 'auto' (MLX when usable, no input gradient is needed and, on the CPU, the "
              "input has at most MLX_CPU_MAX_ROWS rows), 'mlx' or 'torch'",
}


def _options(config: QuantizationConfig) -> dict[str, Any]:
    """``config.backend_options`` checked; raises ``ValueError`` for anything MLX does not take."""
    options = dict(config.backend_options)
    unknown = sorted(set(options) - set(MLX_BACKEND_OPTIONS))
    if unknown:
        raise ValueError(f"backend_options has unknown keys {unknown} for method {config.method.value!r}; "
                         f"accepted: " + "; ".join(f"{k}: {v}" for k, v in MLX_BACKEND_OPTIONS.items()))
    kernel = options.setdefault("kernel", "auto")
    if kernel not in KERNELS:
        raise ValueError(f"backend_options['kernel']={kernel!r} is not valid; allowed: {', '.join(KERNELS)}")
    return options


def _compute_dtype(config: QuantizationConfig, weight_dtype: torch.dtype | None) -> torch.dtype:
    dtype = config.compute_dtype or weight_dtype or torch.get_default_dtype()
    return dtype if dtype in FLOAT_DTYPES else torch.float32


@register_adapter(QuantizationMethod.MLX_INT4, QuantizationMethod.MLX_INT8)
class MLXAdapter(QuantizationAdapter):
    """Quantizes linear layers into :class:`MLXQuantizedLinear` (MLX's affine packed format).

    ``config.bits`` (2, 3, 4, 5, 6, 8) and ``config.group_size`` (32, 64, 128) are honoured exactly,
    whatever the method's nominal width (``mlx_int4`` with ``bits=8`` in ``layer_configs`` gives
    8 bits). Scales and biases are stored in ``config.compute_dtype``, or the weight's dtype when it
    is unset (float32 scales cost 64 / group_size bits per weight instead of 32 / group_size).
    """

    library = "mlx"
    library_module = "mlx"
    types_module = MLXQuantizedLinear.__module__  # ours: the class exists without mlx imported

    def __init__(self, config: QuantizationConfig | None = None, backend: Backend | str | None = None,
                 *, device: torch.device | str | None = None):
        super().__init__(config, backend, device=device)
        _options(self.config)
        for pattern in self.config.layer_configs:
            layer = self.config.with_overrides(self.config.layer_configs[pattern])
            if layer.method in self.methods:
                try:
                    _options(layer)
                except ValueError as e:
                    raise ValueError(f"layer_configs[{pattern!r}]: {e}") from e

    @classmethod
    def check_config(cls, config: QuantizationConfig, backend: Backend) -> list["ValidationIssue"]:
        """Errors: unknown ``backend_options``, a bad ``kernel``, ``kernel='mlx'`` where MLX cannot run.
        Warnings: ``quant_type`` (bitsandbytes only) is ignored."""
        from ...validation import Severity, ValidationIssue

        issues: list[ValidationIssue] = []
        configs = [("", config)] + [(p, config.with_overrides(o)) for p, o in config.layer_configs.items()]
        for where, layer in configs:
            if layer.method not in cls.methods:
                continue
            prefix = f"layer_configs[{where!r}]." if where else ""
            if layer.quant_type is not None and not where:
                issues.append(ValidationIssue(
                    Severity.WARNING, "quant_type",
                    f"quant_type={layer.quant_type!r} is ignored: MLX quantization is affine (scale and bias).",
                    "leave quant_type unset (None)."))
            try:
                options = _options(layer)
            except ValueError as e:
                issues.append(ValidationIssue(Severity.ERROR, prefix + "backend_options", f"{e}.",
                                              "remove the key or fix its value."))
                continue
            if options["kernel"] == "mlx":
                status = get_library_status("mlx", backend)
                if not status.usable:
                    issues.append(ValidationIssue(
                        Severity.ERROR, prefix + "backend_options",
                        f"kernel='mlx' needs MLX, which cannot run on {Backend.parse(backend).value}: "
                        f"{status.reason}.", f"{status.install_hint}, or use kernel='auto'."))
        return issues

    @classmethod
    def quantized_module_types(cls) -> tuple[type, ...]:
        return (MLXQuantizedLinear,)

    @classmethod
    def lora_layer_types(cls) -> tuple[type, ...]:
        return (MLXQuantizedLinear,)  # unknown to peft

    @classmethod
    def config_of_layer(cls, module: nn.Module) -> QuantizationConfig | None:
        if not isinstance(module, MLXQuantizedLinear):
            return None
        storage = module.weight.dtype
        return QuantizationConfig(
            method=QuantizationMethod.MLX_INT8 if module.bits == 8 else QuantizationMethod.MLX_INT4,
            bits=module.bits, group_size=module.group_size, compute_dtype=module.compute_dtype,
            storage_dtype=None if storage is torch.uint32 else storage,
            backend_options={"kernel": module.kernel}, skip_modules=[])

    def _layer(self, name: str | None, config: QuantizationConfig | None,
               in_features: int, out_features: int) -> tuple[QuantizationConfig, dict[str, Any]]:
        config = self.layer_config(name, config)
        if config.method not in self.methods:
            raise ValueError(f"MLXAdapter cannot build a {config.method.value} layer; use adapter.for_method()")
        fitted, reason = self.fit_group_size(in_features, out_features, config)
        if fitted is None:
            raise ValueError(f"{name or 'layer'} ({out_features}x{in_features}): {reason}")
        if reason:
            logger.info("%s: %s", name or "layer", reason)
        return fitted, _options(fitted)

    def quantize_linear(self, linear: nn.Linear, name: str | None = None, *,
                        config: QuantizationConfig | None = None) -> MLXQuantizedLinear:
        """Quantize ``linear`` (left unmodified) with ``mx.quantize`` where MLX runs, else with the
        bit-identical PyTorch quantizer; the layer stays on its device unless the adapter sets one."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantize_linear expects an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if weight.device.type == "meta":
            raise ValueError(f"{name or 'layer'} is on the meta device; use create_quantized_linear")
        config, options = self._layer(name, config, linear.in_features, linear.out_features)
        dtype = _compute_dtype(config, weight.dtype)
        device = self.device or weight.device
        module = MLXQuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                    bits=config.bits, group_size=config.group_size, dtype=dtype,
                                    storage_dtype=config.storage_dtype, kernel=options["kernel"],
                                    device="meta")
        mx = codec.mlx_core(weight.device.type) or (codec.mlx_core("cpu") if torch.device(device).type == "cpu"
                                                     else None)
        if mx is not None:
            arrays = mlx_quantize(weight.to(dtype), config.group_size, config.bits)
            module._adopt_mx(mx, *arrays)
        else:
            packed, scales, biases = affine_quantize(weight.to(dtype), config.group_size, config.bits)
            storage = module.weight.dtype
            module.weight = nn.Parameter(packed if storage is torch.uint32 else packed.view(storage),
                                         requires_grad=False)
            module.scales = nn.Parameter(scales, requires_grad=False)
            module.biases = nn.Parameter(biases, requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=linear.bias.requires_grad)
        if any(t.device != torch.device(device) for t in module.parameters()):
            module.to(device)
        return module

    def create_quantized_linear(self, in_features: int, out_features: int, bias: bool = True, *,
                                config: QuantizationConfig | None = None,
                                device: torch.device | str | None = None,
                                dtype: torch.dtype | None = None) -> MLXQuantizedLinear:
        """An empty :class:`MLXQuantizedLinear` with the settings ``quantize_linear`` would use for a
        weight of ``dtype`` (``device="meta"`` allocates nothing)."""
        config, options = self._layer(None, config or self.config, in_features, out_features)
        return MLXQuantizedLinear(in_features, out_features, bias, bits=config.bits,
                                  group_size=config.group_size, dtype=_compute_dtype(config, dtype),
                                  storage_dtype=config.storage_dtype, kernel=options["kernel"],
                                  device=device or self.device)

    def dequantize_module(self, module: nn.Module) -> nn.Linear:
        """An ``nn.Linear`` in the compute dtype holding exactly the weight the PyTorch path uses."""
        if not isinstance(module, MLXQuantizedLinear):
            raise ValueError(f"MLXAdapter.dequantize_module expects an MLXQuantizedLinear, got "
                             f"{type(module).__name__}")
        weight = module.dequantized_weight()
        linear = nn.Linear(module.in_features, module.out_features, module.bias is not None,
                           device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(weight.dtype).clone(),
                                       requires_grad=module.bias.requires_grad)
        return linear

    def layer_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """mlx-lm's tensors: ``weight`` (``uint32``, whatever ``storage_dtype``), ``scales``,
        ``biases`` and ``bias`` when present."""
        if not isinstance(module, MLXQuantizedLinear):
            raise ValueError(f"expected an MLXQuantizedLinear, got {type(module).__name__}")
        state = {"weight": module.packed_weight.detach(), "scales": module.scales.detach(),
                 "biases": module.biases.detach()}
        if module.bias is not None:
            state["bias"] = module.bias.detach()
        return state

    def layer_state_spec(self, in_features: int, out_features: int, bias: bool, state: Mapping[str, torch.Tensor],
                         *, config: QuantizationConfig) -> LayerStateSpec:
        """mlx-lm's layout: ``weight`` ``uint32`` ``(out, in * bits / 32)``; ``scales`` and ``biases``
        ``(out, in / group_size)`` and ``bias`` ``(out,)`` in the compute dtype (``config.compute_dtype``,
        else the dtype most of them hold: the checkpoint does not record it)."""
        config, _ = self._layer(None, config, in_features, out_features)
        compute = config.compute_dtype or common_dtype(state, ("scales", "biases", "bias"), FLOAT_DTYPES)
        groups = in_features // config.group_size
        spec = {"weight": (torch.uint32, (out_features, in_features * config.bits // 32)),
                "scales": (compute, (out_features, groups)), "biases": (compute, (out_features, groups))}
        if bias:
            spec["bias"] = (compute, (out_features,))
        return spec

    def load_layer_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
        """Fill ``module`` with :meth:`layer_state_dict` output (or mlx-lm's tensors) without copying;
        where the MLX path will run, the tensors are moved into MLX memory once and shared."""
        if not isinstance(module, MLXQuantizedLinear):
            raise ValueError(f"expected an MLXQuantizedLinear, got {type(module).__name__}")
        expected = {"weight", "scales", "biases"} | ({"bias"} if module.bias is not None else set())
        if set(state) != expected:
            raise ValueError(f"MLX layer state has keys {sorted(state)}; expected {sorted(expected)}")
        words = module.in_features * module.bits // 32
        groups = module.in_features // module.group_size
        want = {"weight": (module.out_features, words), "scales": (module.out_features, groups),
                "biases": (module.out_features, groups), "bias": (module.out_features,)}
        for key, tensor in state.items():
            if tuple(tensor.shape) != want[key]:
                raise ValueError(f"MLX layer state {key!r} has shape {tuple(tensor.shape)}, expected {want[key]} "
                                 f"({module.out_features}x{module.in_features}, {module.bits}-bit, "
                                 f"group {module.group_size})")
        weight = state["weight"]
        if weight.dtype not in (torch.uint32, torch.int32):
            raise ValueError(f"MLX layer state 'weight' must be uint32 packed words, got {weight.dtype}")
        if state["scales"].dtype != state["biases"].dtype or state["scales"].dtype not in FLOAT_DTYPES:
            raise ValueError(f"MLX scales/biases must share a float dtype, got {state['scales'].dtype} and "
                             f"{state['biases'].dtype}")
        weight = weight.view(torch.uint32)
        mx = codec.mlx_core("cpu") if module.kernel != "torch" and weight.device.type == "cpu" else None
        storage = module.weight.dtype
        if mx is not None:
            module._adopt_mx(mx, to_mx(mx, weight), to_mx(mx, state["scales"]), to_mx(mx, state["biases"]))
            if "bias" in state:
                module.bias = nn.Parameter(state["bias"], requires_grad=module.bias.requires_grad)
            return module
        tensors = dict(state, weight=weight if storage is torch.uint32 else weight.view(storage))
        module.load_state_dict(tensors, strict=True, assign=True)
        module._mx_cache, module._mx_builds = None, 0
        return module

    def mark_model(self, model: nn.Module) -> None:
        super().mark_model(model)
        model.quantization_method = "mlx"
