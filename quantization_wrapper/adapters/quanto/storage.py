"""How a frozen :class:`~.layer.QuantoLinear` holds its weight: as the plain tensors inside
optimum-quanto's weight tensor, registered on the module, plus the tree that rebuilds quanto's
tensor from them (:class:`WeightLayout`).

* The quantized data is an ``nn.Parameter`` with ``requires_grad=False``: packed ``uint8`` for
  qint2/qint4 (quanto's standard packing, or torch's CPU int4 kernel layout for CPU bfloat16
  qint4), ``int8`` for qint8, and the bytes of qfloat8 (``float8_e4m3fn``) as ``uint8``, so that
  no float cast (``module.to(dtype)``, FSDP2's ``MixedPrecisionPolicy``) ever converts its values.
  FSDP2's ``fully_shard`` splits it along dim 0 like any integer parameter and all-gathers it
  before the forward: each rank holds 1/N of the packed bytes.
* The scales and shifts (quanto's ``_scale``, ``_shift``, tinygemm's ``_scale_shift``, in the
  compute dtype) are buffers: FSDP keeps them whole on every rank (a few percent of the bytes).

Parameter and buffer names: ``weight_data`` (the quantized data), ``weight_scale``,
``weight_shift``, ``weight_scale_shift``. ``module.weight`` rebuilds quanto's tensor from the
module's current tensors (whatever FSDP has put there), so the rebuild never copies, never
requantizes and never parses quanto's string metadata (``ast.literal_eval``, which CPython 3.11
cannot run in two threads at once): the known weight types are built with their constructors, an
unknown one (quanto's CUDA-only AWQ/Marlin types) through ``__tensor_unflatten__`` under the
template lock.

This module imports optimum-quanto (the layer module imports it on first use).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from optimum.quanto.tensor import WeightQBitsTensor, WeightQBytesTensor
from optimum.quanto.tensor.packed import PackedTensor
from optimum.quanto.tensor.weights.tinygemm import TinyGemmWeightQBitsTensor
from optimum.quanto.tensor.weights.tinygemm.packed import TinyGemmPackedTensor

__all__ = ["Leaf", "Node", "WeightLayout", "flatten_weight"]

#: Weight types whose data layout is specific to the device type they were built on.
_DEVICE_LAYOUTS = ("tinygemm", "tinygemm_packed", "generic")


class Leaf(NamedTuple):
    """A plain tensor of quanto's weight, held by the module under ``name``."""

    name: str
    dtype: torch.dtype  # the dtype quanto holds (``float8_e4m3fn`` data is stored as ``uint8``)
    packed: bool  # the quantized data (a parameter), else a scale or shift (a buffer)


class Node(NamedTuple):
    """One of quanto's tensor subclasses inside the weight."""

    kind: str  # "qbits", "tinygemm", "qbytes", "packed", "tinygemm_packed" or "generic"
    cls: type
    args: tuple  # the constructor's arguments besides the inner tensors
    meta: Any  # ``__tensor_flatten__`` metadata (used for the "generic" kind)
    size: tuple
    stride: tuple
    device_type: str
    children: tuple  # ((inner name, Node | Leaf), ...)


def _leaf_name(path: tuple[str, ...]) -> str:
    parts: list[str] = []
    for part in (p.strip("_") for p in path):
        if not parts or parts[-1] != part:
            parts.append(part)
    return "weight_" + "_".join(parts)


def _node(t: torch.Tensor, path: tuple[str, ...], leaves: dict[str, tuple[torch.Tensor, bool]]):
    cls = type(t)
    if getattr(cls, "__tensor_flatten__", None) is None:
        name = _leaf_name(path)
        packed = path[0] == "_data"
        stored = t.detach()
        if packed and stored.dtype.is_floating_point and stored.element_size() == 1:
            stored = stored.view(torch.uint8)  # float8 bytes: no float cast may touch them
        leaves[name] = (stored, packed)
        return Leaf(name, t.dtype, packed)
    names, meta = t.__tensor_flatten__()
    children = tuple((name, _node(getattr(t, name), path + (name,), leaves)) for name in names)
    if cls is PackedTensor:
        kind, args = "packed", (t._bits,)
    elif cls is TinyGemmPackedTensor:
        kind, args = "tinygemm_packed", ()
    elif cls is WeightQBitsTensor:
        kind, args = "qbits", (t.qtype, t.axis, t._group_size)
    elif cls is TinyGemmWeightQBitsTensor:
        kind, args = "tinygemm", (t.qtype, t.axis, t._group_size)
    elif cls is WeightQBytesTensor:
        kind, args = "qbytes", (t.qtype, t.axis, t.activation_qtype)
    else:
        kind, args = "generic", ()
    return Node(kind, cls, args, meta, tuple(t.size()), tuple(t.stride()), t.device.type, children)


