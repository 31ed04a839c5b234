"""The architecture a checkpoint is loaded into, built with its parameters on the meta device (one
builder for every loader: ``torch.device("meta")`` plus the model's ``_init_weights`` for the
buffers it computes, thread-safe, nothing process-wide changed), and the check that a tensor read
from a checkpoint fits the architecture's."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = [
    "BUILD_LOCK",
    "model_from_config",
    "build_skeleton",
    "build_empty_model",
    "checkpoint_skeleton",
    "check_loaded_tensor",
]


#: Skeletons are built one at a time. transformers resolves its public names lazily (importing a
#: submodule on first access, which is not thread-safe: a second thread sees a half-imported
#: module), and configs and model constructors resolve more of them. Building on meta takes
#: milliseconds, so the lock costs little. Re-entrant: a callable may build a skeleton itself.
BUILD_LOCK = threading.RLock()


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
    with BUILD_LOCK:
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
        with BUILD_LOCK:
            _compute_meta_buffers(model_config)
        return model_config
    if callable(model_config) and not hasattr(model_config, "to_dict"):
        with BUILD_LOCK:
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


def checkpoint_skeleton(where: Any, saved_config: dict[str, Any] | None, model_config: Any, *,
                        missing: str) -> nn.Module:
    """:func:`build_skeleton` for a loader: its errors as :class:`CheckpointError` naming ``where``.

    Args:
        where: the checkpoint (named in errors).
        saved_config: the config stored with the checkpoint, if any.
        model_config: what the caller passed (see :func:`build_skeleton`).
        missing: what the error says after ``where`` when there is neither config.
    """
    if model_config is None and saved_config is None:
        raise CheckpointError(f"{where}: {missing}")
    try:
        return build_skeleton(model_config, saved_config, where=str(where))
    except (ValueError, ImportError) as e:
        raise CheckpointError(str(e)) from e


def check_loaded_tensor(where: Any, name: str, value: torch.Tensor | tuple[int, ...], want: torch.Tensor, *,
                        dtype: str | None = "kind", error: type[Exception] = CheckpointError,
                        architecture: str = "the architecture") -> None:
    """A tensor read from a checkpoint must have the architecture's shape and, with ``dtype="kind"``,
    its kind (float, integer, bool); with ``dtype="exact"`` an integer or bool tensor also its exact
    dtype. Float widths are the checkpoint's choice (a model saved in bfloat16 is built in float32
    on meta). Layer states are checked against their format by
    :func:`~quantization_wrapper.tensors.check_state_spec` instead.

    Args:
        where: the checkpoint, named first in the message.
        name: the tensor as the message names it (its key's ``repr``, with more words if need be).
        value: the tensor, or its shape from a file's header (then only the shape is checked).
        want: the architecture's tensor (on meta or not).
        dtype: ``"kind"``, ``"exact"`` or ``None`` (the shape only).
        error: the exception raised.
        architecture: how the message names the architecture.
    """
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)
    if tuple(want.shape) != shape:
        raise error(f"{where}: tensor {name} has shape {shape} in the checkpoint, {tuple(want.shape)} in "
                    f"{architecture}")
    if dtype is None or not isinstance(value, torch.Tensor):
        return
    exact_dtype = dtype == "exact"

    def kind(t: torch.Tensor) -> str:
        return "bool" if t.dtype == torch.bool else "float" if t.is_floating_point() else \
            "complex" if t.is_complex() else "integer"

    if kind(value) != kind(want) or (exact_dtype and kind(want) != "float" and value.dtype != want.dtype):
        raise error(f"{where}: tensor {name} is {value.dtype} in the checkpoint; {architecture} "
                    f"needs {want.dtype if exact_dtype else 'a ' + kind(want) + ' tensor'}")
