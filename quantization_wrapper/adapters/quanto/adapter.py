"""The optimum-quanto adapter: :class:`QuantoAdapter` (plan, layers, save and load) and
:func:`quanto_group_size`. Layers are :class:`~.layer.QuantoLinear`, whose module (it imports
optimum-quanto) is imported when the first layer is built.
"""

from __future__ import annotations

import copy
import functools
import sys
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from ...config import QuantizationConfig, QuantizationMethod, dtype_to_str
from ..base import LayerStateSpec, QuantizationAdapter, common_dtype, leaf_tensors, register_adapter, tensor_nbytes
from .qtensors import (QTYPE_NAMES, dequantized, exact_tinygemm_shifts, method_qtype, quanto_module, standard_weight,
                       tinygemm_weight)

if TYPE_CHECKING:  # pragma: no cover
    from backend_manager import Backend

    from ...validation import ValidationIssue

__all__ = ["QuantoAdapter", "quanto_group_size"]

M = QuantizationMethod
#: The dtype quanto stores each qtype's data in.
_NATIVE_STORAGE = {M.QUANTO_INT2: torch.uint8, M.QUANTO_INT4: torch.uint8, M.QUANTO_INT8: torch.int8,
                   M.QUANTO_FP8: torch.float8_e4m3fn}
_REJECTED_OPTIONS = {
    "activations": "activation quantization needs quanto's calibration pass (optimum.quanto.Calibration), "
                   "which this weight-only adapter does not run",
    "weights": "the weight qtype comes from QuantizationConfig.method (quanto_int2/int4/int8/fp8)",
}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: The tensors of a frozen layer that hold the compute dtype.
_COMPUTE_KEYS = ("weight._scale", "weight._shift", "bias", "input_scale", "output_scale")


def _check_options(config: QuantizationConfig) -> None:
    if not config.backend_options:
        return
    problems = [f"{key!r}: {_REJECTED_OPTIONS.get(key, 'unknown option')}" for key in config.backend_options]
    raise ValueError(f"backend_options={config.backend_options!r} is not valid for {config.method.value}: "
                     f"the optimum-quanto adapter takes no backend_options ({'; '.join(problems)}). "
                     f"Remove them")


@functools.lru_cache(maxsize=None)
def quanto_group_size(in_features: int, method: QuantizationMethod | str) -> int | None:
    """The group size optimum-quanto uses for a layer with ``in_features`` inputs.

    Asked from quanto itself (a ``QLinear`` on the meta device), so it is the truth for the
    installed version.

    Returns:
        The group size along ``in_features``, or ``None`` for one scale per output row (always for
        ``qint8``/``qfloat8``; for ``qint2``/``qint4`` when no allowed group divides the row).
    """
    method = QuantizationMethod.parse(method)
    if method not in QTYPE_NAMES:
        raise ValueError(f"method={method.value!r} is not an optimum-quanto method; allowed: "
                         f"{', '.join(m.value for m in QTYPE_NAMES)}")
    probe = quanto_module().QLinear(in_features, 1, False, device="meta", weights=method_qtype(method))
    return probe.weight_group_size


