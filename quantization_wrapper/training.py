"""Training glue: make a quantized model ready for LoRA (QLoRA), and merge LoRA back.

:func:`prepare_model_for_training` does for every adapter what peft's
``prepare_model_for_kbit_training`` does for bitsandbytes models, without ever touching the
quantized tensors; :func:`merge_lora` folds trained LoRA weights into dequantized weights and can
quantize the result again with the model's own config.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Any, Iterator

import torch
from torch import nn

from .registry import ADAPTER_REGISTRY, adapter_class_for_module, get_adapter_class, is_quantized_module
from .tensors import FloatLinear, autocast_dtype
from .config import QuantizationConfig
from .surgery import get_quantization_plan

__all__ = ["prepare_model_for_training", "merge_lora", "quantized_layers", "adapter_class_for_module"]

logger = logging.getLogger(__name__)
_HALF = (torch.float16, torch.bfloat16)
#: Attributes the adapters' ``mark_model`` and :func:`prepare_model_for_training` set; a merged
#: full-precision model must not carry them (peft and transformers read them).
_QUANTIZATION_ATTRIBUTES = ("quantization_plan", "quantization_config", "is_quantized", "quantization_method",
                            "is_loaded_in_4bit", "is_loaded_in_8bit", "hqq_quantized", "is_prepared_for_training")


# ---------------------------------------------------------------------- which layers are quantized
def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of the layers the adapter converted: every module a registered adapter
    recognizes, plus the layers the plan lists as converted (the fallback adapter's float layers)."""
    plan = get_quantization_plan(model)
    planned = {layer.name for layer in plan.converted} if plan is not None else set()
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer"):  # a LoRA wrapper: the layer is its base_layer
            continue
        owner = name.removesuffix(".base_layer")
        if is_quantized_module(module) or name in planned or (owner != name and owner in planned):
            out[name] = module
    return out


def _params_outside(model: nn.Module, inside: set[int]) -> Iterator[nn.Parameter]:
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in inside:
            continue
        yield from module.parameters(recurse=False)
        stack.extend(module.children())


