"""HQQ adapter: ``nn.Linear`` -> ``hqq.core.quantize.HQQLinear`` (Half-Quadratic Quantization).

HQQ is calibration-free affine quantization in pure PyTorch (1, 2, 3, 4 or 8 bits), so it runs on
every backend, CPU included. What this adapter adds on top of ``HQQLinear``:

* **Group sizes that fit.** hqq 0.2.8 groups the *flattened* weight (``axis=1``: rows of
  ``group_size`` consecutive elements, which may run across output rows), then packs several rows
  of groups into one storage row: 2 for 4-bit, 4 for 2-bit, 8 for 1-bit; 3-bit packs 10 values per
  ``int32`` and pads. So a group size fits when ``in_features * out_features`` is divisible by it
  and the number of groups by the packing factor (``axis=0``: only the first condition).
  :meth:`HQQAdapter.fit_group_size` halves the group size until it fits, or skips the layer.
* **storage_dtype.** The packed weights ``W_q`` are stored as a view in ``storage_dtype`` (hqq's
  ``view_as_float``), so FSDP can shard them with float parameters. hqq itself can only view them
  as the compute dtype; here any storage dtype works (``uint8`` is hqq's native format, ``int32``
  for 3-bit).
* **Meta skeletons and plain-tensor state.** :meth:`HQQAdapter.create_quantized_linear` builds an
  ``HQQLinear`` whose tensors have their final shapes on the meta device; the layer state is hqq's
  own safetensors-ready state dict (every value a tensor, the same keys transformers saves), and
  loading decodes it without hqq's ``eval`` of dtype strings.

``backend_options`` (all optional; per layer through ``layer_configs`` too):

* ``axis`` (``0`` or ``1``, default ``1``): the axis hqq groups along.
* ``optimize`` (bool, default ``True``): run hqq's half-quadratic solver on the zero points;
  ``False`` gives plain min/max rounding.
* ``round_zero`` (bool, default hqq's: ``True`` for 4-bit only): round the zero points.

Unknown keys, and the options hqq 0.2.8 ignores or cannot serialize (``quant_scale``,
``quant_zero``, ``offload_meta``), raise ``ValueError`` when the adapter is built (and when a layer
config reaches :meth:`HQQAdapter.quantize_linear`): a typo must not silently change what is stored.
:meth:`HQQAdapter.check_config` reports the remaining, runnable-but-risky choices as warnings.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from ..config import QuantizationConfig, QuantizationMethod, dtype_to_str, register_config
from ..methods import PACKED_FSDP_STORAGE, FSDPSupport, MethodSpec, RecommendationCandidate, Support, register_method
from .base import LayerStateSpec, QuantizationAdapter, autocast_dtype, common_dtype, register_adapter, tensor_nbytes

if TYPE_CHECKING:  # pragma: no cover
    from backend_manager import Backend

    from ..validation import ValidationIssue

__all__ = ["HQQAdapter", "hqq_group_size_problem"]


# ---------------------------------------------------------------------- what the package knows
M = QuantizationMethod


def _normalize(config: QuantizationConfig) -> None:
    if config.group_size is not None and config.group_size % 8:
        raise ValueError(f"group_size={config.group_size} is not valid for method='hqq'; it must be a "
                         f"multiple of 8 (e.g. 32, 64, 128)")


def _bits(config: QuantizationConfig, in_features: int) -> float:
    meta_bits = 8 * (config.compute_dtype or torch.float16).itemsize  # scale and zero in the compute dtype
    packed = {3: 32 / 10}.get(config.bits, config.bits)  # hqq packs 3-bit as 10 values per int32
    return packed + 2 * meta_bits / (config.group_size or in_features)


_PACK_ROWS = {1: 8, 2: 4, 4: 2, 8: 1}  # rows of packed uint8 per group row (3-bit: 10 values per int32)


def _layer_nbytes(config: QuantizationConfig, in_features: int, out_features: int, bias: bool,
                  weight_dtype: torch.dtype, cdt: int) -> int:
    numel, bits = in_features * out_features, config.bits
    axis = config.backend_options.get("axis", 1)
    group = config.group_size or (in_features if axis == 1 else out_features)
    groups = numel // group
    if axis == 1:
        packed = math.ceil(groups / 10) * group * 4 if bits == 3 else groups // _PACK_ROWS[bits] * group
    else:
        packed = math.ceil(group / 10) * groups * 4 if bits == 3 else group // _PACK_ROWS[bits] * groups
    return packed + 2 * groups * cdt + (out_features * cdt if bias else 0)


_ANY = Support(True, "HQQ is calibration-free and pure PyTorch, with optional CUDA kernels.", True)
#: HQQ as this module declares it to :mod:`quantization_wrapper.methods`.
HQQ_METHOD_SPEC = MethodSpec(
    "hqq", (1, 2, 3, 4, 8), 4, None, 64, "Half-Quadratic Quantization, calibration-free affine",
    support={"cuda": _ANY, "mps": _ANY, "mlx": _ANY, "cpu": _ANY},
    fallback=((M.MLX_INT4, None), (M.QUANTO_INT4, None), (M.NONE, None)),
    fsdp=FSDPSupport("sharded", "sharded", PACKED_FSDP_STORAGE,
                     "W_q sharded; scales and zero points (HQQLinear.meta) whole on each rank",
                     "tests/test_fsdp.py: FSDP2 (float32 storage); by hand: FSDP2 (uint8), FSDP1 (float32)"),
    bits_per_weight=_bits,
    layer_nbytes=_layer_nbytes,
    candidates=(RecommendationCandidate(("cuda",), 40, dict(bits=3, group_size=64)),
                RecommendationCandidate(("cuda",), 50, dict(bits=2, group_size=16)),
                RecommendationCandidate(("cpu",), 20, dict(bits=8, group_size=128), inference_only=True),
                RecommendationCandidate(("cpu",), 30, dict(bits=4, group_size=64)),
                RecommendationCandidate(("cpu",), 40, dict(bits=3, group_size=64)),
                RecommendationCandidate(("cpu",), 50, dict(bits=2, group_size=16))),
    # 1 bit is allowed but not tried by default: without calibration it rarely pays for its error.
    mixed_precision=tuple(dict(method="hqq", bits=b, group_size=g) for b in (2, 3, 4, 8) for g in (32, 64, 128)),
    normalize=_normalize,
    precision_tiers={"high": {"method": "hqq", "bits": 8, "group_size": 128},
                     "low": {"method": "hqq", "bits": 4, "group_size": 64},
                     "default": {"method": "hqq", "bits": 8, "group_size": 128}},
)
register_method(M.HQQ, HQQ_METHOD_SPEC)
register_config("hqq4", dict(method="hqq", bits=4, group_size=64))
register_config("hqq8", dict(method="hqq", bits=8, group_size=128))
register_config("hqq2", dict(method="hqq", bits=2, group_size=16))
# Attention at 8 bits, feed-forward at 4 bits (design document 002's mixed precision).
register_config("mixed_attn8_ffn4", dict(method="hqq", bits=4, group_size=64,
                                         layer_configs={"re:.*(attn|attention).*": {"bits": 8, "group_size": 128}}))

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Rows of groups hqq packs into one storage row, per bit width (3-bit: 10 per int32, padded).
_PACK_ROWS = {1: 8, 2: 4, 3: 10, 4: 2, 8: 1}
_PACKING = {1: "1bit_u8", 2: "2bit_u8", 3: "3bit_32", 4: "4bit_u8", 8: "8bit_u8"}
_OPTION_TYPES = {"axis": int, "optimize": bool, "round_zero": bool}
_REJECTED_OPTIONS = {
    "quant_scale": "hqq 0.2.8 ignores quantized scales (HQQLinear resets them) and cannot save them",
    "quant_zero": "hqq 0.2.8 ignores quantized zero points (HQQLinear resets them) and cannot save them",
    "offload_meta": "hqq 0.2.8 deprecates meta offloading; it needs CUDA pinned memory and cannot be saved",
    "view_as_float": "set QuantizationConfig.storage_dtype (e.g. torch.bfloat16) instead",
    "nbits": "set QuantizationConfig.bits instead",
    "group_size": "set QuantizationConfig.group_size instead",
    "compute_dtype": "set QuantizationConfig.compute_dtype instead",
}
#: The dtype names an hqq state dict may hold; decoded from this table, never with ``eval``.
_STATE_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.uint8,
                                     torch.int8, torch.int32)}
_INT_KEYS = ("nbits", "group_size", "axis")
_BOOL_KEYS = ("view_as_float", "quant_scale", "quant_zero", "offload_meta", "stores_quant_config",
              "channel_wise", "optimize", "round_zero")
_STR_KEYS = ("packing",)
_DTYPE_KEYS = ("unpack_view_dtype", "compute_dtype")
_TENSOR_KEYS = ("W_q", "scale", "zero")
_REQUIRED_KEYS = _TENSOR_KEYS + _INT_KEYS + _STR_KEYS + _DTYPE_KEYS + ("shape", "view_as_float")


@functools.cache
def _hqq() -> ModuleType:
    """``hqq.core.quantize``, imported on first use."""
    try:
        from hqq.core import quantize
    except ImportError as e:
        raise ImportError("HQQAdapter needs the hqq package: pip install hqq") from e
    return quantize


@functools.cache
def _layer_class() -> type:
    """``HQQLinear`` that accepts inputs of any float dtype: it computes in its compute dtype and
    returns the input's dtype, like bitsandbytes' layers (hqq's own forward raises on a mismatch,
    e.g. an fp32 model quantized with ``compute_dtype=torch.bfloat16``). Under ``torch.autocast``
    it computes in, and returns, the autocast dtype, as ``nn.Linear`` does. peft's HQQ dispatch
    checks ``isinstance(layer, HQQLinear)``, which this subclass satisfies."""
    base = _hqq().HQQLinear

    class DtypeSafeHQQLinear(base):
        @classmethod
        def set_backend(cls, backend: Any) -> None:
            # hqq installs the backend's forward on the class it is called on (HQQLinear.__init__
            # calls it): keep it on hqq's class so our forward below stays in front of it.
            base.set_backend.__func__(base, backend)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            dtype = autocast_dtype(x)
            if dtype is not None:
                return self._forward_autocast(x, dtype)
            if x.dtype == self.compute_dtype:
                return super().forward(x)
            return super().forward(x.to(self.compute_dtype)).to(x.dtype)

        def _forward_autocast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            # As nn.Linear under autocast: input, weight and bias in the autocast dtype, and so the
            # output. hqq's autograd function would run its forward under autocast but its backward
            # outside it (a low-precision gradient times the compute-dtype weight: a dtype error);
            # here both multiply in ``dtype`` with autocast off, the weight dequantized in each.
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = _hqq().HQQMatmulNoCacheMul.apply(x.to(dtype), functools.partial(_matmul_as_input, self),
                                                       None)
                # the bias is added outside: hqq's backward sums its gradient over dim 0 only
                return out if self.bias is None else out + self.bias.to(dtype)

    DtypeSafeHQQLinear.__qualname__ = DtypeSafeHQQLinear.__name__ = "HQQLinear"
    return DtypeSafeHQQLinear


def _matmul_as_input(layer: nn.Module, x: torch.Tensor, transpose: bool = True) -> torch.Tensor:
    """``HQQLinear.matmul`` in ``x``'s dtype: the weight is dequantized, then cast to it."""
    weight = layer.dequantize().to(x.dtype)
    return torch.matmul(x, weight.t() if transpose else weight)


