"""From a transformers checkpoint to a quantized model in one pass, with low memory.

:func:`load_and_quantize` builds the architecture with its parameters on the meta device (buffers,
which are small, are real), then reads the checkpoint tensor by tensor and quantizes each linear
weight as soon as it (and its bias) has arrived. At no time does more than the quantized model plus
a few full-precision layers exist in memory.

Which checkpoint tensor goes where is decided by transformers' own loading rules, called rather than
copied: the model's conversion mapping (renamed and legacy names, per-expert MoE weights fused into
one tensor), ``base_model_prefix`` added or stripped, tied weights and the model's ignore lists. A
conversion runs as soon as the last of its checkpoint tensors has arrived.

Mixture-of-experts blocks are planned as ``quantize_model`` plans them: the skeleton's fused experts
modules become containers of per-expert linear layers (on meta), and a block with no expert to
quantize gets its fused module back. An expert of an unfused block is quantized as soon as its own
checkpoint tensors have arrived: transformers' conversion (stack, then concatenate gate and up) runs
on that expert alone, which gives exactly its slice of the fused tensor, so the fused
``[experts, 2 x intermediate, hidden]`` tensor is never built. A checkpoint that holds the fused 3-D
tensors (or a conversion that cannot run per expert) hands each expert a view of the tensor.

The shards are memory-mapped privately (:class:`~.safetensors_io.SafetensorsReader`) and each
layer's pages are handed back as soon as the layer is quantized: a multi-GB checkpoint passes
through a few MB of resident memory. The allocator policy lives here too: freed memory goes back
to the OS (glibc ``malloc_trim``) only while streaming, whenever resident memory has grown by
256 MiB, and glibc keeps layer-sized temporaries in its heap between layers
(:func:`reuse_layer_sized_blocks`); nothing else in the package trims or tunes the allocator. :func:`tensor_worker_pool` runs
layer-sized tensor work on worker threads (here and in the loader of our own checkpoints).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import logging
import math
import os
import sys
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from backend_manager import Backend, detect_backend

from ..config import QuantizationConfig, parse_dtype
from ..experts import expert_layer_shapes, iter_fused_experts, unfuse_experts
from ..registry import get_adapter_class
from ..surgery import LayerDecision, convert_layer, plan_linear_layers, record_plan
from ..tensors import leaf_tensors, tensor_nbytes
from .safetensors_io import CheckpointFiles, SafetensorsReader
from .skeleton import BUILD_LOCK, build_empty_model, check_loaded_tensor

__all__ = [
    "load_and_quantize",
    "release_freed_memory_to_os",
    "reuse_layer_sized_blocks",
    "tensor_worker_pool",
    "default_workers",
]

logger = logging.getLogger(__name__)

#: The streaming loader hands freed memory back to the OS when resident memory has grown this much
#: since it last did (measured on a 1.1B Llama: 64 MiB of weights between trims cost INT8 ~1 s).
_TRIM_SLACK = 256 * 2**20


@functools.cache
def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl)
        return None


def release_freed_memory_to_os() -> bool:
    """Return the memory the allocator holds free to the OS (glibc ``malloc_trim(0)``).

    Streaming a checkpoint allocates and frees one full-precision layer and its temporaries after
    another, between the small long-lived quantized tensors. glibc keeps such freed heap memory for
    reuse, which is fast but grows with fragmentation: measured on a 1.1B Llama, NF4 peaked at
    2.3 GB instead of 1.45 GB. The streaming loader calls this whenever resident memory has grown
    by 256 MiB, which bounds the memory and keeps the fast reuse between calls. (Forcing every
    block >= 1 MiB into its own mapping instead, with ``mallopt(M_MMAP_THRESHOLD)``, bounds it too
    but makes each temporary fault its pages in afresh: elementwise ops ran 3-5x slower.) A no-op
    outside glibc; returns whether memory was released.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


#: glibc's largest dynamic mmap threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``)
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


@functools.cache
def _mallopt() -> Any:
    if _malloc_trim() is None:
        return None
    return getattr(ctypes.CDLL("libc.so.6"), "mallopt", None)


@contextlib.contextmanager
def reuse_layer_sized_blocks() -> Iterator[None]:
    """Within the block glibc keeps layer-sized temporaries in its heap for the next layer instead
    of handing them back to the OS at every free (the streaming loader's own trims, every 256 MiB of
    growth, still bound the memory).

    glibc maps a request of at least its *dynamic* mmap threshold afresh (every page faults in,
    zeroed), and ``free`` hands the top of the heap back once it exceeds twice that threshold. The
    threshold starts at 128 KiB and rises with the largest mapped block freed, up to 32 MiB, where it
    stays. HQQ's optimizer allocates ~400 MB of float32 temporaries per 3584x1024 expert and frees
    them at the end of the layer: each layer then faults them in again. Measured on a 3-layer
    Mixtral: 6.7-11.3M page faults and 16-21 s of system time in a 23-34 s load, against 0.8M and
    2 s with these settings, peak RSS unchanged.

    On exit glibc is left where its own heuristic goes after any free of a 32 MiB block (what
    ``from_pretrained`` and most torch programs do on their way): mmap threshold 32 MiB, trim
    threshold 64 MiB, fixed there as the heuristic would keep them. A no-op outside glibc.
    """
    mallopt = _mallopt()
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD_MAX)



