"""transformers integration: our config and quantizer registered with ``from_pretrained``.

After ``import quantization_wrapper`` (with transformers installed)::

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=QuantizationConfig(method="hqq", bits=4))

quantizes on the fly through our adapters (every method, ``layer_configs`` and ``skip_modules``
included), each linear layer as soon as its weight and bias have been read, as transformers'
own on-the-fly quantizers do. Every model this package produces (``quantize_model``,
``load_quantized_model``, ``load_and_quantize``, ``from_pretrained``) carries an ``hf_quantizer``
that says truthfully what transformers' ``Trainer`` and TRL ask: trainable with adapters (LoRA),
and serializable: ``model.save_pretrained(dir)`` writes each quantized layer's tensors (as
``save_quantized_model`` names them) and a ``config.json`` whose ``quantization_config`` holds our
config and the per-layer plan; ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds every layer
from them (``restore_linear``, the checks of ``load_quantized_model``) without quantizing again.

The reload routes each planned layer's tensors through one transformers ``WeightConverter``
(sources: the layer's saved keys, matched exactly; target: ``<layer>.weight`` of the skeleton's
``nn.Linear``), whose op installs the rebuilt layer. A checkpoint that does not match the plan
raises :class:`~quantization_wrapper.errors.CheckpointError` naming the layer and the tensor.
Loading needs ``quant_method "quantization_wrapper"`` registered: ``import quantization_wrapper``
registers it at once when transformers is imported already, and otherwise the moment transformers
imports its quantizer registry (:func:`register_when_transformers_loads`), so the import order
does not matter and transformers is never imported by us.

transformers is imported only when it is already imported or asked for: the classes are built by
:func:`hf_classes` on first use.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint.names import model_key_renamer
from .experts import experts_unfused, iter_fused_experts, unfuse_experts, unfuse_experts_for
from .config import QuantizationConfig
from .errors import CheckpointError

__all__ = ["HF_QUANT_METHOD", "hf_classes", "register_with_transformers", "attach_hf_quantizer"]

logger = logging.getLogger(__name__)

#: ``quant_method`` under which transformers finds us (``config.json``'s ``quantization_config``).
HF_QUANT_METHOD = "quantization_wrapper"
_REGISTER_LOCK = threading.Lock()
_REGISTERED: list[bool] = []


@functools.cache
def hf_classes() -> tuple[type, type]:
    """``(config_class, quantizer_class)``: transformers subclasses, built once."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class QuantizationWrapperHfConfig(QuantizationConfigMixin):
        """``config.json``'s ``quantization_config`` of a checkpoint ``save_pretrained`` wrote: our
        :class:`QuantizationConfig` and the per-layer plan (``QuantizationPlan.to_dict()``)."""

        def __init__(self, plan: dict[str, Any] | None = None, **kwargs: Any):
            self.quant_method = HF_QUANT_METHOD
            self.config = QuantizationConfig.from_dict({k: v for k, v in kwargs.items() if k != "quant_method"})
            self.plan = plan

        @classmethod
        def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
            data = {k: v for k, v in config_dict.items() if k != "quant_method"}
            # With a plan: a saved checkpoint, the plan travels to the quantizer. Without: our
            # config itself, one object everywhere.
            config = cls(**data) if "plan" in data else QuantizationConfig.from_dict(data)
            return (config, kwargs) if return_unused_kwargs else config

        def to_dict(self) -> dict[str, Any]:
            return {**self.config.to_dict(), **({"plan": self.plan} if self.plan is not None else {})}

    class QuantizationWrapperHfQuantizer(HfQuantizer):
        """Quantizes ``from_pretrained`` models through quantization-wrapper's adapters."""

        requires_calibration = False

        def __init__(self, quantization_config: Any, **kwargs: Any):
            self._saved_plan = getattr(quantization_config, "plan", None)
            if not isinstance(quantization_config, QuantizationConfig):
                quantization_config = QuantizationConfig.from_dict(
                    {k: v for k, v in quantization_config.to_dict().items() if k not in ("quant_method", "plan")})
            super().__init__(quantization_config, **kwargs)
            self._adapter = None
            self._decisions: dict[str, Any] = {}
            self._expert_decisions: list = []
            self._loaded: dict[str, set[str]] = {}
            self._converted: set[str] = set()
            self._restore: _Restore | None = None

        # -- environment
        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            if self.pre_quantized and self._saved_plan is None:
                raise ValueError(
                    "this checkpoint's config.json names quantization-wrapper but its quantization_config has no "
                    "per-layer 'plan' (model.save_pretrained writes one); load checkpoints written by "
                    "save_quantized_model with quantization_wrapper.load_quantized_model(path)")
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and {str(v) for v in device_map.values()} & {"disk"}:
                raise ValueError("quantization-wrapper quantizes layers as they load; device_map entries on 'disk' "
                                 "are not supported (give a device map without disk offload)")
            self.adapter  # noqa: B018 - builds (and validates) the adapter now, with a clear error

        @property
        def adapter(self) -> Any:
            if self._adapter is None:
                from .factory import create_quantization_adapter

                self._adapter = create_quantization_adapter(None, self.quantization_config)
            return self._adapter

        # -- loading
        def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            from .surgery import plan_linear_layers, refuse_quantized_model

            if self.pre_quantized:
                self._restore = _Restore(self.quantization_config, self._saved_plan, model,
                                         kwargs.get("checkpoint_files"))
                return model
            refuse_quantized_model(model, self.quantization_config.method)
            # MoE experts are planned per expert (as quantize_model does) and quantized once loaded:
            # transformers fills the fused 3-D parameters, which then become per-expert layers
            blocks = [name for name, _ in iter_fused_experts(model) if name]
            with experts_unfused(model):
                decisions = plan_linear_layers(model, self.adapter)
            in_block = lambda n: any(n.startswith(f"{b}.") for b in blocks)  # noqa: E731
            self._decisions = {d.name: d for d in decisions if not in_block(d.name)}
            self._expert_decisions = [d for d in decisions if in_block(d.name)]
            self._loaded = {name: set() for name, d in self._decisions.items() if d.config is not None}
            self._converted = set()
            return model

        def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
            module, _, attr = param_name.rpartition(".")
            return attr in ("weight", "bias") and module in self._loaded

        def get_quantize_ops(self) -> Any:
            return _quantize_op_class()(self)

        def update_weight_conversions(self, weight_conversions: list, model: nn.Module) -> list:
            # Ours first: they match exact keys, which no model converter may take before them.
            ours = self._restore.converters(self) if self._restore is not None else []
            return ours + super().update_weight_conversions(weight_conversions, model)

        def _quantize_arrived(self, model: nn.Module, name: str, attr: str, value: Any,
                              missing_keys: Any) -> None:
            """Put ``value`` in the still-float layer; convert the layer once it is complete."""
            from .surgery import LayerDecision, convert_layer

            decision = self._decisions[name]
            linear = decision.linear
            if value.device.type != "cpu" and self.adapter.backend.value == "cpu":
                value = value.cpu()
            setattr(linear, attr, nn.Parameter(value, requires_grad=value.is_floating_point()))
            self._loaded[name].add(attr)
            if missing_keys is not None:
                missing_keys.discard(f"{name}.{attr}")
            needed = {"weight"} | ({"bias"} if linear.bias is not None else set())
            if not needed <= self._loaded[name]:
                return
            module = convert_layer(self.adapter, decision)
            _mark_loaded(module)
            model.set_submodule(name, module)
            self._converted.add(name)
            # The plan's "bytes before" is the layer as loaded; keep only its shape and dtype.
            self._decisions[name] = LayerDecision(
                name, nn.Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                                dtype=linear.weight.dtype), decision.config, decision.reason)

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            from .surgery import record_plan

            if self._restore is not None:
                restore, self._restore = self._restore, None
                restore.finish(model)
                model.hf_quantizer = self
                return model
            for name in sorted(set(self._loaded) - self._converted):
                # A tied output layer has no tensor of its own in the checkpoint: transformers tied
                # it to the input embedding; quantize that copy, as quantize_model does (untied).
                linear = model.get_submodule(name)
                if isinstance(linear, nn.Linear) and linear.weight.device.type != "meta" and \
                        (linear.bias is None or linear.bias.device.type != "meta"):
                    warnings.warn(f"{name}.weight is tied to the input embedding; quantizing {name} unties them: the "
                                  f"embedding stays in full precision beside it and saved checkpoints record "
                                  f"tie_word_embeddings=false. Add {name!r} to skip_modules to keep the tie",
                                  stacklevel=2)
                    for attr in ("weight",) + (("bias",) if linear.bias is not None else ()):
                        self._quantize_arrived(model, name, attr, getattr(linear, attr).detach(), None)
            absent = sorted(set(self._loaded) - self._converted)
            if absent:
                raise ValueError(f"the checkpoint lacks the weights of layers {absent[:5]}"
                                 f"{' ...' if len(absent) > 5 else ''}; they could not be quantized")
            record_plan(model, self.adapter, list(self._decisions.values()) + self._quantize_experts(model))
            self._decisions, self._loaded, self._expert_decisions = {}, {}, []
            model.hf_quantizer = self
            return model

        def _quantize_experts(self, model: nn.Module) -> list:
            """Quantize the loaded fused experts per expert as planned; the decisions, with the loaded
            layers (a block none of whose experts is to be quantized keeps its fused module)."""
            from .surgery import LayerDecision, convert_layer

            planned = [d for d in self._expert_decisions if d.config is not None]
            blocks = {name for name, _ in iter_fused_experts(model) if any(d.name.startswith(f"{name}.") for d in planned)}
            for name in blocks:
                model.set_submodule(name, unfuse_experts(model.get_submodule(name)))
            out = []
            for d in self._expert_decisions:
                if d.config is None:
                    out.append(d)
                    continue
                loaded = LayerDecision(d.name, model.get_submodule(d.name), d.config, d.reason)
                model.set_submodule(d.name, convert_layer(self.adapter, loaded))
                out.append(loaded)
            return out

        # -- what Trainer / TRL / save_pretrained ask
        @property
        def is_trainable(self) -> bool:
            """LoRA trains on every method's layers (peft wraps them; see ``prepare_model_for_training``)."""
            return True

        @property
        def is_qat_trainable(self) -> bool:
            return False

        def is_serializable(self, safe_serialization: bool = True) -> bool:
            return True

        def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, str]]:
            """What ``save_pretrained`` writes: every tensor as ``save_quantized_model`` names it.

            ``save_pretrained`` writes ``config.json`` after asking this, so the model's config gets
            the ``quantization_config`` the reload needs (config and plan); a model whose output
            embedding no longer shares the input embedding's weight (one side quantized) gets
            ``tie_word_embeddings=False``, or the reload would tie them again.
            """
            from .checkpoint.description import BUFFER_PREFIX
            from .checkpoint.interop import untied_embeddings
            from .checkpoint.save import collect_tensors
            from .surgery import get_quantization_plan

            plan = get_quantization_plan(model)
            config = getattr(model, "quantization_config", None)
            if plan is None or not isinstance(config, QuantizationConfig):
                raise ValueError("model has no quantization plan of quantization-wrapper: quantize it (quantize_model, "
                                 "from_pretrained(quantization_config=QuantizationConfig(...))) before save_pretrained")
            tensors, _ = collect_tensors(model, plan, config)  # tied copies: dropped; the reload ties them
            # Non-persistent buffers are never in a transformers checkpoint: the model rebuilds them.
            tensors = {k: v for k, v in tensors.items() if not k.startswith(BUFFER_PREFIX)}
            if untied_embeddings(model):
                for section in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
                    if getattr(section, "tie_word_embeddings", False):
                        section.tie_word_embeddings = False
            config_cls, _ = hf_classes()
            model.config.quantization_config = config_cls(plan=plan.to_dict(), **config.to_dict())
            return tensors, {}

    return QuantizationWrapperHfConfig, QuantizationWrapperHfQuantizer


