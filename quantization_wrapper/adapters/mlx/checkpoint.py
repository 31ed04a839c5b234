"""mlx-lm's and MLX's own checkpoints, read by ``load_quantized_model`` (the MLX adapter's
``native_readers``, attached in :mod:`.interop`).

What ``mlx_lm.convert`` / ``save_model`` writes: a directory with ``config.json`` holding
``"quantization": {"group_size", "bits", ["mode"], [<layer>: {"group_size", "bits"} or false]}`` and
``model.safetensors`` (or ``model-*.safetensors`` + ``model.safetensors.index.json``) with
``<layer>.weight`` (``uint32`` packed), ``<layer>.scales`` and ``<layer>.biases``. Also one ``.npz``
(``mx.savez``) or ``.safetensors`` (``mx.save_safetensors``) file of the same tensors, with
``model_config`` passed. As mlx-lm does, exactly the layers with a ``.scales`` tensor are quantized;
their bits and group size are read from the tensor shapes and checked against the ``quantization``
entry. Linear layers become :class:`~quantization_wrapper.adapters.mlx.MLXQuantizedLinear` (the
stored tensors unchanged); quantized embeddings (mlx-lm quantizes ``embed_tokens`` by default) are
dequantized into the float ``nn.Embedding`` -- exactly ``mx.dequantize`` -- with a warning, since
the PyTorch models have no quantized embedding. ``.npz`` files are read with
``numpy.load(allow_pickle=False)``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ...checkpoint.names import model_key_renamer
from ...experts import unfuse_experts_for
from ...checkpoint.description import layer_adapter
from ...checkpoint.files import confined_file
from ...checkpoint.native import (check_method, config_summary, fill_tensors, finish_model, linear_layers,
                                  native_skeleton, restore_layers, submodule)
from ...checkpoint.safetensors_io import CheckpointFiles, SafetensorsReader
from ...config import QuantizationMethod, dtype_to_str
from ...errors import CheckpointError
from .codec import MLX_BITS, MLX_GROUP_SIZES, affine_dequantize

__all__ = ["is_mlx_checkpoint", "load_mlx_checkpoint"]

#: The weights of an hqq ``save_quantized`` directory: a directory holding them is hqq's.
_HQQ_SAVED_WEIGHTS = "qmodel.pt"


class _NpzTensors:
    """The arrays of an ``.npz`` (``mx.savez``) as torch tensors, read one at a time, no pickle."""

    def __init__(self, path: Path):
        import numpy as np

        self.path = path
        try:
            self._npz = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable .npz file ({e})") from e
        self.names = list(self._npz.files)

    def keys(self) -> list[str]:
        return self.names

    def read(self, key: str) -> torch.Tensor:
        import numpy as np

        try:
            array = self._npz[key]
        except Exception as e:  # zipfile.BadZipFile (CRC), ValueError (object arrays), ...
            raise CheckpointError(f"{self.path}: array {key!r} could not be read ({type(e).__name__}: {e})") from e
        if array.dtype == np.dtype("V2"):
            # numpy has no bfloat16: mx.savez writes bfloat16 arrays as 2-byte void ('<V2'), and
            # mx.load reads '<V2' back as bfloat16. Reinterpret the bits the same way.
            return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
        if array.dtype.kind not in "fiub":
            raise CheckpointError(f"{self.path}: array {key!r} has dtype {array.dtype}, which is not a tensor dtype "
                                  f"MLX writes")
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        return torch.from_numpy(np.ascontiguousarray(array))

    def close(self) -> None:
        self._npz.close()


class _SafetensorsTensors:
    """The tensors of one or more safetensors files (positioned reads, no memory map)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            if path.is_dir():
                self._files = CheckpointFiles(path)
                readers = self._files.readers
            else:
                self._files = SafetensorsReader(path)
                readers = [self._files]
        except ValueError as e:
            raise CheckpointError(str(e)) from e
        self._where = {key: reader for reader in readers for key in reader.keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def read(self, key: str) -> torch.Tensor:
        reader = self._where[key]
        try:
            return reader.read(key)
        except ValueError as e:
            raise CheckpointError(str(e)) from e

    def close(self) -> None:
        self._files.close()


class _SwitchMLPTensors:
    """An mlx-lm checkpoint's tensors under the model's names: transformers' renamings applied
    (``block_sparse_moe`` -> ``mlp``) and each block's ``switch_mlp`` (``SwitchGLU``: ``gate_proj``,
    ``up_proj``, ``down_proj`` stacked over the experts) presented per expert as the unfused experts
    hold them: ``experts.<e>.gate_up_proj.*`` (gate rows, then up rows) and ``experts.<e>.down_proj.*``."""

    def __init__(self, source: Any, model: nn.Module):
        self.source = source
        rename = model_key_renamer(model)
        self.plain: dict[str, str] = {}
        self.expert: dict[str, tuple[list[str], int]] = {}  # model key -> (source keys, expert)
        blocks: dict[str, int] = {}
        for key in source.keys():
            if ".switch_mlp." not in key:
                self.plain[rename(key)] = key
                continue
            disk_parent, _, rest = key.partition(".switch_mlp.")
            proj, _, tensor = rest.partition(".")
            parent = rename(f"{disk_parent}.gate.weight").removesuffix(".gate.weight")
            if parent not in blocks:
                blocks[parent] = submodule(source_path(source), model, f"{parent}.experts", f"tensor {key}").num_experts
            if proj == "down_proj":
                sources, target = [key], "down_proj"
            elif proj in ("gate_proj", "up_proj"):
                sources, target = [f"{disk_parent}.switch_mlp.gate_proj.{tensor}",
                                   f"{disk_parent}.switch_mlp.up_proj.{tensor}"], "gate_up_proj"
            else:
                raise CheckpointError(f"{source_path(source)}: {key}: unknown SwitchGLU projection {proj!r}")
            for e in range(blocks[parent]):
                self.expert[f"{parent}.experts.{e}.{target}.{tensor}"] = (sources, e)

    def expert_layers(self) -> list[str]:
        return sorted({k.rpartition(".")[0] for k in self.expert})

    def keys(self) -> list[str]:
        return list(self.plain) + list(self.expert)

    def read(self, key: str) -> torch.Tensor:
        if key in self.plain:
            return self.source.read(self.plain[key])
        sources, e = self.expert[key]
        parts = []
        for name in sources:
            stacked = self.source.read(name)
            if stacked.ndim < 2:
                raise CheckpointError(f"{source_path(self.source)}: {name} is not stacked over experts "
                                      f"(shape {tuple(stacked.shape)})")
            parts.append(stacked[e])
        return parts[0].clone() if len(parts) == 1 else torch.cat(parts)

    def close(self) -> None:
        self.source.close()


def source_path(source: Any) -> Path:
    return getattr(source, "path", Path("the checkpoint"))


def _safetensors_keys(path: Path) -> tuple[list[str], dict[str, str]]:
    try:
        with SafetensorsReader(path) as reader:
            return reader.keys(), reader.metadata
    except ValueError:
        return [], {}


def _has_mlx_tensors(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return any(k.endswith(".scales") and k[: -len("scales")] + "biases" in keys for k in keys)


def is_mlx_checkpoint(path: Path) -> bool:
    """Whether ``path`` is an mlx-lm directory or an MLX ``.npz`` / ``.safetensors`` file (reads the
    config and safetensors headers only)."""
    if path.is_dir():
        config = path / "config.json"
        if config.exists() and not config.is_symlink():
            try:
                if "quantization" in json.loads(config.read_text()):
                    return True
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
                return False
        shards = sorted(path.glob("*.safetensors"))
        # A directory of MLX tensors whose config lost its 'quantization' entry: claim it, to say so.
        return bool(shards) and config.exists() and not (path / _HQQ_SAVED_WEIGHTS).exists() and \
            _has_mlx_tensors(k for f in shards[:1] for k in _safetensors_keys(f)[0])
    if path.suffix == ".npz":
        return True
    if path.suffix == ".safetensors":
        keys, metadata = _safetensors_keys(path)
        return "quantization_wrapper" not in metadata and _has_mlx_tensors(keys)
    return False


_MLX_QUANTIZED_TYPES = (nn.Linear, nn.Embedding)


def _mlx_settings(where: Path, name: str, module: nn.Module, weight: torch.Tensor,
                  scales: torch.Tensor) -> tuple[int, int]:
    """``(bits, group_size)`` of a stored MLX layer, from its tensor shapes and the architecture."""
    rows, width = (module.out_features, module.in_features) if isinstance(module, nn.Linear) else \
        (module.num_embeddings, module.embedding_dim)
    shape = f"{rows}x{width} {type(module).__name__}"
    if weight.ndim != 2 or scales.ndim != 2 or weight.shape[0] != rows or scales.shape[0] != rows or \
            scales.shape[1] == 0:
        raise CheckpointError(f"{where}: {name}.weight {tuple(weight.shape)} / .scales {tuple(scales.shape)} do not "
                              f"fit the architecture's {shape}")
    bits, rem = divmod(weight.shape[1] * 32, width)
    group, grem = divmod(width, scales.shape[1])
    if rem or grem or bits not in MLX_BITS or group not in MLX_GROUP_SIZES:
        raise CheckpointError(f"{where}: {name}.weight {tuple(weight.shape)} / .scales {tuple(scales.shape)} are not "
                              f"an MLX affine packing of the architecture's {shape} (bits {MLX_BITS}, group sizes "
                              f"{MLX_GROUP_SIZES})")
    return bits, group


def _mlx_quantization(where: Path, entry: Any) -> dict[str, Any] | None:
    if entry is None:
        return None
    if not isinstance(entry, dict) or not {"group_size", "bits"} <= set(entry):
        raise CheckpointError(f"{where}: 'quantization' must be a dict with 'group_size' and 'bits' (as mlx-lm "
                              f"writes), got {entry!r}")
    mode = entry.get("mode", "affine")
    if mode != "affine":
        raise CheckpointError(f"{where}: quantization mode {mode!r} is not supported; only MLX's 'affine' mode "
                              f"(packed weight + scales + biases) maps onto MLXQuantizedLinear")
    return entry


def load_mlx_checkpoint(path: str | os.PathLike, model_config: Any = None, *, device: str | torch.device = "cpu",
                        backend=None, expected_methods: Iterable | None = None, verify: bool = True) -> nn.Module:
    """Load an mlx-lm directory, or an MLX ``.npz`` / ``.safetensors`` file, into the PyTorch model.

    Args:
        path: an mlx-lm directory (``config.json`` + ``model*.safetensors``), or one ``.npz`` /
            ``.safetensors`` file of mlx-lm's tensors.
        model_config: the architecture (see
            :func:`~quantization_wrapper.checkpoint.native.load_native_checkpoint`); required for a
            single file. A dict may carry mlx-lm's ``quantization`` entry, which is then checked too.
        device: where to place the model.
        backend: backend for the adapter (``None``: detect).
        expected_methods: raise unless the checkpoint's method is one of these.
        verify: accepted for symmetry with ``load_quantized_model``; native files carry no checksums.

    Returns:
        The model in eval mode: ``MLXQuantizedLinear`` layers where the checkpoint has ``.scales``,
        with its ``quantization_plan`` and ``quantization_config`` (``mlx_int4``, or ``mlx_int8``
        when most layers are 8-bit; other layers in ``layer_configs``).

    Raises:
        CheckpointError: no ``quantization`` entry in an mlx-lm ``config.json``, settings that
            disagree with the tensors, missing or extra tensors, a non-affine mode (all named).
    """
    path = Path(path)
    config_json: dict[str, Any] | None = None
    if path.is_dir():
        file = path / "config.json"
        if not file.exists():
            raise CheckpointError(f"{path}: no config.json; an mlx-lm checkpoint directory has one with a "
                                  f"'quantization' entry")
        file = confined_file(path, "config.json", "the checkpoint")
        if not file.is_file():
            raise CheckpointError(f"{path}: no config.json; an mlx-lm checkpoint directory has one with a "
                                  f"'quantization' entry")
        try:
            config_json = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: invalid JSON ({e})") from e
        if "quantization" not in config_json:
            raise CheckpointError(f"{file} has no 'quantization' entry, so this is not an mlx-lm quantized checkpoint "
                                  f"(mlx-lm writes e.g. \"quantization\": {{\"group_size\": 64, \"bits\": 4}}); add "
                                  f"it, or load full-precision checkpoints with load_and_quantize")
        quant = _mlx_quantization(file, config_json["quantization"])
        source: Any = _SafetensorsTensors(path)
    else:
        if model_config is None:
            raise CheckpointError(f"{path}: a single MLX weights file holds no model config; pass model_config "
                                  f"(mlx-lm's config.json as a dict, a transformers config, a callable or an nn.Module "
                                  f"on meta)")
        quant = _mlx_quantization(path, model_config.get("quantization")) if isinstance(model_config, dict) else None
        source = _NpzTensors(path) if path.suffix == ".npz" else _SafetensorsTensors(path)
    try:
        model = native_skeleton(path, config_json, model_config)
        if any(".switch_mlp." in k for k in source.keys()):  # an MoE in mlx-lm's SwitchGLU layout
            source = _SwitchMLPTensors(source, model)
            unfuse_experts_for(model, source.expert_layers())
            if quant is not None:  # its per-layer settings name the stacked layers: per expert now
                quant = {k: v for k, v in quant.items() if ".switch_mlp." not in k}
        keys = set(source.keys())
        prefixes = sorted(k[: -len(".scales")] for k in keys if k.endswith(".scales"))
        if not prefixes:
            raise CheckpointError(f"{path}: no '<layer>.scales' tensors; nothing in it is MLX-quantized")
        linears = linear_layers(model)
        layers: dict[str, dict[str, Any]] = {}
        states: dict[str, dict[str, torch.Tensor]] = {}
        embeddings: list[str] = []
        for name in prefixes:
            module = submodule(path, model, name, f"tensor {name}.scales")
            if not isinstance(module, _MLX_QUANTIZED_TYPES):
                raise CheckpointError(f"{path}: {name} is quantized in the checkpoint but is a {type(module).__name__} "
                                      f"in the architecture; only Linear (and Embedding) layers can be loaded")
            wanted = ["weight", "scales", "biases"] + (["bias"] if getattr(module, "bias", None) is not None else [])
            absent = [f"{name}.{k}" for k in wanted if f"{name}.{k}" not in keys]
            if absent:
                raise CheckpointError(f"{path}: quantized layer {name!r} lacks tensors {absent}")
            state = {k: source.read(f"{name}.{k}") for k in wanted}
            keys -= {f"{name}.{k}" for k in wanted}
            bits, group = _mlx_settings(path, name, module, state["weight"], state["scales"])
            if quant is not None:
                entry = quant.get(name, quant)
                if entry is False or not isinstance(entry, dict):
                    raise CheckpointError(f"{path}: 'quantization' says {name!r} is not quantized, but the checkpoint "
                                          f"holds {name}.scales")
                if entry.get("mode", "affine") != "affine":
                    raise CheckpointError(f"{path}: 'quantization' gives {name!r} mode {entry['mode']!r}; only MLX's "
                                          f"'affine' mode maps onto MLXQuantizedLinear")
                if (entry.get("bits"), entry.get("group_size")) != (bits, group):
                    raise CheckpointError(f"{path}: 'quantization' gives {name!r} bits={entry.get('bits')}, "
                                          f"group_size={entry.get('group_size')}, but its tensors are {bits}-bit with "
                                          f"group size {group}")
            if isinstance(module, nn.Embedding):
                embeddings.append(name)
                states[name] = state
                continue
            layers[name] = {"bits": bits, "group_size": group, "compute_dtype": state["scales"].dtype}
            states[name] = state
        if quant is not None:
            stale = [k for k, v in quant.items() if isinstance(v, dict) and k not in states]
            if stale:
                raise CheckpointError(f"{path}: 'quantization' has settings for {stale}, which have no .scales in the "
                                      f"checkpoint (missing tensors?)")
        if not layers:
            raise CheckpointError(f"{path}: no linear layer is quantized (only embeddings {embeddings}); nothing to "
                                  f"load as MLXQuantizedLinear")

        skip = [n for n in linears if n not in layers]
        config = config_summary(_mlx_method, layers, skip, lambda s: {})
        check_method(path, config, expected_methods)
        adapters: dict = {}
        adapter = layer_adapter(config, config.method.value, backend, adapters)
        decisions = restore_layers(path, model, adapter, config, linears, layers, states, "MLX")
        rest = {k: source.read(k) for k in sorted(keys)}
        for name in embeddings:
            rest[f"{name}.weight"] = _dequantized_embedding(path, name, states.pop(name), model)
    finally:
        source.close()
    fill_tensors(path, model, rest)
    return finish_model(model, adapter, decisions, device)


def _mlx_method(settings: dict[str, Any]) -> QuantizationMethod:
    return QuantizationMethod.MLX_INT8 if settings["bits"] == 8 else QuantizationMethod.MLX_INT4


def _dequantized_embedding(where: Path, name: str, state: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    module = model.get_submodule(name)
    bits, group = _mlx_settings(where, name, module, state["weight"], state["scales"])
    weight = affine_dequantize(state["weight"].view(torch.uint32), state["scales"], state["biases"], group, bits)
    warnings.warn(f"{where}: {name} is a quantized embedding ({bits}-bit, group {group}); PyTorch has no quantized "
                  f"embedding, so it is loaded dequantized ({weight.numel() * weight.element_size() / 2**20:.1f} MiB "
                  f"of {dtype_to_str(weight.dtype)}, values identical to mx.dequantize)", stacklevel=4)
    return weight