def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """Install ``value`` as the parameter or buffer ``name`` of ``model`` and return what was
    installed: an ``nn.Parameter`` as it is (tied weights share one), a plain tensor as a new
    parameter with the ``requires_grad`` of the one it replaces."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        if not isinstance(value, nn.Parameter):
            old = module._parameters[attr]
            value = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
        module._parameters[attr] = value
    elif attr in module._buffers:
        value = value.detach() if isinstance(value, nn.Parameter) else value
        module._buffers[attr] = value
    else:
        raise ValueError(f"tensor {name!r} of the checkpoint is not a parameter or buffer of the model")
    return value


class _Piece:
    """A tensor on its way into the model: a checkpoint entry (read from the mapped file when it is
    used) or a tensor that one of transformers' weight conversions produced, or one expert's slice
    of either (``mapped``: the reader whose file it views; ``on_release``: called instead of
    releasing pages, once the slice is done with)."""

    __slots__ = ("reader", "key", "tensor", "mapped", "on_release")

    def __init__(self, reader: SafetensorsReader | None = None, key: str | None = None,
                 tensor: torch.Tensor | None = None, mapped: SafetensorsReader | None = None,
                 on_release: Any = None):
        self.reader, self.key, self.tensor = reader, key, tensor
        self.mapped, self.on_release = mapped, on_release

    @property
    def file(self) -> SafetensorsReader | None:
        """The reader whose memory map the tensor may view (``None``: process memory)."""
        return self.reader if self.tensor is None else self.mapped

    def view(self) -> torch.Tensor:
        """The tensor without a copy (a view of the mapped file for a checkpoint entry)."""
        return self.reader.view(self.key) if self.tensor is None else self.tensor

    def read(self, dtype: torch.dtype | None) -> torch.Tensor:
        """The tensor in process memory, floating tensors converted to ``dtype`` when given."""
        if self.tensor is None:
            return self.reader.read(self.key, dtype)
        t = self.tensor
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            return t.to(dtype)
        return t.clone() if self.mapped is not None else t

    def release(self) -> None:
        if self.tensor is None:
            self.reader.release([self.key])
        elif self.on_release is not None:
            self.on_release()


class _Countdown:
    """Calls ``action`` once ``count`` calls have been made (from any thread)."""

    __slots__ = ("count", "action", "lock")

    def __init__(self, count: int, action: Any):
        self.count, self.action, self.lock = count, action, threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            self.count -= 1
            due = self.count == 0
        if due:
            self.action()


@dataclass
class _ExpertTensor:
    """A fused experts tensor of the architecture (``block.gate_up_proj``, ``block.down_proj_bias``)
    whose block is unfused for quantization: it reaches the model one expert at a time, as the
    per-expert layer ``block.<e>.<projection>.<attr>``."""

    block: str
    projection: str
    attr: str  # "weight" or "bias"
    num_experts: int
    transposed: bool

    def expert_key(self, e: int) -> str:
        return f"{self.block}.{e}.{self.projection}.{self.attr}"

    def expert_slice(self, fused: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e`` of the fused tensor as its linear layer holds it (a view, as
        :func:`~quantization_wrapper.experts.unfuse_experts` makes it)."""
        t = fused[e]
        return t.t() if self.transposed and self.attr == "weight" else t


@dataclass
class _Assembly:
    """A fused experts tensor that transformers assembles from per-expert checkpoint tensors
    (``MergeModulelist`` first, then per-expert operations only), assembled one expert at a time.

    Attributes:
        converter: transformers' converter (no tensor added), copied for each expert.
        pieces: per expert, its ``(checkpoint key, source pattern)`` in ``from_pretrained``'s order.
        expert_of: checkpoint key -> its expert (its place in the stacked list of its pattern).
        left: per expert, the checkpoint tensors still to arrive.
    """

    tensor: _ExpertTensor
    converter: Any
    pieces: list[list[tuple[str, str]]]
    expert_of: dict[str, int]
    left: list[int]