# ---------------------------------------------------------------------- options and shapes
def _options(config: QuantizationConfig) -> dict[str, Any]:
    """``config.backend_options`` checked against what hqq honours.

    Raises:
        ValueError: for an unknown, ignored or ill-typed option (the accepted ones are listed).
    """
    opts = dict(config.backend_options)
    for key, value in opts.items():
        if key in _REJECTED_OPTIONS:
            raise ValueError(f"backend_options[{key!r}] is not supported by the HQQ adapter: "
                             f"{_REJECTED_OPTIONS[key]}")
        if key not in _OPTION_TYPES:
            raise ValueError(f"backend_options has unknown key {key!r} for method 'hqq'; accepted: "
                             f"{', '.join(_OPTION_TYPES)}")
        kind = _OPTION_TYPES[key]
        if isinstance(value, bool) is not (kind is bool) or not isinstance(value, kind):
            raise ValueError(f"backend_options[{key!r}]={value!r} must be a{'n int' if kind is int else ' bool'}")
    if opts.get("axis", 1) not in (0, 1):
        raise ValueError(f"backend_options['axis']={opts['axis']!r} is not valid; allowed: 0, 1")
    return opts


def _axis(config: QuantizationConfig) -> int:
    return config.backend_options.get("axis", 1)


def _native_dtype(bits: int) -> torch.dtype:
    return torch.int32 if bits == 3 else torch.uint8


