"""bitsandbytes adapter: 4-bit NF4/FP4 (``bnb.nn.Linear4bit``) and LLM.int8() (``bnb.nn.Linear8bitLt``).

Layers are quantized when they are built, on CPU exactly as on CUDA: the weight becomes a
``Params4bit`` holding packed 4-bit data plus its ``QuantState`` (absmax, quant map and, with
double quantization, the nested absmax/quant map/offset), or an ``Int8Params`` holding the int8
rows (``CB``) and their fp32 absmax (``SCB``). No full-precision copy of the weight is kept.

Choices worth knowing:

* **Bias.** 4-bit layers keep the bias in the compute dtype: ``Linear4bit.forward`` casts it to
  that dtype on its first call anyway, so storing it that way keeps the module (its bytes and its
  state dict) unchanged by running it. INT8 layers keep the bias in the linear's own dtype
  (``Linear8bitLt`` has no compute dtype; it casts the bias to the input's dtype).
* **Compute dtype.** ``config.compute_dtype``, else the dtype of the linear being quantized
  (``torch.float32`` for an empty layer built without ``dtype``). It is always set explicitly, so
  ``Linear4bit`` never switches it on the fly.
* **CPU packed inference is off.** On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit
  weight in place on its first eval-mode forward: it drops double quantization, stores absmax in
  bfloat16 (changing the outputs and the bytes held), makes saving lossy, and fails with an
  ``AssertionError`` unless ``out_features`` is a multiple of 32. The adapter switches that path off
  per layer (``support_avx512bf16_for_cpu = False``) so a layer computes the same thing in train and
  eval mode, and save/load round trips are exact.
* **Autocast.** Under ``torch.autocast`` a layer computes in, and returns, the autocast dtype, as
  ``nn.Linear`` does (bitsandbytes' own forward returns the input's dtype, and its INT8 forward
  would cast the bias in place to whatever dtype the input has); outside autocast the layers run
  bitsandbytes' forward unchanged.
* **Serialization** uses transformers' bitsandbytes key names (``weight``, ``weight.absmax``,
  ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
  ``weight.quant_state.bitsandbytes__nf4``; INT8: ``weight``, ``SCB``, ``weight_format``), produced
  and read by bitsandbytes' own ``QuantState.as_dict(packed=True)`` / ``Params4bit.from_prequantized``.

``backend_options``: ``llm_int8_threshold`` (float >= 0, default 6.0): the LLM.int8() outlier
threshold of INT8 layers; input columns with a value above it are multiplied in fp16. It acts in
eval mode (on CPU, bitsandbytes' training path multiplies by the dequantized weight). Other keys are
rejected.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from ..config import QuantizationConfig, QuantizationMethod, dtype_to_str, register_config
from ..methods import (
    PACKED_FSDP_STORAGE,
    FSDPSupport,
    MethodSpec,
    RecommendationCandidate,
    Support,
    register_method,
    replace_spec,
)
from ..errors import CheckpointError
from .base import LayerStateSpec, QuantizationAdapter, autocast_dtype, register_adapter, tensor_nbytes

if TYPE_CHECKING:  # pragma: no cover
    from backend_manager import Backend

    from ..validation import ValidationIssue

__all__ = ["BitsAndBytesAdapter", "BNB_BACKEND_OPTIONS", "BNB_METHOD_SPECS"]


# ---------------------------------------------------------------------- what the package knows
M = QuantizationMethod
# bitsandbytes block sizes for 4-bit: powers of two it has kernels for.
_BNB_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_CUDA = Support(True, "bitsandbytes CUDA kernels.", True)
_APPLE = Support(False, "bitsandbytes has no supported Apple GPU backend; use QUANTO_INT4/HQQ/MLX.", False)
_CPU = Support(True, "bitsandbytes >= 0.48 ships CPU kernels (measured here with 0.50); the design "
                     "document predates them.", False)
_SUPPORT = {"cuda": _CUDA, "mps": _APPLE, "mlx": _APPLE, "cpu": _CPU}

def _normalize_4bit(config: QuantizationConfig) -> None:
    if config.quant_type not in (None, "nf4", "fp4"):
        raise ValueError(f"quant_type={config.quant_type!r} is not valid; allowed: nf4, fp4")
    implied = "fp4" if config.method is M.BNB_FP4 else "nf4"
    if config.quant_type not in (None, implied):
        other = "bnb_fp4" if implied == "nf4" else "bnb_nf4"
        raise ValueError(f"quant_type={config.quant_type!r} contradicts method={config.method.value!r}; "
                         f"use method={other!r} instead")
    config.quant_type = implied
    if config.double_quant is None:
        config.double_quant = True


def _bits_4bit(config: QuantizationConfig, in_features: int) -> float:
    if config.double_quant:  # uint8 absmax per block, then an fp32 absmax and fp32 offset per 256 blocks
        return config.bits + 8 / config.group_size + 32 / (config.group_size * 256)
    return config.bits + 32 / config.group_size


_NESTED_BLOCK = 256  # bitsandbytes quantizes the 4-bit absmax again in blocks of 256
_NESTED_CODE = 256  # entries of the dynamic map the nested absmax uses (fp32)
_CODE = 16  # entries of the NF4/FP4 quant map (fp32)


def _nbytes_4bit(config: QuantizationConfig, in_features: int, out_features: int, bias: bool,
                 weight_dtype: torch.dtype, cdt: int) -> int:
    numel = in_features * out_features
    blocks = math.ceil(numel / config.group_size)
    if config.double_quant:
        stats = blocks + math.ceil(blocks / _NESTED_BLOCK) * 4 + _NESTED_CODE * 4 + 4
    else:
        stats = blocks * 4
    return (numel + 1) // 2 + stats + _CODE * 4 + (out_features * cdt if bias else 0)


def _nbytes_int8(config: QuantizationConfig, in_features: int, out_features: int, bias: bool,
                 weight_dtype: torch.dtype, cdt: int) -> int:
    # int8 rows + fp32 row scales; Linear8bitLt keeps the bias in the layer's own dtype
    return in_features * out_features + out_features * 4 + (out_features * weight_dtype.itemsize if bias else 0)


_NF4 = MethodSpec(
    "bitsandbytes", (4,), 4, _BNB_BLOCKS, 64, "bitsandbytes 4-bit NormalFloat (QLoRA)",
    support=_SUPPORT,
    fallback=((M.QUANTO_INT4, 4), (M.HQQ, 4), (M.MLX_INT4, 4), (M.NONE, None)),
    fsdp=FSDPSupport("sharded", "sharded", PACKED_FSDP_STORAGE,
                     "packed 4-bit data sharded; QuantState (absmax, code) whole on each rank; "
                     "the layer restores Params4bit from module.quant_state",
                     "tests/test_fsdp.py: FSDP2 (uint8 storage), FSDP1 (float32 storage)"),
    bits_per_weight=_bits_4bit,
    layer_nbytes=_nbytes_4bit,
    candidates=(RecommendationCandidate(("cuda",), 30, dict(double_quant=True)),),
    mixed_precision=(dict(method="bnb_nf4"), dict(method="bnb_int8"), dict(method="none")),
    normalize=_normalize_4bit,
    options=("double_quant", "quant_type"),
    precision_tiers={"high": {"method": "bnb_int8"}, "low": {"method": "bnb_nf4"}, "default": {"method": "bnb_int8"}},
)
#: The three bitsandbytes methods, as this module declares them to :mod:`quantization_wrapper.methods`.
BNB_METHOD_SPECS = {
    M.BNB_NF4: _NF4,
    M.BNB_FP4: replace_spec(
        _NF4, description="bitsandbytes 4-bit float",
        support={k: Support(v.supported, v.reason, None) for k, v in _SUPPORT.items()},
        fallback=((M.BNB_NF4, 4), (M.QUANTO_INT4, 4), (M.HQQ, 4), (M.MLX_INT4, 4), (M.NONE, None)),
        fsdp=FSDPSupport("sharded", "sharded", PACKED_FSDP_STORAGE, "as bnb_nf4", "same layer type as bnb_nf4"),
        candidates=(), mixed_precision=(), precision_tiers={}),
    M.BNB_INT8: MethodSpec(
        "bitsandbytes", (8,), 8, None, None, "bitsandbytes LLM.int8() row-wise absmax",
        support=_SUPPORT,
        fallback=((M.QUANTO_INT8, 8), (M.HQQ, 8), (M.MLX_INT8, 8), (M.NONE, None)),
        fsdp=FSDPSupport("sharded", "replicated", "ignored (always int8)",
                         "int8 rows (the Int8Params weight) sharded; row scales (SCB) kept in module.state, whole "
                         "on each rank; each forward multiplies with the weight FSDP gathered. FSDP1 cannot flatten "
                         "int8: left out of its units", "tests/test_fsdp.py: FSDP2, plain fully_shard; by hand: FSDP1"),
        bits_per_weight=lambda config, in_features: 8 + 32 / in_features,  # fp32 row scale (SCB)
        layer_nbytes=_nbytes_int8,
        candidates=(RecommendationCandidate(("cuda",), 20, {}, inference_only=True),),
    ),
}
for _method, _spec in BNB_METHOD_SPECS.items():
    register_method(_method, _spec)
register_config("nf4", dict(method="bnb_nf4", double_quant=True, compute_dtype="bfloat16"))
register_config("fp4", dict(method="bnb_fp4", double_quant=True, compute_dtype="bfloat16"))
register_config("int8", dict(method="bnb_int8"))

_BNB_4BIT = (M.BNB_NF4, M.BNB_FP4)
# Block sizes bitsandbytes' quantize_4bit accepts (bitsandbytes.functional.quantize_4bit).
_BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# quant_storage dtypes transformers documents for bnb_4bit_quant_storage (the packed bytes are
# reinterpreted, never converted).
_BNB_QUANT_STORAGE = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
_NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the 4-bit absmax in blocks of 256
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT8_DEFAULT_THRESHOLD = 6.0

BNB_BACKEND_OPTIONS: dict[str, str] = {
    "llm_int8_threshold": "LLM.int8() outlier threshold of bnb_int8 layers (float >= 0, default 6.0; "
                          "0 disables the fp16 outlier path)",
}


#: Weights per call of bitsandbytes' int8 quantizer on the CPU (see :func:`_int8_rowwise_quant`).
_INT8_CPU_SLICE = 1 << 20


def _int8_rowwise_quant(bnb, weight: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CB, SCB)``: bitsandbytes' ``int8_vectorwise_quant`` of ``weight`` in float16 on ``device``.

    On the CPU the op is a handful of whole-tensor torch ops with float32 temporaries (about 25
    bytes of memory traffic per weight). It scales each row by its own absmax, so it is called on
    slices of about a million weights, whose temporaries stay in cache: the same bytes, 2.3x
    faster on a 5632x2048 layer. Other devices get one call (their kernels are fused).
    """
    if device.type != "cpu":
        CB, SCB, _ = bnb.functional.int8_vectorwise_quant(
            weight.to(device=device, dtype=torch.float16).contiguous())
        return CB, SCB
    rows, cols = weight.shape
    CB = torch.empty(rows, cols, dtype=torch.int8)
    SCB = torch.empty(rows, dtype=torch.float32)
    step = max(1, _INT8_CPU_SLICE // max(1, cols))
    for start in range(0, rows, step):
        part = weight[start:start + step].to(device=device, dtype=torch.float16).contiguous()
        c, s, _ = bnb.functional.int8_vectorwise_quant(part)
        CB[start:start + step] = c
        SCB[start:start + step] = s
    return CB, SCB


#: Weights per call of bitsandbytes' 4-bit quantizer on the CPU (see :func:`_quantize_4bit_sliced`).
_4BIT_CPU_SLICE = 1 << 18


def _quantize_4bit_sliced(bnb, weight: torch.Tensor, *, blocksize: int, compress_statistics: bool,
                          quant_type: str, quant_storage: torch.dtype) -> tuple[torch.Tensor, Any]:
    """``bnb.functional.quantize_4bit`` for a CPU weight, its blockwise op run on slices.

    bitsandbytes' CPU op is whole-tensor torch code (float32 copy, absmax, scaling, bucketize,
    packing); on slices of 256K weights, whole blocks each, its temporaries stay in cache and it
    runs 25% faster. The op's blocks and nibble pairs never straddle a slice, so the packed bytes
    and absmax are the whole call's; the statistics are then compressed over the whole layer as
    ``quantize_4bit`` does (``test_4bit_in_slices_equals_bitsandbytes_whole_layer`` holds the two
    to the same bytes).
    """
    F = bnb.functional
    flat = weight.contiguous().reshape(-1)
    step = _4BIT_CPU_SLICE // (blocksize * 8) * (blocksize * 8)  # whole blocks, whole storage words
    parts = [torch.ops.bitsandbytes.quantize_4bit.default(flat[i:i + step], blocksize, quant_type, quant_storage)
             for i in range(0, flat.numel(), step)]
    packed = torch.cat([p[0] for p in parts])
    absmax = torch.cat([p[1] for p in parts])
    del parts
    code = F.get_4bit_type(quant_type, device=weight.device)
    if compress_statistics:
        offset = absmax.mean()
        qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
        state = F.QuantState(absmax=qabsmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code,
                             quant_type=quant_type, offset=offset, state2=state2)
    else:
        state = F.QuantState(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code,
                             quant_type=quant_type)
    return packed, state


@functools.lru_cache(maxsize=1)
def _bnb():
    """Import bitsandbytes once (never at module import)."""
    quiet = _DropRecords("kernels-community")
    cpu_ops_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    # bitsandbytes logs at import that the optional `kernels` package is missing; it only speeds up
    # the AVX512-BF16 packed CPU path, which this adapter switches off (see the module docstring).
    cpu_ops_logger.addFilter(quiet)
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError("BitsAndBytesAdapter needs bitsandbytes; install it with "
                          "`pip install 'bitsandbytes>=0.48'` (CPU support needs >= 0.48)") from e
    finally:
        cpu_ops_logger.removeFilter(quiet)
    return bitsandbytes


@contextlib.contextmanager
def _cast_message_once():
    """LLM.int8() logs "inputs will be cast ... to float16" on *every* forward with non-fp16 inputs;
    our int8 layers say it once per process instead of flooding training logs. The filter sits on
    bitsandbytes' logger only during their forward, so the user's logging is otherwise untouched."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    added = _CAST_ONCE not in log.filters  # a nested forward leaves the outer one's filter alone
    if added:
        log.addFilter(_CAST_ONCE)
    try:
        yield
    finally:
        if added:
            log.removeFilter(_CAST_ONCE)


@functools.cache
def _layer_classes() -> tuple[type, type]:
    """bitsandbytes' ``Linear4bit`` and ``Linear8bitLt`` (subclasses of the same names, so every
    ``isinstance`` check, peft's included, holds) whose forward under ``torch.autocast`` computes in,
    and returns, the autocast dtype, as ``nn.Linear`` does. Outside autocast: bitsandbytes' forward."""
    bnb = _bnb()

    class Linear4bit(bnb.nn.Linear4bit):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            dtype = autocast_dtype(x)
            if dtype is None:
                return super().forward(x)
            # bitsandbytes' forward would compute in the compute dtype and return the input's dtype
            bnb.nn.modules.fix_4bit_weight_quant_state_from_module(self)
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = bnb.matmul_4bit(x.to(dtype), self.weight, quant_state=self.weight.quant_state)
                # the bias is added outside: bitsandbytes' backward sums its gradient over dim 0 only
                return out if self.bias is None else out + self.bias.to(dtype)

    class Linear8bitLt(bnb.nn.Linear8bitLt):
        """bitsandbytes' ``Linear8bitLt`` whose int8 rows live only in its ``weight`` parameter.

        bitsandbytes' forward moves ``CB``/``SCB`` from the ``Int8Params`` into ``module.state``
        (``init_8bit_state``) and multiplies with ``state.CB``, an alias of the whole weight
        that FSDP cannot see. This forward gives each call its own ``MatmulLtState`` whose ``CB``
        is the weight tensor the layer holds now (the ``Int8Params``, or under FSDP2 the plain
        tensor ``fully_shard`` all-gathered) and whose ``SCB`` is the row scales, which the
        layer keeps in ``module.state.SCB`` (whole: 4 bytes per row) so that they survive
        sharding, which drops the ``Int8Params`` attributes; as in bitsandbytes, the first
        forward moves them there from the weight. Same kernels, same numbers.
        """

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with _cast_message_once():
                return self._forward(x)

        def call_state(self):
            """This call's ``MatmulLtState``: the module's settings, ``CB`` the weight held now."""
            weight = self.weight
            module_state = self.state
            scb = getattr(weight, "SCB", None)
            if scb is not None:
                # bitsandbytes' init_8bit_state, but CB stays the weight's own data: the weight's
                # scales move to the module (a new weight brings new ones)
                module_state.SCB = scb
                weight.CB = weight.SCB = None
            else:
                scb = module_state.SCB
            if scb is None:
                raise RuntimeError("this Linear8bitLt has no row scales (SCB): it was never quantized")
            module_state.CB = None  # never an alias of the whole weight beside the parameter
            state = copy.copy(module_state)
            state.CB = weight.data
            state.SCB = scb if scb.device == state.CB.device else scb.to(state.CB.device)
            state.is_training = module_state.is_training = self.training
            return state

        def _forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.state.has_fp16_weights:
                return super().forward(x)
            state = self.call_state()
            dtype = autocast_dtype(x)
            if dtype is None:
                # bitsandbytes' forward (which casts the bias to the input's dtype in place)
                if self.bias is not None and self.bias.dtype != x.dtype:
                    self.bias.data = self.bias.data.to(x.dtype)
                return bnb.matmul(x, self.weight, bias=self.bias, state=state)
            # bitsandbytes' forward, except that it casts the bias to the input's dtype in place:
            # under autocast the inputs come in several dtypes, and the bias would be rounded for good.
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = bnb.matmul(x.to(dtype), self.weight, state=state)
                return out if self.bias is None else out + self.bias.to(dtype)

    for cls in (Linear4bit, Linear8bitLt):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return Linear4bit, Linear8bitLt


def __getattr__(name: str) -> Any:
    # ``Linear4bit``/``Linear8bitLt`` exist once bitsandbytes is imported; this makes them
    # importable (and layers picklable by name) without importing it when this module loads.
    if name in ("Linear4bit", "Linear8bitLt"):
        return _layer_classes()[name == "Linear8bitLt"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _DropRecords(logging.Filter):
    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in str(record.msg)


class _Once(logging.Filter):
    def __init__(self, needle: str):
        super().__init__()
        self.needle, self.seen = needle, False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.needle not in str(record.msg):
            return True
        first, self.seen = not self.seen, True
        return first


_CAST_ONCE = _Once("inputs will be cast")


def _option_problems(config: QuantizationConfig) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """``(errors, warnings)`` of one (per-layer) config, each ``(field, message, suggestion)``."""
    errors: list[tuple[str, str, str]] = []
    warns: list[tuple[str, str, str]] = []
    options = config.backend_options
    unknown = sorted(set(options) - set(BNB_BACKEND_OPTIONS))
    if unknown:
        errors.append(("backend_options",
                       f"bitsandbytes does not know the backend_options {unknown}; allowed: "
                       f"{', '.join(BNB_BACKEND_OPTIONS)}.",
                       "remove them (compute_dtype, storage_dtype, double_quant and group_size are "
                       "config fields, not backend_options)."))
    if "llm_int8_threshold" in options:
        value = options["llm_int8_threshold"]
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value < 0):
            errors.append(("backend_options",
                           f"llm_int8_threshold={value!r} is not a finite number >= 0.",
                           f"use e.g. {_INT8_DEFAULT_THRESHOLD} (the default) or 0.0 to disable the "
                           f"outlier path."))
    if config.method in _BNB_4BIT:
        if config.group_size not in _BNB_BLOCKSIZES:
            errors.append(("group_size",
                           f"group_size={config.group_size} is not a bitsandbytes 4-bit block size; "
                           f"allowed: {', '.join(map(str, _BNB_BLOCKSIZES))}.",
                           "use group_size=64 (the QLoRA default)."))
        if config.storage_dtype is not None and config.storage_dtype not in _BNB_QUANT_STORAGE:
            errors.append(("storage_dtype",
                           f"storage_dtype={dtype_to_str(config.storage_dtype)} is not a bitsandbytes "
                           f"quant_storage dtype; allowed: "
                           f"{', '.join(dtype_to_str(d) for d in _BNB_QUANT_STORAGE)}.",
                           "use the model's float dtype (e.g. bfloat16) for FSDP, or leave it unset "
                           "(uint8)."))
    elif config.method is M.BNB_INT8:
        if config.storage_dtype is not None:
            warns.append(("storage_dtype",
                          f"storage_dtype={dtype_to_str(config.storage_dtype)} is ignored by bnb_int8: "
                          f"Linear8bitLt always stores int8 weights, which FSDP cannot shard together "
                          f"with float parameters.",
                          "leave storage_dtype unset, or use bnb_nf4 with storage_dtype=bfloat16 for "
                          "FSDP."))
        if config.compute_dtype is not None:
            warns.append(("compute_dtype",
                          f"compute_dtype={dtype_to_str(config.compute_dtype)} is ignored by bnb_int8: "
                          f"LLM.int8() multiplies in the input's dtype.",
                          "leave compute_dtype unset and cast the model instead."))
    return errors, warns


def _uses_int8(config: QuantizationConfig) -> bool:
    return config.method is M.BNB_INT8 or any(
        M.parse(o["method"]) is M.BNB_INT8 for o in config.layer_configs.values() if "method" in o)


@register_adapter(M.BNB_NF4, M.BNB_FP4, M.BNB_INT8)
class BitsAndBytesAdapter(QuantizationAdapter):
    """bitsandbytes NF4/FP4 (QLoRA) and LLM.int8() layers.

    Config fields used: ``quant_type`` (from the method), ``group_size`` -> ``blocksize``,
    ``double_quant`` -> ``compress_statistics``, ``compute_dtype``, ``storage_dtype`` ->
    ``quant_storage`` (default ``torch.uint8``); INT8 takes ``backend_options["llm_int8_threshold"]``.
    Any weight shape works: bitsandbytes blocks the flattened weight.

    Raises:
        ValueError: at construction (and per layer) for options bitsandbytes cannot honour; the same
            problems are reported by :func:`~quantization_wrapper.validate_quantization_config`.
    """

    peft_native = True  # peft's bnb LoRA layers; "all-linear" finds Linear4bit / Linear8bitLt

    @classmethod
    def prepare_for_fsdp(cls, module: nn.Module) -> bool:
        """Give a ``Linear4bit`` the ``module.quant_state`` its forward rebuilds the weight from once
        FSDP has replaced the ``Params4bit`` by a plain tensor; give a ``Linear8bitLt`` its row
        scales in ``module.state.SCB`` (sharding drops the ``Int8Params`` attributes) and drop a
        ``module.state.CB`` left by bitsandbytes' own forward (an alias of the whole int8 weight
        that would stay on every rank)."""
        if isinstance(module, _bnb().nn.Linear8bitLt):
            scb = getattr(module.weight, "SCB", None)
            fixed = (scb is not None and module.state.SCB is not scb) or module.state.CB is not None
            if scb is not None:
                module.state.SCB = scb
            module.state.CB = None
            if module.state.SCB is None:
                raise ValueError("bitsandbytes Linear8bitLt has no row scales (SCB): it was never quantized, "
                                 "and FSDP cannot shard it")
            return fixed
        if not hasattr(module.weight, "quant_state") and not hasattr(module, "quant_state"):
            return False
        state = getattr(module.weight, "quant_state", None)
        fixed = getattr(module, "quant_state", None) is None and state is not None
        if fixed:
            module.quant_state = state
        if getattr(module, "quant_state", None) is None:
            raise ValueError(f"bitsandbytes layer {type(module).__name__} has no quant_state: it was never "
                             f"quantized, and FSDP cannot shard it")
        return fixed

    library = "bitsandbytes"
    library_module = "bitsandbytes"

    def __init__(self, config: QuantizationConfig | None = None, backend: "Backend | str | None" = None,
                 *, device: torch.device | str | None = None):
        super().__init__(config, backend, device=device)
        self._checked(self.config)

    # ------------------------------------------------------------------ validation
    @classmethod
    def check_config(cls, config: QuantizationConfig, backend: "Backend") -> list["ValidationIssue"]:
        """Options bitsandbytes cannot honour, for the config and its bitsandbytes overrides.

        Errors: unknown ``backend_options`` keys, a bad ``llm_int8_threshold``, a 4-bit block size
        or ``storage_dtype`` bitsandbytes has no kernel for. Warnings: ``storage_dtype`` or
        ``compute_dtype`` on INT8 (ignored), ``llm_int8_threshold`` when no layer is INT8. A
        ``layer_configs`` override is checked for the fields it sets itself.
        """
        from ..validation import Severity, ValidationIssue

        issues: list[ValidationIssue] = []
        seen: set[str] = set()

        def add(severity: Severity, field: str, message: str, suggestion: str) -> None:
            issue = ValidationIssue(severity, field, message, suggestion)
            if str(issue) not in seen:
                seen.add(str(issue))
                issues.append(issue)

        targets: list[tuple[str, QuantizationConfig, set[str] | None]] = [("", config, None)]
        for pattern, overrides in config.layer_configs.items():
            layer = config.with_overrides(overrides)
            if layer.method in cls.methods:
                # A method switch makes an inherited storage_dtype matter to this layer.
                own = set(overrides) | ({"storage_dtype"} if "method" in overrides else set())
                targets.append((f"layer_configs[{pattern!r}].", layer, own))
        for prefix, layer, own in targets:
            if layer.method not in cls.methods:
                continue
            errors, warns = _option_problems(layer)
            for severity, problems in ((Severity.ERROR, errors), (Severity.WARNING, warns)):
                for field, message, suggestion in problems:
                    if own is not None and field not in own:
                        continue  # inherited: reported on the top-level field
                    add(severity, prefix + field, message, suggestion)
        if "llm_int8_threshold" in config.backend_options and not _uses_int8(config):
            add(Severity.WARNING, "backend_options",
                f"llm_int8_threshold is ignored: no layer uses bnb_int8 ({config.method.value} only).",
                "remove it, or route layers to bnb_int8 with layer_configs.")
        return sorted(issues, key=lambda i: not i.is_error)

    def _checked(self, config: QuantizationConfig) -> QuantizationConfig:
        if config.method not in self.methods:
            raise ValueError(f"BitsAndBytesAdapter serves {', '.join(m.value for m in self.methods)}; "
                             f"got method={config.method.value!r}")
        errors, _ = _option_problems(config)
        if errors:
            raise ValueError("bitsandbytes cannot use this config: " + " ".join(
                f"{field}: {message} Fix: {suggestion}" for field, message, suggestion in errors))
        return config

    @classmethod
    def quantized_module_types(cls) -> tuple[type, ...]:
        bnb = _bnb()
        return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)

    def fit_group_size(self, in_features: int, out_features: int,
                       config: QuantizationConfig) -> tuple[QuantizationConfig | None, str | None]:
        """bitsandbytes blocks the flattened weight (the last block may be partial), so every shape
        fits every block size. The one exception: a float ``storage_dtype`` must hold the packed
        bytes exactly, which an odd count of packed bytes cannot."""
        if config.method is M.BNB_INT8:
            return config, None
        storage = config.storage_dtype or torch.uint8
        packed_bytes = (in_features * out_features + 1) // 2
        if packed_bytes % storage.itemsize:
            return None, (f"{packed_bytes} packed bytes cannot be stored as "
                          f"{dtype_to_str(storage)}; layer kept in full precision")
        return config, None

    # ------------------------------------------------------------------ layer level
    def quantize_linear(self, linear: nn.Linear, name: str | None = None, *,
                        config: QuantizationConfig | None = None) -> nn.Module:
        config = self._checked(self.layer_config(name, config))
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantize_linear expects an nn.Linear, got {type(linear).__name__}")
        if self.is_quantized_module(linear):
            raise ValueError(f"{name or 'the layer'} is already a {type(linear).__name__}")
        weight = linear.weight
        if weight.device.type == "meta":
            raise ValueError(f"{name or 'the layer'} is on the meta device (no weights to quantize); "
                             f"use create_quantized_linear for an empty layer")
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"bitsandbytes quantizes float32/float16/bfloat16 weights; "
                             f"{name or 'the layer'} is {dtype_to_str(weight.dtype)}: cast the model first")
        device = self.device or weight.device
        if config.method is M.BNB_INT8:
            return self._quantize_int8(linear, config, device)
        return self._quantize_4bit(linear, config, device)

    def _quantize_4bit(self, linear: nn.Linear, config: QuantizationConfig, device: torch.device) -> nn.Module:
        bnb = _bnb()
        compute_dtype = config.compute_dtype or linear.weight.dtype
        new = self._empty_4bit(linear.in_features, linear.out_features, linear.bias is not None,
                               config, compute_dtype)
        options = dict(blocksize=config.group_size, compress_statistics=bool(config.double_quant),
                       quant_type=config.quant_type, quant_storage=config.storage_dtype or torch.uint8)
        weight = linear.weight.detach()
        if device.type == "cpu" and weight.numel() > _4BIT_CPU_SLICE:
            data, state = _quantize_4bit_sliced(bnb, weight.to(device), **options)
            new.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, module=new,
                                           bnb_quantized=True, **options)
            new.quant_state = state  # what Params4bit._quantize sets on its module
        else:
            # Params4bit quantizes when moved to a device that is not meta (any device, CPU
            # included); it replaces its own data, so the input linear's weight is only read.
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, module=new, **options).to(device)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().to(device=device, dtype=compute_dtype),
                                    requires_grad=linear.bias.requires_grad)
        return new

    def _quantize_int8(self, linear: nn.Linear, config: QuantizationConfig, device: torch.device) -> nn.Module:
        bnb = _bnb()
        new = self._empty_int8(linear.in_features, linear.out_features, linear.bias is not None,
                               config, linear.weight.dtype)
        # What Int8Params._quantize does, but on `device` directly: bitsandbytes' own `.to()` only
        # quantizes weights that start on the CPU.
        CB, SCB = _int8_rowwise_quant(bnb, linear.weight.detach(), device)
        new.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
        new.state.SCB = SCB  # kept by the module: sharding drops the Int8Params attributes
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().to(device=device),
                                    requires_grad=linear.bias.requires_grad)
        return new

    def _empty_4bit(self, in_features: int, out_features: int, bias: bool, config: QuantizationConfig,
                    compute_dtype: torch.dtype) -> nn.Module:
        new = _layer_classes()[0](in_features, out_features, bias, compute_dtype=compute_dtype,
                                  compress_statistics=bool(config.double_quant), quant_type=config.quant_type,
                                  quant_storage=config.storage_dtype or torch.uint8, device="meta")
        new.support_avx512bf16_for_cpu = False  # see the module docstring
        return new

    def _empty_int8(self, in_features: int, out_features: int, bias: bool, config: QuantizationConfig,
                    source_dtype: torch.dtype) -> nn.Module:
        threshold = float(config.backend_options.get("llm_int8_threshold", _INT8_DEFAULT_THRESHOLD))
        new = _layer_classes()[1](in_features, out_features, bias, has_fp16_weights=False,
                                  threshold=threshold, device="meta")
        # int8 rows carry no dtype; remember the float dtype for dequantize_module.
        new.source_dtype = source_dtype
        return new

    def create_quantized_linear(self, in_features: int, out_features: int, bias: bool = True, *,
                                config: QuantizationConfig | None = None,
                                device: torch.device | str | None = None,
                                dtype: torch.dtype | None = None) -> nn.Module:
        """An empty layer with exactly the tensors :meth:`quantize_linear` would produce (packed
        weight, quant state, bias), allocated on ``device`` (``"meta"``: nothing allocated).

        Args:
            dtype: the dtype of the layer it stands for (default ``torch.float32``); it sets the
                compute dtype when ``config.compute_dtype`` is unset.
        """
        bnb = _bnb()
        config = self._checked(config or self.config)
        device = torch.device(device if device is not None else self.device or "cpu")
        source_dtype = dtype or torch.float32
        if config.method is M.BNB_INT8:
            new = self._empty_int8(in_features, out_features, bias, config, source_dtype)
            CB = torch.empty((out_features, in_features), dtype=torch.int8, device=device)
            SCB = torch.empty((out_features,), dtype=torch.float32, device=device)
            new.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
            new.state.SCB = SCB
            if bias:
                new.bias = nn.Parameter(torch.empty(out_features, dtype=source_dtype, device=device))
            return new

        compute_dtype = config.compute_dtype or source_dtype
        storage = config.storage_dtype or torch.uint8
        new = self._empty_4bit(in_features, out_features, bias, config, compute_dtype)
        n = in_features * out_features
        blocks = -(n // -config.group_size)
        # Same shapes and dtypes as bitsandbytes.functional.quantize_4bit produces.
        data = torch.empty(((n + 1) // (storage.itemsize * 2), 1), dtype=storage, device=device)
        code = torch.empty(16, dtype=torch.float32, device=device)
        if config.double_quant:
            nested = bnb.functional.QuantState(
                absmax=torch.empty(-(blocks // -_NESTED_BLOCKSIZE), dtype=torch.float32, device=device),
                code=torch.empty(256, dtype=torch.float32, device=device),
                blocksize=_NESTED_BLOCKSIZE, dtype=torch.float32)
            absmax = torch.empty(blocks, dtype=torch.uint8, device=device)
            # A 4-byte scalar that bitsandbytes reads with .item() when it writes a state dict (it is
            # saved inside the JSON blob), so it cannot live on meta: a meta skeleton's state_dict()
            # would raise. Everything else stays on `device`.
            offset = torch.zeros((), dtype=torch.float32, device="cpu" if device.type == "meta" else device)
        else:
            nested, offset = None, None
            absmax = torch.empty(blocks, dtype=torch.float32, device=device)
        state = bnb.functional.QuantState(absmax=absmax, shape=torch.Size([out_features, in_features]),
                                          code=code, blocksize=config.group_size,
                                          quant_type=config.quant_type, dtype=source_dtype,
                                          offset=offset, state2=nested)
        new.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=state,
                                       blocksize=config.group_size,
                                       compress_statistics=bool(config.double_quant),
                                       quant_type=config.quant_type, quant_storage=storage,
                                       module=new, bnb_quantized=True)
        new.quant_state = state
        if bias:
            new.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device))
        return new

    def dequantize_module(self, module: nn.Module) -> nn.Linear:
        """An ``nn.Linear`` with the weight the layer multiplies by, in the dtype it was quantized
        from (4-bit: ``quant_state.dtype``; INT8: the linear's dtype), bias kept (cast to it).

        4-bit: ``bitsandbytes.functional.dequantize_4bit``; INT8: ``CB * SCB / 127``.
        """
        bnb = _bnb()
        if isinstance(module, bnb.nn.Linear4bit):
            data, state = _standard_4bit(module)
            weight = bnb.functional.dequantize_4bit(data, state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            CB, SCB = _int8_tensors(module)
            if CB is None or SCB is None:
                raise ValueError("this Linear8bitLt holds no int8 weights (CB/SCB); nothing to dequantize")
            dtype = getattr(module, "source_dtype", None) or (
                module.bias.dtype if module.bias is not None else torch.float32)
            weight = bnb.functional.int8_vectorwise_dequant(CB, SCB).to(dtype)
        else:
            raise ValueError(f"dequantize_module expects a bitsandbytes Linear4bit or Linear8bitLt, "
                             f"got {type(module).__name__}")
        linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.reshape(module.out_features, module.in_features))
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype=weight.dtype, copy=True))
        return linear.to(weight.device)

    # ------------------------------------------------------------------ bytes and state
    def module_nbytes(self, module: nn.Module) -> int:
        """Parameters and buffers plus the tensors bitsandbytes keeps outside them (the 4-bit
        ``QuantState``; INT8 ``SCB``, which moves from the weight to ``module.state`` on the first
        forward)."""
        tensors = list(module.parameters()) + list(module.buffers())
        bnb = _bnb()
        if isinstance(module, bnb.nn.Linear4bit):
            tensors += _quant_state_tensors(getattr(module.weight, "quant_state", None))
        elif isinstance(module, bnb.nn.Linear8bitLt):
            # CB is the weight's own data (bitsandbytes saves it as `weight`); only SCB is extra.
            tensors.append(_int8_tensors(module)[1])
        return tensor_nbytes(tensors)

    def layer_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """bitsandbytes' own state dict (the keys transformers reads and writes), as plain tensors."""
        if not self.is_quantized_module(module):
            raise ValueError(f"layer_state_dict expects a bitsandbytes layer, got {type(module).__name__}")
        return {k: v.detach().as_subclass(torch.Tensor) for k, v in module.state_dict().items()}

    def layer_state_spec(self, in_features: int, out_features: int, bias: bool, state: Mapping[str, torch.Tensor],
                         *, config: QuantizationConfig) -> LayerStateSpec:
        """transformers' bitsandbytes keys with the dtypes and shapes bitsandbytes writes.

        4-bit: ``weight`` (packed, ``storage_dtype`` or ``uint8``, ``(bytes / itemsize, 1)``),
        ``weight.absmax`` (one per block: ``uint8`` with double quantization, else ``float32``),
        ``weight.quant_map`` (16 ``float32``), with double quantization ``weight.nested_absmax``
        (``float32``, one per 256 blocks) and ``weight.nested_quant_map`` (256 ``float32``), the
        ``uint8`` JSON of ``weight.quant_state.bitsandbytes__<quant_type>``, and ``bias`` in the
        compute dtype (``config.compute_dtype``, else the dtype the JSON records). INT8: ``weight``
        ``int8`` ``(out, in)``, ``SCB`` ``float32`` ``(out,)``, ``weight_format`` (a ``uint8``
        scalar) and ``bias`` in the layer's float dtype.
        """
        config = self._checked(config)
        if config.method is M.BNB_INT8:
            spec: dict[str, tuple] = {"weight": (torch.int8, (out_features, in_features)),
                                      "SCB": (torch.float32, (out_features,)),
                                      "weight_format": (torch.uint8, (), True)}
            if bias:
                spec["bias"] = (_FLOAT_DTYPES, (out_features,))
            return spec
        storage = config.storage_dtype or torch.uint8
        n = in_features * out_features
        blocks = -(n // -config.group_size)
        spec = {"weight": (storage, ((n + 1) // (storage.itemsize * 2), 1)),
                "weight.quant_map": (torch.float32, (16,)),
                _quant_state_key(config): (torch.uint8, (None,))}
        if config.double_quant:
            spec["weight.absmax"] = (torch.uint8, (blocks,))
            spec["weight.nested_absmax"] = (torch.float32, (-(blocks // -_NESTED_BLOCKSIZE),))
            spec["weight.nested_quant_map"] = (torch.float32, (256,))
        else:
            spec["weight.absmax"] = (torch.float32, (blocks,))
        if bias:
            spec["bias"] = (config.compute_dtype or _quantized_dtype(state, config) or _FLOAT_DTYPES, (out_features,))
        return spec

    def restore_linear(self, in_features: int, out_features: int, bias: bool, state: dict[str, torch.Tensor], *,
                       config: QuantizationConfig | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """The layer rebuilt from :meth:`layer_state_dict` output, after :meth:`check_layer_state`.
        The dtype it was quantized from (which sets the compute dtype) is read from the state, not
        taken from ``dtype``: a skeleton built without one is float32 whatever the checkpoint holds.

        Raises:
            CheckpointError: ``state`` does not match :meth:`layer_state_spec`.
        """
        config = self._checked(config or self.config)
        self.check_layer_state(in_features, out_features, bias, state, config=config)
        if config.method is M.BNB_INT8:
            source = state["bias"].dtype if bias else dtype
        else:
            source = _quantized_dtype(state, config)
            if source is None:
                raise CheckpointError(f"{_quant_state_key(config)!r} does not record the dtype the layer was "
                                      f"quantized from (float32, float16 or bfloat16)")
        empty = self.create_quantized_linear(in_features, out_features, bias, config=config, device="meta",
                                             dtype=source)
        return self.load_layer_state(empty, state)

    def load_layer_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
        """Fill a layer from :meth:`create_quantized_linear` (possibly on meta) with a state dict in
        transformers' bitsandbytes format. Tensors stay where they are unless the adapter has a
        ``device`` or the layer lives on a real device.

        Raises:
            ValueError: missing or unexpected keys, or tensors whose shape, dtype or quantization
                settings differ from the layer's (the key is named).
        """
        bnb = _bnb()
        state = dict(state)
        if "weight" not in state:
            raise ValueError(f"layer state has no 'weight'; keys: {sorted(state)}")
        target = self.device or (module.weight.device if module.weight.device.type != "meta"
                                 else state["weight"].device)
        bias = state.pop("bias", None)
        if (bias is None) != (module.bias is None):
            raise ValueError(f"layer state {'lacks' if bias is None else 'has'} a 'bias' but the layer "
                             f"{'has' if bias is None else 'has none'}")
        if bias is not None and tuple(bias.shape) != (module.out_features,):
            raise ValueError(f"'bias' has shape {tuple(bias.shape)}, expected ({module.out_features},)")
        if isinstance(module, bnb.nn.Linear4bit):
            self._load_4bit(module, state, target)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            self._load_int8(module, state, target)
        else:
            raise ValueError(f"load_layer_state expects a bitsandbytes layer, got {type(module).__name__}")
        if bias is not None:
            # trainable, as nn.Linear's bias (and so the layers quantize_model builds from one)
            module.bias = nn.Parameter(bias.to(target))
        return module

    def _load_4bit(self, module: nn.Module, state: dict[str, torch.Tensor], target: torch.device) -> None:
        bnb = _bnb()
        weight = state.pop("weight")
        stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
        unexpected = sorted(k for k in state if not k.startswith("weight."))
        if unexpected:
            raise ValueError(f"unexpected keys in a Linear4bit state: {unexpected}")
        expected = module.weight
        if tuple(weight.shape) != tuple(expected.shape) or weight.dtype != expected.dtype:
            raise ValueError(f"'weight' is {tuple(weight.shape)} {dtype_to_str(weight.dtype)}, the layer "
                             f"expects {tuple(expected.shape)} {dtype_to_str(expected.dtype)} (packed "
                             f"{module.out_features}x{module.in_features}, quant_storage "
                             f"{dtype_to_str(expected.quant_storage)})")
        try:
            param = bnb.nn.Params4bit.from_prequantized(data=weight, quantized_stats=dict(stats),
                                                        requires_grad=False, device=target, module=module)
        except (ValueError, KeyError, AssertionError, TypeError) as e:
            raise ValueError(f"the 4-bit quant state in this layer state is unreadable "
                             f"(keys {sorted(stats)}): {type(e).__name__}: {e}") from e
        got = param.quant_state
        checks = (("shape", tuple(got.shape), (module.out_features, module.in_features)),
                  ("quant_type", got.quant_type, expected.quant_type),
                  ("blocksize", got.blocksize, expected.blocksize),
                  ("double quantization", got.nested, bool(expected.compress_statistics)))
        for what, value, want in checks:
            if value != want:
                raise ValueError(f"the layer state has {what}={value!r}, the layer was built for {want!r}")
        blocks = -(math.prod(got.shape) // -got.blocksize)
        if got.absmax.numel() != blocks:
            raise ValueError(f"'weight.absmax' has {got.absmax.numel()} entries, expected {blocks}")
        module.weight = param

    def _load_int8(self, module: nn.Module, state: dict[str, torch.Tensor], target: torch.device) -> None:
        bnb = _bnb()
        weight = state.pop("weight")
        if "SCB" not in state:
            raise ValueError(f"layer state of a Linear8bitLt has no 'SCB'; keys: {sorted(state) + ['weight']}")
        SCB = state.pop("SCB")
        fmt = state.pop("weight_format", None)
        if fmt is not None and int(fmt) != 0:
            raise ValueError(f"'weight_format'={int(fmt)}; only 0 (row-major) is supported")
        if state:
            raise ValueError(f"unexpected keys in a Linear8bitLt state: {sorted(state)}")
        shape = (module.out_features, module.in_features)
        if tuple(weight.shape) != shape or weight.dtype != torch.int8:
            raise ValueError(f"'weight' is {tuple(weight.shape)} {dtype_to_str(weight.dtype)}, expected "
                             f"{shape} int8")
        if tuple(SCB.shape) != (module.out_features,):
            raise ValueError(f"'SCB' has shape {tuple(SCB.shape)}, expected ({module.out_features},)")
        CB = weight.to(target)
        SCB = SCB.to(device=target, dtype=torch.float32)
        module.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
        module.state.CB, module.state.SCB = None, SCB

    # ------------------------------------------------------------------ model level
    def mark_model(self, model: nn.Module) -> None:
        """``is_quantized``, ``quantization_method = "bitsandbytes"`` (transformers'
        ``QuantizationMethod.BITS_AND_BYTES``) and ``is_loaded_in_4bit`` / ``is_loaded_in_8bit``
        for the layer types present: peft passes the last two to its bnb LoRA dispatchers."""
        super().mark_model(model)
        bnb = _bnb()
        modules = list(model.modules())
        model.is_loaded_in_4bit = any(isinstance(m, bnb.nn.Linear4bit) for m in modules)
        model.is_loaded_in_8bit = any(isinstance(m, bnb.nn.Linear8bitLt) for m in modules)
        model.is_quantized = True
        model.quantization_method = "bitsandbytes"


def _quant_state_key(config: QuantizationConfig) -> str:
    return f"weight.quant_state.bitsandbytes__{config.quant_type}"


def _quantized_dtype(state: Mapping[str, torch.Tensor], config: QuantizationConfig) -> torch.dtype | None:
    """The dtype a 4-bit layer was quantized from, as its quant-state JSON records it; ``None`` when
    the entry is absent, unreadable or names no float dtype."""
    blob = state.get(_quant_state_key(config))
    if not (isinstance(blob, torch.Tensor) and blob.dtype == torch.uint8 and blob.ndim == 1):
        return None
    try:
        name = json.loads(bytes(blob.cpu().numpy()).decode("utf-8")).get("dtype")
    except (ValueError, AttributeError):
        return None
    return next((d for d in _FLOAT_DTYPES if dtype_to_str(d) == name), None)


def _quant_state_tensors(state: Any) -> list[torch.Tensor]:
    if state is None:
        return []
    tensors = [getattr(state, name, None) for name in ("absmax", "code", "offset")]
    nested = getattr(state, "state2", None)  # bitsandbytes deletes it when it repacks for CPU
    if nested is not None:
        tensors += [nested.absmax, nested.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def _standard_4bit(module: nn.Module):
    """``(data, quant_state)`` of a Linear4bit in bitsandbytes' standard layout, undoing (on
    copies) the AVX512-BF16 CPU repacking of layers built elsewhere."""
    weight = module.weight
    state = weight.quant_state
    if state is None:
        raise ValueError("this Linear4bit is not quantized (no quant_state)")
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        return _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(state))
    return weight.data, state


def _int8_tensors(module: nn.Module):
    CB = getattr(module.weight, "CB", None)
    SCB = getattr(module.weight, "SCB", None)
    if CB is None or SCB is None:  # after the first forward bitsandbytes keeps them in module.state
        CB = module.state.CB if module.state.CB is not None else module.weight.data
        SCB = module.state.SCB
    return CB, SCB


# ---------------------------------------------------------------------- checkpoints
def _transformers_bnb_config(model: nn.Module, method: str, plan: Any) -> dict[str, Any] | None:
    """transformers' ``BitsAndBytesConfig`` (as a dict) of a model whose converted layers are all
    ``method``'s, read off its first layer; ``None`` without transformers."""
    try:
        from transformers import BitsAndBytesConfig
    except ImportError:  # without transformers there is no peer to be compatible with
        return None
    skipped = [l.name for l in plan.skipped]
    if method == "bnb_int8":
        module = model.get_submodule(plan.converted[0].name)
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=module.state.threshold,
                                  llm_int8_skip_modules=skipped).to_dict()
    module = model.get_submodule(plan.converted[0].name)
    state = module.weight.quant_state
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=state.quant_type,
        bnb_4bit_use_double_quant=state.nested, bnb_4bit_compute_dtype=module.compute_dtype or torch.float32,
        bnb_4bit_quant_storage=module.weight.quant_storage, llm_int8_skip_modules=skipped,
    ).to_dict()


def _peer_config_entries(cls, model: nn.Module, plan: Any, layers: list) -> tuple[dict[str, Any], dict[str, Any]]:
    """transformers' ``quantization_config`` when every converted layer of the model is bitsandbytes
    with one method (4-bit of one quant type, or INT8): with our tensor names (the ones
    transformers uses), ``AutoModelForCausalLM.from_pretrained(path)`` loads the checkpoint."""
    if {layer.method for layer in plan.converted} != {layers[0].method}:
        return {}, {}
    config = _transformers_bnb_config(model, layers[0].method, plan)
    return ({"quantization_config": config} if config is not None else {}), {}


BitsAndBytesAdapter.peer_config_entries = classmethod(_peer_config_entries)
