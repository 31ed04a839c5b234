"""Load the peers' own checkpoint formats: mlx-lm / MLX and hqq.

:func:`~quantization_wrapper.serialization.load_quantized_model` reads these too: a path without our
``quantization_config.json`` (and not our single ``.safetensors`` file) is handed to
:func:`load_native_checkpoint`, which asks each registered format whether the path is one of its own.

* **mlx** -- what ``mlx_lm.convert`` / ``save_model`` writes: a directory with ``config.json``
  holding ``"quantization": {"group_size", "bits", ["mode"], [<layer>: {"group_size", "bits"} or
  false]}`` and ``model.safetensors`` (or ``model-*.safetensors`` + ``model.safetensors.index.json``)
  with ``<layer>.weight`` (``uint32`` packed), ``<layer>.scales`` and ``<layer>.biases``. Also one
  ``.npz`` (``mx.savez``) or ``.safetensors`` (``mx.save_safetensors``) file of the same tensors,
  with ``model_config`` passed. As mlx-lm does, exactly the layers with a ``.scales`` tensor are
  quantized; their bits and group size are read from the tensor shapes and checked against the
  ``quantization`` entry. Linear layers become :class:`~quantization_wrapper.adapters.mlx.MLXQuantizedLinear`
  (the stored tensors unchanged); quantized embeddings (mlx-lm quantizes ``embed_tokens`` by
  default) are dequantized into the float ``nn.Embedding`` -- exactly ``mx.dequantize`` -- with a
  warning, since the PyTorch models have no quantized embedding.
* **hqq** -- ``AutoHQQHFModel.save_quantized``: a directory with ``config.json`` and ``qmodel.pt``
  (``torch.save`` of ``{module name: module state dict}``; ``HQQLinear`` states hold ``W_q``), or a
  ``.pt`` / ``.pth`` file holding one ``HQQLinear.state_dict()`` (raw or safetensors-encoded), which
  loads as that single layer.

Nothing here unpickles arbitrary objects: ``.pt`` files go through ``torch.load(weights_only=True)``
and ``.npz`` files through ``numpy.load(allow_pickle=False)``; hqq's dtype names are decoded from an
allow-list. The architecture is rebuilt with its parameters on the meta device and its buffers
real (the rotary tables a native checkpoint does not hold), every quantized layer is built empty
and filled with the stored tensors, and the model gets a ``quantization_plan`` and a
``quantization_config`` (per-layer settings in ``layer_configs``, unquantized linear layers in
``skip_modules``), so :func:`~quantization_wrapper.serialization.save_quantized_model` saves it in
our format and that reloads bit-identically. Native formats carry no checksums: safetensors
headers are bounds-checked and zip members (``.npz``, ``.pt``) CRC-checked on read.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .checkpoint_dir import confined_file
from .config import QuantizationConfig, QuantizationMethod, dtype_to_str
from .patterns import best_match
from .surgery import LayerDecision

__all__ = [
    "NATIVE_FORMATS",
    "ACCEPTED_FORMATS",
    "detect_native_format",
    "load_native_checkpoint",
    "load_mlx_checkpoint",
    "load_hqq_checkpoint",
]

#: One line per checkpoint layout :func:`~quantization_wrapper.serialization.load_quantized_model` reads.
ACCEPTED_FORMATS = (
    "a quantization-wrapper directory (quantization_config.json) or single .safetensors file; "
    "an mlx-lm directory (config.json with a 'quantization' entry + model*.safetensors); "
    "an MLX .npz or .safetensors file of <layer>.weight/.scales/.biases (with model_config); "
    "an hqq save_quantized directory (qmodel.pt + config.json); "
    "an hqq .pt/.pth file holding one HQQLinear state dict"
)
_HQQ_WEIGHTS = "qmodel.pt"
_PT_SUFFIXES = (".pt", ".pth")


def _error(message: str) -> Exception:
    from .errors import CheckpointError

    return CheckpointError(message)


# ------------------------------------------------------------------------------- the registry
#: ``name -> (detect(path) -> bool, load(path, model_config, **kwargs) -> nn.Module)``.
NATIVE_FORMATS: dict[str, tuple[Callable[[Path], bool], Callable[..., nn.Module]]] = {}


def _native_format(name: str, detect: Callable[[Path], bool]):
    def register(loader: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        NATIVE_FORMATS[name] = (detect, loader)
        return loader

    return register


def detect_native_format(path: str | os.PathLike) -> str | None:
    """The native format of ``path`` (``"mlx"`` or ``"hqq"``), or ``None`` when it is none of them
    (our own checkpoints included). Reads file headers only."""
    from .serialization import QUANT_CONFIG_NAME

    path = Path(path)
    if not path.exists() or (path / QUANT_CONFIG_NAME).exists():
        return None
    for name, (detect, _) in NATIVE_FORMATS.items():
        if detect(path):
            return name
    return None


def load_native_checkpoint(path: str | os.PathLike, model_config: Any = None, **kwargs: Any) -> nn.Module:
    """Load an mlx-lm / MLX or hqq checkpoint, whichever ``path`` is (see the module docstring).

    Args:
        path: the checkpoint directory or file.
        model_config: the architecture, as for ``load_quantized_model``: ``None`` (the
            ``config.json`` beside the weights), a transformers config or dict, a callable that
            builds the model, or an ``nn.Module`` whose parameters are on meta.
        **kwargs: ``device``, ``backend``, ``expected_methods`` (as for ``load_quantized_model``).

    Raises:
        CheckpointError: not a native format, or the files are broken (the file and key named).
    """
    path = Path(path)
    name = detect_native_format(path)
    if name is None:
        raise _error(f"{path}: not a checkpoint format this package reads; accepted: {ACCEPTED_FORMATS}")
    return NATIVE_FORMATS[name][1](path, model_config, **kwargs)


# ------------------------------------------------------------------------------- shared steps
def _skeleton(where: Path, config: dict[str, Any] | None, model_config: Any) -> nn.Module:
    """The architecture with parameters on meta, from ``model_config`` or the checkpoint's config."""
    from .loading import build_skeleton

    if model_config is None and config is None:
        raise _error(f"{where}: the checkpoint holds no model config; pass model_config (the config.json "
                     f"dict, a transformers config, a callable that builds the model, or an nn.Module on meta)")
    try:
        return build_skeleton(model_config, config, where=str(where))
    except (ValueError, ImportError) as e:
        raise _error(str(e)) from e