def _effective_group(config: QuantizationConfig, in_features: int, out_features: int) -> int:
    """hqq's group size; ``None`` means one group per row (``axis=1``) or column (``axis=0``)."""
    if config.group_size is not None:
        return config.group_size
    return in_features if _axis(config) == 1 else out_features


def _packed_shape(config: QuantizationConfig, in_features: int, out_features: int) -> tuple[int, int]:
    """Shape of hqq's packed ``W_q`` in its native dtype (uint8, int32 for 3-bit)."""
    group = _effective_group(config, in_features, out_features)
    groups = in_features * out_features // group
    rows, cols = (groups, group) if _axis(config) == 1 else (group, groups)
    pack = _PACK_ROWS[config.bits]
    return (math.ceil(rows / 10) if config.bits == 3 else rows // pack), cols


def hqq_group_size_problem(in_features: int, out_features: int, config: QuantizationConfig) -> str | None:
    """Why hqq 0.2.8 cannot quantize an ``out_features x in_features`` weight with ``config``'s bits,
    group size, axis and storage dtype; ``None`` when it can."""
    group = _effective_group(config, in_features, out_features)
    numel = in_features * out_features
    if numel % group:
        return (f"group_size={group} does not divide in_features*out_features={numel} "
                f"(hqq groups the flattened weight)")
    groups = numel // group
    pack = _PACK_ROWS[config.bits]
    if _axis(config) == 1 and config.bits != 3 and groups % pack:
        return (f"group_size={group} gives {groups} groups; {config.bits}-bit packing needs a multiple "
                f"of {pack}")
    storage = config.storage_dtype
    if storage is not None and storage != _native_dtype(config.bits):
        cols = _packed_shape(config, in_features, out_features)[1]
        if cols * _native_dtype(config.bits).itemsize % storage.itemsize:
            return (f"packed rows of {cols} {dtype_to_str(_native_dtype(config.bits))} values cannot be "
                    f"viewed as storage_dtype={dtype_to_str(storage)}")
    return None


def _raw_skeleton_state(config: QuantizationConfig, in_features: int, out_features: int, bias: bool,
                        compute_dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """hqq's (decoded) state dict of an empty layer: tensors of the final shapes, uninitialized."""
    opts = _options(config)
    axis = _axis(config)
    group = _effective_group(config, in_features, out_features)
    groups = in_features * out_features // group
    native = _native_dtype(config.bits)
    storage = config.storage_dtype or native
    rows, cols = _packed_shape(config, in_features, out_features)
    cols = cols * native.itemsize // storage.itemsize
    meta_shape = (groups, 1) if axis == 1 else (1, groups)
    state: dict[str, Any] = {
        "W_q": torch.empty(rows, cols, dtype=storage, device=device),
        "scale": torch.empty(meta_shape, dtype=compute_dtype, device=device),
        "zero": torch.empty(meta_shape, dtype=compute_dtype, device=device),
        "nbits": config.bits, "group_size": group, "axis": axis,
        "shape": torch.Size([out_features, in_features]),
        "packing": _PACKING[config.bits], "unpack_view_dtype": native,
        "view_as_float": storage != native, "quant_scale": False, "quant_zero": False,
        "compute_dtype": compute_dtype, "offload_meta": False, "stores_quant_config": True,
        "channel_wise": True, "optimize": opts.get("optimize", True),
        "round_zero": opts.get("round_zero", config.bits == 4),
    }
    state["W_q"] = nn.Parameter(state["W_q"], requires_grad=False)
    if bias:
        state["bias"] = torch.empty(out_features, dtype=compute_dtype, device=device)
    return state


def _decode_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """hqq's encoded (all-tensor) state dict -> the values ``HQQLinear.load_state_dict`` expects
    when ``encoded_state_dict`` is absent. Dtype names come from an allow-list, never ``eval``."""
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"HQQ layer state is missing {missing}; it holds {sorted(state)}")
    known = set(_TENSOR_KEYS + _INT_KEYS + _BOOL_KEYS + _STR_KEYS + _DTYPE_KEYS) | {"shape", "bias",
                                                                                     "encoded_state_dict"}
    unknown = sorted(set(state) - known)
    if unknown:
        raise ValueError(f"HQQ layer state has unsupported keys {unknown} (quantized scales/zeros or "
                         f"offloaded meta are not supported)")
    raw: dict[str, Any] = {k: state[k] for k in _TENSOR_KEYS}
    # HQQLinear registers W_q as a parameter; installing a plain tensor over it would fail.
    raw["W_q"] = nn.Parameter(state["W_q"], requires_grad=False)
    if state.get("bias") is not None:
        raw["bias"] = state["bias"]
    for key in _INT_KEYS:
        raw[key] = int(state[key].item())
    for key in _BOOL_KEYS:
        raw[key] = bool(state[key].item()) if key in state else key in ("stores_quant_config", "channel_wise")
    raw["packing"] = _decode_str(state["packing"])
    for key in _DTYPE_KEYS:
        name = _decode_str(state[key])
        if name not in _STATE_DTYPES:
            raise ValueError(f"HQQ layer state has {key}={name!r}; allowed: {', '.join(_STATE_DTYPES)}")
        raw[key] = _STATE_DTYPES[name]
    raw["shape"] = torch.Size(int(v) for v in state["shape"].tolist())
    if _PACKING.get(raw["nbits"]) != raw["packing"]:
        raise ValueError(f"HQQ layer state has nbits={raw['nbits']} and packing={raw['packing']!r}; "
                         f"supported: {', '.join(f'{b}-bit {p!r}' for b, p in _PACKING.items())}")
    if raw["quant_scale"] or raw["quant_zero"] or raw["offload_meta"]:
        raise ValueError("HQQ layer state uses quantized scales/zeros or offloaded meta, which hqq 0.2.8 "
                         "cannot load back faithfully; re-quantize the layer without them")
    return raw


def _decode_str(t: torch.Tensor) -> str:
    return bytes(t.to(torch.uint8).tolist()).decode("ascii")


def _named_dtype(t: Any) -> torch.dtype | None:
    """The float dtype an encoded dtype name (``uint8`` codes of e.g. ``"torch.float16"``) names;
    ``None`` when ``t`` is not such a name."""
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.ndim == 1 and t.numel() <= 32):
        return None
    try:
        dtype = _STATE_DTYPES.get(_decode_str(t))
    except UnicodeDecodeError:
        return None
    return dtype if dtype in _FLOAT_DTYPES else None


