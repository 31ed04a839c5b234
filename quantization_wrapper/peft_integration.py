"""peft integration: LoRA on every quantized layer type this package produces.

What peft 0.21 does by itself, per layer type:

* bitsandbytes ``Linear4bit`` / ``Linear8bitLt``: its own LoRA layers, chosen when the model has
  ``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` (set by the adapter's ``mark_model``).
* hqq ``HQQLinear``: its own ``HqqLoraLinear``; but ``target_modules="all-linear"`` misses the
  layers, because ``HQQLinear`` is not an ``nn.Linear``.
* optimum-quanto ``QLinear``: no quanto layer in peft; ``QLinear`` subclasses ``nn.Linear``, so
  peft wraps it in its plain ``lora.Linear``. Training is right, but ``merge_and_unload`` adds the
  LoRA delta to the quantized tensor's storage and silently corrupts the layer (measured: 0.86
  absolute output error on a 64x64 layer).
* :class:`~quantization_wrapper.adapters.mlx.MLXQuantizedLinear`: unknown to peft (not an
  ``nn.Linear``): ``get_peft_model`` raises "Target module ... is not supported".

This module fills the gaps through peft's own extension points:

* :func:`lora_custom_modules` maps quanto's ``QLinear`` and ``MLXQuantizedLinear`` to
  :class:`QuantizedLoraLinear` (peft's ``lora.Linear`` whose merge/unmerge dequantize, add the
  delta and re-quantize with the layer's own settings), for ``LoraConfig._register_custom_module``.
* :func:`prepare_lora_config` registers those modules on a ``LoraConfig`` and widens
  ``target_modules="all-linear"`` to the quantized layers that are not ``nn.Linear`` (HQQ, MLX),
  leaving out the output embedding as peft does.
* :func:`peft_integration` is a context manager within which plain ``peft.get_peft_model`` /
  ``PeftModel.from_pretrained`` / ``add_adapter`` do the same: peft 0.21 has no public hook for
  either (custom LoRA layers are registered per config, ``_register_custom_module``, and the config
  of a saved adapter does not keep them; "all-linear" is resolved by the private
  ``peft.tuners.tuners_utils._maybe_include_all_linear_layers``, which only knows ``nn.Linear`` and
  ``Conv1D``), so the block wraps that private function, which every LoRA injection calls with the
  config and the model, and puts peft's own function back when it exits (also on an exception).
* :func:`install_peft_integration` with ``process_wide=True`` installs the same wrapper for the
  whole process, for code that calls peft where no ``with`` block fits (idempotent; detectable with
  :func:`is_peft_integration_installed`; undone by :func:`uninstall_peft_integration`). A model
  this package quantizes or loads installs it once peft is imported (``mark_model``), because
  users and TRL call plain ``get_peft_model``; the wrapper changes nothing for models without
  our layer types.

Without the block, :func:`prepare_lora_config` (on the config, before ``get_peft_model``) and
:func:`load_lora_adapter` (for a saved adapter) need no patch at all.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .peft_experts import (expert_layer_key, experts_state_dict_to_fused, experts_state_dict_to_unfused,
                           fused_experts_config, iter_unfused_experts, lora_weight_key, translate_target_parameters,
                           unfused_containers)
from .registry import ADAPTER_REGISTRY, adapter_class_for_module, build_adapter, is_quantized_module

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig, PeftModel

__all__ = [
    "QuantizedLoraLinear",
    "adapter_for_module",
    "lora_custom_modules",
    "prepare_lora_config",
    "all_linear_names",
    "peft_integration",
    "install_peft_integration",
    "uninstall_peft_integration",
    "is_peft_integration_installed",
    "load_lora_adapter",
    "write_lora_adapter",
    "load_expert_lora_state",
]

logger = logging.getLogger(__name__)

#: ``init_lora_weights`` values that do not read the base weight (the others -- pissa, olora,
#: corda, loftq, eva, lora_ga -- decompose ``base_layer.weight``, which is packed here).
_SAFE_INITS = (True, False, "gaussian")


# ---------------------------------------------------------------------- which adapter owns a layer
def adapter_for_module(module: nn.Module, backend=None) -> Any:
    """An adapter of the class that produced ``module``, configured to re-create it (same bits,
    group size, dtypes), or ``None`` when ``module`` is not a quantized layer.

    Only the layer types whose adapter can read their settings back (``config_of_layer``) are
    supported: quanto's ``QLinear`` and :class:`~quantization_wrapper.adapters.mlx.MLXQuantizedLinear`
    (the ones :class:`QuantizedLoraLinear` wraps). For a whole model use its ``quantization_config``.
    """
    cls = adapter_class_for_module(module)
    config = cls.config_of_layer(module) if cls is not None else None
    if config is None:
        return None
    return build_adapter(config, backend, device=_module_device(module))


def _module_device(module: nn.Module) -> torch.device | None:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


# ---------------------------------------------------------------------- the LoRA layer
@functools.cache
def _lora_linear_class() -> type:
    """Define :class:`QuantizedLoraLinear` on first use (it subclasses peft's ``lora.Linear``)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class QuantizedLoraLinear(LoraLinear):
        """peft's ``lora.Linear`` over a quantized layer peft has no LoRA layer for (optimum-quanto
        ``QLinear``, :class:`~quantization_wrapper.adapters.mlx.MLXQuantizedLinear`).

        The forward pass is peft's: the base layer's output plus the LoRA path. Merging
        dequantizes the base layer, adds (or, to unmerge, subtracts) the LoRA delta in float32
        and quantizes the result again with the layer's own settings, as peft's HQQ layer does;
        both steps therefore round to the quantization grid. DoRA and initializations that
        decompose the base weight (PiSSA, OLoRA, LoftQ, ...) are refused: the base weight is packed.
        """

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: "LoraConfig", **kwargs: Any):
            if config.init_lora_weights not in _SAFE_INITS:
                raise ValueError(
                    f"init_lora_weights={config.init_lora_weights!r} is not supported on "
                    f"{type(base_layer).__name__}: it decomposes the base weight, which is stored quantized; "
                    f"use init_lora_weights=True or 'gaussian'")
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            # peft's generic lookup works too, but warns "Unsupported layer type" for every layer
            return module.in_features, module.out_features

        @property
        def lora_variants(self):
            return {(): None}

        def resolve_lora_variant(self, *, config: "LoraConfig", **kwargs: Any):
            requested = [f.name for f in dataclasses.fields(config)
                         if f.metadata.get("is_lora_variant") and getattr(config, f.name)]
            if requested:
                raise ValueError(f"{type(self).__name__} supports plain LoRA only; {requested} need the "
                                 f"dense base weight. Remove them from the LoraConfig")
            return None

        def _rebuild(self, adapter_names: list[str], sign: float, safe_merge: bool) -> None:
            base = self.get_base_layer()
            adapter = adapter_for_module(base)
            if adapter is None:
                raise ValueError(f"cannot merge into {type(base).__name__}: no adapter re-creates it")
            dense = adapter.dequantize_module(base)
            weight = dense.weight.detach().to(torch.float32)
            bias = None if dense.bias is None else dense.bias.detach().to(torch.float32)
            for name in adapter_names:
                delta = self.get_delta_weight(name).to(device=weight.device, dtype=torch.float32)
                weight = weight + sign * delta
                if self.lora_bias[name]:
                    if bias is None:
                        raise RuntimeError("cannot merge a LoRA bias: the base layer has no bias")
                    bias = bias + sign * self.lora_B[name].bias.detach().float() * self.scaling[name]
            if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
                raise ValueError(f"NaNs detected in the merged weights of adapter(s) {adapter_names}")
            dtype = dense.weight.dtype
            merged = nn.Linear(base.in_features, base.out_features, bias is not None, device="meta")
            merged.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
            if bias is not None:
                merged.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
            self.base_layer = adapter.quantize_linear(merged, config=adapter.config)

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            adapter_names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
            if not adapter_names:
                return
            self._rebuild(adapter_names, 1.0, safe_merge)
            self.merged_adapters.extend(adapter_names)

        def unmerge(self) -> None:
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
                return
            names = [n for n in reversed(self.merged_adapters) if n in self.lora_A]
            self.merged_adapters.clear()
            if names:
                self._rebuild(names, -1.0, False)

        def __repr__(self) -> str:
            return "lora." + nn.Module.__repr__(self)

    QuantizedLoraLinear.__module__ = __name__
    QuantizedLoraLinear.__qualname__ = "QuantizedLoraLinear"
    return QuantizedLoraLinear