@dataclass
class _Route:
    """Where each checkpoint tensor goes, decided by transformers' own loading rules
    (:func:`_route_checkpoint`).

    Attributes:
        renamed: checkpoint key -> model key, for tensors loaded as they are (renamed or not).
        converted_from: checkpoint key -> the first target key of the conversion it feeds.
        converters: first target key -> its own copy of the transformers ``WeightConverter``.
        pieces: first target key -> ``(checkpoint key, source pattern)`` in the order
            ``from_pretrained`` collects them (which fixes, e.g., the expert order of a fused tensor).
        outputs: first target key -> the model keys its conversion fills.
        fills: model key -> tied model keys the checkpoint lacks, which get its tensor.
        equal_ties: tied ``(target, source)`` pairs both in the checkpoint; tied when their values
            agree, as ``from_pretrained`` does.
        unexpected: names of checkpoint tensors the model has no place for (after its ignore lists).
        missing: model keys nothing fills (after its ignore lists).
        optional: model keys nothing fills that the model declares ignorable when missing.
        used: the transforms that matched a key (kept on the model as ``from_pretrained`` keeps them).
    """

    renamed: dict[str, str] = field(default_factory=dict)
    converted_from: dict[str, str] = field(default_factory=dict)
    converters: dict[str, Any] = field(default_factory=dict)
    pieces: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    fills: dict[str, list[str]] = field(default_factory=dict)
    equal_ties: list[tuple[str, str]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    optional: list[str] = field(default_factory=list)
    used: list[Any] = field(default_factory=list)


def _loading_info(transformers_info: Any, missing: set[str]) -> Any:
    """An empty ``LoadStateDictInfo`` (its fields differ between transformers 5 releases)."""
    names = {f.name for f in fields(transformers_info)}
    values = {"missing_keys": set(missing), "unexpected_keys": set(), "mismatched_keys": set(),
              "error_msgs": [], "conversion_errors": {}, "skipped_pp_keys": set()}
    return transformers_info(**{k: v for k, v in values.items() if k in names})


def _route_checkpoint(model: nn.Module, keys: list[str]) -> _Route:
    """Route the checkpoint tensors ``keys`` into ``model`` as ``from_pretrained`` would, by its own
    rules: the model's conversion mapping (``get_model_conversion_mapping``: per-model renamings and
    ``WeightConverter`` s such as per-expert MoE weights fused into 3-D tensors, plus the legacy
    ``gamma``/``beta`` names), ``rename_source_key`` (which also adds or strips
    ``base_model_prefix``), the tied weights of ``all_tied_weights_keys`` (a missing side gets the
    other's tensor, either way round, as ``tie_weights`` does during loading) and the model's
    ignore lists (``_adjust_missing_and_unexpected_keys``). Only the names are routed; nothing is read.

    The loop follows ``convert_and_load_state_dict_in_model``: keys in its order, the same fallback
    for keys that should not have been renamed, one converter copy per target key.
    """
    from copy import deepcopy

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming, _add_unmatched_checkpoint_key,
                                                     dot_natural_key, rename_source_key)
        from transformers.utils.loading_report import LoadStateDictInfo
    except ImportError as e:  # transformers 4 loads by other rules
        raise ImportError(f"load_and_quantize follows the loading rules of transformers 5 ({e}); "
                          f"pip install -U 'transformers>=5.0'") from e

    route = _Route()
    with BUILD_LOCK:  # the mapping table is built (and its classes imported) on first use
        transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    info = _loading_info(LoadStateDictInfo, set(expected))
    for key in sorted(keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if target not in expected and key in expected:  # should not have been renamed; maybe the prefix
            target, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=expected)
        if target in expected:
            if pattern is None:
                if target not in info.missing_keys:  # a second name for one tensor ('gamma' and
                    continue                         # 'weight'): the first counts, as in from_pretrained
                route.renamed[key] = target
                info.missing_keys.discard(target)
                continue
            converter = route.converters.setdefault(target, deepcopy(by_pattern[pattern]))
            route.pieces.setdefault(target, []).append((key, pattern))
            route.converted_from[key] = target
            if target not in route.outputs:
                route.outputs[target] = [target.replace(converter.target_patterns[0], t)
                                         for t in converter.target_patterns]
                info.missing_keys.difference_update(route.outputs[target])
        elif pattern is not None:
            first = by_pattern[pattern].target_patterns[0]
            for t in by_pattern[pattern].target_patterns:
                _add_unmatched_checkpoint_key(target.replace(first, t), model, info)
        else:
            _add_unmatched_checkpoint_key(target, model, info)

    _route_tied(model, info.missing_keys, route)
    before = set(info.missing_keys)
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if adjust is not None:
        adjust(info)
    route.missing = sorted(info.missing_keys)
    route.optional = sorted(before - info.missing_keys)
    route.unexpected = sorted(info.unexpected_keys)
    route.used = [t for t in transforms if t.was_used()]
    return route


def _route_tied(model: nn.Module, missing: set[str], route: _Route) -> None:
    """The decisions ``PreTrainedModel.tie_weights(missing_keys=...)`` takes while loading, pair by
    pair of ``all_tied_weights_keys``: a missing target gets its source's tensor; a missing source
    gets the target's (swapped); when both are missing, a later pair with the same source that the
    checkpoint has provides it (else both stay missing, as transformers leaves them); when both are
    present they are tied only if equal (checked once loaded). ``missing`` loses the keys filled."""
    pairs = list((getattr(model, "all_tied_weights_keys", None) or {}).items())
    root: dict[str, str] = {}  # a filled key -> the checkpoint-backed key whose tensor it gets
    for i, (target, source) in enumerate(pairs):
        source_there, target_there = source not in missing, target not in missing
        if source_there and target_there:
            route.equal_ties.append((target, source))
            continue
        if target_there:
            target, source = source, target
        elif not source_there:
            for backup_target, backup_source in pairs[i + 1:]:
                if backup_source == source and backup_target not in missing:
                    source = backup_target
                    break
            else:
                continue
        root[target] = root.get(source, source)
        route.fills.setdefault(root[target], []).append(target)
        missing.discard(target)


def _plan_with_experts_unfused(model: nn.Module, adapter: Any, module_filter: Any
                               ) -> tuple[list[LayerDecision], dict[str, _ExpertTensor], set[str]]:
    """Plan the skeleton as ``quantize_model`` plans a model: every fused experts module becomes a
    container of per-expert linear layers (on meta) and the layers are planned; a block with no
    expert to quantize gets its fused module back (its experts' decisions stay in the plan).

    Returns the decisions, the fused tensors of the blocks left unfused (model key -> where each
    expert goes) and the names of every fused experts module."""
    fused = [(name, module) for name, module in iter_fused_experts(model) if name]
    for name, module in fused:
        model.set_submodule(name, unfuse_experts(module))
    decisions = plan_linear_layers(model, adapter, module_filter=module_filter)
    quantized = [d.name for d in decisions if d.config is not None]
    split: dict[str, _ExpertTensor] = {}
    for name, module in fused:
        if not any(n.startswith(f"{name}.") for n in quantized):
            model.set_submodule(name, module)
            continue
        transposed = bool(getattr(module, "is_transposed", False))
        projections = {layer.rpartition(".")[2] for layer, *_ in expert_layer_shapes(name, module)}
        for key, param in module._parameters.items():
            projection, is_bias = (key[:-len("_bias")], True) if key.endswith("_bias") else (key, False)
            if param is None or projection not in projections:
                continue
            split[f"{name}.{key}"] = _ExpertTensor(name, projection, "bias" if is_bias else "weight",
                                                   param.shape[0], transposed)
    return decisions, split, {name for name, _ in fused}


