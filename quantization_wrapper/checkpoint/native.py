"""The peers' own checkpoint formats (mlx-lm / MLX, hqq): which reader a path belongs to, and the
steps every reader shares.

:func:`~quantization_wrapper.checkpoint.load.load_quantized_model` reads these too: a path without
our ``quantization_config.json`` (and not our single ``.safetensors`` file) is handed to
:func:`load_native_checkpoint`, which asks each format whether the path is one of its own. The
formats belong to the backends: each adapter class lists its readers in
:meth:`~quantization_wrapper.adapters.base.QuantizationAdapter.native_readers` (hqq's in
``adapters/hqq.py``, MLX's in ``adapters/mlx/checkpoint.py``), found through the adapter registry.

Nothing here unpickles arbitrary objects: ``.pt`` files go through ``torch.load(weights_only=True)``
and ``.npz`` files through ``numpy.load(allow_pickle=False)``; hqq's dtype names are decoded from an
allow-list. The architecture is rebuilt with its parameters on the meta device and its buffers
real (the rotary tables a native checkpoint does not hold), every quantized layer is built empty
and filled with the stored tensors, and the model gets a ``quantization_plan`` and a
``quantization_config`` (per-layer settings in ``layer_configs``, unquantized linear layers in
``skip_modules``), so :func:`~quantization_wrapper.checkpoint.save.save_quantized_model` saves it in
our format and that reloads bit-identically. Native formats carry no checksums: safetensors
headers are bounds-checked and zip members (``.npz``, ``.pt``) CRC-checked on read.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..config import QuantizationConfig, QuantizationMethod
from ..errors import CheckpointError
from ..patterns import best_match
from ..registry import ADAPTER_REGISTRY
from ..surgery import LayerDecision, record_plan
from .description import ACCEPTED_FORMATS, QUANT_CONFIG_NAME
from .skeleton import check_loaded_tensor, checkpoint_skeleton

__all__ = [
    "ACCEPTED_FORMATS",
    "native_formats",
    "detect_native_format",
    "load_native_checkpoint",
    "load_mlx_checkpoint",
    "load_hqq_checkpoint",
    "native_skeleton",
    "restore_layers",
    "config_summary",
    "check_method",
    "fill_tensors",
    "finish_model",
    "linear_layers",
    "submodule",
]


# ------------------------------------------------------------------------------- the registry
def native_formats() -> dict[str, tuple[Callable[[Path], bool], Callable[..., nn.Module]]]:
    """``name -> (detect(path) -> bool, load(path, model_config, **kwargs) -> nn.Module)`` of every
    native format the registered adapters read (their
    :meth:`~quantization_wrapper.adapters.base.QuantizationAdapter.native_readers`), in the order
    the adapters registered."""
    formats: dict[str, tuple[Callable[[Path], bool], Callable[..., nn.Module]]] = {}
    for cls in dict.fromkeys(ADAPTER_REGISTRY.values()):
        formats.update(cls.native_readers())
    return formats


def __getattr__(name: str) -> Any:
    # NATIVE_FORMATS (a dict filled at import before the readers moved to the backends): the
    # registered adapters' formats as they are now.
    if name == "NATIVE_FORMATS":
        return native_formats()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def detect_native_format(path: str | os.PathLike) -> str | None:
    """The native format of ``path`` (``"mlx"`` or ``"hqq"``), or ``None`` when it is none of them
    (our own checkpoints included). Reads file headers only."""
    path = Path(path)
    if not path.exists() or (path / QUANT_CONFIG_NAME).exists():
        return None
    for name, (detect, _) in native_formats().items():
        if detect(path):
            return name
    return None


def load_native_checkpoint(path: str | os.PathLike, model_config: Any = None, **kwargs: Any) -> nn.Module:
    """Load an mlx-lm / MLX or hqq checkpoint, whichever ``path`` is (see the module docstring).

    Args:
        path: the checkpoint directory or file.
        model_config: the architecture, as for ``load_quantized_model``: ``None`` (the
            ``config.json`` beside the weights), a transformers config or dict, a callable that
            builds the model, or an ``nn.Module`` whose parameters are on meta.
        **kwargs: ``device``, ``backend``, ``expected_methods`` (as for ``load_quantized_model``).

    Raises:
        CheckpointError: not a native format, or the files are broken (the file and key named).
    """
    path = Path(path)
    name = detect_native_format(path)
    if name is None:
        raise CheckpointError(f"{path}: not a checkpoint format this package reads; accepted: {ACCEPTED_FORMATS}")
    return native_formats()[name][1](path, model_config, **kwargs)


def _reader(name: str) -> Callable[..., nn.Module]:
    try:
        return native_formats()[name][1]
    except KeyError:
        raise CheckpointError(f"no registered adapter reads {name!r} checkpoints (its backend's adapter is not "
                              f"registered)") from None


def load_mlx_checkpoint(path: str | os.PathLike, model_config: Any = None, **kwargs: Any) -> nn.Module:
    """Load an mlx-lm directory or an MLX ``.npz`` / ``.safetensors`` file: the MLX backend's reader
    (:func:`quantization_wrapper.adapters.mlx.checkpoint.load_mlx_checkpoint`, which documents it)."""
    return _reader("mlx")(path, model_config, **kwargs)


def load_hqq_checkpoint(path: str | os.PathLike, model_config: Any = None, **kwargs: Any) -> nn.Module:
    """Load hqq's own serialization: the hqq backend's reader
    (:func:`quantization_wrapper.adapters.hqq.load_hqq_checkpoint`, which documents it)."""
    return _reader("hqq")(path, model_config, **kwargs)


# ------------------------------------------------------------------------------- shared steps
def native_skeleton(where: Path, config: dict[str, Any] | None, model_config: Any) -> nn.Module:
    """The architecture with parameters on meta, from ``model_config`` or the checkpoint's config."""
    return checkpoint_skeleton(where, config, model_config, missing="the checkpoint holds no model config; pass "
                               "model_config (the config.json dict, a transformers config, a callable that builds "
                               "the model, or an nn.Module on meta)")


