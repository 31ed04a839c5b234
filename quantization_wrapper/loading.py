"""From a transformers checkpoint to a quantized model in one pass, with low memory.

:func:`load_and_quantize` builds the architecture with its parameters on the meta device (buffers,
which are small, are real), then reads the checkpoint tensor by tensor and quantizes each linear
weight as soon as it (and its bias) has arrived. At no time does more than the quantized model plus
a few full-precision layers exist in memory.

Which checkpoint tensor goes where is decided by transformers' own loading rules, called rather than
copied: the model's conversion mapping (renamed and legacy names, per-expert MoE weights fused into
one tensor), ``base_model_prefix`` added or stripped, tied weights and the model's ignore lists. A
conversion runs as soon as the last of its checkpoint tensors has arrived.

Files are memory-mapped privately (copy-on-write, as safetensors does): a tensor is a view of the
OS page cache, read without a copy. Every page of a mapping that is touched counts in the
process' resident memory until it is unmapped, so the streaming loader hands each layer's pages
back (``madvise(MADV_DONTNEED)``) as soon as the layer is quantized: a multi-GB checkpoint passes
through a few MB of resident memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import math
import mmap
import os
import re
import struct
import sys
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from backend_manager import Backend, detect_backend

from .adapters.base import leaf_tensors, tensor_nbytes
from .checkpoint_dir import confined_file
from .config import QuantizationConfig, parse_dtype
from .surgery import LayerDecision, convert_layer, plan_linear_layers, record_plan

__all__ = [
    "SafetensorsReader",
    "CheckpointFiles",
    "load_and_quantize",
    "model_from_config",
    "build_skeleton",
    "build_empty_model",
    "release_freed_memory_to_os",
    "tensor_worker_pool",
]

logger = logging.getLogger(__name__)

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_MAX_HEADER = 100 * 2**20
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


class SafetensorsReader:
    """Tensors of one ``.safetensors`` file, as views of a private memory map or as copies.

    The header (an 8-byte little-endian length, then JSON) is parsed and checked against the
    file size. :meth:`view` gives a tensor backed by the file's pages (no copy; writes stay private
    to this process), :meth:`read` a tensor in process memory, :meth:`release` hands pages back.

    Args:
        path: the file.
        mmap: map the file (default). ``False`` reads every tensor with positioned reads; views are
            then copies.
    """

    def __init__(self, path: str | os.PathLike, *, mmap: bool = True):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise ValueError(f"{self.path}: cannot open ({e.strerror})") from e
        self._map: Any = None
        self._bytes: torch.Tensor | None = None
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) != 8:
            self.close()
            raise ValueError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            self.close()
            raise ValueError(f"{self.path}: not a safetensors file or truncated (header length {n} bytes, "
                             f"file {size} bytes)")
        try:
            header = json.loads(self._file.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.close()
            raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            self.close()
            raise ValueError(f"{self.path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            self.close()
            raise ValueError(f"{self.path}: corrupt safetensors header ('__metadata__' is not an object)")
        self.metadata: dict[str, str] = metadata
        self._start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                begin, end = info["data_offsets"]
                shape = tuple(int(d) for d in info["shape"])
                if not (type(begin) is int and type(end) is int and 0 <= begin <= end) or min(shape, default=0) < 0:
                    raise ValueError(f"data_offsets {info['data_offsets']!r} / shape {info['shape']!r} are not valid")
            except (KeyError, TypeError, ValueError) as e:
                self.close()
                raise ValueError(f"{self.path}: bad header entry for {name!r} ({e})") from e
            if end - begin != math.prod(shape) * dtype.itemsize or self._start + end > size:
                self.close()
                raise ValueError(f"{self.path}: tensor {name!r} lies outside the file or has the wrong size "
                                 f"(file truncated or corrupt)")
            self.entries[name] = (dtype, shape, begin, end)
        if mmap and size > self._start:
            try:
                self._map = _mmap_private(self._file.fileno())
                self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
            except (OSError, ValueError) as e:  # e.g. a file system that cannot map: read instead
                logger.debug("%s: cannot memory-map (%s); reading instead", self.path, e)
                self._map = self._bytes = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def view(self, name: str) -> torch.Tensor:
        """The tensor ``name`` backed by the mapped file (a copy when the file is not mapped or the
        tensor is not aligned to its element size). Valid after :meth:`close`: the mapping lives
        as long as a view does."""
        stored, shape, begin, end = self.entries[name]
        offset = self._start + begin
        if self._bytes is None or end == begin or offset % stored.itemsize:
            return self.read(name)
        return self._bytes[offset:self._start + end].view(stored).reshape(shape)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name`` in process memory (converted to ``dtype`` when given)."""
        stored, shape, begin, end = self.entries[name]
        if self._bytes is not None and end > begin and (self._start + begin) % stored.itemsize == 0:
            t = self.view(name)
            return t.clone() if dtype is None or dtype == stored or not stored.is_floating_point else t.to(dtype)
        buf = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            view = memoryview(buf.numpy())
            got = os.preadv(self._file.fileno(), [view], self._start + begin) if hasattr(os, "preadv") else None
            if got is None:
                self._file.seek(self._start + begin)
                got = self._file.readinto(view)
            if got != end - begin:
                raise ValueError(f"{self.path}: tensor {name!r} is truncated")
        t = buf.view(stored).reshape(shape)
        return t if dtype is None or dtype == stored or not stored.is_floating_point else t.to(dtype)

    def release(self, names: Any) -> None:
        """Hand the pages that lie wholly inside the tensors ``names`` back to the OS: the resident
        memory their views cost drops, and touching them again re-reads the file (private writes
        to those pages are lost, so only release tensors that are done with)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        for name in names:
            _, _, begin, end = self.entries[name]
            first = -(-(self._start + begin) // page) * page
            last = (self._start + end) // page * page
            if last > first:
                self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        """Close the file. The mapping is unmapped when its last view dies (each view's storage
        holds a reference to it), at once when none is alive; never explicitly, which would pull
        the pages from under a view."""
        self._bytes = None
        self._map = None
        self._file.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _mmap_private(fileno: int) -> mmap.mmap:
    """A copy-on-write mapping of the whole file (writes never reach the file)."""
    if hasattr(mmap, "MAP_PRIVATE"):
        return mmap.mmap(fileno, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return mmap.mmap(fileno, 0, access=mmap.ACCESS_COPY)  # Windows


class CheckpointFiles:
    """The weight files of a transformers checkpoint directory: one ``model.safetensors`` or the
    shards named by ``model.safetensors.index.json``, validated before anything is read."""

    def __init__(self, directory: str | os.PathLike, *, mmap: bool = True):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ValueError(f"checkpoint directory not found: {self.directory}")
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a valid safetensors index (needs a 'weight_map') ({e})") from e
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
            self.files = [confined_file(self.directory, n, f"{index.name} 'weight_map'")
                          for n in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in self.files if not f.exists()]
            if missing:
                raise ValueError(f"{index} names shards that are missing: {missing}")
            self.weight_map = dict(weight_map)
        else:
            files = [confined_file(self.directory, f.name, "the directory listing")
                     for f in sorted(self.directory.glob("*.safetensors"))]
            if not files:
                raise ValueError(f"{self.directory}: no .safetensors weights (and no model.safetensors.index.json)")
            self.files = files
            self.weight_map = {}
        self.readers: list[SafetensorsReader] = []
        try:  # a check that fails closes what was opened (files and mappings)
            for f in self.files:
                self.readers.append(SafetensorsReader(f, mmap=mmap))
            seen: dict[str, Path] = {}
            for reader in self.readers:
                for key in reader.keys():
                    if key in seen:
                        raise ValueError(f"tensor {key!r} is in both {seen[key].name} and {reader.path.name}")
                    seen[key] = reader.path
                    listed = self.weight_map.get(key)
                    if self.weight_map and listed != reader.path.name:
                        raise ValueError(f"{index.name}: tensor {key!r} is listed in {listed!r} but stored in "
                                         f"{reader.path.name!r}; the index does not match the shards")
            if self.weight_map:
                absent = sorted(set(self.weight_map) - set(seen))
                if absent:
                    raise ValueError(f"{index.name} lists tensors no shard contains: {absent[:5]}")
        except BaseException:
            self.close()
            raise
        self.location = seen

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: r.shape(k) for r in self.readers for k in r.keys()}

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def __enter__(self) -> "CheckpointFiles":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


#: Skeletons are built one at a time. transformers resolves its public names lazily (importing a
#: submodule on first access, which is not thread-safe: a second thread sees a half-imported
#: module), and configs and model constructors resolve more of them. Building on meta takes
#: milliseconds, so the lock costs little. Re-entrant: a callable may build a skeleton itself.
_BUILD_LOCK = threading.RLock()


def model_from_config(model_config: Any, *, dtype: torch.dtype | None = None, where: str = "model_config") -> nn.Module:
    """A transformers model of ``model_config`` (a config object or a ``config.json`` dict; the peers'
    ``quantization``/``quantization_config`` entries are ignored) with its parameters on the meta
    device, built as transformers 5 builds one before loading: under ``torch.device("meta")``.

    Nothing process-wide is changed (not the default dtype, not ``nn.Module`` or ``torch.nn.init``),
    so skeletons can be built from several threads at once. Buffers the model computes (rotary
    ``inv_freq``, BERT ``position_ids``) are computed on the CPU by the model's ``_init_weights``, as
    ``from_pretrained`` does for buffers a checkpoint lacks; buffers it does not compute stay on meta,
    for the checkpoint to provide (loaders name those it does not).

    Args:
        model_config: the config; its ``architectures[0]`` names the class (a subclass of
            ``transformers.PreTrainedModel``), else ``AutoModel``'s class for the config is used.
        dtype: dtype of the floating parameters, as ``from_pretrained(dtype=...)`` gives them,
            respecting the class' ``_keep_in_fp32_modules`` (float16) and
            ``_keep_in_fp32_modules_strict`` (float16, bfloat16). ``None``: the default dtype
            (with no ``architectures``, the config's ``dtype`` as ``AutoModel.from_config`` uses).
            Buffers keep the dtype their constructor gives them.
        where: named in errors (the checkpoint path).

    Raises:
        ValueError: a config that is not a dict or transformers config, a dict without
            ``model_type``, a type transformers does not know, or ``architectures`` that does not
            name a transformers model class.
        ImportError: transformers missing, with the install line.
    """
    try:
        import transformers
    except ImportError as e:
        raise ImportError("rebuilding the architecture needs transformers: pip install 'quantization-wrapper[hf]' "
                          "(or pass the model as an nn.Module on meta)") from e
    with _BUILD_LOCK:
        model_config = _config_object(transformers, model_config, where)
        cls = _architecture_class(transformers, model_config, where)
        if cls is None:
            try:
                cls = transformers.MODEL_MAPPING[type(model_config)]
            except KeyError:
                raise ValueError(f"{where}: transformers has no model for config class "
                                 f"{type(model_config).__name__}; set 'architectures' in the config") from None
            cls = cls[0] if isinstance(cls, (list, tuple)) else cls
            if dtype is None:  # as AutoModel.from_config builds it
                dtype = _config_dtype(model_config)
        with torch.device("meta"):
            model = cls(model_config)
        if dtype is not None and dtype.is_floating_point and dtype != torch.get_default_dtype():
            _cast_meta_parameters(model, dtype)
        _compute_meta_buffers(model)
    return model


def _config_object(transformers: Any, model_config: Any, where: str) -> Any:
    """``model_config`` as a transformers config (built from a ``config.json`` dict)."""
    if isinstance(model_config, transformers.PretrainedConfig):
        return model_config
    if not isinstance(model_config, dict):
        raise ValueError(f"{where}: the model config must be a config.json dict (an object) or a transformers "
                         f"config, got {type(model_config).__name__}")
    data = {k: v for k, v in model_config.items() if k not in ("quantization", "quantization_config")}
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{where}: the model config has no 'model_type' (e.g. 'llama'); pass model_config")
    try:
        return transformers.AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{where}: transformers cannot build model_type={model_type!r}: {e}") from e


def _architecture_class(transformers: Any, model_config: Any, where: str) -> type | None:
    """The class ``architectures[0]`` names, only if it is a transformers model class (``None`` when
    the config names none): the name is looked up on the ``transformers`` module, where anything
    else (``set_seed``, ``AutoTokenizer``) must never be called with the config."""
    archs = getattr(model_config, "architectures", None)
    if not archs:
        return None
    fix = ("set it to a transformers model class such as 'LlamaForCausalLM', or remove 'architectures' "
           "to build the config's AutoModel class")
    if not isinstance(archs, (list, tuple)) or not all(isinstance(a, str) for a in archs):
        raise ValueError(f"{where}: config field 'architectures' must be a list of class names, got {archs!r}; {fix}")
    name = archs[0]
    cls = None
    if name.isidentifier() and not name.startswith("_"):
        try:
            cls = getattr(transformers, name, None)
        except Exception as e:  # a lazy import that fails (a missing backend) names no usable class either
            raise ValueError(f"{where}: config field architectures[0]={name!r} could not be imported from "
                             f"transformers ({type(e).__name__}: {e}); {fix}") from e
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{where}: config field architectures[0]={name!r} is not a transformers model class "
                         f"(a subclass of transformers.PreTrainedModel); {fix}")
    return cls


def _config_dtype(model_config: Any) -> torch.dtype | None:
    try:
        value = model_config.dtype
    except AttributeError:  # transformers < 4.56 (reading torch_dtype on later ones warns)
        value = getattr(model_config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def _cast_meta_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Give the floating meta parameters ``dtype`` (free on meta) instead of changing the process'
    default dtype while building. Names matching the model's ``_keep_in_fp32_modules`` (for float16)
    or ``_keep_in_fp32_modules_strict`` (float16, bfloat16) stay float32, matched as
    ``from_pretrained`` matches them. Tied parameters stay one parameter."""
    keep = []
    if dtype == torch.float16:
        keep += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        keep += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    keep_fp32 = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in keep)) if keep else None
    replaced: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id -> (old, new); old kept alive
    for prefix, module in model.named_modules():
        for name, p in module._parameters.items():
            if p is None or p.device.type != "meta" or not p.is_floating_point():
                continue
            if id(p) not in replaced:
                full = f"{prefix}.{name}" if prefix else name
                target = torch.float32 if keep_fp32 is not None and keep_fp32.search(full) else dtype
                new = nn.Parameter(torch.empty_like(p, dtype=target, device="meta"), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                replaced[id(p)] = (p, new)
            module._parameters[name] = replaced[id(p)][1]


def _compute_meta_buffers(model: nn.Module) -> None:
    """Compute on the CPU the meta buffers the model's ``_init_weights`` computes, as transformers 5
    does after building on meta (``_move_missing_keys_from_meta_to_device`` then
    ``_initialize_missing_keys``), without its process-wide patch of ``torch.nn.init``.

    Each module that owns meta buffers (and only meta parameters, so nothing real is re-initialized)
    is initialized twice, its buffers filled with zeros and then with ones: a buffer is computed when
    both runs give the same tensor. The others go back to meta, so a checkpoint must provide them
    (never memory nobody wrote)."""
    base = getattr(sys.modules.get("transformers"), "PreTrainedModel", None)
    if base is None:
        return
    seen: set[int] = set()

    def walk(module: nn.Module, init: Any) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, base):  # a sub-model initializes its own modules, as transformers dispatches
            init = module._init_weights
        for child in module.children():
            walk(child, init)
        owned = {n: b for n, b in module._buffers.items() if b is not None}
        if (init is None or not owned or any(b.device.type != "meta" for b in owned.values())
                or any(p.device.type != "meta" for p in module.parameters(recurse=False))):
            return
        runs = []
        try:
            for fill in (torch.zeros_like, torch.ones_like):
                for name, b in owned.items():
                    module._buffers[name] = fill(b, device="cpu")
                with torch.no_grad():
                    init(module)
                runs.append(dict(module._buffers))
        finally:
            for name, b in owned.items():
                module._buffers[name] = b
        for name in owned:
            first, second = (run.get(name) for run in runs)
            if _same_values(first, second):
                module._buffers[name] = second

    walk(model, None)