def _assembled_per_expert(converter: Any) -> bool:
    """Whether transformers' ``converter`` stacks per-expert tensors first (``MergeModulelist`` along
    dimension 0) and then only transforms each expert on its own (``Concatenate``/``Interleave``
    along another dimension, ``Transpose`` of two others without a shape check): then converting
    one expert's tensors gives exactly that expert's slice of the fused tensor."""
    try:
        from transformers.core_model_loading import Concatenate, Interleave, MergeModulelist, Transpose
    except ImportError:
        return False
    ops = list(getattr(converter, "operations", None) or [])
    if getattr(converter, "quantization_operation", None) is not None:
        return False
    if not ops or type(ops[0]) is not MergeModulelist or ops[0].dim != 0:
        return False
    for op in ops[1:]:
        if type(op) in (Concatenate, Interleave) and op.dim % 3 != 0:
            continue
        if type(op) is Transpose and not op.check_dims and 0 not in (op.dim0 % 3, op.dim1 % 3):
            continue
        return False
    return True


def _assemblies(route: _Route, split: dict[str, _ExpertTensor]) -> dict[str, _Assembly]:
    """The conversions into unfused blocks' tensors that can run one expert at a time: a single
    target, operations :func:`_assembled_per_expert`, and as many tensors per source pattern as
    the block has experts (the i-th of each pattern is expert i, as ``MergeModulelist`` stacks them)."""
    out = {}
    for target, pieces in route.pieces.items():
        tensor = split.get(target)
        converter = route.converters.get(target)
        if tensor is None or route.outputs.get(target) != [target] or not _assembled_per_expert(converter):
            continue
        per_pattern: dict[str, int] = {}
        expert_of = {}
        for key, pattern in pieces:
            expert_of[key] = per_pattern.get(pattern, 0)
            per_pattern[pattern] = expert_of[key] + 1
        if set(per_pattern.values()) != {tensor.num_experts}:
            continue
        by_expert: list[list[tuple[str, str]]] = [[] for _ in range(tensor.num_experts)]
        for key, pattern in pieces:
            by_expert[expert_of[key]].append((key, pattern))
        out[target] = _Assembly(tensor, converter, by_expert, expert_of, [len(p) for p in by_expert])
    return out