@functools.cache
def _quantize_op_class() -> type:
    from transformers.core_model_loading import ConversionOps

    class QuantizationWrapperQuantize(ConversionOps):
        """transformers' per-parameter hook: hands each weight/bias to the quantizer."""

        def __init__(self, hf_quantizer: Any):
            self.hf_quantizer = hf_quantizer

        def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None,
                    full_layer_name: str | None = None, missing_keys: Any = None, **kwargs: Any) -> dict:
            for key, value in input_dict.items():
                value = value[0] if isinstance(value, list) else value
                name, _, attr = key.rpartition(".")
                self.hf_quantizer._quantize_arrived(model, name, attr, value, missing_keys)
            return {}

    return QuantizationWrapperQuantize


def _exact(key: str) -> str:
    """A transformers source pattern matching ``key`` and nothing else: transformers searches
    (``re.search``) and stops a pattern at a name boundary only, so without the anchors
    ``layers.1.q_proj.weight`` would also take ``model.layers.1.q_proj.weight.absmax``."""
    return f"^{re.escape(key)}$"


class _Restore:
    """One pre-quantized load: the saved plan, the checkpoint's keys of each planned layer, and
    the layers rebuilt so far."""

    def __init__(self, config: QuantizationConfig, plan: dict[str, Any], model: nn.Module, checkpoint_files: Any):
        from .surgery import QuantizationPlan

        self.config = config
        try:
            self.plan = QuantizationPlan.from_dict(plan)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"config.json's quantization_config 'plan' is damaged ({type(e).__name__}: {e}); "
                                  f"save the model again with save_pretrained") from e
        files = [str(f) for f in checkpoint_files or ()]
        self.where = str(Path(files[0]).parent) if files else "the checkpoint"
        if not files or not all(f.endswith(".safetensors") for f in files):
            raise CheckpointError(f"{self.where}: a quantization-wrapper checkpoint is read from .safetensors files, "
                                  f"got {files[:3]}")
        from safetensors import safe_open

        self.layers = {layer.name: layer for layer in self.plan.converted}
        unfuse_experts_for(model, list(self.layers))  # MoE blocks saved per expert
        to_model = model_key_renamer(model)  # save_pretrained wrote the model's on-disk names
        self.by_layer: dict[str, list[str]] = {}
        for f in files:
            with safe_open(f, framework="pt") as handle:
                for key in map(to_model, handle.keys()):
                    owner = key.rpartition(".")[0]
                    while owner and owner not in self.layers:  # the innermost planned layer holding it
                        owner = owner.rpartition(".")[0]
                    if owner:
                        self.by_layer.setdefault(owner, []).append(key)
        self.keys: dict[str, tuple[str, str]] = {}  # source pattern -> (layer, key in the layer)
        for name, layer in self.layers.items():
            try:
                current = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"{self.where}: the plan's layer {name!r} does not exist in the model "
                                      f"architecture") from None
            shape = (getattr(current, "in_features", None), getattr(current, "out_features", None))
            if shape != (layer.in_features, layer.out_features):
                raise CheckpointError(f"{self.where}: layer {name!r} is {shape[1]}x{shape[0]} in the architecture "
                                      f"but {layer.out_features}x{layer.in_features} in the checkpoint")
            if name not in self.by_layer:
                raise CheckpointError(f"{self.where}: the checkpoint has no tensors of the planned layer {name!r}")
            self.keys.update({_exact(k): (name, k[len(name) + 1:]) for k in self.by_layer[name]})
        self.pending = set(self.layers)
        self.errors: list[str] = []
        self.adapters: dict = {}

    def converters(self, hf_quantizer: Any) -> list:
        from transformers.core_model_loading import WeightConverter

        op = _deserialize_op_class()(hf_quantizer)
        return [WeightConverter([_exact(k) for k in keys], f"{name}.weight", [op])
                for name, keys in self.by_layer.items()]

    def restore(self, model: nn.Module, name: str, tensors: dict[str, Any], missing_keys: Any) -> None:
        """Rebuild layer ``name`` from its checkpoint tensors and install it. A failure is kept for
        :meth:`finish` (transformers would only log it and raise a generic error)."""
        from .checkpoint.description import layer_adapter, layer_config

        layer = self.layers[name]
        for attr in ("weight", "bias"):  # the skeleton's keys: the rebuilt layer replaces them
            if missing_keys is not None:
                missing_keys.discard(f"{name}.{attr}")
        state = {self.keys[p][1]: (v[0] if isinstance(v, list) else v) for p, v in tensors.items()}
        current = model.get_submodule(name)
        try:
            adapter = layer_adapter(self.config, layer.method, None, self.adapters)
            module = adapter.restore_linear(layer.in_features, layer.out_features, layer.bias, state,
                                            config=layer_config(self.config, layer.__dict__),
                                            dtype=current.weight.dtype)
        except CheckpointError as e:
            self.errors.append(f"{self.where}: layer {name!r}: {e}")
            return
        except Exception as e:
            self.errors.append(f"{self.where}: layer {name!r} could not be restored from {sorted(state)}: "
                               f"{type(e).__name__}: {e}")
            return
        _mark_loaded(module)
        model.set_submodule(name, module)
        self.pending.discard(name)

    def finish(self, model: nn.Module) -> None:
        """Raise what went wrong; else record the plan and config and set the flags peft reads."""
        from .checkpoint.description import layer_adapter

        if self.errors:
            more = f" (and {len(self.errors) - 1} more layers)" if len(self.errors) > 1 else ""
            raise CheckpointError(self.errors[0] + more)
        if self.pending:
            absent = sorted(self.pending)
            more = " ..." if len(absent) > 5 else ""
            raise CheckpointError(f"{self.where}: the tensors of layers {absent[:5]}{more} were not loaded")
        # Our converters only load: saving reverts the model's own conversions, not these.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [c for c in conversions
                                         if not any(isinstance(op, _deserialize_op_class()) for op in
                                                    getattr(c, "operations", ()))]
        model.quantization_plan = self.plan
        model.quantization_config = self.config
        for method in sorted({l.method for l in self.plan.converted} - {self.config.method.value}):
            layer_adapter(self.config, method, None, self.adapters).mark_model(model)
        layer_adapter(self.config, self.config.method.value, None, self.adapters).mark_model(model)


