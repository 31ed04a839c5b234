"""Save and load quantized models: safetensors + a JSON description, atomic, checksummed, no pickle.

Layout of a checkpoint directory::

    model.safetensors                  (or model-00001-of-0000N.safetensors ... + model.safetensors.index.json)
    quantization_config.json           format version, QuantizationConfig, per-layer plan, library
                                       versions, tied tensors, sha256 + size of every file
    config.json                        the transformers config, when the model has one
    quantization_map.json              optimum-quanto layers: what ``optimum.quanto.requantize`` reads
    non_persistent_buffers.safetensors buffers loading would not rebuild (``__buffer__.<name>``), if any

Tensor names are transformers' (tied weights saved once, under the name ``save_pretrained`` keeps),
so the peers' own loaders read the weights too (see :func:`_interop`).

Loading builds the model skeleton on the meta device, replaces each planned layer with an empty
quantized layer (``create_quantized_linear(device="meta")``) and fills everything with
``assign=True`` from views of the memory-mapped files (copy-on-write, as safetensors maps them:
nothing is copied, pages come in from the OS cache on first use), or with ``mmap=False`` from
copies read into process memory: the full-precision weights never exist.
"""

from __future__ import annotations

import errno
import hashlib
from concurrent.futures import ThreadPoolExecutor
import json
import logging
import math
import mmap
import os
import re
import sys
import zlib
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .adapters.base import QuantizationAdapter, get_adapter_class, leaf_tensors
from .config import QuantizationConfig, QuantizationMethod
from .checkpoint_dir import StagedDirectory, StagedFile, check_save_target, confined_file, recover
from .errors import CheckpointError, ChecksumError, UnsafePathError
from .loading import SafetensorsReader, build_skeleton, release_freed_memory_to_os, tensor_worker_pool
from .surgery import QuantizationPlan, get_quantization_plan

__all__ = [
    "save_quantized_model",
    "load_quantized_model",
    "parse_size",
    "verify_checkpoint",
    "read_checkpoint_info",
    "CheckpointError",
    "ChecksumError",
    "FORMAT_VERSION",
    "QUANT_CONFIG_NAME",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
QUANT_CONFIG_NAME = "quantization_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_LIBRARIES = ("torch", "safetensors", "bitsandbytes", "hqq", "optimum-quanto", "mlx", "transformers", "peft")


# ---------------------------------------------------------------------------------------- helpers
def parse_size(size: int | str) -> int:
    """Bytes in ``size`` (an int, or text such as ``"500MB"``, ``"2GiB"``), as ``max_shard_size`` takes it.

    Raises:
        ValueError: not a size, or not positive and finite (naming ``max_shard_size`` and the value).
    """
    allowed = "a positive number of bytes or a size such as 500MB, 2GB or 1GiB"
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"max_shard_size={size!r} is not a size; use {allowed}")
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size={size} must be positive; use {allowed}")
        return size
    text = size.strip().upper().replace(" ", "")
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1, "": 1}
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            number = text[: len(text) - len(unit)]
            try:
                value = float(number)
            except ValueError:
                continue
            if not math.isfinite(value) or value * factor < 1:
                raise ValueError(f"max_shard_size={size!r} must be a positive, finite size; use {allowed}")
            return int(value * factor)
    raise ValueError(f"max_shard_size={size!r} is not a size; use {allowed}")


#: Files are hashed whole (``sha256``, what ``sha256sum`` prints) and checksummed in blocks of
#: this size (``block_crc32``), which loading verifies on every core at once. The sums are stored
#: unsigned next to the data, so they guard against accidents (truncation, bit rot, a partial
#: copy), not against someone who can rewrite the description too; for that CRC-32 per 64 MiB
#: (every burst of <= 32 flipped bits caught, anything else missed with probability 2**-32) does
#: the job at 2.2 GB/s per core against sha256's 1.3 GB/s. ``verify_checkpoint(path, full=True)``
#: checks the sha256s as well.
HASH_BLOCK = 64 * 2**20


class _Sha256:
    name = "sha256"

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, data: Any) -> None:
        self._h.update(data)

    def result(self) -> str:
        return self._h.hexdigest()


class _Crc32:
    name = "CRC-32"

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: Any) -> None:
        self._crc = zlib.crc32(data, self._crc)

    def result(self) -> int:
        return self._crc


_BLOCK_SUMS = {"block_crc32": _Crc32, "block_sha256": _Sha256}  # (sha256 blocks: read, not written)


def _sum_range(fd: int, offset: int, length: int, algorithm: type = _Sha256) -> Any:
    """Checksum (``_Sha256`` or ``_Crc32``) of ``length`` bytes at ``offset`` of ``fd``.

    The range is memory-mapped and summed in 64 MiB calls (hashlib and zlib release the GIL for
    each: a thread that takes the GIL back every few MB loses most of its time waiting for it while
    a loader works in the main thread), then unmapped with its pages released, so checking a file
    adds at most one slice per thread to the resident memory.
    """
    h = algorithm()
    if length == 0:
        return h.result()
    start = offset // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    try:
        mapped = mmap.mmap(fd, length + offset - start, access=mmap.ACCESS_READ, offset=start)
    except (OSError, ValueError) as e:  # the file is shorter than the range
        raise ChecksumError(f"cannot read {length} bytes at {offset} ({e})") from e
    with mapped, memoryview(mapped) as view:
        step = 64 << 20
        for pos in range(offset - start, offset - start + length, step):
            end = min(pos + step, offset - start + length)
            h.update(view[pos:end])
            if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                first = pos // mmap.PAGESIZE * mmap.PAGESIZE
                mapped.madvise(mmap.MADV_DONTNEED, first, end - first)
    return h.result()