class _RoutedModel:
    """The model as transformers' conversions see it (some read ``model.get_parameter(target)`` for
    its shape or dtype): the architecture's tensors as the checkpoint was routed into them, fused
    experts included, whatever has been unfused or quantized since."""

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor]):
        self._model, self._tensors = model, tensors

    def get_parameter(self, name: str) -> torch.Tensor:
        t = self._tensors.get(name)
        return t if t is not None else self._model.get_parameter(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def load_and_quantize(checkpoint_dir: str | os.PathLike, config: QuantizationConfig | None = None, *,
                      backend: Backend | str | None = None, dtype: torch.dtype | str | None = None,
                      workers: int | None = None, progress: bool = True, module_filter: Any = None) -> nn.Module:
    """Load a transformers checkpoint and quantize it on the fly, never holding it in full precision.

    The result equals loading the model with ``from_pretrained`` and then calling ``quantize_model``
    (bit-identical quantized tensors), at a fraction of the peak memory. The returned model owns
    its memory: it does not depend on the checkpoint files afterwards.

    The checkpoint is matched to the architecture by transformers' own loading rules (see
    :func:`_route_checkpoint`): its renamings and legacy names, ``base_model_prefix`` added or
    stripped, tied weights, the model's ignore lists, and its weight conversions. A conversion
    runs when the last of its checkpoint tensors has arrived. MoE experts are quantized per expert,
    as ``quantize_model`` quantizes them (``skip_modules``/``layer_configs`` address a block,
    ``mlp.experts``, an expert, ``layers.0.mlp.experts.3``, or a projection): each expert is
    assembled from its per-expert checkpoint tensors by transformers' conversion run on that expert
    alone and quantized at once, never the whole fused tensor in float; a block none of whose
    experts is quantized keeps transformers' fused module, filled with the fused tensor.

    Unlike ``from_pretrained``, which initializes the weights a checkpoint lacks randomly and only
    logs it, a checkpoint that lacks weights of the architecture is refused, naming them (the
    typical cause: ``architectures`` names a head model and the checkpoint holds a base model, or the
    reverse). Weights the model declares optional (``_keys_to_ignore_on_load_missing``) are
    initialized by the model's ``_init_weights``, as ``from_pretrained`` does, with a warning.
    Checkpoint tensors the architecture has no place for are skipped with a warning, as
    ``from_pretrained`` skips them (it logs them).

    Args:
        checkpoint_dir: directory with ``config.json`` and ``model.safetensors`` or sharded
            safetensors plus ``model.safetensors.index.json``.
        config: the quantization config; ``None`` recommends one for the backend and the number
            of parameters in the checkpoint.
        backend: a :class:`~backend_manager.Backend` or its string (``None``: detect).
        dtype: dtype of the non-quantized parameters and of the weights handed to the quantizer
            (``None``: as stored in the checkpoint); parameters the model keeps in float32
            (``_keep_in_fp32_modules``) stay float32, as ``from_pretrained(dtype=...)`` keeps them.
        workers: threads that quantize layers concurrently while this one reads. ``None``: 2 on a
            machine with at least 2 cores when a second layer's temporaries fit in 256 MiB
            (``quantize_workspace_per_weight`` of the adapter: about 16 bytes per weight for NF4,
            110 for HQQ), else 1 (quantize in the reading thread). Each worker runs torch ops on
            ``cores // workers`` threads (set for that thread only): two layers side by side on
            one core each beat one layer on two cores, because quantization is a chain of small
            memory-bound ops.
        progress: show a tqdm progress bar over the tensors.
        module_filter: as in ``quantize_model``.

    Returns:
        The quantized model (eval mode) with its ``quantization_plan``.

    Raises:
        ValueError: missing files or shards, an index that does not match the shards, tensors
            whose shapes do not match the architecture, or weights of the architecture that the
            checkpoint lacks (named).
    """
    from ..factory import create_quantization_adapter

    checkpoint_dir = Path(checkpoint_dir)
    dtype = parse_dtype(dtype, "dtype")
    release_freed_memory_to_os()
    backend = detect_backend() if backend is None else Backend.parse(backend)
    cores = os.cpu_count() or 1
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ValueError(f"workers={workers!r} must be a positive int (threads that quantize layers side by side)")
    with CheckpointFiles(checkpoint_dir) as files:
        shapes = files.shapes()
        if config is None:
            from ..recommend import get_recommended_config

            size_b = sum(math.prod(shape) for shape in shapes.values()) / 1e9
            config = get_recommended_config(backend, size_b)
        adapter = create_quantization_adapter(backend, config)
        model = build_empty_model(checkpoint_dir, dtype)
        # The checkpoint is routed into the architecture as transformers builds it (fused experts);
        # then the experts are unfused and planned per expert, as quantize_model plans them.
        expected = dict(model.state_dict(keep_vars=True))
        route = _route_checkpoint(model, list(shapes))
        planned, split, expert_blocks = _plan_with_experts_unfused(model, adapter, module_filter)
        decisions = {d.name: d for d in planned}
        if workers is None:
            workers = default_workers(cores, decisions.values())
        _check_keys(checkpoint_dir, model, expected, shapes, route)
        routed = _RoutedModel(model, dict(expected))
        expected.update(model.state_dict(keep_vars=True))  # the unfused experts' layers
        reader_of = {key: reader for reader in files.readers for key in reader.keys()}
        assemblies = _assemblies(route, split)
        remaining = {target: len(pieces) for target, pieces in route.pieces.items() if target not in assemblies}

        def wanted(name: str) -> torch.dtype | None:
            """The dtype ``name`` is loaded in: the architecture's (as built for ``dtype``), or as stored."""
            like = expected[name]
            return like.dtype if dtype is not None and like.is_floating_point() else None

        pending: dict[str, dict[str, _Piece]] = {}
        jobs: list[Future] = []
        bar = tqdm(total=len(shapes), desc=f"loading+quantizing ({adapter.config.method.value})", unit="tensor",
                   disable=not progress)

        process, trim_lock = psutil.Process(), threading.Lock()
        after_trim = [process.memory_info().rss]

        def finish(decision: LayerDecision, pieces: dict[str, _Piece]) -> tuple[str, nn.Module]:
            linear = decision.linear
            tensors = {attr: piece.view() for attr, piece in pieces.items()}
            if dtype is not None:
                tensors = {a: t.to(getattr(linear, a).dtype) if t.is_floating_point() else t
                           for a, t in tensors.items()}
            real = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
            real.weight = nn.Parameter(tensors["weight"], requires_grad=False)
            if linear.bias is not None:
                real.bias = nn.Parameter(tensors["bias"], requires_grad=False)
            real.train(linear.training)
            weight_dtype = real.weight.dtype
            module = convert_layer(adapter, LayerDecision(decision.name, real, decision.config, decision.reason))
            del real, tensors
            # The weights went in frozen (no autograd while quantizing); the float parameters the
            # layer keeps (a bias, the fallback's weight) get the flag the architecture gives them,
            # as quantize_model leaves them.
            for attr in ("weight", "bias"):
                kept = module._parameters.get(attr)
                if type(kept) is nn.Parameter and kept.is_floating_point() and getattr(linear, attr) is not None:
                    kept.requires_grad_(getattr(linear, attr).requires_grad)
            for reader in {id(p.file): p.file for p in pieces.values() if p.file is not None}.values():
                _own_memory(module, reader, decision.name)
            for piece in pieces.values():
                piece.release()
            # Hand the freed temporaries back once resident memory has grown by _TRIM_SLACK since
            # the last trim: a trim costs 5-20 ms, so trimming after every layer would cost seconds.
            with trim_lock:
                due = process.memory_info().rss > after_trim[0] + _TRIM_SLACK
            if due:
                release_freed_memory_to_os()
                with trim_lock:
                    after_trim[0] = process.memory_info().rss
            # The plan's "bytes before" is that of the weights as loaded; keep only their shape/dtype.
            decisions[decision.name] = LayerDecision(
                decision.name, nn.Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                         device="meta", dtype=weight_dtype), decision.config, decision.reason)
            return decision.name, module

        def deliver(name: str, piece: _Piece, pool: Any) -> None:
            """Hand the tensor of model key ``name`` (and of the tied keys it fills) to its layer to
            quantize, or install it; tied float parameters share one ``nn.Parameter``. A fused
            experts tensor of an unfused block goes to its experts' layers, one view per expert."""
            expert_tensor = split.get(name)
            if expert_tensor is not None:
                whole = piece.view()
                done = _Countdown(expert_tensor.num_experts, piece.release)
                for e in range(expert_tensor.num_experts):
                    deliver(expert_tensor.expert_key(e), _Piece(tensor=expert_tensor.expert_slice(whole, e),
                                                                mapped=piece.file, on_release=done), pool)
                return
            shared = None
            for target in (name, *route.fills.get(name, ())):
                module_name, _, attr = target.rpartition(".")
                decision = decisions.get(module_name)
                if decision is not None and decision.config is not None and attr in ("weight", "bias"):
                    slot = pending.setdefault(module_name, {})
                    slot[attr] = piece
                    needed = {"weight", "bias"} if decision.linear.bias is not None else {"weight"}
                    if needed <= slot.keys():
                        jobs.append(pool.submit(finish, decision, pending.pop(module_name)))
                        # Bound the layers in flight; collect finished ones as they come.
                        while jobs and (len(jobs) > 2 * workers or jobs[0].done()):
                            _install(model, jobs.pop(0).result())
                else:
                    shared = _set_tensor(model, target, piece.read(wanted(target)) if shared is None else shared)
            if shared is not None:
                piece.release()

        def run_conversion(converter: Any, target: str, pieces: list, what: str) -> dict:
            """Feed ``pieces`` (checkpoint key, pattern) to ``converter`` and run it into ``target``, as
            from_pretrained does; the pieces' pages go back at once, also on failure."""
            for key, pattern in pieces:
                converter.add_tensor(target, key, pattern, functools.partial(reader_of[key].read, key, wanted(target)))
            try:
                return converter.convert(target, model=routed, config=getattr(model, "config", None))
            except Exception as e:
                raise ValueError(f"{checkpoint_dir}: transformers' conversion {converter!r} of {what} "
                                 f"({pieces[0][0]!r}, ...) into {target!r} failed: {type(e).__name__}: {e}") from e
            finally:
                for key, _ in pieces:
                    reader_of[key].release([key])

        def convert(target: str) -> None:
            """Run the conversion whose last checkpoint tensor has arrived, as from_pretrained runs it
            (its pieces in from_pretrained's order, each in the dtype of the target), and deliver what
            it produces; the pieces' pages go back at once."""
            converter, pieces = route.converters.pop(target), route.pieces.pop(target)
            produced = run_conversion(converter, target, pieces, f"{len(pieces)} checkpoint tensors")
            for name, value in produced.items():
                value = value[0] if isinstance(value, list) else value
                if name not in expected:
                    raise ValueError(f"{checkpoint_dir}: transformers' conversion {converter!r} produced {name!r}, "
                                     f"which is not a tensor of the architecture")
                check_loaded_tensor(checkpoint_dir, f"{name!r} (converted from the checkpoint)", value,
                                    expected[name], dtype=None, error=ValueError,
                                    architecture="the architecture described by config.json")
                deliver(name, _Piece(tensor=value), pool)

        def convert_expert(target: str, e: int) -> None:
            """Run the conversion of one expert's checkpoint tensors (all arrived) into its slice of the
            fused tensor ``target`` -- what from_pretrained's conversion of every expert holds at index
            ``e`` -- and deliver it to the expert's layer: the fused tensor never exists."""
            assembly = assemblies[target]
            converter, pieces = copy.deepcopy(assembly.converter), assembly.pieces[e]
            produced = run_conversion(converter, target, pieces, f"expert {e}'s checkpoint tensors")
            if set(produced) != {target}:
                raise ValueError(f"{checkpoint_dir}: transformers' conversion {converter!r} of expert {e} produced "
                                 f"{sorted(produced)}, not {target!r}")
            value = produced[target]
            value = value[0] if isinstance(value, list) else value
            check_loaded_tensor(checkpoint_dir, f"{target!r}, expert {e} (converted from {pieces[0][0]!r}, ...)",
                                value, expected[target][e:e + 1], dtype=None, error=ValueError,
                                architecture="the architecture described by config.json")
            deliver(assembly.tensor.expert_key(e), _Piece(tensor=assembly.tensor.expert_slice(value, 0)), pool)

        with reuse_layer_sized_blocks(), tensor_worker_pool(workers, "quantize") as pool:
            for reader in files.readers:
                for key in reader.keys():
                    bar.update(1)
                    if key in route.renamed:
                        deliver(route.renamed[key], _Piece(reader, key), pool)
                    elif key in route.converted_from and route.converted_from[key] in assemblies:
                        target = route.converted_from[key]
                        assembly = assemblies[target]
                        e = assembly.expert_of[key]
                        assembly.left[e] -= 1
                        if not assembly.left[e]:
                            convert_expert(target, e)
                    elif key in route.converted_from:
                        target = route.converted_from[key]
                        remaining[target] -= 1
                        if not remaining[target]:
                            convert(target)
            while jobs:
                _install(model, jobs.pop(0).result())
        bar.close()
    _initialize_optional(model, route.optional, checkpoint_dir)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftovers:
        raise ValueError(f"{checkpoint_dir}: these tensors of the architecture are not in the checkpoint: "
                         f"{leftovers[:10]}")
    _tie_equal(model, route.equal_ties, decisions)
    _as_loaded_in_fused_blocks(model, decisions, expert_blocks - {t.block for t in split.values()})
    model._weight_conversions = route.used  # as from_pretrained keeps them, to save in the checkpoint's layout
    _warn_float_conversions(model, route, decisions, expert_blocks, checkpoint_dir)
    record_plan(model, adapter, list(decisions.values()))
    model._qw_source_dir = str(checkpoint_dir.resolve())  # a save never writes over its source weights
    model.eval()
    return model