def restore_layers(where: Path, model: nn.Module, adapter: Any, config: QuantizationConfig,
                   linears: dict[str, nn.Linear], layers: dict[str, dict[str, Any]],
                   states: dict[str, dict[str, torch.Tensor]], kind: str) -> list[LayerDecision]:
    """Install an adapter layer filled from ``states`` for every quantized linear; the plan's decisions."""
    decisions = []
    for name, linear in linears.items():
        if name not in layers:
            decisions.append(LayerDecision(name, linear, None, f"not quantized in the {kind} checkpoint"))
            continue
        dtype = layers[name]["compute_dtype"]
        try:
            empty = adapter.create_quantized_linear(linear.in_features, linear.out_features, linear.bias is not None,
                                                    config=config.for_layer(name), device="meta", dtype=dtype)
            filled = adapter.load_layer_state(empty, states.pop(name))
        except ValueError as e:
            raise CheckpointError(f"{where}: layer {name!r} could not be restored: {e}") from e
        model.set_submodule(name, filled)
        decisions.append(LayerDecision(name, nn.Linear(linear.in_features, linear.out_features,
                                                       linear.bias is not None, device="meta", dtype=dtype),
                                       config.for_layer(name), None))
    return decisions


def config_summary(method_of: Callable[[dict[str, Any]], QuantizationMethod],
                   layers: dict[str, dict[str, Any]], skip: list[str],
                   backend_options: Callable[[dict[str, Any]], dict[str, Any]]) -> QuantizationConfig:
    """One :class:`QuantizationConfig` describing ``layers`` (``name -> settings``) exactly: the most
    common settings are the config's own, every other layer gets an exact-name ``layer_configs``
    entry with the fields that differ, and ``skip`` (unquantized linear layers) is ``skip_modules``."""
    def key(s: dict[str, Any]) -> tuple:
        return tuple(sorted((k, str(v)) for k, v in s.items()))

    counts = Counter(key(s) for s in layers.values())
    base = next(s for s in layers.values() if key(s) == counts.most_common(1)[0][0])
    overrides = {}
    for name, settings in layers.items():
        diff = {k: v for k, v in settings.items() if v != base[k]}
        if "axis" in diff:
            diff["backend_options"] = backend_options(settings)
            del diff["axis"]
        if diff:
            overrides[name] = diff
    # An exact name also matches as a dotted path ("lm_head" covers "x.lm_head"): pin the layers an
    # override would reach by accident to the base settings.
    for name in layers:
        if name not in overrides and best_match(name, overrides) is not None:
            overrides[name] = {}
    fields = {k: v for k, v in base.items() if k != "axis"}
    config = QuantizationConfig(method=method_of(base), skip_modules=list(skip), layer_configs=overrides,
                                backend_options=backend_options(base), **fields)
    for name, settings in layers.items():
        got = config.for_layer(name)
        got = {"axis": got.backend_options.get("axis", 1), **{k: getattr(got, k) for k in settings if k != "axis"}}
        if any(got[k] != v for k, v in settings.items()):  # pragma: no cover - guarded by construction
            raise AssertionError(f"layer_configs do not reproduce {name}: {got} != {settings}")
    return config