class WeightLayout:
    """The structure of one frozen quanto weight: which module tensors hold its leaves and how
    quanto's tensor is rebuilt from them. Immutable (shared by deep copies of the module)."""

    __slots__ = ("root", "leaves")

    def __init__(self, root: Node, leaves: tuple[Leaf, ...]):
        self.root = root
        self.leaves = leaves

    def __deepcopy__(self, memo: dict) -> "WeightLayout":
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(leaf.name for leaf in self.leaves)

    def build(self, get: Callable[[str], torch.Tensor], lock: Any = None) -> torch.Tensor:
        """quanto's weight tensor over the tensors ``get(name)`` returns (views, never copies)."""
        return _build(self.root, get, lock)


def _build(node, get, lock):
    if isinstance(node, Leaf):
        t = get(node.name)
        return t if t.dtype == node.dtype else t.view(node.dtype)
    inner = {name: _build(child, get, lock) for name, child in node.children}
    kind = node.kind
    if kind in _DEVICE_LAYOUTS:
        device = next(t.device for t in inner.values())
        if device.type != node.device_type and device.type != "meta" and node.device_type != "meta":
            raise RuntimeError(
                f"this quanto weight ({node.cls.__name__}) holds its data in the layout of the {node.device_type} "
                f"kernel but the data is now on {device}: it was moved tensor by tensor (e.g. by FSDP's "
                f"fully_shard on a model still on {node.device_type}). Move the model to its device first "
                f"(model.to(device) converts the layout), then shard it")
    if kind == "packed":
        return PackedTensor(inner["_data"], node.args[0], node.size, node.stride)
    if kind == "qbits":
        qtype, axis, group_size = node.args
        return WeightQBitsTensor(qtype, axis, group_size, node.size, node.stride, inner["_data"], inner["_scale"],
                                 inner["_shift"])
    if kind == "tinygemm_packed":
        return TinyGemmPackedTensor(inner["_data"], node.size, node.stride)
    if kind == "tinygemm":
        qtype, axis, group_size = node.args
        return TinyGemmWeightQBitsTensor(qtype, axis, group_size, node.size, node.stride, inner["_data"],
                                         inner["_scale_shift"])
    if kind == "qbytes":
        qtype, axis, activation_qtype = node.args
        return WeightQBytesTensor(qtype, axis, node.size, node.stride, inner["_data"], inner["_scale"],
                                  activation_qtype)
    # quanto's CUDA-only types: their own unflatten parses the metadata with ast.literal_eval
    if lock is None:
        return node.cls.__tensor_unflatten__(inner, node.meta, node.size, node.stride)
    with lock:
        return node.cls.__tensor_unflatten__(inner, node.meta, node.size, node.stride)


def flatten_weight(weight: torch.Tensor) -> tuple[WeightLayout, dict[str, tuple[torch.Tensor, bool]]]:
    """``(layout, {name: (tensor to register, is_packed_data)})`` of a quanto weight tensor; the
    tensors are detached views of its leaves (nothing copied)."""
    leaves: dict[str, tuple[torch.Tensor, bool]] = {}
    root = _node(weight, (), leaves)
    if not isinstance(root, Node):
        raise TypeError(f"expected an optimum-quanto weight tensor, got {type(weight).__name__}")
    order: list[Leaf] = []

    def collect(node):
        for _, child in node.children:
            if isinstance(child, Leaf):
                order.append(child)
            else:
                collect(child)

    collect(root)
    if len({leaf.name for leaf in order}) != len(order):
        raise ValueError(f"{type(weight).__name__} has inner tensors whose names collide: "
                         f"{[leaf.name for leaf in order]}")
    return WeightLayout(root, tuple(order)), leaves