def _names(keys: list[str], limit: int = 20) -> str:
    more = len(keys) - limit
    return f"{keys[:limit]}" + (f" and {more} more" if more > 0 else "")


def _initialize_optional(model: nn.Module, keys: list[str], where: Path) -> None:
    """Initialize the weights the checkpoint lacks that the model declares optional
    (``_keys_to_ignore_on_load_missing``) and that are still on meta, as ``from_pretrained`` does:
    on the CPU, by the ``_init_weights`` of the transformers model that owns them. The module's
    other tensors, loaded already, keep their values. Warns, naming them (from_pretrained does not)."""
    base = getattr(sys.modules.get("transformers"), "PreTrainedModel", None)
    todo: dict[str, list[str]] = {}
    for key in keys:
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        tensor = module._parameters.get(attr, module._buffers.get(attr))
        if tensor is not None and tensor.device.type == "meta":
            todo.setdefault(module_name, []).append(attr)
    if not todo or base is None:
        return
    for module_name, attrs in todo.items():
        module = model.get_submodule(module_name) if module_name else model
        parts = module_name.split(".") if module_name else []
        owner = next(m for m in (model.get_submodule(".".join(parts[:i])) for i in range(len(parts), -1, -1))
                     if isinstance(m, base))
        stores = (module._parameters, module._buffers)
        loaded = {(i, n): (t, t.detach().clone()) for i, store in enumerate(stores) for n, t in store.items()
                  if t is not None and n not in attrs and t.device.type != "meta"}
        for attr in attrs:
            if attr in module._parameters:
                p = module._parameters[attr]
                module._parameters[attr] = nn.Parameter(torch.empty_like(p, device="cpu"),
                                                        requires_grad=p.requires_grad)
            else:
                module._buffers[attr] = torch.empty_like(module._buffers[attr], device="cpu")
        with torch.no_grad():
            owner._init_weights(module)
            for (i, n), (tensor, value) in loaded.items():  # an init that does not skip loaded tensors
                stores[i][n] = tensor
                if not torch.equal(tensor, value):
                    tensor.copy_(value)
    names = [f"{m}.{a}" if m else a for m, attrs in todo.items() for a in attrs]
    warnings.warn(f"{where}: the checkpoint lacks {_names(names)}, which {type(model).__name__} declares optional "
                  f"(_keys_to_ignore_on_load_missing); they were initialized by the model's _init_weights, as "
                  f"from_pretrained initializes them", stacklevel=3)