def _restore_layers(where: Path, model: nn.Module, adapter: Any, config: QuantizationConfig,
                    linears: dict[str, nn.Linear], layers: dict[str, dict[str, Any]],
                    states: dict[str, dict[str, torch.Tensor]], kind: str) -> list[LayerDecision]:
    """Install an adapter layer filled from ``states`` for every quantized linear; the plan's decisions."""
    decisions = []
    for name, linear in linears.items():
        if name not in layers:
            decisions.append(LayerDecision(name, linear, None, f"not quantized in the {kind} checkpoint"))
            continue
        dtype = layers[name]["compute_dtype"]
        try:
            empty = adapter.create_quantized_linear(linear.in_features, linear.out_features, linear.bias is not None,
                                                    config=config.for_layer(name), device="meta", dtype=dtype)
            filled = adapter.load_layer_state(empty, states.pop(name))
        except ValueError as e:
            raise _error(f"{where}: layer {name!r} could not be restored: {e}") from e
        model.set_submodule(name, filled)
        decisions.append(LayerDecision(name, nn.Linear(linear.in_features, linear.out_features,
                                                       linear.bias is not None, device="meta", dtype=dtype),
                                       config.for_layer(name), None))
    return decisions


def _config_summary(method_of: Callable[[dict[str, Any]], QuantizationMethod],
                    layers: dict[str, dict[str, Any]], skip: list[str],
                    backend_options: Callable[[dict[str, Any]], dict[str, Any]]) -> QuantizationConfig:
    """One :class:`QuantizationConfig` describing ``layers`` (``name -> settings``) exactly: the most
    common settings are the config's own, every other layer gets an exact-name ``layer_configs``
    entry with the fields that differ, and ``skip`` (unquantized linear layers) is ``skip_modules``."""
    def key(s: dict[str, Any]) -> tuple:
        return tuple(sorted((k, str(v)) for k, v in s.items()))

    counts = Counter(key(s) for s in layers.values())
    base = next(s for s in layers.values() if key(s) == counts.most_common(1)[0][0])
    overrides = {}
    for name, settings in layers.items():
        diff = {k: v for k, v in settings.items() if v != base[k]}
        if "axis" in diff:
            diff["backend_options"] = backend_options(settings)
            del diff["axis"]
        if diff:
            overrides[name] = diff
    # An exact name also matches as a dotted path ("lm_head" covers "x.lm_head"): pin the layers an
    # override would reach by accident to the base settings.
    for name in layers:
        if name not in overrides and best_match(name, overrides) is not None:
            overrides[name] = {}
    fields = {k: v for k, v in base.items() if k != "axis"}
    config = QuantizationConfig(method=method_of(base), skip_modules=list(skip), layer_configs=overrides,
                                backend_options=backend_options(base), **fields)
    for name, settings in layers.items():
        got = config.for_layer(name)
        got = {"axis": got.backend_options.get("axis", 1), **{k: getattr(got, k) for k in settings if k != "axis"}}
        if any(got[k] != v for k, v in settings.items()):  # pragma: no cover - guarded by construction
            raise AssertionError(f"layer_configs do not reproduce {name}: {got} != {settings}")
    return config


