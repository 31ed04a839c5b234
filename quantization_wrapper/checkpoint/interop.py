"""What the peers' own loaders read beside our weights, so our checkpoints open with them too: the
``config.json`` (the transformers config naming the model class, ``tie_word_embeddings`` as the
saved model ties, and each library's quantization entry) and the libraries' extra JSON files.

The entries are the backends' own: each adapter class answers
:meth:`~quantization_wrapper.adapters.base.QuantizationAdapter.peer_config_entries` for its layers
(bitsandbytes: transformers' ``quantization_config``; MLX: mlx-lm's ``quantization``;
optimum-quanto: ``quantization_map.json``), found through the adapter registry.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..registry import get_adapter_class
from ..surgery import get_quantization_plan

__all__ = ["hf_config_dict", "untied_embeddings", "peer_entries"]


def hf_config_dict(model: nn.Module) -> dict[str, Any]:
    """The transformers config as a dict, naming the model class so loading rebuilds the same head,
    with the peers' quantization entries (see :func:`peer_entries`).

    ``tie_word_embeddings`` is written ``False`` when the model no longer ties its output embedding
    to its input embedding (one of them quantized): peers that tie by the config (mlx-lm drops
    ``lm_head``, quanto's ``QuantizedModelForCausalLM`` calls ``tie_weights``) would otherwise
    discard the saved output layer. optimum-quanto's own ``save_pretrained`` does the same."""
    data = model.config.to_dict()
    data.pop("quantization_config", None)
    if type(model).__module__.startswith("transformers."):
        data["architectures"] = [type(model).__name__]
    if untied_embeddings(model):
        for section in (data, data.get("text_config")):
            if isinstance(section, dict) and section.get("tie_word_embeddings"):
                section["tie_word_embeddings"] = False
    data.update(peer_entries(model)[0])
    return data


def untied_embeddings(model: nn.Module) -> bool:
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


def peer_entries(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the peers' own loaders read, so our checkpoints open with them too: ``(config.json
    additions, extra JSON files by name)``, from the adapter class of each method in the model's
    plan, asked once with the plan's layers of its methods."""
    plan = get_quantization_plan(model)
    converted = plan.converted if plan is not None else []
    layers_of: dict[type, list] = {}
    for layer in converted:
        layers_of.setdefault(get_adapter_class(layer.method), []).append(layer)
    additions: dict[str, Any] = {}
    files: dict[str, Any] = {}
    for cls, layers in layers_of.items():
        more, extra = cls.peer_config_entries(model, plan, layers)
        additions.update(more)
        files.update(extra)
    return additions, files