def check_method(where: Path, config: QuantizationConfig, expected_methods: Iterable | None) -> None:
    """Raise unless ``config``'s method is one of ``expected_methods`` (``None``: any)."""
    if expected_methods is None:
        return
    expected = tuple(QuantizationMethod.parse(m) for m in expected_methods)
    if config.method not in expected:
        raise CheckpointError(f"{where} is a {config.method.value!r} checkpoint; this adapter serves "
                              f"{', '.join(m.value for m in expected)} (use the module-level load_quantized_model "
                              f"to load any method)")


def fill_tensors(where: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Assign the non-quantized tensors, tie weights, and make sure nothing is left on meta."""
    current = model.state_dict(keep_vars=True)
    unexpected = sorted(set(tensors) - set(current))
    if unexpected:
        raise CheckpointError(f"{where}: the checkpoint has tensors the architecture does not: "
                              f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for key, value in tensors.items():
        check_loaded_tensor(where, repr(key), value, current[key], dtype=None)
    model.load_state_dict(tensors, strict=False, assign=True)
    if hasattr(model, "tie_weights") and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.tie_weights()
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                 if t.device.type == "meta"]
    computed = [n for n in leftovers if n not in current]  # non-persistent buffers (rotary tables)
    if computed:
        raise CheckpointError(f"{where}: buffers {computed[:10]} are on the meta device and the model's _init_weights "
                              f"does not compute them; native checkpoints do not hold buffers the model computes "
                              f"itself. Pass model_config as a module built with real buffers (accelerate's "
                              f"init_empty_weights(include_buffers=False)), or as a config or callable whose model "
                              f"computes them")
    if leftovers:
        raise CheckpointError(f"{where}: the checkpoint lacks tensors the architecture needs: "
                              f"{leftovers[:10]}{' ...' if len(leftovers) > 10 else ''}")


def finish_model(model: nn.Module, adapter, decisions: list, device: str | torch.device) -> nn.Module:
    """Record the plan and config on the filled model, move it to ``device``, eval mode."""
    record_plan(model, adapter, decisions, warn_if_unchanged=False)  # (catch_warnings is process-wide)
    device = torch.device(device)
    if device.type != "cpu":
        model.to(device)
    return model.eval()


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's ``nn.Linear`` layers by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def submodule(where: Path, model: nn.Module, name: str, what: str) -> nn.Module:
    """``model.get_submodule(name)``, or a ``CheckpointError`` saying that ``what`` names a module the
    architecture does not have."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{where}: {what} names module {name!r}, which the architecture does not have") from None
