"""mlx-lm interop: the ``config["quantization"]`` entry mlx-lm writes next to a checkpoint of
:class:`~.layer.MLXQuantizedLinear` layers (whose tensor names are already mlx-lm's), and the MLX
adapter's checkpoint hooks: that entry in the ``config.json`` of our checkpoints
(``peer_config_entries``) and mlx-lm's / MLX's own files among the formats ``load_quantized_model``
reads (``native_readers``, :mod:`.checkpoint`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .adapter import MLXAdapter
from .checkpoint import is_mlx_checkpoint, load_mlx_checkpoint
from .layer import MLXQuantizedLinear

__all__ = ["mlx_lm_quantization_config"]


def mlx_lm_quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``config["quantization"]`` entry mlx-lm writes next to a quantized checkpoint.

    The most common (group size, bits) of the model's :class:`MLXQuantizedLinear` layers is the
    default; every layer that differs gets its own ``{"group_size": ..., "bits": ...}`` under its
    dotted name. mlx-lm quantizes exactly the layers whose ``<name>.scales`` is in the weights, so
    layers left in float need no entry. Tensor names are those of :meth:`MLXAdapter.layer_state_dict`
    under the module's dotted name.

    Raises:
        ValueError: when the model has no MLX layer.
    """
    layers = {name: (m.group_size, m.bits) for name, m in model.named_modules()
              if isinstance(m, MLXQuantizedLinear)}
    if not layers:
        raise ValueError("the model has no MLXQuantizedLinear layer; quantize it with an MLX method first")
    counts: dict[tuple[int, int], int] = {}
    for setting in layers.values():
        counts[setting] = counts.get(setting, 0) + 1
    group, bits = max(counts, key=lambda k: (counts[k], k[1]))
    config: dict[str, Any] = {"group_size": group, "bits": bits, "mode": "affine"}
    for name, (g, b) in layers.items():
        if (g, b) != (group, bits):
            config[name] = {"group_size": g, "bits": b}
    return config


def _peer_config_entries(cls, model: nn.Module, plan: Any, layers: list) -> tuple[dict[str, Any], dict[str, Any]]:
    """mlx-lm's ``quantization`` entry (:func:`mlx_lm_quantization_config`) for the ``config.json``."""
    return {"quantization": mlx_lm_quantization_config(model)}, {}


def _native_readers(cls) -> dict:
    """mlx-lm directories and MLX ``.npz`` / ``.safetensors`` files (:mod:`.checkpoint`)."""
    return {"mlx": (is_mlx_checkpoint, load_mlx_checkpoint)}


MLXAdapter.peer_config_entries = classmethod(_peer_config_entries)
MLXAdapter.native_readers = classmethod(_native_readers)
