"""Save and load quantized models: safetensors + a JSON description, atomic, checksummed, no pickle.

Layout of a checkpoint directory::

    model.safetensors                  (or model-00001-of-0000N.safetensors ... + model.safetensors.index.json)
    quantization_config.json           format version, QuantizationConfig, per-layer plan, library
                                       versions, tied tensors, sha256 + size of every file
    config.json                        the transformers config, when the model has one

Loading builds the model skeleton on the meta device, replaces each planned layer with an empty
quantized layer (``create_quantized_linear(device="meta")``) and fills everything with
``assign=True`` from views of the memory-mapped files (copy-on-write, as safetensors maps them:
nothing is copied, pages come in from the OS cache on first use), or with ``mmap=False`` from
copies read into process memory: the full-precision weights never exist.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
import json
import logging
import mmap
import os
import shutil
import tempfile
import zlib
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .adapters.base import QuantizationAdapter, get_adapter_class, leaf_tensors
from .config import QuantizationConfig, QuantizationMethod
from .loading import SafetensorsReader, _Inline, build_skeleton, release_freed_memory_to_os
from .surgery import QuantizationPlan, get_quantization_plan

__all__ = [
    "save_quantized_model",
    "load_quantized_model",
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


class CheckpointError(ValueError):
    """The checkpoint is missing, malformed, or does not match the model."""


class ChecksumError(CheckpointError):
    """A file's sha256 or size differs from what was recorded at save time."""


# ---------------------------------------------------------------------------------------- helpers
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size={size} must be positive")
        return size
    text = str(size).strip().upper().replace(" ", "")
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    raise ValueError(f"max_shard_size={size!r} is not a size; write e.g. 500MB, 2GB or a number of bytes")


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
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
    with the peers' quantization entries (see :func:`_interop`)."""
    data = model.config.to_dict()
    data.pop("quantization_config", None)
    if type(model).__module__.startswith("transformers."):
        data["architectures"] = [type(model).__name__]
    data.update(_interop(model)[0])
    return data


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


def _collect_tensors(model: nn.Module, plan: QuantizationPlan, config: QuantizationConfig) -> tuple[dict, dict]:
    """All tensors to save (quantized layers through their adapter) and the tied-tensor aliases."""
    tensors: dict[str, torch.Tensor] = {}
    owned: set[str] = set()
    adapters: dict = {}
    for layer in plan.layers:
        if layer.status == "skipped":
            continue
        module = model.get_submodule(layer.name)
        adapter = _layer_adapter(config, layer.method, cache=adapters)
        for key, value in adapter.layer_state_dict(module).items():
            tensors[f"{layer.name}.{key}"] = value
        owned.add(layer.name)
    tensors.update(_state_outside(model, owned))
    # Non-persistent buffers (rotary inv_freq, position ids) are rebuilt from code by the model
    # constructor, which we avoid on load (it would run on meta); save them too.
    for name, buf in model.named_buffers():
        if name not in tensors and not any(name.startswith(o + ".") for o in owned):
            tensors[f"__buffer__.{name}"] = buf
    # Tied weights: safetensors refuses shared storage; keep one copy, record the aliases.
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name in sorted(tensors):
        t = tensors[name]
        if t.device.type == "meta":
            raise CheckpointError(f"tensor {name!r} is on the meta device; load or quantize real weights "
                                  f"before saving")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
    for name in tied:
        del tensors[name]
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        out[name] = t.contiguous()
    return out, tied


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in tensors:  # insertion order keeps a layer's tensors together
        n = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += n
    return shards


