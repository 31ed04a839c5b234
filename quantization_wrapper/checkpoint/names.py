"""Tensor names as checkpoints write them and as the model holds them."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

__all__ = ["model_key_renamer"]


def model_key_renamer(model: nn.Module) -> Callable[[str], str]:
    """``key -> model key``: the renamings transformers applies to a checkpoint's keys before it
    matches them (``block_sparse_moe`` -> ``mlp`` for Mixtral), without its converters and without
    its base-model-prefix guessing (the keys here name tensors the model's ``state_dict`` does not
    have, such as ``scales``); the identity where transformers has no conversion mapping."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:  # transformers 4 renames nothing
        return lambda key: key
    if not hasattr(model, "config"):
        return lambda key: key
    renamings: list[Any] = [t for t in get_model_conversion_mapping(model, add_legacy=False)
                            if isinstance(t, WeightRenaming)]
    return lambda key: apply_renamings(key, renamings)