def __getattr__(name: str) -> Any:
    # ``QuantizedLoraLinear`` exists once peft is imported; this keeps importing this module cheap.
    if name == "QuantizedLoraLinear":
        return _lora_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lora_custom_modules(model: nn.Module | None = None) -> dict[type, type]:
    """``{quantized layer class: LoRA layer class}`` for ``LoraConfig._register_custom_module``.

    Args:
        model: when given, only the layer types present in it (an empty dict when none is).
    """
    types = [t for cls in dict.fromkeys(ADAPTER_REGISTRY.values()) for t in cls.lora_layer_types()]
    if model is not None:
        present = {type(m) for m in model.modules()}
        types = [t for t in types if any(issubclass(p, t) for p in present)]
    if not types:
        return {}
    lora_cls = _lora_linear_class()
    return {t: lora_cls for t in types}


# ---------------------------------------------------------------------- target_modules="all-linear"
def all_linear_names(model: nn.Module) -> set[str]:
    """What ``target_modules="all-linear"`` means for a quantized ``model``: peft's own answer (every
    ``nn.Linear`` subclass, bitsandbytes and quanto layers included) plus the quantized layers that
    are not ``nn.Linear`` (HQQ, MLX), without the output embedding and without layers inside
    existing LoRA layers."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    include = _original_include()
    probe = include(LoraConfig(target_modules="all-linear"), model)
    names = set(probe.target_modules)
    excluded: set[str] = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for prefix, module in model.named_modules():
        if output is not None and module is output:
            excluded.add(prefix)
        if isinstance(module, BaseTunerLayer):
            excluded.update(f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix)
    for name, module in model.named_modules():
        if name and not isinstance(module, nn.Linear) and is_quantized_module(module):
            names.add(name)
    return names - excluded


def prepare_lora_config(lora_config: "LoraConfig", model: nn.Module) -> "LoraConfig":
    """Make ``lora_config`` work on quantized ``model`` (in place; returns it).

    * registers :func:`lora_custom_modules` for the layer types present in ``model``;
    * ``target_modules="all-linear"`` becomes the set of names from :func:`all_linear_names`;
    * ``target_parameters`` naming MoE expert parameters (``mlp.experts.gate_up_proj``) that the
      model holds per expert (quantized) become those per-expert layers in ``target_modules``
      (:func:`~quantization_wrapper.peft_experts.translate_target_parameters`): each expert gets its
      own rank-``r`` LoRA, as peft's ``ParamWrapper`` gives it.

    Idempotent; other PEFT configs are returned unchanged.
    """
    from peft import LoraConfig

    if not isinstance(lora_config, LoraConfig):
        return lora_config
    custom = lora_custom_modules(model)
    if custom:
        lora_config._register_custom_module(custom)
    target = lora_config.target_modules
    if isinstance(target, str) and target.lower() == "all-linear":
        names = all_linear_names(model)
        if not names:
            raise ValueError("target_modules='all-linear' found no linear or quantized linear layer in the model")
        lora_config.target_modules = names
    translate_target_parameters(lora_config, model)
    return lora_config


# ---------------------------------------------------------------------- the peft hook
def _original_include():
    import peft.tuners.tuners_utils as tu

    fn = tu._maybe_include_all_linear_layers
    return _saved.get("include", fn) if getattr(fn, "_quantization_wrapper", False) else fn


_lock = threading.RLock()
#: how many ``with peft_integration()`` blocks are open, and whether a process-wide install holds
_holders = {"blocks": 0, "process": False}
_saved: dict[str, Any] = {}  # peft's own function while ours is in place


def is_peft_integration_installed() -> bool:
    """True while peft's LoRA injection goes through :func:`prepare_lora_config` (inside a
    :func:`peft_integration` block, or after ``install_peft_integration(process_wide=True)``)."""
    tu = sys.modules.get("peft.tuners.tuners_utils")
    return tu is not None and getattr(tu._maybe_include_all_linear_layers, "_quantization_wrapper", False)


def _wrap(tu) -> bool:
    """Put the wrapper in place unless it is there; ``False`` when peft's internals changed."""
    if is_peft_integration_installed():
        return True
    original = getattr(tu, "_maybe_include_all_linear_layers", None)
    if original is None:
        warnings.warn("this peft version has no _maybe_include_all_linear_layers; call "
                      "quantization_wrapper.prepare_lora_config(lora_config, model) before get_peft_model",
                      RuntimeWarning, stacklevel=3)
        return False

    @functools.wraps(original)
    def include_quantized_layers(peft_config, model):
        prepare_lora_config(peft_config, model)
        return original(peft_config, model)

    include_quantized_layers._quantization_wrapper = True
    # peft's transformers-5 config conversion (MoE targets) resolves "all-linear" through its own
    # reference to the function, taken when that module is first imported (so import it while
    # peft's own is in place): point it here too, or the quantized layers that are not nn.Linear
    # would be dropped depending on import order
    conversion = _conversion_module()
    _saved["include"] = original
    tu._maybe_include_all_linear_layers = include_quantized_layers
    if conversion is not None and getattr(conversion, "_maybe_include_all_linear_layers", None) is not None:
        theirs = conversion._maybe_include_all_linear_layers
        _saved["include_conversion"] = original if getattr(theirs, "_quantization_wrapper", False) else theirs
        conversion._maybe_include_all_linear_layers = include_quantized_layers
    _wrap_state_loader()
    return True