def save_quantized_model(model: nn.Module, path: str | os.PathLike, *, max_shard_size: int | str = "2GB",
                         single_file: bool = False, _before_commit: Callable[[Path], None] | None = None) -> Path:
    """Save a model quantized by this package.

    The checkpoint is written to a temporary directory next to ``path``, fsynced, then renamed into
    place: an interrupted save leaves any previous checkpoint at ``path`` intact.

    Args:
        model: a model with a ``quantization_plan`` (from ``quantize_model`` or ``load_quantized_model``).
        path: the checkpoint directory (or, with ``single_file=True``, the ``.safetensors`` file).
        max_shard_size: split ``model.safetensors`` into shards of at most this size (``"500MB"``,
            ``2 * 2**30``), with a ``model.safetensors.index.json`` as transformers writes it.
        single_file: write one ``.safetensors`` file whose metadata holds the JSON description.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    plan = get_quantization_plan(model)
    config = getattr(model, "quantization_config", None)
    if plan is None or not isinstance(config, QuantizationConfig):
        raise ValueError("model has no quantization plan: quantize it with an adapter's quantize_model "
                         "(or load it with load_quantized_model) before saving")
    path = Path(path)
    tensors, tied = _collect_tensors(model, plan, config)
    description = {
        "format": "quantization-wrapper",
        "format_version": FORMAT_VERSION,
        "quantization_config": config.to_dict(),
        "plan": plan.to_dict(),
        "libraries": _library_versions(),
        "tied": tied,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
    }
    hf_config = getattr(model, "config", None)

    if single_file:
        if path.suffix != ".safetensors":
            raise ValueError(f"single_file=True needs a path ending in .safetensors, got {str(path)!r}")
        if hf_config is not None and hasattr(hf_config, "to_dict"):
            description["config"] = _hf_config_dict(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"quantization_wrapper": json.dumps(description, default=str)})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            if _before_commit is not None:
                _before_commit(Path(tmp))
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    max_bytes = _parse_size(max_shard_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        shards = _shards(tensors, max_bytes)
        files: dict[str, dict[str, Any]] = {}
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, 1):
            name = WEIGHTS_NAME if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, staging / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (staging / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if hf_config is not None and hasattr(hf_config, "to_dict"):
            (staging / "config.json").write_text(json.dumps(_hf_config_dict(model), indent=2, default=str))
        for name, content in _interop(model)[1].items():
            (staging / name).write_text(json.dumps(content, indent=2))
        for f in sorted(staging.iterdir()):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            files[f.name] = _file_record(f)
        description["files"] = files
        (staging / QUANT_CONFIG_NAME).write_text(json.dumps(description, indent=2, default=str))
        with open(staging / QUANT_CONFIG_NAME, "rb+") as fh:
            os.fsync(fh.fileno())
        _fsync_dir(staging)
        if _before_commit is not None:
            _before_commit(staging)
        _commit(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _commit(staging: Path, path: Path) -> None:
    """Move ``staging`` to ``path``; an existing checkpoint is replaced only once the new one is complete."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    try:
        os.replace(staging, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------- load
def read_checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON description of a checkpoint (directory or single file), version-checked."""
    path = Path(path)
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
        info = json.loads(meta["quantization_wrapper"])
    else:
        desc = path / QUANT_CONFIG_NAME
        if not desc.exists():
            from .native_formats import ACCEPTED_FORMATS

            raise CheckpointError(f"{path}: no {QUANT_CONFIG_NAME}; not a quantization-wrapper checkpoint, nor a "
                                  f"native format this package reads; accepted: {ACCEPTED_FORMATS}")
        try:
            info = json.loads(desc.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{desc}: invalid JSON ({e})") from e
    version = info.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: description has no integer format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} is newer than this quantization-wrapper "
                              f"understands ({FORMAT_VERSION}); upgrade the package")
    return info


def verify_checkpoint(path: str | os.PathLike, *, full: bool = False) -> dict[str, str]:
    """Check every recorded file's size and checksums. Returns ``{file: "ok"}``.

    Files saved with block checksums are verified block by block on up to 4 threads (1.2 GB in
    about 0.3 s on 2 cores); others by their whole-file sha256.

    Args:
        path: the checkpoint directory.
        full: also check every file's whole sha256 (what ``sha256sum`` prints), besides its blocks.

    Raises:
        ChecksumError: naming the file whose size or checksum differs (and the byte range), or
            that is missing.
    """
    path = Path(path)
    info = read_checkpoint_info(path)
    if path.is_file():
        return {path.name: "ok (single file: integrity checked by safetensors on load)"}
    records = info.get("files", {})
    fds: dict[str, int] = {}
    try:
        jobs = []
        for name, rec in records.items():
            f = path / name
            if not f.exists():
                raise ChecksumError(f"{f}: file listed in {QUANT_CONFIG_NAME} is missing")
            if f.stat().st_size != rec["size"]:
                raise ChecksumError(f"{f}: size {f.stat().st_size} bytes, expected {rec['size']} "
                                    f"(truncated or modified)")
            fds[name] = os.open(f, os.O_RDONLY)
            block = rec.get("block_size")
            kind = next((k for k in _BLOCK_SUMS if isinstance(rec.get(k), list)), None)
            sums = rec.get(kind) if kind else None
            if isinstance(block, int) and block > 0 and sums and len(sums) == -(-rec["size"] // block):
                jobs += [(name, i * block, min(block, rec["size"] - i * block), want, _BLOCK_SUMS[kind])
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


def _build_skeleton(path: Path, info: dict, model_config: Any) -> nn.Module:
    """The architecture with parameters on meta, from ``model_config`` or the saved config."""
    saved = info.get("config")
    if saved is None and (path / "config.json").exists():
        saved = json.loads((path / "config.json").read_text())
    if model_config is None and saved is None:
        raise CheckpointError(f"{path}: no config.json; pass model_config (a transformers config, a "
                              f"dict, a callable that builds the model, or an nn.Module on meta)")
    try:
        return build_skeleton(model_config, saved, where=str(path))
    except (ValueError, ImportError) as e:
        raise CheckpointError(str(e)) from e


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
            return load_native_checkpoint(path, model_config, device=device, backend=backend,
                                          expected_methods=expected_methods)
    info = read_checkpoint_info(path)
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
    elif (path / INDEX_NAME).exists():
        index = json.loads((path / INDEX_NAME).read_text())
        names = sorted(set(index["weight_map"].values()))
        for n in names:
            if not (path / n).exists():
                raise CheckpointError(f"{path / n}: shard listed in {INDEX_NAME} is missing")
        files = [path / n for n in names]
    else:
        if not (path / WEIGHTS_NAME).exists():
            raise CheckpointError(f"{path / WEIGHTS_NAME}: weights file is missing")
        files = [path / WEIGHTS_NAME]

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
            except CheckpointError:
                raise
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
        for key in list(handles):
            if key.startswith("__buffer__."):
                buffers[key[len("__buffer__."):]] = take(key)
            else:
                rest[key] = take(key)

        if deferred:
            before_filling()
            # Their tensor work is a chain of memory-bound ops: two layers side by side on one
            # core each beat one layer on two cores (as when streaming).
            cores = os.cpu_count() or 1
            workers = min(len(deferred), 2 if cores >= 2 else 1)
            pool = (ThreadPoolExecutor(workers, thread_name_prefix="restore", initializer=torch.set_num_threads,
                                       initargs=(max(1, cores // workers),)) if workers > 1 else _Inline())
            with pool:
                futures = [pool.submit(restore, *item[:6]) for item in deferred]
                for item, future in zip(deferred, futures):
                    fill(*item, filled=future.result())
        del deferred
    for alias, source in info.get("tied", {}).items():
        if alias.startswith("__buffer__."):
            continue
        if source in rest:
            rest[alias] = rest[source]

    expected = {k for k, v in skeleton.items() if v.device.type == "meta"}
    missing = sorted(expected - set(rest))
    unexpected = sorted(set(rest) - set(skeleton))
    if unexpected:
        raise CheckpointError(f"{path}: the checkpoint has tensors the architecture does not: "
                              f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks tensors the architecture needs: "
                              f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    current = skeleton
    for key, value in rest.items():
        if tuple(current[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(value.shape)} in the checkpoint, "
                                  f"{tuple(current[key].shape)} in the architecture")
    model.load_state_dict(rest, strict=False, assign=True)
    for name, value in buffers.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        persistent = attr not in getattr(module, "_non_persistent_buffers_set", set())
        module.register_buffer(attr, value, persistent=persistent)
    if hasattr(model, "tie_weights") and info.get("tied"):
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
