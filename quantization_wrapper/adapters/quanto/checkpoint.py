"""optimum-quanto's side of our checkpoints: ``quantization_map.json``, what
``optimum.quanto.requantize`` reads beside the weights (the layers' tensor names are already
quanto's), attached to :class:`~.adapter.QuantoAdapter` as its ``peer_config_entries``."""

from __future__ import annotations

from typing import Any

from torch import nn

from .adapter import QuantoAdapter

__all__: list[str] = []


def _peer_config_entries(cls, model: nn.Module, plan: Any, layers: list) -> tuple[dict[str, Any], dict[str, Any]]:
    """``quantization_map.json``: quanto's map entry of every optimum-quanto layer."""
    return {}, {"quantization_map.json": {layer.name: cls.quantization_map_entry(model.get_submodule(layer.name))
                                          for layer in layers}}


QuantoAdapter.peer_config_entries = classmethod(_peer_config_entries)