def _conversion_module() -> Any:
    """peft's ``transformers_weight_conversion`` module (transformers 5 only), or None."""
    try:
        import peft.utils.transformers_weight_conversion as conversion
    except Exception:  # noqa: BLE001 - absent on transformers 4 or older peft
        return None
    return conversion


def _wrap_state_loader() -> None:
    """Route ``PeftModel.load_adapter``'s ``set_peft_model_state_dict`` through
    :func:`load_expert_lora_state` for models whose experts are held per expert (peft would rename
    their per-expert keys as transformers 4 keys, and cannot read the fused layout onto them)."""
    import peft.peft_model as pm

    original = getattr(pm, "set_peft_model_state_dict", None)
    if original is None or getattr(original, "_quantization_wrapper", False):
        return

    @functools.wraps(original)
    def load_with_experts(model, peft_model_state_dict, adapter_name="default", **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not any(True for _ in iter_unfused_experts(base)):
            return original(model, peft_model_state_dict, adapter_name=adapter_name, **kwargs)
        return load_expert_lora_state(model, peft_model_state_dict, adapter_name, loader=original, **kwargs)

    load_with_experts._quantization_wrapper = True
    _saved["load"] = original
    pm.set_peft_model_state_dict = load_with_experts


def _release() -> None:
    """Give peft its own function back once no block and no process-wide install holds ours."""
    if _holders["blocks"] or _holders["process"] or "include" not in _saved:
        return
    import peft.tuners.tuners_utils as tu

    original = _saved.pop("include")
    if "include_conversion" in _saved:
        conversion = _conversion_module()
        own = _saved.pop("include_conversion")
        if conversion is not None and getattr(conversion._maybe_include_all_linear_layers, "_quantization_wrapper", False):
            conversion._maybe_include_all_linear_layers = own
    if "load" in _saved:
        import peft.peft_model as pm

        loader = _saved.pop("load")
        if getattr(pm.set_peft_model_state_dict, "_quantization_wrapper", False):
            pm.set_peft_model_state_dict = loader
    if getattr(tu._maybe_include_all_linear_layers, "_quantization_wrapper", False):
        tu._maybe_include_all_linear_layers = original
    else:  # someone replaced ours in the meantime: theirs stays, and may still call ours
        warnings.warn("peft's _maybe_include_all_linear_layers was replaced while quantization_wrapper's "
                      "wrapper was installed; leaving the replacement in place", RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def peft_integration():
    """Within the block, plain peft (``get_peft_model``, ``PeftModel.from_pretrained``,
    ``add_adapter``, ``inject_adapter_in_model``) prepares every ``LoraConfig`` with
    :func:`prepare_lora_config`: the LoRA layers of quanto and MLX layers are registered and
    ``target_modules="all-linear"`` reaches HQQ and MLX layers.

    peft is restored when the block exits, also on an exception; blocks nest, and a block inside
    ``install_peft_integration(process_wide=True)`` leaves that install in place. Example::

        with peft_integration():
            peft_model = get_peft_model(model, LoraConfig(target_modules="all-linear"))

    Yields:
        ``True`` when the wrapper is active, ``False`` when peft's internals changed (a
        ``RuntimeWarning`` says so; use :func:`prepare_lora_config` instead).
    """
    import peft.tuners.tuners_utils as tu

    with _lock:
        active = _wrap(tu)
        _holders["blocks"] += active
    try:
        yield active
    finally:
        with _lock:
            _holders["blocks"] -= active
            _release()


def install_peft_integration(*, process_wide: bool = False) -> bool:
    """Route every LoRA injection of peft through :func:`prepare_lora_config` for the whole process.

    Prefer :func:`peft_integration` (a ``with`` block) or :func:`prepare_lora_config`: this replaces
    a private peft function until :func:`uninstall_peft_integration`. Without
    ``process_wide=True`` nothing is changed. ``mark_model`` (every model this package quantizes
    or loads, once peft is imported) installs it, so that plain ``get_peft_model`` works.

    Args:
        process_wide: install the wrapper (idempotent; :func:`is_peft_integration_installed`
            reports it).

    Returns:
        Whether the wrapper is installed now; ``False`` also when peft is not installed or its
        internals changed (a warning says so).
    """
    if not process_wide:
        return is_peft_integration_installed()
    try:
        import peft.tuners.tuners_utils as tu
    except ImportError:
        return False
    with _lock:
        if not _wrap(tu):
            return False
        if not _holders["process"]:
            _holders["process"] = True
            logger.info("peft's _maybe_include_all_linear_layers is wrapped for the whole process "
                        "(quantization_wrapper.install_peft_integration)")
    return True


def uninstall_peft_integration() -> None:
    """Undo ``install_peft_integration(process_wide=True)``; open :func:`peft_integration` blocks
    keep the wrapper until they exit."""
    with _lock:
        _holders["process"] = False
        _release()


def load_lora_adapter(model: nn.Module, path: str, *, adapter_name: str = "default", is_trainable: bool = False,
                      **kwargs: Any) -> "PeftModel":
    """``PeftModel.from_pretrained`` for a quantized base, with the custom LoRA layers registered on
    the loaded config (needed for MLX and quanto layers; works whether or not
    :func:`peft_integration` is active).

    An adapter trained by peft on transformers' float MoE model with ``target_parameters``
    (``mlp.experts.gate_up_proj``: peft's ``ParamWrapper`` layout) loads onto a model whose experts
    this package quantized per expert: each expert's rank-``r`` slice becomes its layer's LoRA,
    exactly (see :mod:`~quantization_wrapper.peft_experts`); ``save_lora_adapter``
    (:func:`write_lora_adapter`) writes that layout back.

    Args:
        model: the quantized base model (e.g. from ``load_quantized_model``).
        path: the directory written by ``PeftModel.save_pretrained`` (or ``save_lora_adapter``).
        adapter_name, is_trainable, **kwargs: passed to ``PeftModel.from_pretrained``.
    """
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(path)
    config.inference_mode = not is_trainable
    prepare_lora_config(config, model)
    with peft_integration():  # peft's loader reads per-expert and fused expert adapters onto per-expert layers
        return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable,
                                         config=config, **kwargs)


def load_expert_lora_state(peft_model: "PeftModel", state: dict[str, torch.Tensor], adapter_name: str = "default",
                           *, loader: Any = None, **kwargs: Any) -> Any:
    """``set_peft_model_state_dict`` for a model whose MoE experts are held per expert: an adapter
    state (peft's saved keys) in peft's fused ``ParamWrapper`` layout is rearranged per expert
    (:func:`~quantization_wrapper.peft_experts.experts_state_dict_to_unfused`), the per-expert LoRA
    weights are copied in directly, everything else goes through peft's loader (``loader``; default
    ``peft.utils.set_peft_model_state_dict``, with ``kwargs``). Returns the loader's
    ``(missing_keys, unexpected_keys)``, the expert weights included."""
    if loader is None:
        from peft.utils import set_peft_model_state_dict as loader

    base = peft_model.get_base_model()
    containers = unfused_containers(base)
    state = experts_state_dict_to_unfused(state, base)
    experts, rest = {}, {}
    for key, value in state.items():
        lora = lora_weight_key(key)
        if lora and expert_layer_key(containers, lora[0].removeprefix("base_model.model.")):
            experts[f"{lora[0]}.{lora[1]}.{adapter_name}.weight"] = value
        else:
            rest[key] = value
    result = loader(peft_model, rest, adapter_name=adapter_name, **kwargs)
    own = dict(peft_model.named_parameters())
    unexpected = list(result.unexpected_keys) + [k for k in experts if k not in own]
    missing = [k for k in result.missing_keys if k not in experts]
    with torch.no_grad():
        for key, value in experts.items():
            target = own.get(key)
            if target is None:
                continue
            if target.shape != value.shape:
                raise ValueError(f"{key}: the adapter holds {tuple(value.shape)}, the model's LoRA layer "
                                 f"{tuple(target.shape)} (another rank or another model?)")
            target.copy_(value.to(target.dtype))
    return type(result)(missing, unexpected) if isinstance(result, tuple) else result


def write_lora_adapter(peft_model: "PeftModel", path: str | os.PathLike,
                       adapters: dict[str, dict[str, torch.Tensor]] | None = None, *,
                       experts_layout: str = "fused", overwrite: bool = False) -> Path:
    """Write the LoRA adapters of ``peft_model`` as ``save_pretrained`` does (``adapter_config.json``
    + ``adapter_model.safetensors``; adapters other than ``default`` in a folder of their name),
    readable by plain peft for every MoE layout. Public as ``save_lora_adapter``, which gathers
    the weights under FSDP first.

    ``PeftModel.save_pretrained`` on a model whose MoE experts this package quantized writes one
    LoRA per expert layer (``mlp.experts.3.gate_up_proj``), which transformers' float model, whose
    experts are fused 3-D parameters, does not have. With ``experts_layout="fused"`` (the default)
    those layers are written as peft's ``target_parameters`` adapter of the fused parameters
    (``ParamWrapper`` keys, the same numbers rearranged), so that
    ``PeftModel.from_pretrained(float_model, path)`` applies exactly the update trained here;
    :func:`load_lora_adapter` reads both layouts back onto the quantized model. Models without
    unfused experts are written as ``save_pretrained`` writes them.

    Args:
        peft_model: the ``PeftModel`` (LoRA) over a quantized model.
        path: the adapter directory (created).
        adapters: ``{adapter name: state dict with peft's saved keys}``; default: every adapter's
            ``get_peft_model_state_dict``.
        experts_layout: ``"fused"`` (peft's ``target_parameters``) or ``"per_expert"``.
        overwrite: replace an adapter already in the folder; without it an existing
            ``adapter_config.json`` or ``adapter_model.safetensors`` is an error (nothing is
            written). Other files there are never touched.
    """
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
    from safetensors.torch import save_file

    if experts_layout not in ("fused", "per_expert"):
        raise ValueError(f"experts_layout={experts_layout!r}; allowed: 'fused' (peft's target_parameters layout, "
                         "read by PeftModel.from_pretrained on transformers' float model) or 'per_expert'")
    if adapters is None:
        adapters = {name: get_peft_model_state_dict(peft_model, adapter_name=name) for name in peft_model.peft_config}
    path = Path(path)
    base = peft_model.get_base_model()
    fused = experts_layout == "fused" and any(True for _ in iter_unfused_experts(base))
    writes = []
    for name, tensors in adapters.items():
        if not tensors:
            raise ValueError(f"no parameters of adapter {name!r} to save")
        folder = path if name == "default" else path / name
        existing = [f for f in ("adapter_config.json", SAFETENSORS_WEIGHTS_NAME) if (folder / f).exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{folder} already holds an adapter ({existing}); pass overwrite=True to replace "
                                  "it (other files there are kept)")
        config = copy.deepcopy(peft_model.peft_config[name])
        if fused:
            tensors = experts_state_dict_to_fused(tensors, base)
            config = fused_experts_config(config, base)
        config.inference_mode = True
        writes.append((folder, tensors, config))
    for folder, tensors, config in writes:  # every adapter converted and checked before the first write
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{SAFETENSORS_WEIGHTS_NAME}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        config.save_pretrained(str(folder))
        os.replace(tmp, folder / SAFETENSORS_WEIGHTS_NAME)  # peft reads it before any adapter_model.bin
    return path
