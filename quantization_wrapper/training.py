"""Training glue: make a quantized model ready for LoRA (QLoRA) training."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .adapters.base import QuantizationAdapter, is_quantized_module

__all__ = ["prepare_model_for_training"]

logger = logging.getLogger(__name__)
_HALF = (torch.float16, torch.bfloat16)


def _float_params_outside_quantized(model: nn.Module):
    """Parameters owned directly by modules that are neither quantized layers nor inside one."""
    stack = [model]
    while stack:
        module = stack.pop()
        if is_quantized_module(module):
            continue
        yield from module.parameters(recurse=False)
        stack.extend(module.children())


def prepare_model_for_training(model: nn.Module, adapter: QuantizationAdapter, *,
                               gradient_checkpointing: bool = True, use_reentrant: bool = False) -> nn.Module:
    """Freeze the base model and make it ready for LoRA adapters.

    * every base parameter gets ``requires_grad=False``; quantized weights stay quantized;
    * when the compute dtype is half precision, the small float parameters outside the quantized
      layers (norms, biases of skipped layers, embeddings) are cast to float32 for stable training,
      as peft's ``prepare_model_for_kbit_training`` does;
    * input gradients are enabled and gradient checkpointing is switched on (non-reentrant by
      default) where the model supports them (transformers models);
    * the attributes peft reads are set (``adapter.mark_model``).

    Args:
        model: a model quantized by ``adapter``.
        adapter: the adapter that quantized it.
        gradient_checkpointing: enable activation checkpointing when the model supports it.
        use_reentrant: passed to ``torch.utils.checkpoint``.

    Returns:
        The same model.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    compute = adapter.config.compute_dtype
    if compute in _HALF:
        for param in _float_params_outside_quantized(model):
            if param.dtype in _HALF:
                param.data = param.data.to(torch.float32)
    if gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    elif gradient_checkpointing:
        logger.info("%s does not support gradient checkpointing; training without it",
                    type(model).__name__)
    adapter.mark_model(model)
    model.is_prepared_for_training = True
    return model
