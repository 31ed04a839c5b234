"""The quantized layer: :class:`MLXQuantizedLinear`, MLX's packed format held in a PyTorch module,
computing with ``mx.quantized_matmul`` or the PyTorch path (see the package docstring).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backend_manager import Backend, get_library_status

from ...config import dtype_to_str
from ..base import autocast_dtype
from . import codec  # codec.mlx_core is looked up per call: the package may replace it (tests simulate no MLX)
from .codec import FLOAT_DTYPES, affine_dequantize, check_format, to_mx, to_torch

__all__ = ["KERNELS", "MLX_CPU_MAX_ROWS", "MLXQuantizedLinear"]

logger = logging.getLogger(__name__)

KERNELS = ("auto", "mlx", "torch")
#: On MLX's CPU device ``kernel="auto"`` runs MLX for inputs of at most this many rows. MLX's CPU
#: kernel does one matrix-vector product per row; measured here (4096x4096, 4-bit, 2 cores) it
#: takes 26 ms per row against ~150 ms + GEMM for the PyTorch path, which wins from ~8 rows up.
MLX_CPU_MAX_ROWS = 8
# Copies into MLX after which a layer whose weights keep changing stops caching them.
_MAX_MX_REBUILDS = 3


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
        kernel: ``"auto"``, ``"mlx"`` or ``"torch"`` (see the package docstring).
        device: where the (empty) tensors are allocated; ``"meta"`` allocates nothing.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4,
                 group_size: int = 64, dtype: torch.dtype | None = None,
                 storage_dtype: torch.dtype | None = None, kernel: str = "auto",
                 device: torch.device | str | None = None):
        super().__init__()
        check_format(bits, group_size, in_features)
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r} is not valid; allowed: {', '.join(KERNELS)}")
        dtype = dtype or torch.get_default_dtype()
        if dtype not in FLOAT_DTYPES:
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
        mx = codec.mlx_core(x.device.type)
        plain = (type(x) is torch.Tensor and x.dtype in FLOAT_DTYPES and self.weight.device.type != "meta"
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
        arrays = (to_mx(mx, self.packed_weight), to_mx(mx, self.scales), to_mx(mx, self.biases))
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
            packed = to_torch(mx, weight)
            self.weight = nn.Parameter(packed if storage is torch.uint32 else packed.view(storage),
                                       requires_grad=False)
            self.scales = nn.Parameter(to_torch(mx, scales), requires_grad=False)
            self.biases = nn.Parameter(to_torch(mx, biases), requires_grad=False)
        self._mx_cache, self._mx_builds = (self._cache_key(), (weight, scales, biases)), 0

    def _forward_mlx(self, mx, x: torch.Tensor) -> torch.Tensor:
        weight, scales, biases = self._mx_arrays(mx)
        # MLX's CPU kernels accumulate half inputs in half precision: compute in float32 there.
        on_cpu = mx.default_device() == mx.cpu
        dtype = torch.float32 if on_cpu else self.compute_dtype
        if on_cpu and scales.dtype != mx.float32:
            scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
        shape = x.shape
        xm = to_mx(mx, x.reshape(-1, self.in_features).to(dtype))
        y = mx.quantized_matmul(xm, weight, scales, biases, transpose=True, group_size=self.group_size,
                                bits=self.bits)
        out = to_torch(mx, y).to(x.device).reshape(*shape[:-1], self.out_features)
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
