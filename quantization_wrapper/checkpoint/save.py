"""Save a quantized model: safetensors + a JSON description, atomic, checksummed, no pickle.

Tensor names are transformers' (tied weights saved once, under the name ``save_pretrained`` keeps),
so the peers' own loaders read the weights too (see :mod:`~quantization_wrapper.checkpoint.interop`).
The layout is in :mod:`~quantization_wrapper.checkpoint.description`; the files are written as they
are produced, one layer at a time (:class:`SavedTensors`), into a staging directory that is
exchanged with the target in one atomic rename (:mod:`~quantization_wrapper.checkpoint.files`).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..config import QuantizationConfig
from ..errors import CheckpointError
from ..surgery import QuantizationPlan, get_quantization_plan
from ..tensors import leaf_tensors
from .checksums import file_record, tensor_crc32
from .description import (
    BUFFER_PREFIX,
    BUFFERS_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    QUANT_CONFIG_NAME,
    WEIGHTS_NAME,
    layer_adapter,
    library_versions,
)
from .files import StagedDirectory, StagedFile, check_save_target
from .interop import hf_config_dict, peer_entries
from .safetensors_io import SAFETENSORS_DTYPES, parse_size, write_safetensors
from .skeleton import build_skeleton

__all__ = ["save_quantized_model", "SavedTensors", "collect_tensors"]

logger = logging.getLogger(__name__)


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


class SavedTensors:
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
                        layer_adapter(config, layer.method, cache=adapters))
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
            if t.dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"cannot save {name!r}: safetensors has no dtype {t.dtype}; it holds "
                                 f"{', '.join(str(d).replace('torch.', '') for d in SAFETENSORS_DTYPES)}")
            self.specs[name] = (t.dtype, tuple(t.shape))
            if t.numel() and (lasting or t.untyped_storage().data_ptr() in own):
                storage[name] = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if self.crc32 is not None:
                self.crc32[name] = tensor_crc32(t)
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


def collect_tensors(model: nn.Module, plan: QuantizationPlan, config: QuantizationConfig,
                    saved_config: dict[str, Any] | None = None) -> tuple[dict, dict]:
    """All tensors to save at once, as contiguous CPU tensors (quantized layers through their
    adapter), and the tied-tensor aliases: for callers that need one dict (``save_pretrained``);
    :func:`save_quantized_model` streams them instead (:class:`SavedTensors`)."""
    saved = SavedTensors(model, plan, config, saved_config, keep=True)
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
    the next save or load removes what it left behind (:func:`~quantization_wrapper.checkpoint.files.recover`).
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
    saved_config = hf_config_dict(model) if hf_config is not None and hasattr(hf_config, "to_dict") else None
    # Written as produced, one layer at a time (see SavedTensors): a save holds the model and one
    # layer's converted tensors, not a second copy of the quantized weights.
    saved = SavedTensors(model, plan, config, saved_config, crc32=single_file)
    description = {
        "format": "quantization-wrapper",
        "format_version": FORMAT_VERSION,
        "quantization_config": config.to_dict(),
        "plan": plan.to_dict(),
        "libraries": library_versions(),
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
                write_safetensors(saved, {staged.path: (list(saved.specs), metadata)})
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
            write_safetensors(saved, layout)
            if len(shards) > 1:
                (staging / INDEX_NAME).write_text(json.dumps(
                    {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, indent=2))
            files: dict[str, dict[str, Any]] = {}
            if saved_config is not None:
                (staging / "config.json").write_text(json.dumps(saved_config, indent=2, default=str))
            for name, content in peer_entries(model)[1].items():
                (staging / name).write_text(json.dumps(content, indent=2))
            for name in sorted(stage.written()):
                with open(staging / name, "rb+") as fh:
                    os.fsync(fh.fileno())
                files[name] = file_record(staging / name)
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
