"""transformers integration: our config and quantizer registered with ``from_pretrained``.

After ``import quantization_wrapper`` (with transformers installed)::

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=QuantizationConfig(method="hqq", bits=4))

quantizes on the fly through our adapters (every method, ``layer_configs`` and ``skip_modules``
included), each linear layer as soon as its weight and bias have been read, as transformers'
own on-the-fly quantizers do. Every model this package produces (``quantize_model``,
``load_quantized_model``, ``load_and_quantize``, ``from_pretrained``) carries an ``hf_quantizer``
that says truthfully what transformers' ``Trainer`` and TRL ask: trainable with adapters (LoRA),
not serializable through ``save_pretrained`` (``save_quantized_model`` writes the checkpoint;
``PeftModel.save_pretrained`` / ``Trainer.save_model`` save the adapter as usual).

transformers is imported only when it is already imported or asked for: the classes are built by
:func:`hf_classes` on first use.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import warnings
from typing import Any

from torch import nn

from .config import QuantizationConfig

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
        """What transformers reads from ``config.json``: our :class:`QuantizationConfig` as a dict."""

        def __init__(self, **kwargs: Any):
            self.quant_method = HF_QUANT_METHOD
            self.config = QuantizationConfig.from_dict({k: v for k, v in kwargs.items() if k != "quant_method"})

        @classmethod
        def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
            data = {k: v for k, v in config_dict.items() if k not in ("quant_method", "plan")}
            config = QuantizationConfig.from_dict(data)  # our config itself: one object everywhere
            return (config, kwargs) if return_unused_kwargs else config

        def to_dict(self) -> dict[str, Any]:
            return self.config.to_dict()

    class QuantizationWrapperHfQuantizer(HfQuantizer):
        """Quantizes ``from_pretrained`` models through quantization-wrapper's adapters."""

        requires_calibration = False

        def __init__(self, quantization_config: Any, **kwargs: Any):
            if not isinstance(quantization_config, QuantizationConfig):
                quantization_config = QuantizationConfig.from_dict(
                    {k: v for k, v in quantization_config.to_dict().items() if k not in ("quant_method", "plan")})
            super().__init__(quantization_config, **kwargs)
            self._adapter = None
            self._decisions: dict[str, Any] = {}
            self._loaded: dict[str, set[str]] = {}
            self._converted: set[str] = set()

        # -- environment
        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            if self.pre_quantized:
                raise ValueError(
                    "this checkpoint's config.json says it was quantized by quantization-wrapper, but transformers "
                    "cannot load our quantized checkpoints yet: load it with quantization_wrapper."
                    "load_quantized_model(path) (checkpoints written by save_quantized_model)")
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

            refuse_quantized_model(model, self.quantization_config.method)
            self._decisions = {d.name: d for d in plan_linear_layers(model, self.adapter)}
            self._loaded = {name: set() for name, d in self._decisions.items() if d.config is not None}
            self._converted = set()
            return model

        def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
            module, _, attr = param_name.rpartition(".")
            return attr in ("weight", "bias") and module in self._loaded

        def get_quantize_ops(self) -> Any:
            return _quantize_op_class()(self)

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
            # transformers initializes what is not marked loaded: a quantized layer is loaded
            for sub in module.modules():
                sub._is_hf_initialized = True
                for t in list(sub._parameters.values()) + list(sub._buffers.values()):
                    if t is not None:
                        t._is_hf_initialized = True
            model.set_submodule(name, module)
            self._converted.add(name)
            # The plan's "bytes before" is the layer as loaded; keep only its shape and dtype.
            self._decisions[name] = LayerDecision(
                name, nn.Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                                dtype=linear.weight.dtype), decision.config, decision.reason)

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            from .surgery import record_plan

            absent = sorted(set(self._loaded) - self._converted)
            if absent:
                raise ValueError(f"the checkpoint lacks the weights of layers {absent[:5]}"
                                 f"{' ...' if len(absent) > 5 else ''}; they could not be quantized")
            record_plan(model, self.adapter, list(self._decisions.values()))
            self._decisions, self._loaded = {}, {}
            model.hf_quantizer = self
            return model

        # -- what Trainer / TRL / save_pretrained ask
        @property
        def is_trainable(self) -> bool:
            """LoRA trains on every method's layers (peft wraps them; see ``prepare_model_for_training``)."""
            return True

        @property
        def is_qat_trainable(self) -> bool:
            return False

        def is_serializable(self, safe_serialization: bool = True) -> bool:
            # transformers asks this right before it refuses save_pretrained ("check out the warnings")
            warnings.warn("quantization-wrapper models are saved with quantization_wrapper.save_quantized_model"
                          "(model, path) (reloaded with load_quantized_model); save_pretrained cannot write them. "
                          "A LoRA adapter on top saves as usual (PeftModel.save_pretrained, Trainer.save_model)",
                          stacklevel=2)
            return False

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


def register_with_transformers() -> bool:
    """Register our config and quantizer with transformers (idempotent). Returns whether it did.

    Called by ``import quantization_wrapper`` when transformers is importable; registration only
    adds our name to transformers' two mappings.
    """
    try:
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    except ImportError:
        return False
    if _REGISTERED:
        return True
    config_cls, quantizer_cls = hf_classes()
    with _REGISTER_LOCK:
        _REGISTERED.append(True)
        AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(HF_QUANT_METHOD, config_cls)
        AUTO_QUANTIZER_MAPPING.setdefault(HF_QUANT_METHOD, quantizer_cls)
    return True


def attach_hf_quantizer(model: nn.Module, config: QuantizationConfig) -> None:
    """Give a model quantized outside ``from_pretrained`` the ``hf_quantizer`` transformers reads
    next to ``is_quantized`` (Trainer refuses a quantized model without one). Only where
    transformers is already imported: a model of another library needs none."""
    if "transformers" not in sys.modules or getattr(model, "hf_quantizer", None) is not None:
        return
    _, quantizer_cls = hf_classes()
    model.hf_quantizer = quantizer_cls(config, pre_quantized=True)