# ---------------------------------------------------------------------- the adapter
@register_adapter(QuantizationMethod.HQQ)
class HQQAdapter(QuantizationAdapter):
    """Quantizes linear layers into ``hqq.core.quantize.HQQLinear`` (1/2/3/4/8 bits).

    The compute dtype (dtype of scales, zero points, bias and the matmul) is
    ``config.compute_dtype``, else the layer's own float dtype. ``storage_dtype`` sets the dtype
    the packed weights are stored as (see the module docstring); ``backend_options`` takes
    ``axis``, ``optimize`` and ``round_zero``.

    Raises:
        ValueError: at construction, for ``backend_options`` hqq does not honour (in the config or
            in any ``layer_configs`` override).
    """

    library = "hqq"
    library_module = "hqq"
    # float32 copies and the optimizer's iterates: a second worker added 0.33 GB on 2.9M weights
    quantize_workspace_per_weight = 112.0

    def __init__(self, config: QuantizationConfig | None = None, backend=None, *, device=None):
        super().__init__(config, backend, device=device)
        _options(self.config)
        for pattern, overrides in self.config.layer_configs.items():
            layer = self.config.with_overrides(overrides)
            if layer.method is QuantizationMethod.HQQ:
                try:
                    _options(layer)
                except ValueError as e:
                    raise ValueError(f"layer_configs[{pattern!r}]: {e}") from e

    # ------------------------------------------------------------------ hooks
    @classmethod
    def quantized_module_types(cls) -> tuple[type, ...]:
        return (_hqq().HQQLinear,)

    @classmethod
    def check_config(cls, config: QuantizationConfig, backend: "Backend") -> list["ValidationIssue"]:
        from ..validation import Severity, ValidationIssue

        issues = []
        storage, compute = config.storage_dtype, config.compute_dtype
        if storage in _FLOAT_DTYPES and compute is not None and storage != compute:
            issues.append(ValidationIssue(
                Severity.WARNING, "storage_dtype",
                f"HQQ's packed weights are stored as a {dtype_to_str(storage)} view while compute_dtype is "
                f"{dtype_to_str(compute)}; casting the model (model.to({dtype_to_str(compute)}), FSDP "
                f"param_dtype={dtype_to_str(compute)}) would corrupt them, and peft's merge re-packs them "
                f"as {dtype_to_str(compute)}.",
                f"set storage_dtype equal to compute_dtype ({dtype_to_str(compute)})."))
        return issues

    def fit_group_size(self, in_features: int, out_features: int,
                       config: QuantizationConfig) -> tuple[QuantizationConfig | None, str | None]:
        """The largest of ``config.group_size`` and its halvings (multiples of 8) that hqq can
        store for this shape (see :func:`hqq_group_size_problem`); ``(None, reason)`` if none."""
        problem = hqq_group_size_problem(in_features, out_features, config)
        if problem is None:
            return config, None
        group = config.group_size
        candidate = group // 2 if group is not None else 0
        while candidate >= 8 and candidate % 8 == 0:
            adjusted = config.replace(group_size=candidate)
            if hqq_group_size_problem(in_features, out_features, adjusted) is None:
                return adjusted, f"{problem}; using group_size={candidate}"
            candidate //= 2
        return None, f"{problem}, and no smaller group size fits; layer kept in full precision"

    def module_nbytes(self, module: nn.Module) -> int:
        """W_q, bias and every tensor in hqq's ``meta`` dict (scale, zero, ...), which are neither
        parameters nor buffers."""
        if not self.is_quantized_module(module):
            return super().module_nbytes(module)
        return tensor_nbytes([module.W_q, module.bias, *_meta_tensors(module.meta or {})])

    def mark_model(self, model: nn.Module) -> None:
        super().mark_model(model)
        model.hqq_quantized = True  # peft's prepare_model_for_kbit_training reads this flag

    # ------------------------------------------------------------------ layer level
    def _compute_dtype(self, config: QuantizationConfig, layer_dtype: torch.dtype | None) -> torch.dtype:
        if config.compute_dtype is not None:
            return config.compute_dtype
        if layer_dtype in _FLOAT_DTYPES:
            return layer_dtype
        raise ValueError(f"HQQ computes in float32, float16 or bfloat16; the layer is {layer_dtype}. "
                         f"Set QuantizationConfig.compute_dtype to one of them")

    def _quant_config(self, config: QuantizationConfig, view_as_float: bool) -> dict[str, Any]:
        opts = _options(config)
        qc = _hqq().BaseQuantizeConfig(nbits=config.bits, group_size=config.group_size,
                                       axis=_axis(config), view_as_float=view_as_float)
        params = qc["weight_quant_params"]
        for key in ("optimize", "round_zero"):
            if key in opts:
                params[key] = opts[key]
        return qc

    def _check_shape(self, in_features: int, out_features: int, config: QuantizationConfig) -> None:
        problem = hqq_group_size_problem(in_features, out_features, config)
        if problem is not None:
            raise ValueError(f"HQQ cannot quantize a {out_features}x{in_features} weight at {config.bits} bits: "
                             f"{problem}. Use HQQAdapter.fit_group_size to pick a group size that fits")

    def quantize_linear(self, linear: nn.Linear, name: str | None = None, *,
                        config: QuantizationConfig | None = None) -> nn.Module:
        """Quantize ``linear`` (left unmodified) into an ``HQQLinear``; the bias is kept."""
        config = self.layer_config(name, config)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"HQQAdapter.quantize_linear expects an nn.Linear, got {type(linear).__name__}")
        if linear.weight.device.type == "meta":
            raise ValueError("the layer is on the meta device (no weights to quantize); use "
                             "create_quantized_linear for an empty layer")
        compute = self._compute_dtype(config, linear.weight.dtype)
        self._check_shape(linear.in_features, linear.out_features, config)
        device = self.device or linear.weight.device
        # HQQLinear unbinds the parameters of the layer it is given: hand it a shell that shares
        # the tensors (read-only for hqq) but not the module.
        shell = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        shell.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        if linear.bias is not None:
            shell.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        storage = config.storage_dtype
        native = _native_dtype(config.bits)
        as_view = storage is not None and storage != native
        # hqq can only view W_q as the compute dtype; other storage dtypes are viewed here.
        module = _layer_class()(shell, self._quant_config(config, as_view and storage == compute),
                               del_orig=True, compute_dtype=compute, device=str(device))
        if as_view:
            module.W_q = nn.Parameter(module.W_q.data.view(native).view(storage), requires_grad=False)
            module.meta["view_as_float"] = True
            module.quant_config["weight_quant_params"]["view_as_float"] = True
        # hqq's solver runs under inference_mode and may hand back inference tensors (the zero
        # points), which refuse in-place updates later (loading, moving); make them ordinary.
        for key, value in module.meta.items():
            if isinstance(value, torch.Tensor) and value.is_inference():
                module.meta[key] = value.clone()
        return module

    def create_quantized_linear(self, in_features: int, out_features: int, bias: bool = True, *,
                                config: QuantizationConfig | None = None,
                                device: torch.device | str | None = None,
                                dtype: torch.dtype | None = None) -> nn.Module:
        """An ``HQQLinear`` with every tensor in its final shape and dtype, uninitialized.

        On ``device="meta"`` nothing is allocated; :meth:`module_nbytes` still reports the bytes the
        filled layer will hold. Fill it with :meth:`load_layer_state`.
        """
        config = config or self.config
        _options(config)
        compute = self._compute_dtype(config, dtype or torch.float32)
        self._check_shape(in_features, out_features, config)
        device = torch.device(device) if device is not None else (self.device or torch.device("cpu"))
        module = _layer_class()(None, self._quant_config(config, False), compute_dtype=compute,
                               device=str(device), initialize=False)
        raw = _raw_skeleton_state(config, in_features, out_features, bias, compute, device)
        module.load_state_dict(raw)  # hqq's override: installs W_q and meta as given (no copy)
        module.encoded_state_dict = True
        return module

    def layer_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """hqq's own safetensors-ready state dict (the keys transformers saves): every value a
        tensor, strings and dtypes as uint8 codes, flags as 0-d tensors."""
        if not self.is_quantized_module(module):
            raise ValueError(f"HQQAdapter.layer_state_dict expects an HQQLinear, got {type(module).__name__}")
        if not module.is_initialized():
            raise ValueError("the HQQLinear holds no weights yet (created with initialize=False)")
        module.encoded_state_dict = True
        state = module.state_dict()
        out = {}
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"HQQ state value {key!r} is a {type(value).__name__}, not a tensor")
            out[key] = value.detach()
        return out

    def layer_state_spec(self, in_features: int, out_features: int, bias: bool, state: Mapping[str, torch.Tensor],
                         *, config: QuantizationConfig) -> LayerStateSpec:
        """hqq's encoded state dict: ``W_q`` in the storage dtype (``uint8``, ``int32`` for 3-bit, or
        ``storage_dtype``), ``scale``/``zero`` (one per group) and ``bias`` in the compute dtype, the
        settings as hqq encodes them (ints ``int32``, the shape ``int64``, strings and flags
        ``uint8``). The compute dtype is ``config.compute_dtype``, else the one the state names.
        Flags older hqq versions do not write may be absent."""
        compute = config.compute_dtype or _named_dtype(state.get("compute_dtype"))
        if compute is None:
            compute = common_dtype(state, ("scale", "zero", "bias"), _FLOAT_DTYPES)
        skeleton = _raw_skeleton_state(config, in_features, out_features, bias,
                                       compute if isinstance(compute, torch.dtype) else torch.float32,
                                       torch.device("meta"))
        spec: dict[str, tuple] = {"W_q": (skeleton["W_q"].dtype, tuple(skeleton["W_q"].shape))}
        for key in ("scale", "zero") + (("bias",) if bias else ()):
            spec[key] = (compute, tuple(skeleton[key].shape))
        spec.update({key: (torch.int32, ()) for key in _INT_KEYS})
        spec["shape"] = (torch.int64, (2,))
        spec["packing"] = (torch.uint8, (len(_PACKING[config.bits]),))
        spec["unpack_view_dtype"] = (torch.uint8, (len(str(_native_dtype(config.bits))),))
        spec["compute_dtype"] = (torch.uint8, (len(str(compute)) if isinstance(compute, torch.dtype) else None,))
        spec.update({key: (torch.uint8, (), True) for key in _BOOL_KEYS + ("encoded_state_dict",)})
        spec["view_as_float"] = (torch.uint8, ())
        return spec

    def load_layer_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
        """Install ``state`` (from :meth:`layer_state_dict`, e.g. read from safetensors) into
        ``module``, an ``HQQLinear`` from :meth:`create_quantized_linear`. Tensors are used as
        given (no copy) unless the adapter's ``device`` asks to move them.

        Raises:
            ValueError: when the state does not match the module (bits, group size, shape, tensor
                shapes) or holds keys or dtypes hqq cannot load.
        """
        if not self.is_quantized_module(module):
            raise ValueError(f"HQQAdapter.load_layer_state expects an HQQLinear, got {type(module).__name__}")
        raw = _decode_state(dict(state))
        expected = module.meta or {}
        for key in ("nbits", "group_size", "axis", "shape"):
            if key in expected and expected[key] != raw[key]:
                raise ValueError(f"HQQ layer state has {key}={raw[key]}, but the layer was built for "
                                 f"{key}={expected[key]}; the checkpoint and the model config disagree")
        if module.is_initialized():
            for key in _TENSOR_KEYS:
                want = tuple(module.W_q.shape if key == "W_q" else expected[key].shape)
                got = tuple(raw[key].shape)
                if key == "W_q" and raw[key].dtype != module.W_q.dtype:
                    want = (want[0], want[1] * module.W_q.dtype.itemsize // raw[key].dtype.itemsize)
                if got != want:
                    raise ValueError(f"HQQ layer state tensor {key!r} has shape {got}, expected {want}")
        if module.is_initialized() and (module.bias is not None) != ("bias" in raw):
            raise ValueError(f"HQQ layer state {'lacks' if module.bias is not None else 'has'} a bias, "
                             f"but the layer was built {'with' if module.bias is not None else 'without'} one")
        device = self.device or raw["W_q"].device
        module.compute_dtype = raw["compute_dtype"]
        module.device = str(device)
        module.load_state_dict(raw)
        module.encoded_state_dict = True
        return module

    def dequantize_module(self, module: nn.Module) -> nn.Linear:
        """An ``nn.Linear`` (compute dtype) holding ``module.dequantize()`` and the bias."""
        if not self.is_quantized_module(module):
            raise ValueError(f"HQQAdapter.dequantize_module expects an HQQLinear, got {type(module).__name__}")
        weight = module.dequantize().detach()
        out_features, in_features = weight.shape
        linear = nn.Linear(in_features, out_features, module.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().clone())
        return linear


def _meta_tensors(meta: dict[str, Any]):
    for value in meta.values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            yield from _meta_tensors(value)


# ---------------------------------------------------------------------- hqq's own checkpoints
# What load_quantized_model reads besides our format (HQQAdapter.native_readers): hqq's own
# serialization, ``AutoHQQHFModel.save_quantized`` -- a directory with ``config.json`` and ``qmodel.pt``
# (``torch.save`` of ``{module name: module state dict}``; ``HQQLinear`` states hold ``W_q``) -- or a
# ``.pt`` / ``.pth`` file holding one ``HQQLinear.state_dict()`` (raw or safetensors-encoded), which
# loads as that single layer. Files go through ``torch.load(weights_only=True)`` only, and the dtype
# names of a state are decoded from an allow-list (:func:`_decode_state`).
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterable  # noqa: E402

from ..checkpoint.description import layer_adapter  # noqa: E402
from ..checkpoint.files import confined_file  # noqa: E402
from ..checkpoint.native import (check_method, config_summary, fill_tensors, finish_model,  # noqa: E402
                                 linear_layers, native_skeleton, restore_layers, submodule)
from ..errors import CheckpointError  # noqa: E402

_HQQ_WEIGHTS = "qmodel.pt"
_PT_SUFFIXES = (".pt", ".pth")


def _is_hqq(path: Path) -> bool:
    if path.is_dir():
        return (path / _HQQ_WEIGHTS).is_file()
    return path.suffix in _PT_SUFFIXES


def _torch_load(file: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain values only, never arbitrary objects."""
    import pickle

    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line),
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise CheckpointError(f"{file}: refused to load: it holds pickled objects other than tensors and plain values "
                              f"({detail}). Files are read with torch.load(weights_only=True) only, which never runs "
                              f"pickled code. If you wrote the file and trust it, re-save the state with plain values: "
                              f"tensors, ints, floats, bools, strings, torch dtypes and torch.Size, in dicts (what "
                              f"HQQLinear.state_dict() and hqq's save_quantized produce)") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable torch.save file ({type(e).__name__}: {e})") from e


def _is_layer_state(data: Any) -> bool:
    return isinstance(data, dict) and "W_q" in data


def _encode_hqq_state(where: str, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """hqq's raw layer state (ints, strings, dtypes, ``torch.Size``) in its safetensors encoding --
    what :meth:`HQQAdapter.load_layer_state` decodes from an allow-list -- as
    ``hqq.core.utils.encode_safetensor_type`` writes it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.detach()
        elif isinstance(value, bool):
            out[key] = torch.tensor(int(value), dtype=torch.uint8)
        elif isinstance(value, torch.Size):
            out[key] = torch.tensor(list(value))
        elif isinstance(value, int):
            out[key] = torch.tensor(value, dtype=torch.int32)
        elif isinstance(value, float):
            out[key] = torch.tensor(value, dtype=torch.float32)
        elif isinstance(value, torch.dtype):
            out[key] = torch.tensor(list(str(value).encode("ascii")), dtype=torch.uint8)
        elif isinstance(value, str):
            out[key] = torch.tensor(list(value.encode("ascii")), dtype=torch.uint8)
        elif value is None and key == "group_size":
            continue  # one group per row/column: filled in below from the shape and axis
        else:
            raise CheckpointError(f"{where}: HQQ state value {key!r} is a {type(value).__name__}; expected tensors, "
                                  f"ints, bools, strings, dtypes or torch.Size")
    if "group_size" not in out and "shape" in out and "axis" in out:
        out_features, in_features = (int(v) for v in out["shape"].tolist())
        group = in_features if int(out["axis"].item()) == 1 else out_features
        out["group_size"] = torch.tensor(group, dtype=torch.int32)
    return out


def _hqq_layer_settings(where: str, state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], bool, torch.Size]:
    """The :class:`QuantizationConfig` fields one hqq layer state implies, its bias flag and shape."""
    try:
        raw = _decode_state(dict(state))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e
    storage = raw["W_q"].dtype if raw["view_as_float"] else None
    settings = {"bits": raw["nbits"], "group_size": raw["group_size"], "compute_dtype": raw["compute_dtype"],
                "storage_dtype": storage, "axis": raw["axis"]}
    return settings, "bias" in raw, raw["shape"]


def _hqq_options(settings: dict[str, Any]) -> dict[str, Any]:
    return {"axis": settings["axis"]} if settings["axis"] != 1 else {}


def _hqq_layer_config(where: str, settings: dict[str, Any]) -> QuantizationConfig:
    fields = {k: v for k, v in settings.items() if k != "axis"}
    try:
        return QuantizationConfig(method="hqq", backend_options=_hqq_options(settings), **fields)
    except ValueError as e:
        raise CheckpointError(f"{where}: the HQQ layer's settings are not supported: {e}") from e


def _hqq_single_layer(file: Path, state: dict[str, Any], backend) -> nn.Module:
    encoded = _encode_hqq_state(str(file), state)
    settings, bias, shape = _hqq_layer_settings(str(file), encoded)
    config = _hqq_layer_config(str(file), settings)
    adapter = HQQAdapter(config, backend)
    out_features, in_features = shape
    try:
        empty = adapter.create_quantized_linear(in_features, out_features, bias, device="meta",
                                                dtype=settings["compute_dtype"])
        return adapter.load_layer_state(empty, encoded).eval()
    except ValueError as e:
        raise CheckpointError(f"{file}: the HQQ layer could not be restored: {e}") from e


def load_hqq_checkpoint(path: str | os.PathLike, model_config: Any = None, *, device: str | torch.device = "cpu",
                        backend=None, expected_methods: Iterable | None = None, verify: bool = True) -> nn.Module:
    """Load hqq's own serialization.

    Args:
        path: a directory written by hqq's ``AutoHQQHFModel.save_quantized`` (``qmodel.pt`` +
            ``config.json``), or a ``.pt`` / ``.pth`` file holding either one
            ``HQQLinear.state_dict()`` (raw or encoded) or hqq's ``{module name: state}`` dict
            (then ``model_config`` is needed).
        model_config: the architecture (see
            :func:`~quantization_wrapper.checkpoint.native.load_native_checkpoint`).
        device: where to place the result.
        backend: backend for the adapter (``None``: detect).
        expected_methods: raise unless ``hqq`` is one of these.
        verify: accepted for symmetry with ``load_quantized_model``; native files carry no checksums.

    Returns:
        For one layer state: that layer (an ``HQQLinear``). Otherwise the model in eval mode, its
        ``HQQLinear`` layers those whose state holds ``W_q``, with its ``quantization_plan`` and
        ``quantization_config`` (method ``hqq``; per-layer bits, group size, axis, storage dtype
        in ``layer_configs``).

    Raises:
        CheckpointError: a file that needs more than ``torch.load(weights_only=True)``, missing
            files, layers or tensors, states hqq cannot load faithfully (all named).
    """
    path = Path(path)
    config_json = None
    if path.is_dir():
        file = confined_file(path, _HQQ_WEIGHTS, "the checkpoint")
        if not file.is_file():
            raise CheckpointError(f"{path}: no {_HQQ_WEIGHTS}; hqq's save_quantized writes the weights there")
        if model_config is None:
            config_file = confined_file(path, "config.json", "the checkpoint")
            if not config_file.exists():
                raise CheckpointError(f"{path}: no config.json beside {_HQQ_WEIGHTS}; pass model_config")
            try:
                config_json = json.loads(config_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{config_file}: invalid JSON ({e})") from e
    else:
        file = path
        if not file.is_file():
            raise CheckpointError(f"checkpoint not found: {file}")
    data = _torch_load(file)
    if _is_layer_state(data):
        if expected_methods is not None:
            check_method(file, QuantizationConfig(method="hqq"), expected_methods)
        layer = _hqq_single_layer(file, data, backend)
        return layer if torch.device(device).type == "cpu" else layer.to(device)
    if not isinstance(data, dict) or not data or not all(isinstance(k, str) and isinstance(v, dict)
                                                         for k, v in data.items()):
        raise CheckpointError(f"{file}: expected hqq's layout, {{module name: state dict}} (save_quantized) or one "
                              f"HQQLinear state dict with 'W_q'; got {type(data).__name__}"
                              f"{' with keys ' + str(list(data)[:5]) if isinstance(data, dict) else ''}")
    model = native_skeleton(path, config_json, model_config)
    linears = linear_layers(model)
    layers: dict[str, dict[str, Any]] = {}
    encoded: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, state in data.items():
        module = submodule(file, model, name, "the weights file")
        where = f"{file}: layer {name!r}"
        if "W_q" not in state:
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
                rest[f"{name}.{key}" if name else key] = value.detach()
            continue
        if not isinstance(module, nn.Linear):
            raise CheckpointError(f"{where} is an HQQ layer in the checkpoint but a {type(module).__name__} in the "
                                  f"architecture")
        encoded[name] = _encode_hqq_state(where, state)
        settings, bias, shape = _hqq_layer_settings(where, encoded[name])
        if tuple(shape) != (module.out_features, module.in_features) or bias != (module.bias is not None):
            raise CheckpointError(f"{where} is {shape[0]}x{shape[1]} ({'with' if bias else 'no'} bias) in the "
                                  f"checkpoint, {module.out_features}x{module.in_features} "
                                  f"({'with' if module.bias is not None else 'no'} bias) in the architecture")
        layers[name] = settings
    if not layers:
        raise CheckpointError(f"{file}: no HQQ layer (no state with 'W_q'); nothing is quantized")

    skip = [n for n in linears if n not in layers]
    try:
        config = config_summary(lambda s: QuantizationMethod.HQQ, layers, skip, _hqq_options)
    except ValueError as e:
        raise CheckpointError(f"{file}: the HQQ layers' settings are not supported: {e}") from e
    check_method(file, config, expected_methods)
    adapter = layer_adapter(config, "hqq", backend, {})
    decisions = restore_layers(file, model, adapter, config, linears, layers, encoded, "hqq")
    fill_tensors(file, model, rest)
    return finish_model(model, adapter, decisions, device)


def _native_readers(cls) -> dict:
    """hqq's ``save_quantized`` directories and ``.pt`` / ``.pth`` files (see above)."""
    return {"hqq": (_is_hqq, load_hqq_checkpoint)}


HQQAdapter.native_readers = classmethod(_native_readers)