def _threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _sha256(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _sum_range(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _file_record(path: Path) -> dict[str, Any]:
    """Size, whole-file sha256 and per-block CRC-32 of ``path``, summed on up to 4 threads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        with ThreadPoolExecutor(_threads()) as pool:
            whole = pool.submit(_sum_range, fd, 0, size)
            blocks = [pool.submit(_sum_range, fd, o, min(HASH_BLOCK, size - o), _Crc32)
                      for o in range(0, size, HASH_BLOCK)]
            record = {"sha256": whole.result(), "size": size}
            if len(blocks) > 1:
                record["block_size"] = HASH_BLOCK
                record["block_crc32"] = [b.result() for b in blocks]
        return record
    finally:
        os.close(fd)


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _layer_adapter(config: QuantizationConfig, method: str, backend=None,
                   cache: dict | None = None) -> QuantizationAdapter:
    cache = {} if cache is None else cache
    key = QuantizationMethod.parse(method)
    if key not in cache:
        cls = get_adapter_class(key)
        base = config if config.method is key else config.replace(
            method=key, bits=None, group_size=None, quant_type=None, double_quant=None, layer_configs={})
        cache[key] = cls(base, backend)
    return cache[key]


def _layer_config(config: QuantizationConfig, layer: dict) -> QuantizationConfig:
    cfg = config.for_layer(layer["name"])
    return cfg.replace(bits=layer["bits"], group_size=layer["group_size"]) if cfg.method.value == layer["method"] else \
        QuantizationConfig(method=layer["method"], bits=layer["bits"], group_size=layer["group_size"],
                           compute_dtype=cfg.compute_dtype, storage_dtype=cfg.storage_dtype,
                           backend_options=cfg.backend_options, skip_modules=[])


# ------------------------------------------------------------------------------------------- save
def _hf_config_dict(model: nn.Module) -> dict[str, Any]:
    """The transformers config as a dict, naming the model class so loading rebuilds the same head,
    with the peers' quantization entries (see :func:`_interop`).

    ``tie_word_embeddings`` is written ``False`` when the model no longer ties its output embedding
    to its input embedding (one of them quantized): peers that tie by the config (mlx-lm drops
    ``lm_head``, quanto's ``QuantizedModelForCausalLM`` calls ``tie_weights``) would otherwise
    discard the saved output layer. optimum-quanto's own ``save_pretrained`` does the same."""
    data = model.config.to_dict()
    data.pop("quantization_config", None)
    if type(model).__module__.startswith("transformers."):
        data["architectures"] = [type(model).__name__]
    if _untied_embeddings(model):
        for section in (data, data.get("text_config")):
            if isinstance(section, dict) and section.get("tie_word_embeddings"):
                section["tie_word_embeddings"] = False
    data.update(_interop(model)[0])
    return data


def _untied_embeddings(model: nn.Module) -> bool:
    """The config ties the word embeddings but the model's output embedding does not share the input
    embedding's weight (it was quantized, or replaced)."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        get_text_config = getattr(config, "get_text_config", None)
        if not callable(get_text_config) or not getattr(get_text_config(), "tie_word_embeddings", False):
            return False
    try:
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    if inputs is None or outputs is None:
        return False
    a, b = getattr(inputs, "weight", None), getattr(outputs, "weight", None)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return True
    return a is not b and (a.untyped_storage().data_ptr(), a.storage_offset(), a.shape, a.dtype) != \
        (b.untyped_storage().data_ptr(), b.storage_offset(), b.shape, b.dtype)


def _interop(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the peers' own loaders read, so our checkpoints open with them too.

    Returns ``(config.json additions, extra JSON files)``:

    * all layers bitsandbytes 4-bit (one quant type) or all INT8: ``quantization_config`` as
      transformers writes it; with our tensor names (the ones transformers uses),
      ``AutoModelForCausalLM.from_pretrained(path)`` loads the checkpoint;
    * MLX layers: mlx-lm's ``quantization`` entry ({group_size, bits} plus per-layer exceptions);
    * optimum-quanto layers: ``quantization_map.json`` for ``optimum.quanto.requantize``.
    """
    plan = get_quantization_plan(model)
    converted = plan.converted if plan is not None else []
    methods = {layer.method for layer in converted}
    additions: dict[str, Any] = {}
    files: dict[str, Any] = {}
    if len(methods) == 1 and methods <= {"bnb_nf4", "bnb_fp4", "bnb_int8"}:
        bnb = _transformers_bnb_config(model, next(iter(methods)), plan)
        if bnb is not None:
            additions["quantization_config"] = bnb
    if methods & {"mlx_int4", "mlx_int8"}:
        from .adapters.mlx import mlx_lm_quantization_config

        additions["quantization"] = mlx_lm_quantization_config(model)
    quanto = [l.name for l in converted if l.method.startswith("quanto_")]
    if quanto:
        from .adapters.quanto import QuantoAdapter

        files["quantization_map.json"] = {name: QuantoAdapter.quantization_map_entry(model.get_submodule(name))
                                          for name in quanto}
    return additions, files


def _transformers_bnb_config(model: nn.Module, method: str, plan: QuantizationPlan) -> dict[str, Any] | None:
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


def _state_outside(model: nn.Module, owned: set[str]) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without the modules in ``owned`` and their children, which are never
    asked for their state (quanto's CPU int4 layers repack every weight to give it)."""
    out: dict[str, torch.Tensor] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        if prefix[:-1] in owned:
            return
        for name, p in module._parameters.items():
            if p is not None:
                out[prefix + name] = p.detach()
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                out[prefix + name] = b.detach()
        if type(module).get_extra_state is not nn.Module.get_extra_state:
            out[prefix + "_extra_state"] = module.get_extra_state()
        for name, child in module._modules.items():
            if child is not None:
                walk(child, prefix + name + ".")

    walk(model, "")
    return out


#: Non-persistent buffers a skeleton would not rebuild as the model holds them are saved under this
#: prefix (``__buffer__.model.rotary_emb.inv_freq``) in :data:`BUFFERS_NAME`, a file no peer reads:
#: mlx-lm loads ``model*.safetensors`` strictly and transformers the files its index names.
BUFFER_PREFIX = "__buffer__."
BUFFERS_NAME = "non_persistent_buffers.safetensors"


def _rebuilt_buffers(saved_config: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """The buffers a skeleton built from ``saved_config`` computes itself, as loading builds it
    (``{}`` when there is no config or transformers cannot build it: every buffer is then saved)."""
    if saved_config is None:
        return {}
    try:
        skeleton = build_skeleton(None, saved_config, where="the model's config")
    except Exception as e:  # any failure only means saving every buffer, which is always right
        logger.debug("saving every non-persistent buffer: the config does not rebuild the model (%s)", e)
        return {}
    return {name: b for name, b in skeleton.named_buffers() if b.device.type != "meta"}


def _tied_copy_patterns(model: nn.Module) -> list[str]:
    """Patterns of the names ``save_pretrained`` drops as tied copies: the keys (v5) or items (v4) of
    every submodule's ``_tied_weights_keys``, prefixed with the submodule's name."""
    patterns = []
    for prefix, module in model.named_modules():
        tied = getattr(module, "_tied_weights_keys", None) or ()
        if isinstance(tied, (dict, list, tuple, set)):
            patterns += [f"{prefix}.{k}" if prefix else k for k in tied if isinstance(k, str)]
    return patterns


#: safetensors' name of each dtype, in the order ``safetensors.torch.save_file`` lays tensors out
#: (widest first, then by name), which keeps every tensor aligned to its element size.
_SAFETENSORS_DTYPES = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64",
    torch.float32: "F32", torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.uint16: "U16", torch.int16: "I16", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(_SAFETENSORS_DTYPES)}


class _SavedTensors:
    """Every tensor a save writes: surveyed first (names, dtypes, shapes, ties; CRC-32s when asked),
    then produced again for writing, one planned layer at a time (:meth:`tensors`).

    A layer's tensors for the file can be new copies (quanto's CPU int4 layers unpack their kernel
    layout into quanto's own); holding every layer's at once would add the quantized model's size
    to the peak memory of a save. The survey drops each layer's before asking the next, and so does
    the writing, so at most one layer's exist at a time, for converting each layer twice. The
    tensors outside the planned layers are the model's own (detached views) and are kept.

    Args:
        crc32: record the CRC-32 of every tensor's bytes (a single-file checkpoint's metadata).
        keep: keep the layers' tensors from the survey instead (one conversion, all held at once).
    """

    def __init__(self, model: nn.Module, plan: QuantizationPlan, config: QuantizationConfig,
                 saved_config: dict[str, Any] | None = None, *, crc32: bool = False, keep: bool = False) -> None:
        adapters: dict = {}
        self.layers = [(layer.name, model.get_submodule(layer.name),
                        _layer_adapter(config, layer.method, cache=adapters))
                       for layer in plan.layers if layer.status != "skipped"]
        #: name -> (dtype, shape) of every tensor written, in the order saves have always listed them.
        self.specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.crc32: dict[str, int] | None = {} if crc32 else None
        self._kept: dict[str, torch.Tensor] | None = {} if keep else None
        # Ties are looked for among tensors whose memory lasts through the save (the model's own):
        # a layer's converted copies are freed before the next layer's exist, at reused addresses.
        own = {leaf.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())
               for leaf in leaf_tensors(t) if leaf.device.type != "meta"}
        storage: dict[str, tuple] = {}

        def survey(name: str, t: Any, lasting: bool) -> None:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"cannot save {name!r}: it is a {type(t).__name__}; safetensors holds tensors only")
            if t.device.type == "meta":
                raise CheckpointError(f"tensor {name!r} is on the meta device; load or quantize real weights "
                                      f"before saving")
            if t.dtype not in _DTYPE_RANK:
                raise ValueError(f"cannot save {name!r}: safetensors has no dtype {t.dtype}; it holds "
                                 f"{', '.join(str(d).replace('torch.', '') for d in _SAFETENSORS_DTYPES)}")
            self.specs[name] = (t.dtype, tuple(t.shape))
            if t.numel() and (lasting or t.untyped_storage().data_ptr() in own):
                storage[name] = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if self.crc32 is not None:
                self.crc32[name] = _tensor_crc32(t)
            if self._kept is not None:
                self._kept[name] = t

        for state in self._layer_states():
            for name in list(state):
                survey(name, state.pop(name), lasting=False)
            del state  # before the next layer is converted
        owned = {name for name, _, _ in self.layers}
        self.lasting = _state_outside(model, owned)
        # Non-persistent buffers go under BUFFER_PREFIX only when a skeleton built from saved_config
        # (the config.json being written) does not compute them with the same values (a model
        # without config, a buffer cast to another dtype): loading would not rebuild them.
        rebuilt = _rebuilt_buffers(saved_config)
        for name, buf in model.named_buffers(remove_duplicate=False):
            if name in self.lasting or any(name.startswith(o + ".") for o in owned):
                continue
            ref = rebuilt.get(name)
            if ref is None or ref.dtype != buf.dtype or ref.shape != buf.shape or \
                    not torch.equal(ref, buf.detach().cpu()):
                self.lasting[BUFFER_PREFIX + name] = buf
        for name, t in self.lasting.items():
            survey(name, t, lasting=True)
        # Tied weights: keep one copy, the one save_pretrained keeps; record the others as aliases.
        copies = _tied_copy_patterns(model)
        groups: dict[tuple, list[str]] = {}
        for name in sorted(storage):
            groups.setdefault(storage[name], []).append(name)
        #: alias -> the saved name of the same tensor.
        self.tied: dict[str, str] = {}
        for names in groups.values():
            if len(names) > 1:
                kept = min(names, key=lambda n: (any(re.search(p, n) for p in copies), n))
                self.tied.update({n: kept for n in names if n != kept})
        for name in self.tied:
            del self.specs[name]
            for table in (self.lasting, self.crc32, self._kept):
                if table is not None:
                    table.pop(name, None)

    def _layer_states(self) -> Iterable[dict[str, torch.Tensor]]:
        for name, module, adapter in self.layers:
            yield {f"{name}.{k}": v for k, v in adapter.layer_state_dict(module).items()}

    def nbytes(self, name: str) -> int:
        dtype, shape = self.specs[name]
        return math.prod(shape) * dtype.itemsize

    def tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of every tensor in :attr:`specs`, in that order; each planned layer's
        converted again, and released (by this generator) before the next layer's are made.

        Raises:
            CheckpointError: a layer gives a tensor its survey did not (a nondeterministic adapter).
        """
        if self._kept is not None:
            yield from self._kept.items()
            return
        for state in self._layer_states():
            for name in list(state):
                t = state.pop(name)
                if name in self.specs:
                    yield name, t
                elif name not in self.tied:
                    raise CheckpointError(f"tensor {name!r} appeared when the layer was converted again for "
                                          f"writing; its adapter's layer_state_dict is not deterministic")
                del t
            del state
        yield from self.lasting.items()


def _collect_tensors(model: nn.Module, plan: QuantizationPlan, config: QuantizationConfig,
                     saved_config: dict[str, Any] | None = None) -> tuple[dict, dict]:
    """All tensors to save at once, as contiguous CPU tensors (quantized layers through their
    adapter), and the tied-tensor aliases: for callers that need one dict (``save_pretrained``);
    :func:`save_quantized_model` streams them instead (:class:`_SavedTensors`)."""
    saved = _SavedTensors(model, plan, config, saved_config, keep=True)
    return {name: t.detach().cpu().contiguous() for name, t in saved.tensors()}, saved.tied


def _shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """``sizes`` (name -> bytes) cut in order into runs of at most ``max_bytes`` (a tensor larger
    than that alone), so a layer's tensors stay together."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in sizes.items():
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _safetensors_header(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                        metadata: dict[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """The header ``safetensors.torch.save_file`` writes for tensors of these dtypes and shapes (its
    length as 8 bytes little-endian, then the JSON padded with spaces to a multiple of 8), and the
    offset in the file of each tensor's bytes."""
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    offsets: dict[str, int] = {}
    end = 0
    for name in sorted(specs, key=lambda n: (_DTYPE_RANK[specs[n][0]], n)):
        dtype, shape = specs[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [end, end + size]}
        offsets[name] = end
        end += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {name: start + o for name, o in offsets.items()}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` as safetensors stores them (row-major, little-endian): a view of a
    contiguous CPU tensor's memory, else of one copy."""
    t = t.detach().resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    data = t.view(torch.uint8)
    if sys.byteorder == "big" and t.element_size() > 1:
        data = data.view(-1, t.element_size()).flip(-1).reshape(-1)
    return memoryview(data.numpy())


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (one call writes at most 2 GiB on Linux)."""
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _write_safetensors(saved: _SavedTensors, files: dict[Path, tuple[list[str], dict[str, str]]]) -> None:
    """Write safetensors files, ``{path: (tensor names, metadata)}``, byte for byte as
    ``safetensors.torch.save_file`` would: every header first (the survey gave each tensor's dtype
    and shape), then each tensor at its offset as :meth:`_SavedTensors.tensors` produces it.

    Raises:
        CheckpointError: a tensor differs from its survey in dtype, shape or (single file) CRC-32.
    """
    place: dict[str, tuple[int, int]] = {}
    with ExitStack() as stack:
        for path, (names, metadata) in files.items():
            header, offsets = _safetensors_header({n: saved.specs[n] for n in names}, metadata)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            stack.callback(os.close, fd)
            _pwrite_all(fd, memoryview(header), 0)
            os.ftruncate(fd, len(header) + sum(saved.nbytes(n) for n in names))
            place.update({name: (fd, offset) for name, offset in offsets.items()})
        left = set(place)
        for name, t in saved.tensors():
            if (t.dtype, tuple(t.shape)) != saved.specs[name]:
                raise CheckpointError(f"tensor {name!r} is {t.dtype} {tuple(t.shape)} when written but was "
                                      f"{saved.specs[name][0]} {saved.specs[name][1]} when surveyed; its "
                                      f"adapter's layer_state_dict is not deterministic")
            data = _tensor_bytes(t)
            del t
            if saved.crc32 is not None and zlib.crc32(data) != saved.crc32[name]:
                raise CheckpointError(f"tensor {name!r} has other bytes when written than when its CRC-32 was "
                                      f"taken; its adapter's layer_state_dict is not deterministic")
            fd, offset = place[name]
            _pwrite_all(fd, data, offset)
            del data
            left.discard(name)
        if left:
            raise CheckpointError(f"tensors {sorted(left)[:5]} were surveyed but not produced again for writing; "
                                  f"their adapter's layer_state_dict is not deterministic")


def save_quantized_model(model: nn.Module, path: str | os.PathLike, *, max_shard_size: int | str = "2GB",
                         single_file: bool = False, overwrite: bool = False,
                         _before_commit: Callable[[Path], None] | None = None) -> Path:
    """Save a model quantized by this package.

    Nothing the package did not write is ever deleted. The rules (``docs/reliability.md``):

    * ``path`` new or an empty directory: the checkpoint is created there.
    * ``path`` one of our checkpoints: it is replaced; files added to it since (a tokenizer, a
      README) are kept.
    * ``path`` a non-empty directory that is not one of our checkpoints: refused with
      ``FileExistsError`` unless ``overwrite=True``; then files named like the checkpoint's
      (``model*.safetensors``, ``config.json``, ...) are replaced and every other file is kept.
    * never the directory the model's weights were read from, nor the working directory.

    The checkpoint is written to a staging directory next to ``path``, fsynced, then exchanged with
    ``path`` in one atomic rename: an interrupted save leaves the previous checkpoint loadable, and
    the next save or load removes what it left behind (:func:`~quantization_wrapper.checkpoint_dir.recover`).
    The directory gets the usual permissions (those of the directory it replaces, or the umask's).

    Args:
        model: a model with a ``quantization_plan`` (from ``quantize_model`` or ``load_quantized_model``).
        path: the checkpoint directory (or, with ``single_file=True``, the ``.safetensors`` file).
        max_shard_size: split ``model.safetensors`` into shards of at most this size (``"500MB"``,
            ``2 * 2**30``), with a ``model.safetensors.index.json`` as transformers writes it.
        single_file: write one ``.safetensors`` file whose metadata holds the JSON description and
            a CRC-32 of every tensor.
        overwrite: allow writing into a non-empty directory (or over a file) that the package did
            not write; see above.

    Returns:
        The path written.

    Raises:
        FileExistsError: ``path`` holds files of other origin and ``overwrite`` is False.
        ValueError: no quantization plan, a bad ``max_shard_size``, or a forbidden ``path``.
    """
    plan = get_quantization_plan(model)
    config = getattr(model, "quantization_config", None)
    if plan is None or not isinstance(config, QuantizationConfig):
        raise ValueError("model has no quantization plan: quantize it with an adapter's quantize_model "
                         "(or load it with load_quantized_model) before saving")
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite={overwrite!r} must be True or False")
    path = Path(os.path.abspath(path))
    if single_file and path.suffix != ".safetensors":
        raise ValueError(f"single_file=True needs a path ending in .safetensors, got {str(path)!r}")
    max_bytes = parse_size(max_shard_size)
    check_save_target(path, overwrite=overwrite, model=model, single_file=single_file)
    hf_config = getattr(model, "config", None)
    saved_config = _hf_config_dict(model) if hf_config is not None and hasattr(hf_config, "to_dict") else None
    # Written as produced, one layer at a time (see _SavedTensors): a save holds the model and one
    # layer's converted tensors, not a second copy of the quantized weights.
    saved = _SavedTensors(model, plan, config, saved_config, crc32=single_file)
    description = {
        "format": "quantization-wrapper",
        "format_version": FORMAT_VERSION,
        "quantization_config": config.to_dict(),
        "plan": plan.to_dict(),
        "libraries": _library_versions(),
        "tied": saved.tied,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
    }

    try:
        if single_file:
            if saved_config is not None:
                description["config"] = saved_config
            description["tensor_crc32"] = saved.crc32
            with StagedFile(path) as staged:
                metadata = {"quantization_wrapper": json.dumps(description, default=str)}
                _write_safetensors(saved, {staged.path: (list(saved.specs), metadata)})
                if _before_commit is not None:
                    _before_commit(staged.path)
                staged.commit()
            return path

        with StagedDirectory(path, overwrite=overwrite) as stage:
            staging = stage.path
            buffers = [k for k in saved.specs if k.startswith(BUFFER_PREFIX)]
            sizes = {k: saved.nbytes(k) for k in saved.specs if not k.startswith(BUFFER_PREFIX)}
            shards = _shards(sizes, max_bytes)
            layout: dict[Path, tuple[list[str], dict[str, str]]] = {}
            if buffers:
                layout[staging / BUFFERS_NAME] = (buffers, {"format": "pt"})
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(shards, 1):
                name = WEIGHTS_NAME if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                layout[staging / name] = (shard, {"format": "pt"})
                weight_map.update({k: name for k in shard})
            _write_safetensors(saved, layout)
            if len(shards) > 1:
                (staging / INDEX_NAME).write_text(json.dumps(
                    {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, indent=2))
            files: dict[str, dict[str, Any]] = {}
            if saved_config is not None:
                (staging / "config.json").write_text(json.dumps(saved_config, indent=2, default=str))
            for name, content in _interop(model)[1].items():
                (staging / name).write_text(json.dumps(content, indent=2))
            for name in sorted(stage.written()):
                with open(staging / name, "rb+") as fh:
                    os.fsync(fh.fileno())
                files[name] = _file_record(staging / name)
            description["files"] = files
            (staging / QUANT_CONFIG_NAME).write_text(json.dumps(description, indent=2, default=str))
            with open(staging / QUANT_CONFIG_NAME, "rb+") as fh:
                os.fsync(fh.fileno())
            if _before_commit is not None:
                _before_commit(staging)
            stage.commit()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(e.errno, f"no space left on the device of {path.parent} while saving the checkpoint; "
                                   f"nothing was changed at {path}") from e
        raise
    return path


def _tensor_crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes, as they lie in the safetensors file."""
    return zlib.crc32(_tensor_bytes(t))


# ------------------------------------------------------------------------------------------- load
def _read_description_file(desc: Path) -> Any:
    try:
        raw = desc.read_bytes()
    except IsADirectoryError:
        raise CheckpointError(f"{desc}: is a directory, not the checkpoint's JSON description") from None
    except OSError as e:
        raise CheckpointError(f"{desc}: cannot be read ({e.strerror})") from e
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{desc}: not UTF-8 text (byte {e.start}); the description is damaged") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{desc}: invalid JSON ({e})") from e


def read_checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON description of a checkpoint (directory or single file), checked against its schema.

    Raises:
        CheckpointError: naming the file and the field that is missing or has the wrong type.
    """
    path = Path(path)
    if not path.exists():
        recover(path)  # a save that died between its two renames leaves the checkpoint aside
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        if "quantization_wrapper" not in meta:
            from .native_formats import ACCEPTED_FORMATS

            raise CheckpointError(f"{path}: safetensors file has no quantization-wrapper description in its metadata "
                                  f"(nor MLX-quantized tensors); accepted: {ACCEPTED_FORMATS}")
        source = f"{path} (metadata 'quantization_wrapper')"
        try:
            info = json.loads(meta["quantization_wrapper"])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{source}: invalid JSON ({e})") from e
    else:
        recover(path)
        desc = path / QUANT_CONFIG_NAME
        if not desc.exists() and not desc.is_symlink():
            from .native_formats import ACCEPTED_FORMATS

            raise CheckpointError(f"{path}: no {QUANT_CONFIG_NAME}; not a quantization-wrapper checkpoint, nor a "
                                  f"native format this package reads; accepted: {ACCEPTED_FORMATS}")
        confined_file(path, QUANT_CONFIG_NAME, "the checkpoint")
        source = str(desc)
        info = _read_description_file(desc)
    _check_description(info, source, directory=path.is_dir())
    return info


def _check_description(info: Any, source: str, *, directory: bool) -> None:
    """Raise ``CheckpointError(source: field ...)`` unless ``info`` has the description's schema."""

    def bad(field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{source}: field {field} {problem}; the description is damaged or was not "
                               f"written by quantization-wrapper")

    def typed(value: Any, kind: type | tuple, field: str, what: str) -> Any:
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise bad(field, f"must be {what}, got {type(value).__name__} {value!r:.60}")
        return value

    typed(info, dict, "<top level>", "a JSON object")
    if "format" in info and info["format"] != "quantization-wrapper":
        raise bad("format", f"is {info['format']!r}, expected 'quantization-wrapper'")
    version = info.get("format_version")
    typed(version, int, "format_version", "an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{source}: format_version {version} is newer than this quantization-wrapper "
                              f"understands ({FORMAT_VERSION}); upgrade the package")
    if version < 1:
        raise bad("format_version", f"is {version}; versions start at 1")
    for field in ("quantization_config", "plan"):
        if field not in info:
            raise bad(field, "is missing")
    try:
        QuantizationConfig.from_dict(typed(info["quantization_config"], dict, "quantization_config", "an object"))
    except (ValueError, TypeError) as e:
        raise bad("quantization_config", f"is invalid ({e})") from e
    plan = typed(info["plan"], dict, "plan", "an object")
    typed(plan.get("method"), str, "plan.method", "a string")
    layers = typed(plan.get("layers"), list, "plan.layers", "a list")
    kinds = {"name": str, "in_features": int, "out_features": int, "bias": bool, "method": str,
             "bytes_before": int, "bytes_after": int, "status": str}
    seen: set[str] = set()
    for i, layer in enumerate(layers):
        where = f"plan.layers[{i}]"
        typed(layer, dict, where, "an object")
        unknown = sorted(set(layer) - set(kinds) - {"bits", "group_size", "reason"})
        if unknown:
            raise bad(f"{where}", f"has unknown keys {unknown}")
        for key, kind in kinds.items():
            if key not in layer:
                raise bad(f"{where}.{key}", "is missing")
            typed(layer[key], kind, f"{where}.{key}", "a " + kind.__name__)
        for key in ("bits", "group_size"):
            if layer.get(key) is not None:
                typed(layer[key], int, f"{where}.{key}", "an integer or null")
        if layer["in_features"] <= 0 or layer["out_features"] <= 0:
            raise bad(f"{where}", "has a non-positive shape")
        if layer["status"] not in ("quantized", "float", "skipped"):
            raise bad(f"{where}.status", f"is {layer['status']!r}; allowed: quantized, float, skipped")
        if layer["status"] != "skipped":
            try:
                QuantizationMethod.parse(layer["method"])
            except ValueError as e:
                raise bad(f"{where}.method", f"is invalid ({e})") from e
        if layer["name"] in seen:
            raise bad(f"{where}.name", f"repeats layer {layer['name']!r}")
        seen.add(layer["name"])
    for field in ("tied", "libraries"):
        value = typed(info.get(field, {}), dict, field, "an object")
        for k, v in value.items():
            typed(v, str, f"{field}[{k!r}]", "a string")
    if "config" in info:
        typed(info["config"], dict, "config", "an object")
    if directory:
        files = info.get("files")
        if files is None:
            raise bad("files", "is missing (it lists every file with its size and checksums)")
        typed(files, dict, "files", "an object")
        if not files:
            raise bad("files", "is empty; without it nothing could be verified")
        for name, rec in files.items():
            where = f"files[{name!r}]"
            typed(rec, dict, where, "an object")
            size = typed(rec.get("size"), int, f"{where}.size", "an integer")
            if size < 0:
                raise bad(f"{where}.size", f"is negative ({size})")
            digest = typed(rec.get("sha256"), str, f"{where}.sha256", "a hex string")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise bad(f"{where}.sha256", "is not 64 lower-case hex digits")
            if "block_size" in rec or "block_crc32" in rec:
                block = typed(rec.get("block_size"), int, f"{where}.block_size", "an integer")
                sums = typed(rec.get("block_crc32"), list, f"{where}.block_crc32", "a list")
                if block <= 0 or len(sums) != -(-size // block):
                    raise bad(f"{where}.block_crc32", f"has {len(sums)} sums for {size} bytes in blocks of {block}")
                for v in sums:
                    typed(v, int, f"{where}.block_crc32[]", "an integer")
        if not any(n.endswith(".safetensors") for n in files):
            raise bad("files", "lists no .safetensors weights")
    else:
        crcs = typed(info.get("tensor_crc32"), dict, "tensor_crc32", "an object (a CRC-32 per tensor)")
        for k, v in crcs.items():
            typed(v, int, f"tensor_crc32[{k!r}]", "an integer")


def verify_checkpoint(path: str | os.PathLike, *, full: bool = False) -> dict[str, str]:
    """Check every recorded file's size and checksums. Returns ``{file: "ok"}``.

    Files saved with block checksums are verified block by block on up to 4 threads (1.2 GB in
    about 0.3 s on 2 cores); others by their whole-file sha256. A single-file checkpoint is
    checked tensor by tensor against the CRC-32s in its metadata.

    Args:
        path: the checkpoint directory or single file.
        full: also check every file's whole sha256 (what ``sha256sum`` prints), besides its blocks.

    Raises:
        ChecksumError: naming the file whose size or checksum differs (and the byte range or
            tensor), or that is missing.
        UnsafePathError: a listed file lies outside the checkpoint directory.
    """
    path = Path(path)
    info = read_checkpoint_info(path)
    if path.is_file():
        return {path.name: _verify_single_file(path, info)}
    records = info["files"]
    fds: dict[str, int] = {}
    try:
        jobs = []
        for name, rec in records.items():
            f = confined_file(path, name, f"{QUANT_CONFIG_NAME} 'files'")
            if not f.is_file():
                raise ChecksumError(f"{f}: file listed in {QUANT_CONFIG_NAME} is missing")
            if f.stat().st_size != rec["size"]:
                raise ChecksumError(f"{f}: size {f.stat().st_size} bytes, expected {rec['size']} "
                                    f"(truncated or modified)")
            fds[name] = os.open(f, os.O_RDONLY)
            block = rec.get("block_size")
            sums = rec.get("block_crc32")
            if block and sums:
                jobs += [(name, i * block, min(block, rec["size"] - i * block), want, _Crc32)
                         for i, want in enumerate(sums)]
                if full:
                    jobs.append((name, 0, rec["size"], rec["sha256"], _Sha256))
            else:
                jobs.append((name, 0, rec["size"], rec["sha256"], _Sha256))
        with ThreadPoolExecutor(_threads()) as pool:
            futures = [(job, pool.submit(_sum_range, fds[job[0]], job[1], job[2], job[4])) for job in jobs]
            for (name, offset, length, want, algorithm), future in futures:
                try:
                    got = future.result()
                except ChecksumError as e:
                    raise ChecksumError(f"{path / name}: {e}") from None
                if got != want:
                    where = "" if length == records[name]["size"] else f" in bytes {offset}-{offset + length}"
                    for _, other in futures:
                        other.cancel()
                    raise ChecksumError(f"{path / name}: {algorithm.name} mismatch{where} (the file was modified "
                                        f"after saving)")
    finally:
        for fd in fds.values():
            os.close(fd)
    return {name: "ok" for name in records}


def _verify_single_file(path: Path, info: dict[str, Any]) -> str:
    """Check every tensor of a single-file checkpoint against its recorded CRC-32."""
    sums = info["tensor_crc32"]
    try:
        reader = SafetensorsReader(path, mmap=False)
    except ValueError as e:
        raise ChecksumError(str(e)) from e
    with reader:
        names = set(reader.keys())
        if names != set(sums):
            extra, missing = sorted(names - set(sums)), sorted(set(sums) - names)
            raise ChecksumError(f"{path}: the tensors do not match the recorded checksums (unrecorded: "
                                f"{extra[:5]}, missing: {missing[:5]})")
        fd = reader._file.fileno()
        for name in sorted(names):
            _, _, begin, end = reader.entries[name]
            got = _sum_range(fd, reader._start + begin, end - begin, _Crc32)
            if got != sums[name]:
                raise ChecksumError(f"{path}: CRC-32 mismatch in tensor {name!r} (bytes "
                                    f"{reader._start + begin}-{reader._start + end}; the file was modified after saving)")
    return "ok (CRC-32 of every tensor)"


def _build_skeleton(path: Path, info: dict, model_config: Any) -> nn.Module:
    """The architecture with parameters on meta, from ``model_config`` or the saved config."""
    saved = info.get("config")
    if saved is None and path.is_dir() and (path / "config.json").exists():
        saved = _read_description_file(confined_file(path, "config.json", "the checkpoint"))
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path / 'config.json'}: must hold a JSON object, got {type(saved).__name__}")
    if model_config is None and saved is None:
        raise CheckpointError(f"{path}: no config.json; pass model_config (a transformers config, a "
                              f"dict, a callable that builds the model, or an nn.Module on meta)")
    try:
        return build_skeleton(model_config, saved, where=str(path))
    except (ValueError, ImportError) as e:
        raise CheckpointError(str(e)) from e


def _check_like(path: Path, key: str, value: torch.Tensor, want: torch.Tensor, *, exact_dtype: bool) -> None:
    """A checkpoint tensor must have the architecture's shape and kind (float, integer, bool); an
    integer or bool buffer also its exact dtype. Float widths are the checkpoint's choice (a model
    saved in bfloat16 is built in float32 on meta)."""
    if tuple(want.shape) != tuple(value.shape):
        raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(value.shape)} in the checkpoint, "
                              f"{tuple(want.shape)} in the architecture")

    def kind(t: torch.Tensor) -> str:
        return "bool" if t.dtype == torch.bool else "float" if t.is_floating_point() else \
            "complex" if t.is_complex() else "integer"

    if kind(value) != kind(want) or (exact_dtype and kind(want) != "float" and value.dtype != want.dtype):
        raise CheckpointError(f"{path}: tensor {key!r} is {value.dtype} in the checkpoint; the architecture "
                              f"needs {want.dtype if exact_dtype else 'a ' + kind(want) + ' tensor'}")


def load_quantized_model(path: str | os.PathLike, model_config: Any = None, *, device: str | torch.device = "cpu",
                         backend=None, verify: bool = True, mmap: bool = True,
                         expected_methods: Iterable[QuantizationMethod] | None = None) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized_model`; the method is read from it.

    The peers' own formats load too (mlx-lm directories, MLX ``.npz``/``.safetensors`` files, hqq's
    ``save_quantized`` directories and ``.pt`` layer states): see :mod:`quantization_wrapper.native_formats`.

    Args:
        path: the checkpoint directory or single ``.safetensors`` file.
        model_config: how to build the architecture: ``None`` (the saved ``config.json``), a
            transformers config or dict, a callable returning the model, or an ``nn.Module`` on meta.
        device: where to place the tensors.
        backend: backend for the adapters (``None``: detect).
        verify: check every file's sha256 and size (in a second thread, while loading; nothing is
            returned before it passes).
        mmap: keep the tensors as views of the memory-mapped files (copy-on-write: writes stay in
            this process), as ``safetensors`` and ``from_pretrained`` do: loading copies nothing and
            pages are read from the OS cache when first used. ``False`` copies every tensor into
            process memory, so the model no longer depends on the files (do that before
            overwriting a checkpoint in place, e.g. with ``cp``; our own saves replace files
            atomically, which mapped models survive). Tensors moved to another ``device`` are
            copies either way.
        expected_methods: raise if the checkpoint's method is not one of these.

    Returns:
        The quantized model, in eval mode, with its ``quantization_plan``.

    Raises:
        CheckpointError / ChecksumError: naming the file or key that is wrong.
    """
    path = Path(path)
    release_freed_memory_to_os()
    if path.exists() and not (path / QUANT_CONFIG_NAME).exists():  # not ours: maybe mlx-lm's or hqq's own
        from .native_formats import detect_native_format, load_native_checkpoint

        if detect_native_format(path) is not None:
            model = load_native_checkpoint(path, model_config, device=device, backend=backend,
                                           expected_methods=expected_methods)
            model._qw_source_dir = str(path.resolve() if path.is_dir() else path.resolve().parent)
            return model
    info = read_checkpoint_info(path)
    if path.is_file() and verify:
        verify_checkpoint(path)
    if path.is_dir() and verify:
        # Hash the files on other threads (hashlib releases the GIL) while this one builds the
        # skeleton and the empty layers, which is Python work; the layers are filled, which is
        # tensor work, once the hashes have passed. Nothing is filled from, or returned for, a
        # corrupt checkpoint.
        with ThreadPoolExecutor(max_workers=1) as pool:
            verification = pool.submit(verify_checkpoint, path)
            try:
                model = _load_checkpoint(path, info, model_config, device=device, backend=backend,
                                         expected_methods=expected_methods, mmap=mmap,
                                         before_filling=verification.result)
            except CheckpointError:
                verification.result()  # a checksum failure explains a read failure better
                raise
            verification.result()
        return model
    return _load_checkpoint(path, info, model_config, device=device, backend=backend,
                            expected_methods=expected_methods, mmap=mmap)


def _load_checkpoint(path: Path, info: dict[str, Any], model_config: Any, *, device, backend,
                     expected_methods, mmap: bool = True, before_filling: Callable[[], Any] | None = None) -> nn.Module:
    config = QuantizationConfig.from_dict(info["quantization_config"])
    if expected_methods is not None and config.method not in tuple(expected_methods):
        raise CheckpointError(f"{path} was saved with method {config.method.value!r}; this adapter serves "
                              f"{', '.join(m.value for m in expected_methods)} (use the module-level "
                              f"load_quantized_model to load any method)")
    plan = QuantizationPlan.from_dict(info["plan"])
    device = torch.device(device)

    if path.is_file():
        files = [path]
    else:  # the description lists the weights: other files in the directory are not ours to read
        files = [confined_file(path, n, f"{QUANT_CONFIG_NAME} 'files'")
                 for n in sorted(info["files"]) if n.endswith(".safetensors")]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: weights file listed in {QUANT_CONFIG_NAME} is missing")

    model = _build_skeleton(path, info, model_config)
    # The tensors the checkpoint must provide besides the planned layers, read off the skeleton
    # once: a state_dict() of the filled model would serialize every quantized layer again
    # (quanto repacks CPU int4 weights to do so, seconds per layer).
    planned = tuple(layer.name + "." for layer in plan.layers if layer.status != "skipped")
    skeleton = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(planned)}
    adapters: dict = {}
    with ExitStack() as stack:
        handles = {}
        for f in files:
            try:
                reader = stack.enter_context(SafetensorsReader(f, mmap=mmap))
            except ValueError as e:
                raise CheckpointError(str(e)) from e
            for key in reader.keys():
                handles[key] = reader

        def take(key: str) -> torch.Tensor:
            try:
                reader = handles.pop(key)
                tensor = reader.view(key) if mmap else reader.read(key)
            except KeyError:
                raise CheckpointError(f"{path}: tensor {key!r} is missing from the checkpoint") from None
            except Exception as e:
                raise CheckpointError(f"{path}: tensor {key!r} could not be read ({e})") from e
            return tensor if device.type == "cpu" else tensor.to(device)

        def restore(name: str, adapter: QuantizationAdapter, layer: Any, layer_config: QuantizationConfig,
                    dtype: torch.dtype, state: dict[str, torch.Tensor]) -> nn.Module:
            try:
                return adapter.restore_linear(layer.in_features, layer.out_features, layer.bias, state,
                                              config=layer_config, dtype=dtype)
            except CheckpointError as e:
                raise type(e)(f"{path}: layer {name!r}: {e}") from e
            except Exception as e:
                raise CheckpointError(f"{path}: layer {name!r} could not be restored from "
                                      f"{sorted(state)}: {type(e).__name__}: {e}") from e

        def fill(name: str, adapter: QuantizationAdapter, layer: Any, layer_config: QuantizationConfig,
                 dtype: torch.dtype, state: dict[str, torch.Tensor], owners: dict[str, SafetensorsReader],
                 filled: nn.Module) -> None:
            model.set_submodule(name, filled)
            if mmap:  # hand back the pages of tensors the layer converted instead of keeping
                kept = [(leaf.data_ptr(), leaf.data_ptr() + leaf.numel() * leaf.element_size())
                        for t in list(filled.parameters()) + list(filled.buffers()) for leaf in leaf_tensors(t)]
                for key, t in state.items():
                    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
                    if not any(a < hi and lo < b for a, b in kept):
                        owners[key].release([name + "." + key])

        # Layers whose filling is multi-threaded tensor work wait for the checksums (it runs faster
        # after the hashing threads than beside them); the others are filled as they are read.
        deferred = []
        for layer in plan.layers:
            if layer.status == "skipped":
                continue
            try:
                current = model.get_submodule(layer.name)
            except AttributeError:
                raise CheckpointError(f"{path}: the plan's layer {layer.name!r} does not exist in the model "
                                      f"architecture") from None
            if getattr(current, "in_features", layer.in_features) != layer.in_features or \
                    getattr(current, "out_features", layer.out_features) != layer.out_features:
                raise CheckpointError(
                    f"{path}: layer {layer.name!r} is {current.out_features}x{current.in_features} in the "
                    f"architecture but {layer.out_features}x{layer.in_features} in the checkpoint")
            adapter = _layer_adapter(config, layer.method, backend, adapters)
            prefix = layer.name + "."
            keys = [k for k in handles if k.startswith(prefix)]
            owners = {k[len(prefix):]: handles[k] for k in keys}
            item = (layer.name, adapter, layer, _layer_config(config, layer.__dict__),
                    getattr(current, "weight", torch.empty(0)).dtype, {k[len(prefix):]: take(k) for k in keys}, owners)
            if adapter.fill_after_verification and before_filling is not None:
                deferred.append(item)
            else:
                fill(*item, filled=restore(*item[:6]))

        rest: dict[str, torch.Tensor] = {}
        buffers: dict[str, torch.Tensor] = {}
        known_buffers = dict(model.named_buffers(remove_duplicate=False))
        for key in list(handles):
            if key.startswith(BUFFER_PREFIX):
                name = key[len(BUFFER_PREFIX):]
                if name not in known_buffers:
                    raise CheckpointError(f"{path}: tensor {key!r} names a buffer the architecture does not have")
                buffers[name] = take(key)
                _check_like(path, key, buffers[name], known_buffers[name], exact_dtype=True)
            else:
                rest[key] = take(key)

        if deferred:
            before_filling()
            # Their tensor work is a chain of memory-bound ops: two layers side by side on one
            # core each beat one layer on two cores (as when streaming).
            # The first layer is restored here: a library's first use compiles code lazily, and
            # CPython 3.11 compiling in two threads at once fails ("AST constructor recursion depth
            # mismatch", seen with quanto); the others then run side by side.
            first = deferred.pop(0)
            fill(*first, filled=restore(*first[:6]))
            workers = min(len(deferred), 2 if (os.cpu_count() or 1) >= 2 else 1)
            with tensor_worker_pool(workers, "restore") as pool:
                futures = [pool.submit(restore, *item[:6]) for item in deferred]
                for item, future in zip(deferred, futures):
                    fill(*item, filled=future.result())
        del deferred
    # Tied tensors are saved once (this version keeps the name save_pretrained keeps; earlier ones
    # kept the alphabetically first, e.g. lm_head.weight); the description names the other copies.
    tied = info.get("tied", {})
    for alias, source in tied.items():
        value = buffers.get(source[len(BUFFER_PREFIX):]) if source.startswith(BUFFER_PREFIX) else rest.get(source)
        if value is None:
            continue  # the checks below name what the architecture lacks
        if alias.startswith(BUFFER_PREFIX):
            name = alias[len(BUFFER_PREFIX):]
            if name not in known_buffers:
                raise CheckpointError(f"{path}: tied entry {alias!r} names a buffer the architecture does not have")
            _check_like(path, alias, value, known_buffers[name], exact_dtype=True)
            buffers[name] = value
        else:
            rest[alias] = value

    expected = {k for k, v in skeleton.items() if v.device.type == "meta"}
    missing = sorted(expected - set(rest))
    unexpected = sorted(set(rest) - set(skeleton))
    if unexpected:
        raise CheckpointError(f"{path}: the checkpoint has tensors the architecture does not: "
                              f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks tensors the architecture needs: "
                              f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    for key, value in rest.items():
        _check_like(path, key, value, skeleton[key], exact_dtype=skeleton[key].device.type != "meta")
    model.load_state_dict(rest, strict=False, assign=True)
    for name, value in buffers.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        persistent = attr not in getattr(module, "_non_persistent_buffers_set", set())
        module.register_buffer(attr, value, persistent=persistent)
    for alias, source in tied.items():  # one parameter again, not two sharing memory
        module_name, _, attr = alias.rpartition(".")
        try:
            param = model.get_parameter(source)
            module = model.get_submodule(module_name) if module_name else model
        except AttributeError:
            continue
        if attr in module._parameters:
            module._parameters[attr] = param
    if hasattr(model, "tie_weights") and tied:
        model.tie_weights()
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftovers:
        raise CheckpointError(f"{path}: after loading, these tensors have no data: {leftovers[:10]}")
    if device.type != "cpu":
        model.to(device)
    release_freed_memory_to_os()
    model.quantization_plan = plan
    model.quantization_config = config
    main = _layer_adapter(config, config.method.value, backend, adapters)
    main.mark_model(model)
    model.eval()
    return model