def _check_method(where: Path, config: QuantizationConfig, expected_methods: Iterable | None) -> None:
    if expected_methods is None:
        return
    expected = tuple(QuantizationMethod.parse(m) for m in expected_methods)
    if config.method not in expected:
        raise _error(f"{where} is a {config.method.value!r} checkpoint; this adapter serves "
                     f"{', '.join(m.value for m in expected)} (use the module-level load_quantized_model "
                     f"to load any method)")


def _fill(where: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Assign the non-quantized tensors, tie weights, and make sure nothing is left on meta."""
    current = model.state_dict(keep_vars=True)
    unexpected = sorted(set(tensors) - set(current))
    if unexpected:
        raise _error(f"{where}: the checkpoint has tensors the architecture does not: "
                     f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for key, value in tensors.items():
        if tuple(current[key].shape) != tuple(value.shape):
            raise _error(f"{where}: tensor {key!r} has shape {tuple(value.shape)} in the checkpoint, "
                         f"{tuple(current[key].shape)} in the architecture")
    model.load_state_dict(tensors, strict=False, assign=True)
    if hasattr(model, "tie_weights") and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.tie_weights()
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                 if t.device.type == "meta"]
    computed = [n for n in leftovers if n not in current]  # non-persistent buffers (rotary tables)
    if computed:
        raise _error(f"{where}: buffers {computed[:10]} are on the meta device and the model's _init_weights "
                     f"does not compute them; native checkpoints do not hold buffers the model computes itself. "
                     f"Pass model_config as a module built with real buffers (accelerate's "
                     f"init_empty_weights(include_buffers=False)), or as a config or callable whose model computes them")
    if leftovers:
        raise _error(f"{where}: the checkpoint lacks tensors the architecture needs: "
                     f"{leftovers[:10]}{' ...' if len(leftovers) > 10 else ''}")


def _finish(model: nn.Module, adapter, decisions: list, device: str | torch.device) -> nn.Module:
    from .surgery import record_plan

    record_plan(model, adapter, decisions, warn_if_unchanged=False)  # (catch_warnings is process-wide)
    device = torch.device(device)
    if device.type != "cpu":
        model.to(device)
    return model.eval()


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _submodule(where: Path, model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise _error(f"{where}: {what} names module {name!r}, which the architecture does not have") from None


# ------------------------------------------------------------------------------- MLX / mlx-lm
class _NpzTensors:
    """The arrays of an ``.npz`` (``mx.savez``) as torch tensors, read one at a time, no pickle."""

    def __init__(self, path: Path):
        import numpy as np

        self.path = path
        try:
            self._npz = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise _error(f"{path}: not a readable .npz file ({e})") from e
        self.names = list(self._npz.files)

    def keys(self) -> list[str]:
        return self.names

    def read(self, key: str) -> torch.Tensor:
        import numpy as np

        try:
            array = self._npz[key]
        except Exception as e:  # zipfile.BadZipFile (CRC), ValueError (object arrays), ...
            raise _error(f"{self.path}: array {key!r} could not be read ({type(e).__name__}: {e})") from e
        if array.dtype == np.dtype("V2"):
            # numpy has no bfloat16: mx.savez writes bfloat16 arrays as 2-byte void ('<V2'), and
            # mx.load reads '<V2' back as bfloat16. Reinterpret the bits the same way.
            return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
        if array.dtype.kind not in "fiub":
            raise _error(f"{self.path}: array {key!r} has dtype {array.dtype}, which is not a tensor dtype "
                         f"MLX writes")
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        return torch.from_numpy(np.ascontiguousarray(array))

    def close(self) -> None:
        self._npz.close()


class _SafetensorsTensors:
    """The tensors of one or more safetensors files (positioned reads, no memory map)."""

    def __init__(self, path: Path):
        from .loading import CheckpointFiles, SafetensorsReader

        self.path = path
        try:
            if path.is_dir():
                self._files = CheckpointFiles(path)
                readers = self._files.readers
            else:
                self._files = SafetensorsReader(path)
                readers = [self._files]
        except ValueError as e:
            raise _error(str(e)) from e
        self._where = {key: reader for reader in readers for key in reader.keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def read(self, key: str) -> torch.Tensor:
        reader = self._where[key]
        try:
            return reader.read(key)
        except ValueError as e:
            raise _error(str(e)) from e

    def close(self) -> None:
        self._files.close()


def _safetensors_keys(path: Path) -> tuple[list[str], dict[str, str]]:
    from .loading import SafetensorsReader

    try:
        with SafetensorsReader(path) as reader:
            return reader.keys(), reader.metadata
    except ValueError:
        return [], {}


def _has_mlx_tensors(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return any(k.endswith(".scales") and k[: -len("scales")] + "biases" in keys for k in keys)


def _is_mlx(path: Path) -> bool:
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
        return bool(shards) and config.exists() and not (path / _HQQ_WEIGHTS).exists() and \
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
    from .adapters.mlx import MLX_BITS, MLX_GROUP_SIZES

    rows, width = (module.out_features, module.in_features) if isinstance(module, nn.Linear) else \
        (module.num_embeddings, module.embedding_dim)
    shape = f"{rows}x{width} {type(module).__name__}"
    if weight.ndim != 2 or scales.ndim != 2 or weight.shape[0] != rows or scales.shape[0] != rows or \
            scales.shape[1] == 0:
        raise _error(f"{where}: {name}.weight {tuple(weight.shape)} / .scales {tuple(scales.shape)} do not fit "
                     f"the architecture's {shape}")
    bits, rem = divmod(weight.shape[1] * 32, width)
    group, grem = divmod(width, scales.shape[1])
    if rem or grem or bits not in MLX_BITS or group not in MLX_GROUP_SIZES:
        raise _error(f"{where}: {name}.weight {tuple(weight.shape)} / .scales {tuple(scales.shape)} are not an "
                     f"MLX affine packing of the architecture's {shape} (bits {MLX_BITS}, group sizes "
                     f"{MLX_GROUP_SIZES})")
    return bits, group


def _mlx_quantization(where: Path, entry: Any) -> dict[str, Any] | None:
    if entry is None:
        return None
    if not isinstance(entry, dict) or not {"group_size", "bits"} <= set(entry):
        raise _error(f"{where}: 'quantization' must be a dict with 'group_size' and 'bits' (as mlx-lm writes), "
                     f"got {entry!r}")
    mode = entry.get("mode", "affine")
    if mode != "affine":
        raise _error(f"{where}: quantization mode {mode!r} is not supported; only MLX's 'affine' mode "
                     f"(packed weight + scales + biases) maps onto MLXQuantizedLinear")
    return entry


@_native_format("mlx", _is_mlx)
def load_mlx_checkpoint(path: str | os.PathLike, model_config: Any = None, *, device: str | torch.device = "cpu",
                        backend=None, expected_methods: Iterable | None = None, verify: bool = True) -> nn.Module:
    """Load an mlx-lm directory, or an MLX ``.npz`` / ``.safetensors`` file, into the PyTorch model.

    Args:
        path: an mlx-lm directory (``config.json`` + ``model*.safetensors``), or one ``.npz`` /
            ``.safetensors`` file of mlx-lm's tensors.
        model_config: the architecture (see :func:`load_native_checkpoint`); required for a single
            file. A dict may carry mlx-lm's ``quantization`` entry, which is then checked too.
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
    from .serialization import _layer_adapter

    path = Path(path)
    config_json: dict[str, Any] | None = None
    if path.is_dir():
        file = path / "config.json"
        if not file.exists():
            raise _error(f"{path}: no config.json; an mlx-lm checkpoint directory has one with a 'quantization' entry")
        file = confined_file(path, "config.json", "the checkpoint")
        if not file.is_file():
            raise _error(f"{path}: no config.json; an mlx-lm checkpoint directory has one with a 'quantization' entry")
        try:
            config_json = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _error(f"{file}: invalid JSON ({e})") from e
        if "quantization" not in config_json:
            raise _error(f"{file} has no 'quantization' entry, so this is not an mlx-lm quantized checkpoint "
                         f"(mlx-lm writes e.g. \"quantization\": {{\"group_size\": 64, \"bits\": 4}}); add it, or "
                         f"load full-precision checkpoints with load_and_quantize")
        quant = _mlx_quantization(file, config_json["quantization"])
        source: Any = _SafetensorsTensors(path)
    else:
        if model_config is None:
            raise _error(f"{path}: a single MLX weights file holds no model config; pass model_config (mlx-lm's "
                         f"config.json as a dict, a transformers config, a callable or an nn.Module on meta)")
        quant = _mlx_quantization(path, model_config.get("quantization")) if isinstance(model_config, dict) else None
        source = _NpzTensors(path) if path.suffix == ".npz" else _SafetensorsTensors(path)
    try:
        model = _skeleton(path, config_json, model_config)
        keys = set(source.keys())
        prefixes = sorted(k[: -len(".scales")] for k in keys if k.endswith(".scales"))
        if not prefixes:
            raise _error(f"{path}: no '<layer>.scales' tensors; nothing in it is MLX-quantized")
        linears = _linear_layers(model)
        layers: dict[str, dict[str, Any]] = {}
        states: dict[str, dict[str, torch.Tensor]] = {}
        embeddings: list[str] = []
        for name in prefixes:
            module = _submodule(path, model, name, f"tensor {name}.scales")
            if not isinstance(module, _MLX_QUANTIZED_TYPES):
                raise _error(f"{path}: {name} is quantized in the checkpoint but is a {type(module).__name__} in the "
                             f"architecture; only Linear (and Embedding) layers can be loaded")
            wanted = ["weight", "scales", "biases"] + (["bias"] if getattr(module, "bias", None) is not None else [])
            absent = [f"{name}.{k}" for k in wanted if f"{name}.{k}" not in keys]
            if absent:
                raise _error(f"{path}: quantized layer {name!r} lacks tensors {absent}")
            state = {k: source.read(f"{name}.{k}") for k in wanted}
            keys -= {f"{name}.{k}" for k in wanted}
            bits, group = _mlx_settings(path, name, module, state["weight"], state["scales"])
            if quant is not None:
                entry = quant.get(name, quant)
                if entry is False or not isinstance(entry, dict):
                    raise _error(f"{path}: 'quantization' says {name!r} is not quantized, but the checkpoint holds "
                                 f"{name}.scales")
                if entry.get("mode", "affine") != "affine":
                    raise _error(f"{path}: 'quantization' gives {name!r} mode {entry['mode']!r}; only MLX's "
                                 f"'affine' mode maps onto MLXQuantizedLinear")
                if (entry.get("bits"), entry.get("group_size")) != (bits, group):
                    raise _error(f"{path}: 'quantization' gives {name!r} bits={entry.get('bits')}, "
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
                raise _error(f"{path}: 'quantization' has settings for {stale}, which have no .scales in the "
                             f"checkpoint (missing tensors?)")
        if not layers:
            raise _error(f"{path}: no linear layer is quantized (only embeddings {embeddings}); nothing to load "
                         f"as MLXQuantizedLinear")

        skip = [n for n in linears if n not in layers]
        config = _config_summary(_mlx_method, layers, skip, lambda s: {})
        _check_method(path, config, expected_methods)
        adapters: dict = {}
        adapter = _layer_adapter(config, config.method.value, backend, adapters)
        decisions = _restore_layers(path, model, adapter, config, linears, layers, states, "MLX")
        rest = {k: source.read(k) for k in sorted(keys)}
        for name in embeddings:
            rest[f"{name}.weight"] = _dequantized_embedding(path, name, states.pop(name), model)
    finally:
        source.close()
    _fill(path, model, rest)
    return _finish(model, adapter, decisions, device)


def _mlx_method(settings: dict[str, Any]) -> QuantizationMethod:
    return QuantizationMethod.MLX_INT8 if settings["bits"] == 8 else QuantizationMethod.MLX_INT4


def _dequantized_embedding(where: Path, name: str, state: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    from .adapters.mlx import affine_dequantize

    module = model.get_submodule(name)
    bits, group = _mlx_settings(where, name, module, state["weight"], state["scales"])
    weight = affine_dequantize(state["weight"].view(torch.uint32), state["scales"], state["biases"], group, bits)
    warnings.warn(f"{where}: {name} is a quantized embedding ({bits}-bit, group {group}); PyTorch has no quantized "
                  f"embedding, so it is loaded dequantized ({weight.numel() * weight.element_size() / 2**20:.1f} MiB "
                  f"of {dtype_to_str(weight.dtype)}, values identical to mx.dequantize)", stacklevel=4)
    return weight


# ------------------------------------------------------------------------------- hqq
def _is_hqq(path: Path) -> bool:
    if path.is_dir():
        return (path / _HQQ_WEIGHTS).is_file()
    return path.suffix in _PT_SUFFIXES


def _torch_load(file: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain values only, never arbitrary objects."""
    import pickle

    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line),
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise _error(f"{file}: refused to load: it holds pickled objects other than tensors and plain values "
                     f"({detail}). Files are read with torch.load(weights_only=True) only, which never runs "
                     f"pickled code. If you wrote the file and trust it, re-save the state with plain values: "
                     f"tensors, ints, floats, bools, strings, torch dtypes and torch.Size, in dicts (what "
                     f"HQQLinear.state_dict() and hqq's save_quantized produce)") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise _error(f"{file}: not a readable torch.save file ({type(e).__name__}: {e})") from e


def _is_layer_state(data: Any) -> bool:
    return isinstance(data, dict) and "W_q" in data


def _encode_hqq_state(where: str, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """hqq's raw layer state (ints, strings, dtypes, ``torch.Size``) in its safetensors encoding --
    what :meth:`HQQAdapter.load_layer_state` decodes from an allow-list -- as
    ``hqq.core.utils.encode_safetensor_type`` writes it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.detach()
        elif isinstance(value, bool):
            out[key] = torch.tensor(int(value), dtype=torch.uint8)
        elif isinstance(value, torch.Size):
            out[key] = torch.tensor(list(value))
        elif isinstance(value, int):
            out[key] = torch.tensor(value, dtype=torch.int32)
        elif isinstance(value, float):
            out[key] = torch.tensor(value, dtype=torch.float32)
        elif isinstance(value, torch.dtype):
            out[key] = torch.tensor(list(str(value).encode("ascii")), dtype=torch.uint8)
        elif isinstance(value, str):
            out[key] = torch.tensor(list(value.encode("ascii")), dtype=torch.uint8)
        elif value is None and key == "group_size":
            continue  # one group per row/column: filled in below from the shape and axis
        else:
            raise _error(f"{where}: HQQ state value {key!r} is a {type(value).__name__}; expected tensors, "
                         f"ints, bools, strings, dtypes or torch.Size")
    if "group_size" not in out and "shape" in out and "axis" in out:
        out_features, in_features = (int(v) for v in out["shape"].tolist())
        group = in_features if int(out["axis"].item()) == 1 else out_features
        out["group_size"] = torch.tensor(group, dtype=torch.int32)
    return out


def _hqq_layer_settings(where: str, state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], bool, torch.Size]:
    """The :class:`QuantizationConfig` fields one hqq layer state implies, its bias flag and shape."""
    from .adapters.hqq import _decode_state

    try:
        raw = _decode_state(dict(state))
    except ValueError as e:
        raise _error(f"{where}: {e}") from e
    storage = raw["W_q"].dtype if raw["view_as_float"] else None
    settings = {"bits": raw["nbits"], "group_size": raw["group_size"], "compute_dtype": raw["compute_dtype"],
                "storage_dtype": storage, "axis": raw["axis"]}
    return settings, "bias" in raw, raw["shape"]


def _hqq_options(settings: dict[str, Any]) -> dict[str, Any]:
    return {"axis": settings["axis"]} if settings["axis"] != 1 else {}


def _hqq_layer_config(where: str, settings: dict[str, Any]) -> QuantizationConfig:
    fields = {k: v for k, v in settings.items() if k != "axis"}
    try:
        return QuantizationConfig(method="hqq", backend_options=_hqq_options(settings), **fields)
    except ValueError as e:
        raise _error(f"{where}: the HQQ layer's settings are not supported: {e}") from e


def _hqq_single_layer(file: Path, state: dict[str, Any], backend) -> nn.Module:
    from .adapters.hqq import HQQAdapter

    encoded = _encode_hqq_state(str(file), state)
    settings, bias, shape = _hqq_layer_settings(str(file), encoded)
    config = _hqq_layer_config(str(file), settings)
    adapter = HQQAdapter(config, backend)
    out_features, in_features = shape
    try:
        empty = adapter.create_quantized_linear(in_features, out_features, bias, device="meta",
                                                dtype=settings["compute_dtype"])
        return adapter.load_layer_state(empty, encoded).eval()
    except ValueError as e:
        raise _error(f"{file}: the HQQ layer could not be restored: {e}") from e


@_native_format("hqq", _is_hqq)
def load_hqq_checkpoint(path: str | os.PathLike, model_config: Any = None, *, device: str | torch.device = "cpu",
                        backend=None, expected_methods: Iterable | None = None, verify: bool = True) -> nn.Module:
    """Load hqq's own serialization.

    Args:
        path: a directory written by hqq's ``AutoHQQHFModel.save_quantized`` (``qmodel.pt`` +
            ``config.json``), or a ``.pt`` / ``.pth`` file holding either one
            ``HQQLinear.state_dict()`` (raw or encoded) or hqq's ``{module name: state}`` dict
            (then ``model_config`` is needed).
        model_config: the architecture (see :func:`load_native_checkpoint`).
        device: where to place the result.
        backend: backend for the adapter (``None``: detect).
        expected_methods: raise unless ``hqq`` is one of these.
        verify: accepted for symmetry with ``load_quantized_model``; native files carry no checksums.

    Returns:
        For one layer state: that layer (an ``HQQLinear``). Otherwise the model in eval mode, its
        ``HQQLinear`` layers those whose state holds ``W_q``, with its ``quantization_plan`` and
        ``quantization_config`` (method ``hqq``; per-layer bits, group size, axis, storage dtype
        in ``layer_configs``).

    Raises:
        CheckpointError: a file that needs more than ``torch.load(weights_only=True)``, missing
            files, layers or tensors, states hqq cannot load faithfully (all named).
    """
    from .serialization import _layer_adapter

    path = Path(path)
    config_json = None
    if path.is_dir():
        file = confined_file(path, _HQQ_WEIGHTS, "the checkpoint")
        if not file.is_file():
            raise _error(f"{path}: no {_HQQ_WEIGHTS}; hqq's save_quantized writes the weights there")
        if model_config is None:
            config_file = confined_file(path, "config.json", "the checkpoint")
            if not config_file.exists():
                raise _error(f"{path}: no config.json beside {_HQQ_WEIGHTS}; pass model_config")
            try:
                config_json = json.loads(config_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise _error(f"{config_file}: invalid JSON ({e})") from e
    else:
        file = path
        if not file.is_file():
            raise _error(f"checkpoint not found: {file}")
    data = _torch_load(file)
    if _is_layer_state(data):
        if expected_methods is not None:
            _check_method(file, QuantizationConfig(method="hqq"), expected_methods)
        layer = _hqq_single_layer(file, data, backend)
        return layer if torch.device(device).type == "cpu" else layer.to(device)
    if not isinstance(data, dict) or not data or not all(isinstance(k, str) and isinstance(v, dict)
                                                         for k, v in data.items()):
        raise _error(f"{file}: expected hqq's layout, {{module name: state dict}} (save_quantized) or one "
                     f"HQQLinear state dict with 'W_q'; got {type(data).__name__}"
                     f"{' with keys ' + str(list(data)[:5]) if isinstance(data, dict) else ''}")
    model = _skeleton(path, config_json, model_config)
    linears = _linear_layers(model)
    layers: dict[str, dict[str, Any]] = {}
    encoded: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, state in data.items():
        module = _submodule(file, model, name, "the weights file")
        where = f"{file}: layer {name!r}"
        if "W_q" not in state:
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    raise _error(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
                rest[f"{name}.{key}" if name else key] = value.detach()
            continue
        if not isinstance(module, nn.Linear):
            raise _error(f"{where} is an HQQ layer in the checkpoint but a {type(module).__name__} in the architecture")
        encoded[name] = _encode_hqq_state(where, state)
        settings, bias, shape = _hqq_layer_settings(where, encoded[name])
        if tuple(shape) != (module.out_features, module.in_features) or bias != (module.bias is not None):
            raise _error(f"{where} is {shape[0]}x{shape[1]} ({'with' if bias else 'no'} bias) in the checkpoint, "
                         f"{module.out_features}x{module.in_features} ({'with' if module.bias is not None else 'no'} "
                         f"bias) in the architecture")
        layers[name] = settings
    if not layers:
        raise _error(f"{file}: no HQQ layer (no state with 'W_q'); nothing is quantized")

    skip = [n for n in linears if n not in layers]
    try:
        config = _config_summary(lambda s: QuantizationMethod.HQQ, layers, skip, _hqq_options)
    except ValueError as e:
        raise _error(f"{file}: the HQQ layers' settings are not supported: {e}") from e
    _check_method(file, config, expected_methods)
    adapter = _layer_adapter(config, "hqq", backend, {})
    decisions = _restore_layers(file, model, adapter, config, linears, layers, encoded, "hqq")
    _fill(file, model, rest)
    return _finish(model, adapter, decisions, device)