def _layer_compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype a quantized layer multiplies in (``None`` when it cannot be told)."""
    dtype = getattr(module, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point:
        return weight.dtype  # quanto's tensors report their float dtype; float layers their own
    dtype = getattr(module, "source_dtype", None)  # bitsandbytes INT8 (set by the adapter)
    if isinstance(dtype, torch.dtype):
        return dtype
    bias = getattr(module, "bias", None)
    return bias.dtype if isinstance(bias, torch.Tensor) else None


def _cast_input_hooks(module: nn.Module, dtype: torch.dtype) -> None:
    """Feed ``module`` inputs in ``dtype`` and give callers back their own dtype.

    HQQ and quanto layers multiply the input as given and fail on float32 activations with half
    weights (``expected m1 and m2 to have the same dtype``); bitsandbytes and MLX layers cast
    themselves, for which these hooks change nothing. Under ``torch.autocast`` they stand aside:
    every layer then casts its input and returns the autocast dtype itself, as ``nn.Linear`` does.
    """
    if getattr(module, "_qw_input_dtype_hooks", None) is not None:
        return

    def before(mod, args, kwargs):
        x = args[0] if args else None
        if (not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == dtype
                or autocast_dtype(x) is not None):
            mod._qw_caller_dtype = None
            return None
        mod._qw_caller_dtype = x.dtype
        return (x.to(dtype), *args[1:]), kwargs

    def after(mod, args, kwargs, output):
        caller = getattr(mod, "_qw_caller_dtype", None)
        if caller is not None and isinstance(output, torch.Tensor) and output.dtype != caller:
            return output.to(caller)
        return None

    module._qw_input_dtype_hooks = (module.register_forward_pre_hook(before, with_kwargs=True),
                                    module.register_forward_hook(after, with_kwargs=True))


def _needs_peft_integration(layers: dict[str, nn.Module]) -> bool:
    """Some layer has no LoRA layer in peft or is missed by "all-linear" (all but bitsandbytes')."""
    return any(is_quantized_module(m) and not adapter_class_for_module(m).peft_native
               for m in layers.values())


# ---------------------------------------------------------------------- prepare
def prepare_model_for_training(model: nn.Module, adapter: QuantizationAdapter | None = None, *,
                               gradient_checkpointing: bool = True, use_reentrant: bool = False) -> nn.Module:
    """Freeze the base model and make it ready for LoRA adapters (in place).

    * every parameter gets ``requires_grad=False``; quantized tensors are not touched (no cast,
      no copy: they stay bit-identical);
    * when the quantized layers compute in float16/bfloat16, the other float parameters (norms,
      embeddings, an unquantized ``lm_head``: what peft's ``prepare_model_for_kbit_training``
      casts) become float32, and every quantized layer gets its input cast to its compute dtype
      and its output cast back (HQQ and quanto layers do not cast by themselves);
    * gradient checkpointing (``use_reentrant`` as given) and input gradients are enabled where
      the model supports them (transformers models); ``use_cache`` is switched off;
    * the flags peft reads are set (``adapter.mark_model``: ``is_loaded_in_4bit``,
      ``hqq_quantized``, ...), and, when the model has HQQ, MLX or quanto layers, peft is taught
      their LoRA layers and ``target_modules="all-linear"``
      (:func:`~quantization_wrapper.peft_integration.install_peft_integration`).

    Args:
        model: a model quantized by ``adapter`` (or loaded with ``load_quantized_model``).
        adapter: the adapter that quantized it; ``None``: the one for the model's
            ``quantization_config`` (any model this package produced, ``from_pretrained`` included).
        gradient_checkpointing: enable activation checkpointing when the model supports it.
        use_reentrant: passed to ``torch.utils.checkpoint``.

    Returns:
        The same model, with ``model.is_prepared_for_training = True``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if adapter is None:
        config = getattr(model, "quantization_config", None)
        if not isinstance(config, QuantizationConfig):
            raise ValueError("model has no quantization_config of this package: quantize it (quantize_model, "
                             "from_pretrained(quantization_config=QuantizationConfig(...))) or pass the adapter")
        adapter = get_adapter_class(config.method)(config)
    for param in model.parameters():
        param.requires_grad_(False)

    layers = quantized_layers(model)
    compute = adapter.config.compute_dtype
    layer_dtypes = {name: _layer_compute_dtype(m) for name, m in layers.items()}
    half = compute in _HALF or any(d in _HALF for d in layer_dtypes.values())
    if half:
        inside = {id(m) for m in layers.values()}
        cast = 0
        for param in _params_outside(model, inside):
            if param.dtype in _HALF:
                param.data = param.data.to(torch.float32)
                cast += param.numel()
        for name, module in layers.items():
            dtype = layer_dtypes[name]
            if dtype in _HALF:
                _cast_input_hooks(module, dtype)
        logger.info("cast %d non-quantized parameters to float32 (half-precision compute)", cast)

    if gradient_checkpointing:
        if getattr(model, "supports_gradient_checkpointing", False) and hasattr(model, "gradient_checkpointing_enable"):
            kwargs = {"use_reentrant": use_reentrant}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            config = getattr(model, "config", None)
            if config is not None and getattr(config, "use_cache", False):
                config.use_cache = False  # transformers turns it off anyway, with a warning
        else:
            logger.info("%s does not support gradient checkpointing; training without it", type(model).__name__)

    adapter.mark_model(model)
    if _needs_peft_integration(layers) and importlib.util.find_spec("peft") is not None:
        from .peft_integration import install_peft_integration

        install_peft_integration(process_wide=True)
    model.is_prepared_for_training = True
    return model


# ---------------------------------------------------------------------- merge
def _dense(module: nn.Module, method: str | None, cache: dict) -> nn.Linear:
    """``module`` as a :class:`FloatLinear` holding the weight it computes with."""
    cls = get_adapter_class(method) if method is not None else None
    if cls is None or not (cls.quantized_module_types() and isinstance(module, cls.quantized_module_types())):
        cls = adapter_class_for_module(module) or cls
    if cls is None:
        raise ValueError(f"no adapter can dequantize a {type(module).__name__}")
    if cls not in cache:
        cache[cls] = cls(None)
    linear = cache[cls].dequantize_module(module)
    return _as_float_linear(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())


def _as_float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> FloatLinear:
    out_features, in_features = weight.shape
    layer = FloatLinear(in_features, out_features, bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def merge_lora(model: nn.Module, *, requantize: bool = False, adapter_names: list[str] | None = None,
               safe_merge: bool = False, backend: Any = None) -> nn.Module:
    """Fold LoRA weights into the dequantized base weights: a full-precision model, optionally
    quantized again with the model's own config.

    Every quantized layer is dequantized (its adapter's ``dequantize_module``) into a
    :class:`~quantization_wrapper.adapters.fallback.FloatLinear` in its compute dtype (an
    ``nn.Linear`` that accepts inputs of any float dtype); for layers with LoRA, the delta of each
    adapter (``scaling * B @ A``, and a LoRA bias) is added in float32 first. LoRA on layers that
    were not quantized is merged by peft. With ``requantize=True`` the merged model is quantized by
    the adapter of ``model.quantization_config`` (same skip list, per-layer overrides and group
    fitting), so it can be saved with ``save_quantized_model``.

    The model is changed in place: a ``PeftModel`` is consumed (use the returned model).

    Args:
        model: a ``PeftModel`` over a quantized model, or the quantized model with LoRA layers.
        requantize: quantize the merged weights again.
        adapter_names: adapters to merge (default: the active ones).
        safe_merge: raise if a merged weight is not finite.
        backend: backend for the re-quantizing adapter (``None``: detect).

    Returns:
        The merged base model (no LoRA layers). Without ``requantize`` it carries no quantization
        attributes; with it, a fresh ``quantization_plan``.
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    plan = get_quantization_plan(base)
    config = getattr(base, "quantization_config", None)
    if requantize and not isinstance(config, QuantizationConfig):
        raise ValueError("requantize=True needs the model's quantization_config (set by quantize_model or "
                         "load_quantized_model); this model has none")
    methods = {layer.name: layer.method for layer in plan.converted} if plan is not None else {}
    quantized = quantized_layers(base)
    cache: dict = {}

    lora_layers = [(name, m) for name, m in base.named_modules() if isinstance(m, LoraLayer)]
    for name, lora in lora_layers:
        inner = lora.get_base_layer()
        names = [n for n in (adapter_names or lora.active_adapters)
                 if n in lora.lora_A and n not in lora.merged_adapters]
        if not any(inner is m for m in quantized.values()):  # not converted by an adapter: peft merges it
            if names:
                lora.merge(safe_merge=safe_merge, adapter_names=names)
            base.set_submodule(name, inner)
            continue
        # Adapters peft already merged live in the (re-quantized) base layer; the rest are added here.
        dense = _dense(inner, methods.get(name), cache)
        weight = dense.weight.detach().to(torch.float32)
        bias = None if dense.bias is None else dense.bias.detach().to(torch.float32)
        for adapter in names:
            weight = weight + lora.get_delta_weight(adapter).to(device=weight.device, dtype=torch.float32)
            if lora.lora_bias.get(adapter, False):
                extra = lora.lora_B[adapter].bias.detach().float() * lora.scaling[adapter]
                bias = extra if bias is None else bias + extra
        if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(f"{name}: the merged weight is not finite (adapters {names})")
        dtype = dense.weight.dtype
        base.set_submodule(name, _as_float_linear(weight.to(dtype), None if bias is None else bias.to(dtype)))

    for name, module in list(base.named_modules()):
        if name in quantized and quantized[name] is module:
            base.set_submodule(name, _dense(module, methods.get(name.removesuffix(".base_layer")), cache))

    for attribute in _QUANTIZATION_ATTRIBUTES:
        base.__dict__.pop(attribute, None)
    if requantize:
        adapter = get_adapter_class(config.method)(config, backend)
        adapter.quantize_model(base)
    return base
