"""MLX adapter: MLX's affine packed format (``mx.quantize``) held in PyTorch modules.

Each linear layer becomes a :class:`MLXQuantizedLinear` that stores exactly what ``mx.quantize``
returns and mlx-lm saves: ``weight`` (``uint32``, ``bits`` bits per value packed from the least
significant bit up, shape ``(out, in * bits / 32)``), ``scales`` and ``biases`` (one per group of
``group_size`` inputs, shape ``(out, in / group_size)``, in the compute dtype) and the linear's
``bias``. A weight is ``scales * q + biases`` per group, ``q`` in ``[0, 2**bits - 1]``.

Where ``mlx`` runs (Apple silicon, or Linux CPU with ``pip install "mlx[cpu]"``) layers are
quantized by ``mx.quantize`` itself and the forward pass runs ``mx.quantized_matmul`` whenever no
gradient has to flow through the input. Everywhere else -- training (so LoRA on top trains),
CUDA tensors, or no ``mlx`` installed -- a pure-PyTorch path unpacks the same bits and runs
``F.linear``; its quantizer is bit-identical to ``mx.quantize`` and its dequantized weight to
``mx.dequantize``.

On MLX's CPU backend the kernels for float16/bfloat16 accumulate in half precision: measured here
(2048x2048, 4-bit, group 64) they are 10x less accurate (bfloat16: 5% relative error) and 40x
slower than in float32, so on the CPU the MLX path computes in float32 from the stored half
scales and casts the result back. On Apple GPUs it computes in the stored dtype (Metal kernels
accumulate in float32).

``backend_options`` (per layer through ``layer_configs`` too):

* ``kernel``: ``"auto"`` (default: MLX when usable and no gradient is needed -- on MLX's CPU
  device only for inputs of at most :data:`MLX_CPU_MAX_ROWS` rows, where it is faster -- else
  PyTorch), ``"mlx"`` (always MLX; an error where it cannot run or when a gradient must flow
  through the input), ``"torch"`` (always the PyTorch path, even where MLX runs).

``storage_dtype`` is honoured: the packed bytes are viewed (not converted) as that dtype, so FSDP
can shard them with the other parameters; checkpoints always hold mlx-lm's ``uint32`` layout.
Converting a module's dtype (``model.half()``) casts scales, biases and bias and never touches the
packed bytes.

Memory: after ``quantize_linear`` or ``load_layer_state`` (where MLX runs) the module's tensors are
views of MLX's arrays, so both paths share one copy (MLX can export CPU memory without a copy but
not import it). Tensors replaced any other way are copied into MLX on the first MLX call; when
they keep changing (FSDP gathers them anew each forward) they are copied per call, not cached.
mlx-lm checkpoints: :meth:`MLXAdapter.layer_state_dict` gives its tensor names and
:func:`mlx_lm_quantization_config` its ``config["quantization"]`` entry.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from backend_manager import Backend, get_library_status, is_library_usable

from ..config import QuantizationConfig, QuantizationMethod, dtype_to_str
from .base import LayerStateSpec, QuantizationAdapter, autocast_dtype, common_dtype, register_adapter

if TYPE_CHECKING:  # pragma: no cover
    from ..validation import ValidationIssue

__all__ = [
    "MLXAdapter",
    "MLXQuantizedLinear",
    "MLX_BACKEND_OPTIONS",
    "MLX_CPU_MAX_ROWS",
    "affine_quantize",
    "affine_dequantize",
    "pack_bits",
    "unpack_bits",
    "mlx_quantize",
    "mlx_lm_quantization_config",
]

logger = logging.getLogger(__name__)

MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)
KERNELS = ("auto", "mlx", "torch")
#: Accepted ``backend_options`` and what they do.
MLX_BACKEND_OPTIONS: dict[str, str] = {
    "kernel": "forward path: 'auto' (MLX when usable, no input gradient is needed and, on the CPU, the "
              "input has at most MLX_CPU_MAX_ROWS rows), 'mlx' or 'torch'",
}
#: On MLX's CPU device ``kernel="auto"`` runs MLX for inputs of at most this many rows. MLX's CPU
#: kernel does one matrix-vector product per row; measured here (4096x4096, 4-bit, 2 cores) it
#: takes 26 ms per row against ~150 ms + GEMM for the PyTorch path, which wins from ~8 rows up.
MLX_CPU_MAX_ROWS = 8
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows of a weight quantized at once by the PyTorch quantizer: bounds its float32 temporaries.
_CHUNK_ELEMENTS = 1 << 22
# Copies into MLX after which a layer whose weights keep changing stops caching them.
_MAX_MX_REBUILDS = 3
# Bit widths that do not divide 32 are packed as E values in B bytes (MLX: 8 in 3, 8 in 5, 4 in 3).
_ODD_PACKS = {3: (8, 3), 5: (8, 5), 6: (4, 3)}


# ---------------------------------------------------------------------- MLX availability
@functools.lru_cache(maxsize=None)
def _mlx_core(device_type: str = "cpu"):
    """``mlx.core`` when MLX can compute on tensors of ``device_type`` here, else ``None``.

    Cached: the answer cannot change within a process, and the forward pass asks every call.
    """
    if device_type not in ("cpu", "mps"):
        return None
    if not is_library_usable("mlx", Backend.MPS if device_type == "mps" else Backend.CPU):
        return None
    import mlx.core as mx

    return mx


def _to_mx(mx, tensor: torch.Tensor):
    """A torch tensor as an ``mx.array``: one copy (MLX cannot import CPU memory without one).

    Through DLPack, not ``tensor.numpy()``: exporting to numpy marks the tensor's storage
    non-resizable for good, and FSDP frees unsharded parameters by resizing their storage.
    """
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if hasattr(mx, "from_dlpack"):
        return mx.from_dlpack(t)
    t = t.clone()  # older mlx: go through numpy, on a private copy
    if t.dtype is torch.bfloat16:  # numpy has no bfloat16: move the bits, then reinterpret them
        return mx.array(t.view(torch.uint16).numpy()).view(mx.bfloat16)
    return mx.array(t.numpy())


def _to_torch(mx, array) -> torch.Tensor:
    """An ``mx.array`` as a CPU torch tensor sharing its memory (evaluates it; no copy)."""
    import numpy as np

    if array.dtype == mx.bfloat16:
        return torch.from_numpy(np.asarray(array.view(mx.uint16))).view(torch.bfloat16)
    return torch.from_numpy(np.asarray(array))


# ---------------------------------------------------------------------- the format, in PyTorch
def _check_format(bits: int, group_size: int, in_features: int | None = None) -> None:
    if bits not in MLX_BITS:
        raise ValueError(f"bits={bits!r} is not supported by MLX; allowed: {', '.join(map(str, MLX_BITS))}")
    if group_size not in MLX_GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not supported by MLX; allowed: "
                         f"{', '.join(map(str, MLX_GROUP_SIZES))}")
    if in_features is not None and in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}; "
                         f"MLX quantizes whole groups along the input dimension")


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values ``q`` (``(rows, n)``, each in ``[0, 2**bits)``) as MLX does.

    Values are laid out from the least significant bit up as one bit stream per row, which is
    MLX's layout for every width (3, 5 and 6 bits straddle 32-bit words).

    Returns:
        ``uint8`` bytes of shape ``(rows, n * bits / 8)``; ``.view(torch.uint32)`` gives MLX's
        ``uint32`` words on a little-endian machine.
    """
    rows, n = q.shape
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    if bits in (2, 4):
        per = 8 // bits
        q = q.reshape(rows, n // per, per)
        out = q[..., 0].clone()
        for k in range(1, per):
            out |= q[..., k] << (k * bits)
        return out
    values, nbytes = _ODD_PACKS[bits]
    word_dtype = torch.int32 if nbytes * 8 < 32 else torch.int64
    v = q.reshape(rows, n // values, values).to(word_dtype)
    shifts = torch.arange(values, dtype=word_dtype, device=q.device) * bits
    word = (v << shifts).sum(-1, dtype=word_dtype)  # disjoint bit ranges: the sum is an OR
    byte_shifts = torch.arange(nbytes, dtype=word_dtype, device=q.device) * 8
    return ((word[..., None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(rows, n * bits // 8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8`` values ``(rows, n)`` from MLX's packed words
    (``uint32`` of shape ``(rows, n * bits / 32)``, or the same bytes in any dtype)."""
    rows = packed.shape[0]
    data = packed.contiguous().view(torch.uint8).reshape(rows, -1)
    if data.shape[1] * 8 != n * bits:
        raise ValueError(f"packed weight holds {data.shape[1] * 8} bits per row; {n} values of {bits} "
                         f"bits need {n * bits}")
    if bits == 8:
        return data
    mask = (1 << bits) - 1
    if bits in (2, 4):  # a stack of shifts is ~2x faster than one broadcast shift here
        return torch.stack([(data >> s) & mask for s in range(0, 8, bits)], -1).reshape(rows, n)
    values, nbytes = _ODD_PACKS[bits]
    word_dtype = torch.int32 if nbytes * 8 < 32 else torch.int64
    b = data.reshape(rows, -1, nbytes).to(word_dtype)
    byte_shifts = torch.arange(nbytes, dtype=word_dtype, device=data.device) * 8
    word = (b << byte_shifts).sum(-1, dtype=word_dtype)
    shifts = torch.arange(values, dtype=word_dtype, device=data.device) * bits
    return ((word[..., None] >> shifts) & mask).to(torch.uint8).reshape(rows, n)


def affine_quantize(weight: torch.Tensor, group_size: int = 64,
                    bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLX's affine quantization in PyTorch, bit-identical to ``mx.quantize`` (any device).

    Per group it follows MLX's CPU kernel step for step in float32: the scale spans min..max, its
    sign and the bias are chosen so that the endpoint of larger magnitude is represented exactly,
    and values round half to even.

    Args:
        weight: ``(out, in)`` float32/float16/bfloat16; ``in`` a multiple of ``group_size``.
        group_size: 32, 64 or 128.
        bits: 2, 3, 4, 5, 6 or 8.

    Returns:
        ``(packed, scales, biases)``: ``uint32`` ``(out, in * bits / 32)``, and two
        ``(out, in / group_size)`` tensors in ``weight.dtype``.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight dtype {weight.dtype} cannot be quantized; allowed: float32, float16, bfloat16")
    out_features, in_features = weight.shape
    _check_format(bits, group_size, in_features)
    device, n_bins = weight.device, float((1 << bits) - 1)
    packed = torch.empty(out_features, in_features * bits // 32, dtype=torch.uint32, device=device)
    scales = torch.empty(out_features, in_features // group_size, dtype=weight.dtype, device=device)
    biases = torch.empty_like(scales)
    eps = torch.tensor(1e-7, dtype=torch.float32, device=device)
    step = max(1, _CHUNK_ELEMENTS // in_features)
    with torch.no_grad():
        for start in range(0, out_features, step):
            stop = min(start + step, out_features)
            w = weight[start:stop].detach().to(torch.float32).reshape(stop - start, -1, group_size)
            w_max, w_min = w.amax(-1), w.amin(-1)
            mask = w_min.abs() > w_max.abs()
            scale = torch.maximum((w_max - w_min) / n_bins, eps)
            scale = torch.where(mask, scale, -scale)
            edge = torch.where(mask, w_min, w_max)
            q0 = torch.round(edge / scale)
            nonzero = q0 != 0
            scale = torch.where(nonzero, edge / q0, scale)
            bias = torch.where(nonzero, edge, torch.zeros_like(edge))
            q = torch.clamp(torch.round((w - bias[..., None]) / scale[..., None]), 0, n_bins)
            packed[start:stop].view(torch.uint8).copy_(pack_bits(q.reshape(stop - start, in_features), bits))
            scales[start:stop] = scale.to(weight.dtype)
            biases[start:stop] = bias.to(weight.dtype)
    return packed, scales, biases


def affine_dequantize(packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor,
                      group_size: int = 64, bits: int = 4) -> torch.Tensor:
    """``scales * q + biases`` per group, in ``scales.dtype``; bit-identical to ``mx.dequantize``
    (a multiply then an add, each rounded to the dtype, as MLX does)."""
    out_features, groups = scales.shape
    in_features = groups * group_size
    w = unpack_bits(packed, bits, in_features).to(scales.dtype).reshape(out_features, groups, group_size)
    return w.mul_(scales[..., None]).add_(biases[..., None]).reshape(out_features, in_features)


def mlx_quantize(weight: torch.Tensor, group_size: int = 64, bits: int = 4):
    """Quantize with ``mx.quantize``; returns the three ``mx.array`` outputs (evaluated).

    Raises:
        ImportError: when MLX cannot run here (with the install command).
    """
    mx = _mlx_core("cpu")
    if mx is None:
        status = get_library_status("mlx", Backend.CPU)
        raise ImportError(f"mlx is not usable here: {status.reason}. Fix: {status.install_hint}")
    _check_format(bits, group_size, weight.shape[-1])
    arrays = mx.quantize(_to_mx(mx, weight), group_size=group_size, bits=bits)
    mx.eval(*arrays)
    return arrays


# ---------------------------------------------------------------------- the module
class MLXQuantizedLinear(nn.Module):
    """A linear layer in MLX's affine packed format.

    ``state_dict()`` holds mlx-lm's names: ``weight`` (packed), ``scales``, ``biases`` and, when the
    layer has one, ``bias``. The compute dtype is the dtype of ``scales``.

    Args:
        in_features, out_features: the layer's shape (``in_features`` a multiple of ``group_size``).
        bias: whether the layer has a bias.
        bits: 2, 3, 4, 5, 6 or 8.
        group_size: 32, 64 or 128.
        dtype: dtype of scales, biases and bias (the compute dtype); default: torch's default.
        storage_dtype: dtype the packed bytes are viewed as (default ``torch.uint32``).
        kernel: ``"auto"``, ``"mlx"`` or ``"torch"`` (see the module docstring).
        device: where the (empty) tensors are allocated; ``"meta"`` allocates nothing.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4,
                 group_size: int = 64, dtype: torch.dtype | None = None,
                 storage_dtype: torch.dtype | None = None, kernel: str = "auto",
                 device: torch.device | str | None = None):
        super().__init__()
        _check_format(bits, group_size, in_features)
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r} is not valid; allowed: {', '.join(KERNELS)}")
        dtype = dtype or torch.get_default_dtype()
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype={dtype} cannot hold MLX scales; allowed: float32, float16, bfloat16")
        storage_dtype = storage_dtype or torch.uint32
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.kernel = bits, group_size, kernel
        words = in_features * bits // 32
        if (words * 4) % storage_dtype.itemsize:
            raise ValueError(f"storage_dtype={storage_dtype} does not divide the {words * 4} packed bytes per row")
        self.weight = nn.Parameter(torch.empty(out_features, words * 4 // storage_dtype.itemsize,
                                               dtype=storage_dtype, device=device), requires_grad=False)
        groups = in_features // group_size
        self.scales = nn.Parameter(torch.empty(out_features, groups, dtype=dtype, device=device),
                                   requires_grad=False)
        self.biases = nn.Parameter(torch.empty(out_features, groups, dtype=dtype, device=device),
                                   requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._mx_cache = None
        self._mx_builds = 0

    # ---------------------------------------------------------------- format access
    @property
    def packed_weight(self) -> torch.Tensor:
        """The packed weight as MLX's ``uint32`` words ``(out, in * bits / 32)`` (a view)."""
        w = self.weight
        return w if w.dtype is torch.uint32 else w.view(torch.uint32)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scales.dtype

    def dequantized_weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight the PyTorch path computes with, in the compute dtype."""
        return affine_dequantize(self.packed_weight, self.scales, self.biases, self.group_size, self.bits)

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast the output has the autocast dtype, as nn.Linear's does (autocast runs the
        # F.linear below in that dtype, and records the casts for the backward).
        dtype = autocast_dtype(x) or x.dtype
        mx = self._mlx_for(x)
        if mx is not None:
            return self._forward_mlx(mx, x).to(dtype)
        w = self.dequantized_weight()
        bias = None if self.bias is None else self.bias.to(w.dtype)
        return F.linear(x.to(w.dtype), w, bias).to(dtype)

    def _mlx_for(self, x: torch.Tensor):
        """``mlx.core`` when this call runs on MLX, else ``None`` (PyTorch path)."""
        if self.kernel == "torch":
            return None
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.scales.requires_grad
                                                  or self.biases.requires_grad)
        mx = _mlx_core(x.device.type)
        plain = (type(x) is torch.Tensor and x.dtype in _FLOAT_DTYPES and self.weight.device.type != "meta"
                 and not torch.compiler.is_compiling() and not torch.jit.is_tracing())
        if self.kernel == "mlx":
            if mx is None:
                status = get_library_status("mlx", Backend.MPS if x.device.type == "mps" else Backend.CPU)
                raise RuntimeError(f"kernel='mlx' but MLX cannot run on {x.device.type} tensors here "
                                   f"({status.reason}); use kernel='auto' or 'torch'")
            if needs_grad:
                raise RuntimeError("kernel='mlx' cannot backpropagate to the input; use kernel='auto' "
                                   "(the PyTorch path runs whenever a gradient is needed)")
            if not plain:
                raise RuntimeError(f"kernel='mlx' needs a plain float tensor outside torch.compile/tracing; "
                                   f"got {type(x).__name__} of {x.dtype}")
            return mx
        if mx is None or not plain or needs_grad:
            return None
        if x.numel() > MLX_CPU_MAX_ROWS * self.in_features and mx.default_device() == mx.cpu:
            return None  # MLX's CPU kernel is one matrix-vector product per row: PyTorch wins here
        return mx

    def _cache_key(self) -> tuple:
        # The tensor objects (weakly: a replaced tensor must be freed, not kept alive here), where
        # their data lives and their in-place version: any change makes the MLX copies stale.
        return tuple((weakref.ref(t), t.data_ptr(), t.dtype, tuple(t.shape), t.device, t._version)
                     for t in (self.weight, self.scales, self.biases))

    def _mx_arrays(self, mx):
        """(weight, scales, biases) as ``mx.array``; rebuilt only when the torch tensors change."""
        key, cache = self._cache_key(), self._mx_cache
        if cache is not None and all(
                old[0]() is new[0]() and old[1:] == new[1:] for old, new in zip(cache[0], key)):
            return cache[1]
        arrays = (_to_mx(mx, self.packed_weight), _to_mx(mx, self.scales), _to_mx(mx, self.biases))
        self._mx_builds += 1
        # Weights that keep changing (FSDP gathers them anew before each forward) are copied per
        # call, not cached: a cached copy would keep every layer unsharded in memory.
        self._mx_cache = (key, arrays) if self._mx_builds <= _MAX_MX_REBUILDS else None
        logger.debug("MLXQuantizedLinear %dx%d: copied weights into MLX (%d times)", self.out_features,
                     self.in_features, self._mx_builds)
        return arrays

    def _adopt_mx(self, mx, weight, scales, biases) -> None:
        """Make ``weight``/``scales``/``biases`` torch views of these ``mx.array`` (no copy) and keep
        the arrays for the MLX path, so the two paths share one copy of the quantized weights."""
        storage = self.weight.dtype
        with torch.no_grad():
            packed = _to_torch(mx, weight)
            self.weight = nn.Parameter(packed if storage is torch.uint32 else packed.view(storage),
                                       requires_grad=False)
            self.scales = nn.Parameter(_to_torch(mx, scales), requires_grad=False)
            self.biases = nn.Parameter(_to_torch(mx, biases), requires_grad=False)
        self._mx_cache, self._mx_builds = (self._cache_key(), (weight, scales, biases)), 0

    def _forward_mlx(self, mx, x: torch.Tensor) -> torch.Tensor:
        weight, scales, biases = self._mx_arrays(mx)
        # MLX's CPU kernels accumulate half inputs in half precision: compute in float32 there.
        on_cpu = mx.default_device() == mx.cpu
        dtype = torch.float32 if on_cpu else self.compute_dtype
        if on_cpu and scales.dtype != mx.float32:
            scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
        shape = x.shape
        xm = _to_mx(mx, x.reshape(-1, self.in_features).to(dtype))
        y = mx.quantized_matmul(xm, weight, scales, biases, transpose=True, group_size=self.group_size,
                                bits=self.bits)
        out = _to_torch(mx, y).to(x.device).reshape(*shape[:-1], self.out_features)
        if self.bias is not None:  # in torch, so a trainable bias still gets its gradient
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)

    # ---------------------------------------------------------------- module plumbing
    def __setattr__(self, name: str, value: Any) -> None:
        # Assigning a new weight, scales or biases drops the MLX copies. FSDP2 swaps the sharded
        # and the gathered parameters this way (its fast path is skipped when a module overrides
        # __setattr__): the gathered tensor is the same object each step, refilled at what is
        # often the same address with its version counter preserved, so the cache key alone cannot
        # see the swap, and a copy kept past the reshard would hold the layer unsharded.
        if name in ("weight", "scales", "biases") and self.__dict__.get("_mx_cache") is not None:
            self.__dict__["_mx_cache"] = None
        super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):
        # Packed bytes viewed as a float dtype must move between devices but never be cast:
        # hide them as uint8 (which dtype conversions skip) while ``fn`` runs.
        storage = self.weight.dtype
        if not storage.is_floating_point:
            return super()._apply(fn, recurse)
        self.weight.data = self.weight.data.view(torch.uint8)
        try:
            return super()._apply(fn, recurse)
        finally:
            self.weight.data = self.weight.data.view(storage)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_mx_cache"] = None  # MLX arrays are rebuilt on demand, never copied or pickled
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}, "
                f"dtype={dtype_to_str(self.compute_dtype)}, kernel={self.kernel!r}")


# ---------------------------------------------------------------------- the adapter
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
    return dtype if dtype in _FLOAT_DTYPES else torch.float32


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
    types_module = __name__  # MLXQuantizedLinear is ours: it exists without mlx imported

    def __init__(self, config: QuantizationConfig | None = None, backend: Backend | str | None = None,
                 *, device: torch.device | str | None = None):
        super().__init__(config, backend, device=device)
        _options(self.config)
        for pattern in self.config.layer_configs:
            layer = self.config._merged(self.config.layer_configs[pattern])
            if layer.method in self.methods:
                try:
                    _options(layer)
                except ValueError as e:
                    raise ValueError(f"layer_configs[{pattern!r}]: {e}") from e

    @classmethod
    def check_config(cls, config: QuantizationConfig, backend: Backend) -> list["ValidationIssue"]:
        """Errors: unknown ``backend_options``, a bad ``kernel``, ``kernel='mlx'`` where MLX cannot run.
        Warnings: ``quant_type`` (bitsandbytes only) is ignored."""
        from ..validation import Severity, ValidationIssue

        issues: list[ValidationIssue] = []
        configs = [("", config)] + [(p, config._merged(o)) for p, o in config.layer_configs.items()]
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
        mx = _mlx_core(weight.device.type) or (_mlx_core("cpu") if torch.device(device).type == "cpu" else None)
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
        compute = config.compute_dtype or common_dtype(state, ("scales", "biases", "bias"), _FLOAT_DTYPES)
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
        if state["scales"].dtype != state["biases"].dtype or state["scales"].dtype not in _FLOAT_DTYPES:
            raise ValueError(f"MLX scales/biases must share a float dtype, got {state['scales'].dtype} and "
                             f"{state['biases'].dtype}")
        weight = weight.view(torch.uint32)
        mx = _mlx_core("cpu") if module.kernel != "torch" and weight.device.type == "cpu" else None
        storage = module.weight.dtype
        if mx is not None:
            module._adopt_mx(mx, _to_mx(mx, weight), _to_mx(mx, state["scales"]), _to_mx(mx, state["biases"]))
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


def mlx_lm_quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``config["quantization"]`` entry mlx-lm writes next to a quantized checkpoint.

    The most common (group size, bits) of the model's :class:`MLXQuantizedLinear` layers is the
    default; every layer that differs gets its own ``{"group_size": ..., "bits": ...}`` under its
    dotted name. mlx-lm quantizes exactly the layers whose ``<name>.scales`` is in the weights, so
    layers left in float need no entry. Tensor names are those of :meth:`MLXAdapter.layer_state_dict`
    under the module's dotted name.

    Raises:
        ValueError: when the model has no MLX layer.
    """
    layers = {name: (m.group_size, m.bits) for name, m in model.named_modules()
              if isinstance(m, MLXQuantizedLinear)}
    if not layers:
        raise ValueError("the model has no MLXQuantizedLinear layer; quantize it with an MLX method first")
    counts: dict[tuple[int, int], int] = {}
    for setting in layers.values():
        counts[setting] = counts.get(setting, 0) + 1
    group, bits = max(counts, key=lambda k: (counts[k], k[1]))
    config: dict[str, Any] = {"group_size": group, "bits": bits, "mode": "affine"}
    for name, (g, b) in layers.items():
        if (g, b) != (group, bits):
            config[name] = {"group_size": g, "bits": b}
    return config