@register_adapter(M.QUANTO_INT2, M.QUANTO_INT4, M.QUANTO_INT8, M.QUANTO_FP8)
class QuantoAdapter(QuantizationAdapter):
    """Quantizes linear layers into optimum-quanto ``QLinear`` layers with frozen ``qint2``,
    ``qint4``, ``qint8`` or ``qfloat8`` (e4m3) weights.

    The compute dtype (dtype of the scales, the bias and the matmul) is ``config.compute_dtype``,
    else the layer's own dtype. quanto fixes the group size (see :func:`quanto_group_size`).

    Raises:
        ValueError: at construction, for any ``backend_options`` (in the config or in a
            ``layer_configs`` override for a quanto method).
    """

    library = "optimum-quanto"
    library_module = "optimum.quanto"
    fill_after_verification = True  # CPU bfloat16 int4 is regrouped for torch's int4 kernel

    def __init__(self, config: QuantizationConfig | None = None, backend=None, *, device=None):
        super().__init__(config, backend, device=device)
        _check_options(self.config)
        for pattern, overrides in self.config.layer_configs.items():
            layer = self.config.with_overrides(overrides)
            if layer.method in self.methods:
                try:
                    _check_options(layer)
                except ValueError as e:
                    raise ValueError(f"layer_configs[{pattern!r}]: {e}") from e

    # ------------------------------------------------------------------ hooks
    @classmethod
    def quantized_module_types(cls) -> tuple[type, ...]:
        return (quanto_module().QLinear,)

    @classmethod
    def lora_layer_types(cls) -> tuple[type, ...]:
        # our LoRA layer wraps quanto's QLinear (asked only once quanto is imported)
        return (quanto_module().QLinear,) if "optimum.quanto" in sys.modules else ()

    @classmethod
    def config_of_layer(cls, module: nn.Module) -> QuantizationConfig | None:
        qtype = cls.quantization_map_entry(module)["weights"]
        by_qtype = {cls.quantization_map_entry(QuantizationConfig(method=m))["weights"]: m for m in cls.methods}
        if qtype not in by_qtype:
            raise ValueError(f"optimum-quanto layer with weights={qtype!r} has no adapter method; known: "
                             f"{', '.join(by_qtype)}")
        return QuantizationConfig(method=by_qtype[qtype], compute_dtype=module.weight.dtype, skip_modules=[])

    @classmethod
    def quantization_map_entry(cls, config: QuantizationConfig | nn.Module) -> dict[str, str]:
        """quanto's ``quantization_map`` entry for a layer quantized with ``config`` (or for a
        ``QLinear`` module), e.g. ``{"weights": "qint4", "activations": "none"}``."""
        if isinstance(config, nn.Module):
            if not hasattr(config, "weight_qtype"):
                raise ValueError(f"{type(config).__name__} is not an optimum-quanto module")
            qtype, activations = config.weight_qtype, getattr(config, "activation_qtype", None)
            return {"weights": "none" if qtype is None else qtype.name,
                    "activations": "none" if activations is None else activations.name}
        if not isinstance(config, QuantizationConfig) or config.method not in QTYPE_NAMES:
            got = config.method.value if isinstance(config, QuantizationConfig) else type(config).__name__
            raise ValueError(f"quantization_map_entry needs a config of an optimum-quanto method "
                             f"({', '.join(m.value for m in QTYPE_NAMES)}), got {got}")
        return {"weights": QTYPE_NAMES[config.method], "activations": "none"}

    @classmethod
    def check_config(cls, config: QuantizationConfig, backend: "Backend") -> list["ValidationIssue"]:
        from ...validation import Severity, ValidationIssue

        issues = []
        # The top-level config, then each override for what it sets itself (inherited problems are
        # reported once, on the top-level field).
        layers = [("", config, {"backend_options", "storage_dtype"})]
        for pattern, overrides in config.layer_configs.items():
            layers.append((f"layer_configs[{pattern!r}].", config.with_overrides(overrides),
                           {"backend_options", "storage_dtype"} if "method" in overrides else set(overrides)))
        for prefix, layer, fields in layers:
            if layer.method not in cls.methods:
                continue
            if "backend_options" in fields and layer.backend_options:
                try:
                    _check_options(layer)
                except ValueError as e:
                    issues.append(ValidationIssue(Severity.ERROR, prefix + "backend_options", str(e),
                                                  "remove backend_options (optimum-quanto takes none)."))
            storage, native = layer.storage_dtype, _NATIVE_STORAGE[layer.method]
            if "storage_dtype" in fields and storage is not None and storage != native:
                issues.append(ValidationIssue(
                    Severity.WARNING, prefix + "storage_dtype",
                    f"storage_dtype={dtype_to_str(storage)} cannot be honoured: optimum-quanto stores "
                    f"{QTYPE_NAMES[layer.method]} data as {dtype_to_str(native)} (scales in the compute dtype); "
                    f"FSDP2 shards that data as it is, and FSDP1 (which cannot flatten integers) keeps it whole "
                    f"on each rank.",
                    "leave storage_dtype unset: FSDP2 shards quanto's integer data as it is, and apply_fsdp(version=1) "
                    "passes it to FSDP1 as ignored_params/ignored_states (whole on each rank); for FSDP1 sharding use "
                    "method='hqq' or 'bnb_nf4' with a float storage_dtype."))
        return issues

    def fit_group_size(self, in_features: int, out_features: int,
                       config: QuantizationConfig) -> tuple[QuantizationConfig | None, str | None]:
        """quanto's own group size for this shape (:func:`quanto_group_size`); a per-row layer
        reports ``group_size=in_features``. Never skips: every shape quantizes correctly."""
        asked = config.group_size
        if config.method in (M.QUANTO_INT8, M.QUANTO_FP8):
            if asked is None:
                return config, None
            return (config.replace(group_size=None),
                    f"group_size={asked} ignored: optimum-quanto {QTYPE_NAMES[config.method]} uses one scale "
                    f"per output row")
        group = quanto_group_size(in_features, config.method)
        effective = group if group is not None else in_features
        if effective == asked:
            return config, None
        if group is None:
            why = "in_features <= 128" if in_features <= 128 else "no group of 128, 96, 64 or 32 divides it"
            reason = (f"optimum-quanto quantizes this layer per output row (group_size=in_features="
                      f"{in_features}): {why}")
        elif asked == 128 or asked is None:
            reason = f"group_size=128 does not divide in_features={in_features}; optimum-quanto uses {group}"
        else:
            reason = f"group_size={asked} cannot be honoured: optimum-quanto uses {group} for this shape"
        return config.replace(group_size=effective), reason

    def module_nbytes(self, module: nn.Module) -> int:
        """Bytes of the plain tensors inside quanto's weight (packed data, scale, shift), the bias
        and the ``input_scale``/``output_scale`` buffers."""
        tensors = [leaf for t in list(module.parameters()) + list(module.buffers()) for leaf in leaf_tensors(t)]
        return tensor_nbytes(tensors)

    # ------------------------------------------------------------------ layer level
    def _checked(self, config: QuantizationConfig) -> QuantizationConfig:
        if config.method not in self.methods:
            raise ValueError(f"QuantoAdapter cannot quantize with method={config.method.value!r}; it serves "
                             f"{', '.join(m.value for m in self.methods)}")
        _check_options(config)
        return config

    def quantize_linear(self, linear: nn.Linear, name: str | None = None, *,
                        config: QuantizationConfig | None = None) -> nn.Module:
        from .layer import QuantoLinear

        config = self._checked(self.layer_config(name, config))
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"QuantoAdapter.quantize_linear expects an nn.Linear, got {type(linear).__name__}")
        if linear.weight.device.type == "meta":
            raise ValueError("the layer is on the meta device (no weights to quantize); use "
                             "create_quantized_linear and load_layer_state")
        device = self.device or linear.weight.device
        dtype = config.compute_dtype or linear.weight.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"optimum-quanto computes in float32, float16 or bfloat16; the layer is {dtype}. "
                             f"Set QuantizationConfig.compute_dtype to one of them")
        # A stand-in that from_module may take tensors from: the caller's layer stays untouched
        # (the weight is only read; the bias is a copy, since the quantized layer keeps it).
        source = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        source.weight = nn.Parameter(linear.weight.detach().to(device=device, dtype=dtype), requires_grad=False)
        if linear.bias is not None:
            source.bias = nn.Parameter(linear.bias.detach().to(device=device, dtype=dtype, copy=True),
                                       requires_grad=linear.bias.requires_grad)
        with torch.no_grad():
            qlinear = QuantoLinear.from_module(source, weights=method_qtype(config.method))
            qlinear.freeze()
        qlinear.weight.requires_grad_(False)  # frozen quantized data has no gradient path
        return qlinear

    def create_quantized_linear(self, in_features: int, out_features: int, bias: bool = True, *,
                                config: QuantizationConfig | None = None,
                                device: torch.device | str | None = None,
                                dtype: torch.dtype | None = None) -> nn.Module:
        """A frozen ``QuantoLinear`` whose quantized tensors have their final shapes and dtypes
        (uninitialized; nothing allocated on ``device="meta"``), to be filled by
        :meth:`load_layer_state`."""
        from .layer import TEMPLATE_LOCK, frozen_meta_template

        config = self._checked(config or self.config)
        device = torch.device(device) if device is not None else (self.device or torch.device("cpu"))
        dtype = config.compute_dtype or dtype or torch.get_default_dtype()
        # Freezing runs quanto's quantization on meta tensors (~10 ms of Python per layer): do it
        # once per shape and copy the template (quantized tensor types and shapes, no data).
        template = frozen_meta_template(in_features, out_features, bool(bias), dtype, config.method)
        with TEMPLATE_LOCK:  # copying QTensors runs quanto's ast.literal_eval: one thread at a time (see layer.py)
            qlinear = copy.deepcopy(template)
        if device.type != "meta":
            qlinear.map_stored(lambda t: torch.empty_like(t, device=device))
            if bias:
                qlinear.bias = nn.Parameter(torch.empty_like(qlinear.bias, device=device))
            qlinear.input_scale = torch.ones_like(qlinear.input_scale, device=device)
            qlinear.output_scale = torch.ones_like(qlinear.output_scale, device=device)
        qlinear.weight.requires_grad_(False)
        return qlinear

    def layer_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """quanto's own state dict of the layer (the names ``optimum.quanto.requantize`` loads)."""
        if not self.is_quantized_module(module) or not module.frozen:
            raise ValueError(f"layer_state_dict expects a frozen optimum-quanto QLinear, got {type(module).__name__}")
        tinygemm = "_scale_shift" in module.weight.__tensor_flatten__()[0]
        standard = standard_weight(module.weight) if tinygemm else None
        if standard is not None:
            # quanto's own state_dict() unpacks CPU int4 through a K x K identity matmul (~1 s per
            # 11M-weight layer); the same state from a direct unpack of the nibbles.
            state: dict[str, torch.Tensor] = {}
            standard.save_to_state_dict(state, "weight.", False)
            if module.bias is not None:
                state["bias"] = module.bias.detach()
            state["input_scale"] = module.input_scale.detach()
            state["output_scale"] = module.output_scale.detach()
        else:
            state = module.state_dict()
        state = {k: v.detach().contiguous() for k, v in state.items()}
        if tinygemm:
            state["weight._shift"] = exact_tinygemm_shifts(module.weight, state["weight._scale"],
                                                           state["weight._shift"])
        return state

    def layer_state_spec(self, in_features: int, out_features: int, bias: bool, state: Mapping[str, torch.Tensor],
                         *, config: QuantizationConfig) -> LayerStateSpec:
        """quanto's state dict of a frozen layer of this shape and qtype (asked from quanto, on meta):
        packed data in the qtype's storage dtype, scales, shifts, bias and the activation scales in
        the compute dtype (``config.compute_dtype``, else the dtype most of them hold)."""
        from .layer import frozen_state_layout

        config = self._checked(config)
        compute = config.compute_dtype or common_dtype(state, _COMPUTE_KEYS, _FLOAT_DTYPES)
        probe = compute if isinstance(compute, torch.dtype) else torch.float32
        layout = frozen_state_layout(in_features, out_features, bool(bias), probe, config.method)
        return {k: (compute if dtype == probe else dtype, shape) for k, (dtype, shape) in layout.items()}

    def restore_linear(self, in_features: int, out_features: int, bias: bool, state: dict[str, torch.Tensor], *,
                       config: QuantizationConfig | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """A CPU bfloat16 ``qint4`` layer is built straight from its state (the standard bytes
        regrouped for the kernel); every other layer through :meth:`load_layer_state`.

        Raises:
            CheckpointError: ``state`` does not match :meth:`layer_state_spec`.
        """
        from .layer import TEMPLATE_LOCK, QuantoLinear, frozen_state_shapes

        config = self._checked(config or self.config)
        self.check_layer_state(in_features, out_features, bias, state, config=config)
        scale, data, shift = (state.get(f"weight.{k}") for k in ("_scale", "_data._data", "_shift"))
        # As quanto's loader does, the saved scales decide the layer's dtype (and its kernel).
        if (config.method is M.QUANTO_INT4 and scale is not None
                and data is not None and shift is not None and scale.dtype == torch.bfloat16
                and data.device.type == "cpu" and (self.device is None or self.device.type == "cpu")
                and quanto_group_size(in_features, config.method) == 128 and out_features % 16 == 0):
            dtype = torch.bfloat16
            expected = frozen_state_shapes(in_features, out_features, bool(bias), dtype, config.method)
            if {k: tuple(v.shape) for k, v in state.items()} == expected:
                weight = tinygemm_weight(method_qtype(config.method), 128, torch.Size((out_features, in_features)),
                                         (in_features, 1), data, scale, shift)
                if weight is not None:  # the regroup above runs in parallel; QTensor handling below does not
                    with TEMPLATE_LOCK:
                        qlinear = QuantoLinear(in_features, out_features, bias, device="meta", dtype=dtype,
                                               weights=method_qtype(config.method))
                        qlinear.weight = nn.Parameter(weight, requires_grad=False)
                        if bias:
                            qlinear.bias = nn.Parameter(state["bias"])
                        qlinear.input_scale = state["input_scale"]
                        qlinear.output_scale = state["output_scale"]
                    return qlinear
        # quanto rebuilds QTensors through ast.literal_eval (detach, deepcopy, load_state_dict), which
        # CPython 3.11 cannot run in two threads at once: these restores are cheap, one at a time.
        with TEMPLATE_LOCK:
            empty = self.create_quantized_linear(in_features, out_features, bias, config=config, device="meta",
                                                 dtype=dtype)
            return self.load_layer_state(empty, state)

    def load_layer_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
        """Fill a layer from :meth:`create_quantized_linear` with :meth:`layer_state_dict` output
        (tensors are taken, not copied).

        Raises:
            ValueError: when keys are missing or unexpected, or a tensor has the wrong shape.
        """
        if not self.is_quantized_module(module):
            raise ValueError(f"load_layer_state expects an optimum-quanto QLinear, got {type(module).__name__}")
        if not module.frozen:
            with torch.no_grad():
                module.freeze()
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(f"{k}: {tuple(state[k].shape)} instead of {shape}" for k, shape in expected.items()
                       if k in state and tuple(state[k].shape) != shape)
        if missing or unexpected or wrong:
            raise ValueError(f"state does not fit this {module.out_features}x{module.in_features} "
                             f"{module.weight_qtype.name} layer: missing {missing}, unexpected {unexpected}, "
                             f"wrong shapes {wrong}")
        # torch's CPU int8 weight-only kernel (quanto's int8 matmul) reads its weight with aligned
        # vector loads: a view of a memory-mapped checkpoint at an offset that is not a multiple of
        # 16 crashed the process (SIGSEGV). Such packed tensors get a copy (64-byte aligned).
        state = {k: v.clone() if not v.is_floating_point() and v.device.type == "cpu" and v.data_ptr() % 64 else v
                 for k, v in state.items()}
        module.load_state_dict(state, strict=True, assign=True)
        module.weight.requires_grad_(False)
        return module

    def dequantize_module(self, module: nn.Module) -> nn.Linear:
        if not self.is_quantized_module(module):
            raise ValueError(f"QuantoAdapter.dequantize_module expects an optimum-quanto QLinear, got "
                             f"{type(module).__name__}")
        with torch.no_grad():
            weight = dequantized(module.qweight) if module.frozen else module.weight.detach()
        linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return linear
