"""mlx-lm interop: the ``config["quantization"]`` entry mlx-lm writes next to a checkpoint of
:class:`~.layer.MLXQuantizedLinear` layers (whose tensor names are already mlx-lm's), and the MLX
adapter's checkpoint hooks: that entry in the ``config.json`` of our checkpoints
(``peer_config_entries``) and mlx-lm's / MLX's own files among the formats ``load_quantized_model``
reads (``native_readers``, :mod:`.checkpoint`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import MLXAdapter
from .checkpoint import is_mlx_checkpoint, load_mlx_checkpoint
from .layer import MLXQuantizedLinear

__all__ = ["mlx_lm_quantization_config", "save_mlx_lm"]


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
    return _quantization_entry({name: (m.group_size, m.bits) for name, m in model.named_modules()
                                if isinstance(m, MLXQuantizedLinear)})


def _quantization_entry(layers: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """mlx-lm's ``quantization`` entry for ``{layer name: (group_size, bits)}``: the most common
    setting as the default, the others per layer."""
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
    """mlx-lm's ``quantization`` entry (:func:`mlx_lm_quantization_config`) for the ``config.json``;
    none for a mixture of experts, which mlx-lm reads only in its SwitchGLU layout (:func:`save_mlx_lm`)."""
    from ...experts import UnfusedExperts

    if any(isinstance(m, UnfusedExperts) for m in model.modules()):
        warnings.warn("this checkpoint holds MoE experts per expert, which mlx-lm cannot read; it is written "
                      "without mlx-lm's 'quantization' entry. For mlx-lm, write save_mlx_lm(model, path) "
                      "(its SwitchGLU layout)", stacklevel=4)
        return {}, {}
    return {"quantization": mlx_lm_quantization_config(model)}, {}


def _native_readers(cls) -> dict:
    """mlx-lm directories and MLX ``.npz`` / ``.safetensors`` files (:mod:`.checkpoint`)."""
    return {"mlx": (is_mlx_checkpoint, load_mlx_checkpoint)}


MLXAdapter.peer_config_entries = classmethod(_peer_config_entries)
MLXAdapter.native_readers = classmethod(_native_readers)


# ---------------------------------------------------------------------- mlx-lm's own layout
def _on_disk_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """``{model key: the name transformers' save_pretrained writes}`` (Mixtral's ``mlp`` is
    ``block_sparse_moe`` on disk, the names mlx-lm's models use), one key at a time."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: names are the same on disk
        return {k: k for k in keys}
    probe = torch.empty(0)
    out = {}
    for key in keys:
        renamed = list(revert_weight_conversion(model, {key: probe}))
        out[key] = renamed[0] if len(renamed) == 1 else key
    return out


def _switch_mlp_tensors(name: str, container: nn.Module) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """mlx-lm's ``SwitchGLU`` tensors of one block of MLX-quantized experts: ``gate_proj``, ``up_proj``
    and ``down_proj``, each ``weight``/``scales``/``biases`` stacked over the experts."""
    experts = [container._modules[str(e)] for e in range(container.num_experts)]
    settings = set()
    per_key: dict[str, list[torch.Tensor]] = {}
    for expert in experts:
        for proj, layer in expert._modules.items():
            if not isinstance(layer, MLXQuantizedLinear):
                raise ValueError(f"{name}: mlx-lm's SwitchLinear holds every expert in one quantized format; "
                                 f"expert projection {proj} is a {type(layer).__name__} (quantize every expert "
                                 f"with an MLX method, or save with save_quantized_model)")
            if layer.bias is not None:
                raise ValueError(f"{name}: experts with biases have no mlx-lm SwitchGLU layout here")
            settings.add((layer.group_size, layer.bits))
            state = MLXAdapter(None).layer_state_dict(layer)
            if proj == "gate_up_proj":
                if not getattr(container, "is_concatenated", True):
                    raise ValueError(f"{name}: interleaved gate/up experts have no mlx-lm SwitchGLU layout here")
                half = layer.out_features // 2
                for key, t in state.items():
                    per_key.setdefault(f"gate_proj.{key}", []).append(t[:half])
                    per_key.setdefault(f"up_proj.{key}", []).append(t[half:])
            else:
                for key, t in state.items():
                    per_key.setdefault(f"{proj}.{key}", []).append(t)
    if len(settings) != 1:
        raise ValueError(f"{name}: mlx-lm's SwitchLinear needs one (group_size, bits) for all experts of a block, "
                         f"got {sorted(settings)}")
    return {k: torch.stack(v) for k, v in per_key.items()}, settings.pop()


def _mlx_lm_config(model: nn.Module) -> dict[str, Any]:
    """The transformers config as a dict, with the names mlx-lm's model arguments read where
    transformers 5 renamed them: each ``attribute_map`` alias (Qwen3-MoE's ``num_experts``) and
    ``rope_theta`` from ``rope_parameters``."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if type(model).__module__.startswith("transformers."):  # loading rebuilds the same head
        config["architectures"] = [type(model).__name__]
    for alias, target in getattr(model.config, "attribute_map", {}).items():
        if alias not in config and target in config:
            config[alias] = config[target]
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    return config


def save_mlx_lm(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (MLX-quantized) as mlx-lm writes a quantized model: ``config.json`` with its
    ``quantization`` entry and ``model.safetensors`` with the tensor names mlx-lm's models use.

    Dense models need nothing more than :func:`~quantization_wrapper.save_quantized_model` (mlx-lm
    reads those checkpoints as they are); this is for mixtures of experts, whose experts mlx-lm holds
    in its ``SwitchGLU`` layout: per block ``switch_mlp.gate_proj`` / ``up_proj`` / ``down_proj``,
    each expert's packed weight, scales and biases stacked (``[experts, out, in * bits / 32]``), under
    the names transformers writes on disk (``block_sparse_moe`` for Mixtral, ``mlp`` for Qwen3-MoE).

    Raises:
        ValueError: a block's experts are not all MLX-quantized with one (group_size, bits), or the
            model has no MLX layer.
        FileExistsError: ``path`` exists and is not empty.
    """
    from safetensors.torch import save_file

    from ...checkpoint.files import StagedDirectory
    from ...experts import UnfusedExperts

    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; save_mlx_lm writes a new directory")
    tensors: dict[str, torch.Tensor] = {}
    settings: dict[str, tuple[int, int]] = {}
    covered: list[str] = []
    containers = {n: m for n, m in model.named_modules() if isinstance(m, UnfusedExperts)}
    for name, container in containers.items():
        stacked, setting = _switch_mlp_tensors(name, container)
        parent = name.rpartition(".")[0]
        for key, t in stacked.items():
            tensors[f"{parent}.switch_mlp.{key}"] = t
        for proj in ("gate_proj", "up_proj", "down_proj"):
            settings[f"{parent}.switch_mlp.{proj}"] = setting
        covered.append(name + ".")
    for name, module in model.named_modules():
        if isinstance(module, MLXQuantizedLinear) and not name.startswith(tuple(covered)):
            for key, t in MLXAdapter(None).layer_state_dict(module).items():
                tensors[f"{name}.{key}"] = t
            settings[name] = (module.group_size, module.bits)
            covered.append(name + ".")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for key, t in model.state_dict().items():
        if key.startswith(tuple(covered)) or (tied and key == "lm_head.weight"):
            continue
        tensors[key] = t.detach()
    names = _on_disk_names(model, list(tensors))
    # the blocks' prefixes as transformers writes them (a key of each block's router stands in)
    for key in list(tensors):
        if ".switch_mlp." in key:
            parent, _, rest = key.partition(".switch_mlp.")
            probe = next((k for k in names if k.startswith(parent + ".") and ".switch_mlp." not in k), None)
            disk_parent = names[probe][: -len(probe[len(parent):])] if probe else parent
            names[key] = f"{disk_parent}.switch_mlp.{rest}"
    quantization = _quantization_entry({names.get(f"{n}.weight", f"{n}.weight").removesuffix(".weight"): v
                                        for n, v in settings.items()})
    config = _mlx_lm_config(model)
    config["quantization"] = quantization
    config["quantization_config"] = quantization
    with StagedDirectory(path, overwrite=False) as stage:  # all or nothing: a failed write leaves no directory
        save_file({names[k]: t.contiguous() for k, t in tensors.items()}, str(stage.path / "model.safetensors"),
                  metadata={"format": "mlx"})
        (stage.path / "config.json").write_text(json.dumps(config, indent=2, default=str))
        stage.commit()
    return path