def _mark_loaded(module: nn.Module) -> None:
    """transformers initializes what is not marked loaded: a quantized layer is loaded."""
    for sub in module.modules():
        sub._is_hf_initialized = True
        for t in list(sub._parameters.values()) + list(sub._buffers.values()):
            if t is not None:
                t._is_hf_initialized = True


@functools.cache
def _deserialize_op_class() -> type:
    from transformers.core_model_loading import ConversionOps

    class QuantizationWrapperDeserialize(ConversionOps):
        """transformers' per-layer hook of a pre-quantized load: rebuilds the layer from its tensors."""

        def __init__(self, hf_quantizer: Any):
            self.hf_quantizer = hf_quantizer  # also tells transformers not to cast the tensors

        def __deepcopy__(self, memo: dict) -> "QuantizationWrapperDeserialize":
            return self  # transformers copies the converter per layer; the quantizer is shared

        def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None,
                    full_layer_name: str | None = None, missing_keys: Any = None, **kwargs: Any) -> dict:
            self.hf_quantizer._restore.restore(model, full_layer_name.removesuffix(".weight"), input_dict,
                                               missing_keys)
            return {}

    return QuantizationWrapperDeserialize


def register_with_transformers() -> bool:
    """Register our config and quantizer with transformers (idempotent). Returns whether it did.

    Called when transformers' quantizer registry is imported (see
    :func:`register_when_transformers_loads`) and when transformers reads
    ``QuantizationConfig.quant_method``; it only adds our name to transformers' two mappings.
    """
    try:
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    except ImportError:
        return False
    config_cls, quantizer_cls = hf_classes()
    with _REGISTER_LOCK:  # nobody is told "registered" before both mappings hold us
        if not _REGISTERED:
            AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(HF_QUANT_METHOD, config_cls)
            AUTO_QUANTIZER_MAPPING.setdefault(HF_QUANT_METHOD, quantizer_cls)
            _REGISTERED.append(True)
    return True


class _RegisterAfterImport:
    """A ``sys.meta_path`` finder that lets Python import ``transformers.quantizers.auto`` as usual,
    then registers us in it. It removes itself once it has fired; it finds nothing else."""

    target = "transformers.quantizers.auto"

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.target:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module  # a loader made for this spec alone: wrap its exec_module

        def exec_module(module: Any) -> None:
            run(module)
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)
            register_with_transformers()

        spec.loader.exec_module = exec_module
        return spec


_HOOK = _RegisterAfterImport()


def register_when_transformers_loads() -> None:
    """Register with transformers now if its quantizer registry is imported, else as soon as it is."""
    if "transformers.quantizers.auto" in sys.modules:
        register_with_transformers()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def attach_hf_quantizer(model: nn.Module, config: QuantizationConfig) -> None:
    """Give a model quantized outside ``from_pretrained`` the ``hf_quantizer`` transformers reads
    next to ``is_quantized`` (Trainer refuses a quantized model without one). Only where
    transformers is already imported: a model of another library needs none."""
    if "transformers" not in sys.modules or getattr(model, "hf_quantizer", None) is not None:
        return
    _, quantizer_cls = hf_classes()
    model.hf_quantizer = quantizer_cls(config, pre_quantized=True)
