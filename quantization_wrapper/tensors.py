"""Tensor facts every layer shares: bytes held, autocast dtype, and the check of a layer's state
against its format (:data:`LayerStateSpec`). Imports nothing of the package but the config's dtype
names and the error types."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .config import dtype_to_str
from .errors import CheckpointError

__all__ = [
    "leaf_tensors",
    "tensor_nbytes",
    "autocast_dtype",
    "LayerStateSpec",
    "check_state_spec",
    "common_dtype",
    "FloatLinear",
]


def leaf_tensors(t: Any) -> list[torch.Tensor]:
    """The plain tensors inside ``t``: ``[t]`` for a plain tensor, else those of a tensor subclass's
    ``__tensor_flatten__``, recursively (quanto's packed data nests one subclass in another)."""
    if not isinstance(t, torch.Tensor):
        return []
    if getattr(type(t), "__tensor_flatten__", None) is None:
        return [t]
    names, _ = t.__tensor_flatten__()
    return [leaf for name in names for leaf in leaf_tensors(getattr(t, name))]


def tensor_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by ``tensors``, each counted once however many of them view it (tied weights).

    A tensor counts its own elements, not its whole storage: a model loaded from a memory map
    holds views into one storage per file.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        nbytes = t.numel() * t.element_size()
        if t.device.type == "meta":
            total += nbytes
            continue
        key = (t.data_ptr(), nbytes)
        if key in seen:
            continue
        seen.add(key)
        total += nbytes
    return total


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs ``nn.Linear`` in for ``x``'s device; ``None`` when autocast
    is off there (or the device has none, like ``meta``). Quantized layers compute in it and return
    it under autocast, as ``nn.Linear`` does."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


#: What a layer state must hold: ``{key: (dtype, shape)}``, or ``(dtype, shape, optional)``. A dtype
#: may be a tuple of accepted dtypes; a shape may hold ``None`` for a free dimension.
LayerStateSpec = Mapping[str, tuple]


def _fmt_dtype(dtype: Any) -> str:
    if isinstance(dtype, tuple):
        return "one of " + "/".join(dtype_to_str(d) for d in dtype)
    return dtype_to_str(dtype)


def _fmt_shape(shape: tuple | None) -> str:
    return "any shape" if shape is None else "(" + ", ".join("*" if d is None else str(d) for d in shape) + \
        ("," if len(shape) == 1 else "") + ")"


def check_state_spec(state: Mapping[str, torch.Tensor], spec: LayerStateSpec, *, where: str) -> None:
    """Check every tensor of a layer state against ``spec``: the same keys (optional ones may be
    absent), and each tensor's dtype and shape.

    Args:
        state: the layer state (tensor names relative to the layer).
        spec: ``{key: (dtype, shape[, optional])}`` (see :data:`LayerStateSpec`).
        where: the layer, as the message names it (method, shape, settings).

    Raises:
        CheckpointError: naming every key that is missing, unknown, or of another dtype or shape,
            with what it holds and what the format requires.
    """
    problems = []
    required = {k for k, entry in spec.items() if not (len(entry) > 2 and entry[2])}
    missing = sorted(required - set(state))
    unknown = sorted(set(state) - set(spec))
    if missing:
        problems.append(f"missing {missing}")
    if unknown:
        problems.append(f"unknown keys {unknown} (the format has {sorted(spec)})")
    for key, tensor in state.items():
        if key not in spec:
            continue
        dtype, shape = spec[key][0], spec[key][1]
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{key!r} is a {type(tensor).__name__}, not a tensor")
            continue
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        dtype_ok = dtype is None or tensor.dtype in allowed
        shape_ok = shape is None or (tensor.ndim == len(shape) and all(
            want is None or got == want for got, want in zip(tensor.shape, shape)))
        if not (dtype_ok and shape_ok):
            problems.append(f"{key!r} is {dtype_to_str(tensor.dtype)} {_fmt_shape(tuple(tensor.shape))}, "
                            f"expected {_fmt_dtype(dtype) if dtype is not None else 'any dtype'} {_fmt_shape(shape)}")
    if problems:
        raise CheckpointError(f"{where}: the layer state does not match its format: " + "; ".join(problems) +
                              ". The checkpoint was altered or written by another tool; save it again from the "
                              "quantized model")


def common_dtype(state: Mapping[str, torch.Tensor], keys: Iterable[str],
                 allowed: tuple[torch.dtype, ...]) -> torch.dtype | tuple[torch.dtype, ...]:
    """The dtype that most of ``keys`` (those present, in ``allowed``) hold in ``state``, the first
    key's on a tie; ``allowed`` itself when none qualifies. For formats whose tensors must share one
    compute dtype the checkpoint does not record: one odd tensor is then the one reported."""
    counts: dict[torch.dtype, int] = {}
    for key in keys:
        t = state.get(key)
        if isinstance(t, torch.Tensor) and t.dtype in allowed:
            counts[t.dtype] = counts.get(t.dtype, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else allowed


class FloatLinear(nn.Linear):
    """An ``nn.Linear`` whose weights may be in another dtype than its input (like the quantized
    layers: compute in the weights' dtype, return the input's dtype; under ``torch.autocast``, as
    ``nn.Linear``, in the autocast dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == w.dtype or autocast_dtype(x) is not None:
            return super().forward(x)
        return nn.functional.linear(x.to(w.dtype), w, self.bias).to(x.dtype)