def _same_values(a: Any, b: Any) -> bool:
    """Both CPU tensors with equal shape, dtype and values (NaN equal to NaN)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a is b:
        return False
    if a.device.type != "cpu" or b.device.type != "cpu" or a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    return bool(a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def build_skeleton(model_config: Any, saved_config: dict[str, Any] | None, *, where: str) -> nn.Module:
    """The architecture a checkpoint is loaded into, parameters on meta (see :func:`model_from_config`).

    Args:
        model_config: ``None`` (use ``saved_config``), an ``nn.Module`` (filled in place, e.g. built
            on meta), a callable that builds the model, or a transformers config / ``config.json``
            dict. A callable runs under ``torch.device("meta")``: tensors it creates without a
            device are on meta. The buffers of a module or a callable's model stay where they are,
            except that a transformers model's meta buffers are computed as
            :func:`model_from_config` computes them (checkpoints do not hold them).
        saved_config: the config stored with the checkpoint, if any.
        where: the checkpoint path, named in errors.

    Raises:
        ValueError: no config to build from, or one transformers cannot build.
    """
    if isinstance(model_config, nn.Module):
        with _BUILD_LOCK:
            _compute_meta_buffers(model_config)
        return model_config
    if callable(model_config) and not hasattr(model_config, "to_dict"):
        with _BUILD_LOCK:
            with torch.device("meta"):
                model = model_config()
            if isinstance(model, nn.Module):
                _compute_meta_buffers(model)
        return model
    if model_config is None:
        model_config = saved_config
    if model_config is None:
        raise ValueError(f"{where}: no model config to build the architecture from; pass model_config (a "
                         f"transformers config, a dict, a callable that builds the model, or an nn.Module on meta)")
    return model_from_config(model_config, where=where)


def build_empty_model(checkpoint_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The checkpoint's architecture (from ``config.json``) in eval mode, built by
    :func:`model_from_config`: parameters on meta (``dtype`` if given), computed buffers on the CPU.

    Raises:
        ValueError: no or invalid ``config.json``, or one that names no transformers model class.
    """
    path = Path(checkpoint_dir) / "config.json"
    if not path.exists():
        raise ValueError(f"{path.parent}: no config.json; not a transformers checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must hold a JSON object (the model config), got a {type(config).__name__}")
    return model_from_config(config, dtype=dtype, where=str(path)).eval()


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
    used) or a tensor that one of transformers' weight conversions produced."""

    __slots__ = ("reader", "key", "tensor")

    def __init__(self, reader: SafetensorsReader | None = None, key: str | None = None,
                 tensor: torch.Tensor | None = None):
        self.reader, self.key, self.tensor = reader, key, tensor

    def view(self) -> torch.Tensor:
        """The tensor without a copy (a view of the mapped file for a checkpoint entry)."""
        return self.reader.view(self.key) if self.tensor is None else self.tensor

    def read(self, dtype: torch.dtype | None) -> torch.Tensor:
        """The tensor in process memory, floating tensors converted to ``dtype`` when given."""
        if self.tensor is None:
            return self.reader.read(self.key, dtype)
        return self.tensor.to(dtype) if dtype is not None and self.tensor.is_floating_point() else self.tensor

    def release(self) -> None:
        if self.tensor is None:
            self.reader.release([self.key])


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
    with _BUILD_LOCK:  # the mapping table is built (and its classes imported) on first use
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
    runs when the last of its checkpoint tensors has arrived, e.g. a fused MoE expert tensor
    when all its experts have. Fused expert tensors are not ``nn.Linear`` layers: they stay in
    float, as ``quantize_model`` leaves them (a warning says how much).

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
    from .factory import create_quantization_adapter

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
            from .recommend import get_recommended_config

            size_b = sum(math.prod(shape) for shape in shapes.values()) / 1e9
            config = get_recommended_config(backend, size_b)
        adapter = create_quantization_adapter(backend, config)
        model = build_empty_model(checkpoint_dir, dtype)
        decisions = {d.name: d for d in plan_linear_layers(model, adapter, module_filter=module_filter)}
        if workers is None:
            workers = _default_workers(cores, decisions.values())
        expected = dict(model.state_dict(keep_vars=True))
        route = _route_checkpoint(model, list(shapes))
        _check_keys(checkpoint_dir, model, expected, shapes, route)
        reader_of = {key: reader for reader in files.readers for key in reader.keys()}
        remaining = {target: len(pieces) for target, pieces in route.pieces.items()}

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
            for reader in {id(p.reader): p.reader for p in pieces.values() if p.reader is not None}.values():
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
            quantize, or install it; tied float parameters share one ``nn.Parameter``."""
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

        def convert(target: str) -> None:
            """Run the conversion whose last checkpoint tensor has arrived, as from_pretrained runs it
            (its pieces in from_pretrained's order, each in the dtype of the target), and deliver what
            it produces; the pieces' pages go back at once."""
            converter, pieces = route.converters.pop(target), route.pieces.pop(target)
            for key, pattern in pieces:
                converter.add_tensor(target, key, pattern, functools.partial(reader_of[key].read, key, wanted(target)))
            try:
                produced = converter.convert(target, model=model, config=getattr(model, "config", None))
            except Exception as e:
                raise ValueError(f"{checkpoint_dir}: transformers' conversion {converter!r} of {len(pieces)} "
                                 f"checkpoint tensors ({pieces[0][0]!r}, ...) into {target!r} failed: "
                                 f"{type(e).__name__}: {e}") from e
            finally:
                for key, _ in pieces:
                    reader_of[key].release([key])
            for name, value in produced.items():
                value = value[0] if isinstance(value, list) else value
                if name not in expected:
                    raise ValueError(f"{checkpoint_dir}: transformers' conversion {converter!r} produced {name!r}, "
                                     f"which is not a tensor of the architecture")
                if tuple(value.shape) != tuple(expected[name].shape):
                    raise ValueError(f"{checkpoint_dir}: tensor {name!r} converted from the checkpoint has shape "
                                     f"{tuple(value.shape)}, {tuple(expected[name].shape)} in the architecture "
                                     f"described by config.json")
                deliver(name, _Piece(tensor=value), pool)

        with tensor_worker_pool(workers, "quantize") as pool:
            for reader in files.readers:
                for key in reader.keys():
                    bar.update(1)
                    if key in route.renamed:
                        deliver(route.renamed[key], _Piece(reader, key), pool)
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
    model._weight_conversions = route.used  # as from_pretrained keeps them, to save in the checkpoint's layout
    _warn_float_conversions(model, route, decisions, checkpoint_dir)
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


def _warn_float_conversions(model: nn.Module, route: _Route, decisions: dict[str, LayerDecision],
                            where: Path) -> None:
    """Warn about the tensors transformers' weight conversions built that are not ``nn.Linear``
    weights (fused MoE experts): no adapter quantizes them yet, so they stay in float."""
    names = sorted({n for outputs in route.outputs.values() for n in outputs
                    if n.rpartition(".")[0] not in decisions})
    if not names:
        return
    state = model.state_dict(keep_vars=True)
    size = tensor_nbytes(state[n] for n in names if n in state)
    dtypes = sorted({str(state[n].dtype).removeprefix("torch.") for n in names if n in state})
    warnings.warn(f"{where}: {len(names)} tensors that transformers fuses on load (e.g. MoE experts stored per "
                  f"expert: {names[:3]}) are not nn.Linear layers and stay in {'/'.join(dtypes)} "
                  f"({size / 2**20:.1f} MiB): quantizing fused expert tensors is not supported yet "
                  f"(quantize_model leaves them in float too)", stacklevel=3)


#: A second quantizing worker is used when its temporaries fit in this much memory.
_SECOND_WORKER_WORKSPACE = 256 * 2**20


def _default_workers(cores: int, decisions: Any) -> int:
    """2 on a machine with 2+ cores when a second layer's quantization temporaries (the largest
    layer's weights x its adapter's ``quantize_workspace_per_weight``) fit in 256 MiB, else 1: the
    streaming budget is the quantized model plus 0.5 GB, and HQQ's optimizer, for one, needs ~110
    bytes per weight."""
    from .adapters.base import get_adapter_class

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
    if reader._bytes is None:
        return
    lo = reader._bytes.data_ptr()
    hi = lo + reader._bytes.numel()
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
        want, got = tuple(expected[target].shape), tuple(shapes[key])
        if want != got:
            name = repr(key) if key == target else f"{key!r} (the architecture's {target!r})"
            raise ValueError(f"{checkpoint_dir}: tensor {name} has shape {got} in the checkpoint, {want} in the "
                             f"architecture described by config.json")
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