def _tie_equal(model: nn.Module, pairs: list[tuple[str, str]], decisions: dict[str, LayerDecision]) -> None:
    """Tie the float parameters of tied pairs that the checkpoint holds both of, when their values
    agree (else they stay apart and leave ``all_tied_weights_keys``), as ``tie_weights`` does while
    loading. Pairs with a side in a quantized layer stay as they are (so does ``quantize_model``)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    for target, source in pairs:
        if any((d := decisions.get(n.rpartition(".")[0])) is not None and d.config is not None
               for n in (target, source)):
            continue
        try:
            t, s = model.get_parameter(target), model.get_parameter(source)
        except AttributeError:
            continue
        if t is s:
            continue
        if t.shape == s.shape and t.dtype == s.dtype and torch.equal(t, s):
            _set_tensor(model, target, s)
        else:
            logger.warning("%s and %s are tied by the config but differ in the checkpoint; they stay apart "
                           "(set tie_word_embeddings=False in config.json to silence this)", target, source)
            if isinstance(tied, dict):
                tied.pop(target, None)


def _as_loaded_in_fused_blocks(model: nn.Module, decisions: dict[str, LayerDecision], blocks: set[str]) -> None:
    """The plan measures an expert of a block that kept its fused module by its decision's layer
    (``quantize_model``'s: a view of the fused tensor as loaded); here that layer was built on meta
    in the skeleton's dtype, so it gets the dtype the fused tensor was loaded in."""
    for name, d in list(decisions.items()):
        block, _, rest = name.rpartition(".")[0].rpartition(".")
        if d.config is not None or block not in blocks:
            continue
        projection = name.rpartition(".")[2]
        fused = model.get_submodule(block)._parameters.get(projection)
        if fused is None or fused.dtype == d.linear.weight.dtype:
            continue
        layer = nn.Linear(d.linear.in_features, d.linear.out_features, d.linear.bias is not None, device="meta",
                          dtype=fused.dtype)
        decisions[name] = LayerDecision(name, layer, d.config, d.reason)


def _warn_float_conversions(model: nn.Module, route: _Route, decisions: dict[str, LayerDecision],
                            expert_blocks: set[str], where: Path) -> None:
    """Warn about the tensors transformers' weight conversions built that are neither ``nn.Linear``
    weights nor MoE experts (which are planned per expert, the plan saying why a block stays fused):
    no adapter quantizes them, so they stay in float."""
    names = sorted({n for outputs in route.outputs.values() for n in outputs
                    if n.rpartition(".")[0] not in decisions and n.rpartition(".")[0] not in expert_blocks})
    if not names:
        return
    state = model.state_dict(keep_vars=True)
    size = tensor_nbytes(state[n] for n in names if n in state)
    dtypes = sorted({str(state[n].dtype).removeprefix("torch.") for n in names if n in state})
    warnings.warn(f"{where}: {len(names)} tensors that transformers builds on load from several checkpoint "
                  f"tensors ({names[:3]}) are neither nn.Linear layers nor MoE experts and stay in "
                  f"{'/'.join(dtypes)} ({size / 2**20:.1f} MiB), as quantize_model leaves them", stacklevel=3)


#: A second quantizing worker is used when its temporaries fit in this much memory.
_SECOND_WORKER_WORKSPACE = 256 * 2**20


def default_workers(cores: int, decisions: Any) -> int:
    """2 on a machine with 2+ cores when a second layer's quantization temporaries (the largest
    layer's weights x its adapter's ``quantize_workspace_per_weight``) fit in 256 MiB, else 1: the
    streaming budget is the quantized model plus 0.5 GB, and HQQ's optimizer, for one, needs ~110
    bytes per weight."""
    if cores < 2:
        return 1
    workspace = max((d.linear.in_features * d.linear.out_features
                     * get_adapter_class(d.config.method).quantize_workspace_per_weight
                     for d in decisions if d.config is not None), default=0)
    return 2 if workspace <= _SECOND_WORKER_WORKSPACE else 1


def _own_memory(module: nn.Module, reader: SafetensorsReader, name: str) -> None:
    """Give ``module`` private copies of any parameter or buffer that still views ``reader``'s
    mapping (an adapter that keeps its input weight as is): the model must not depend on the file,
    and the layer's pages are about to be released."""
    span = reader.mapped_span()
    if span is None:
        return
    lo, hi = span
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for attr, t in list(store.items()):
                if t is None or t.device.type != "cpu":
                    continue
                leaves = leaf_tensors(t)
                if not any(lo <= leaf.data_ptr() < hi for leaf in leaves if leaf.numel()):
                    continue
                if type(t) not in (torch.Tensor, nn.Parameter):
                    raise RuntimeError(f"{name}: the quantized layer's {attr!r} ({type(t).__name__}) shares "
                                       f"memory with the checkpoint file; report this adapter bug")
                copy = t.detach().clone()
                store[attr] = nn.Parameter(copy, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else copy


class _Inline:
    """The ``ThreadPoolExecutor`` interface, running each job at once in the calling thread."""

    def __enter__(self) -> "_Inline":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def submit(self, fn: Any, *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # delivered by .result(), as a pool would
            future.set_exception(e)
        return future


@contextlib.contextmanager
def tensor_worker_pool(workers: int, name: str) -> Any:
    """An executor for layer-sized tensor work: ``workers`` threads running torch ops on
    ``cores // workers`` threads each, or the calling thread when ``workers`` is 1.

    ``torch.set_num_threads`` in a worker also changes the count that threads created later in the
    process start with; the count is restored on exit, so the call leaves it as it was.
    """
    if workers <= 1:
        yield _Inline()
        return
    # Pools of concurrent loads overlap: the first one in records the count, the last one out
    # restores it (a pool entered inside another would read the lowered count as its own).
    with _POOLS_LOCK:
        if not _POOLS:
            _POOLS.append(torch.get_num_threads())
        _POOLS.append(0)
    per_worker = max(1, (os.cpu_count() or 1) // workers)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name,
                                initializer=torch.set_num_threads, initargs=(per_worker,)) as pool:
            yield pool
    finally:
        with _POOLS_LOCK:
            _POOLS.pop()
            if len(_POOLS) == 1:
                torch.set_num_threads(_POOLS.pop())


_POOLS_LOCK = threading.Lock()
_POOLS: list[int] = []  # [thread count before the first pool, one entry per pool open]


def _install(model: nn.Module, result: tuple[str, nn.Module]) -> None:
    name, module = result
    model.set_submodule(name, module)


def _check_keys(checkpoint_dir: Path, model: nn.Module, expected: dict[str, torch.Tensor],
                shapes: dict[str, tuple[int, ...]], route: _Route) -> None:
    """Before anything is read: refuse shapes that differ from the architecture's (``from_pretrained``
    refuses them too) and weights the checkpoint lacks that would stay uninitialized (it would
    initialize them randomly); warn about checkpoint tensors that are skipped (it logs them)."""
    for key, target in route.renamed.items():
        name = repr(key) if key == target else f"{key!r} (the architecture's {target!r})"
        check_loaded_tensor(checkpoint_dir, name, shapes[key], expected[target], error=ValueError,
                            architecture="the architecture described by config.json")
    absent = [k for k in route.missing if expected[k].device.type == "meta"]
    if absent:
        raise ValueError(
            f"{checkpoint_dir}: config.json does not match the weights: the architecture needs {_names(absent)}, "
            f"which no shard contains ({type(model).__name__}, as config.json describes it). from_pretrained would "
            f"initialize them randomly (it reports them as missing); a quantized model with random weights is "
            f"refused. If the checkpoint holds another class of the model (a base model for a head model, or the "
            f"reverse), set 'architectures' in config.json to the class it was saved from")
    if route.unexpected:
        warnings.warn(f"{checkpoint_dir}: the checkpoint holds tensors that {type(model).__name__} (as config.json "
                      f"describes it) has no place for; they are not loaded, as from_pretrained skips them: "
                      f"{_names(route.unexpected)}", stacklevel=3)
