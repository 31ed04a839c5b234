"""What a checkpoint says about itself: the description (``quantization_config.json``, or the
``quantization_wrapper`` metadata of a single ``.safetensors`` file) read and checked against its
schema, the names and constants of the format, and the config and adapter of each planned layer.

Layout of a checkpoint directory::

    model.safetensors                  (or model-00001-of-0000N.safetensors ... + model.safetensors.index.json)
    quantization_config.json           format version, QuantizationConfig, per-layer plan, library
                                       versions, tied tensors, sha256 + size of every file
    config.json                        the transformers config, when the model has one
    quantization_map.json              optimum-quanto layers: what ``optimum.quanto.requantize`` reads
    non_persistent_buffers.safetensors buffers loading would not rebuild (``__buffer__.<name>``), if any
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..config import QuantizationConfig, QuantizationMethod
from ..errors import CheckpointError
from ..registry import Adapter, build_adapter
from .files import DESCRIPTION_NAME, confined_file, recover

__all__ = [
    "FORMAT_VERSION",
    "QUANT_CONFIG_NAME",
    "WEIGHTS_NAME",
    "INDEX_NAME",
    "BUFFER_PREFIX",
    "BUFFERS_NAME",
    "ACCEPTED_FORMATS",
    "library_versions",
    "layer_adapter",
    "layer_config",
    "read_description_file",
    "read_checkpoint_info",
]

FORMAT_VERSION = 1
QUANT_CONFIG_NAME = DESCRIPTION_NAME
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

#: Non-persistent buffers a skeleton would not rebuild as the model holds them are saved under this
#: prefix (``__buffer__.model.rotary_emb.inv_freq``) in :data:`BUFFERS_NAME`, a file no peer reads:
#: mlx-lm loads ``model*.safetensors`` strictly and transformers the files its index names.
BUFFER_PREFIX = "__buffer__."
BUFFERS_NAME = "non_persistent_buffers.safetensors"

#: One line per checkpoint layout :func:`~quantization_wrapper.checkpoint.load.load_quantized_model` reads.
ACCEPTED_FORMATS = (
    "a quantization-wrapper directory (quantization_config.json) or single .safetensors file; "
    "an mlx-lm directory (config.json with a 'quantization' entry + model*.safetensors); "
    "an MLX .npz or .safetensors file of <layer>.weight/.scales/.biases (with model_config); "
    "an hqq save_quantized directory (qmodel.pt + config.json); "
    "an hqq .pt/.pth file holding one HQQLinear state dict"
)
_LIBRARIES = ("torch", "safetensors", "bitsandbytes", "hqq", "optimum-quanto", "mlx", "transformers", "peft")


def library_versions() -> dict[str, str]:
    """Versions of the libraries a checkpoint's layers depend on, as installed (the description
    records them)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def layer_adapter(config: QuantizationConfig, method: QuantizationMethod | str, backend: Any = None,
                  cache: dict | None = None) -> Adapter:
    """The adapter of the layers of ``method`` in a model quantized with ``config``: built for
    ``config`` itself when it is ``method``'s, else for ``config`` switched to ``method`` (with that
    method's defaults); one per method in ``cache`` when given."""
    cache = {} if cache is None else cache
    key = QuantizationMethod.parse(method)
    if key not in cache:
        cache[key] = build_adapter(config if config.method is key else config.with_overrides(method=key), backend)
    return cache[key]


def layer_config(config: QuantizationConfig, layer: dict) -> QuantizationConfig:
    """The config of one planned layer (a ``plan.layers`` entry of the description, as a dict):
    ``config``'s for the layer's name, with the bits and group size the plan recorded."""
    cfg = config.for_layer(layer["name"])
    return cfg.replace(bits=layer["bits"], group_size=layer["group_size"]) if cfg.method.value == layer["method"] else \
        QuantizationConfig(method=layer["method"], bits=layer["bits"], group_size=layer["group_size"],
                           compute_dtype=cfg.compute_dtype, storage_dtype=cfg.storage_dtype,
                           backend_options=cfg.backend_options, skip_modules=[])


def read_description_file(desc: Path) -> Any:
    """The JSON in ``desc`` (a checkpoint's description or ``config.json``).

    Raises:
        CheckpointError: naming the file: unreadable, a directory, not UTF-8, or not JSON.
    """
    try:
        raw = desc.read_bytes()
    except IsADirectoryError:
        raise CheckpointError(f"{desc}: is a directory, not the checkpoint's JSON description") from None
    except OSError as e:
        raise CheckpointError(f"{desc}: cannot be read ({e.strerror})") from e
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{desc}: not UTF-8 text (byte {e.start}); the description is damaged") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{desc}: invalid JSON ({e})") from e


def read_checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON description of a checkpoint (directory or single file), checked against its schema.

    Raises:
        CheckpointError: naming the file and the field that is missing or has the wrong type.
    """
    path = Path(path)
    if not path.exists():
        recover(path)  # a save that died between its two renames leaves the checkpoint aside
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        if "quantization_wrapper" not in meta:
            raise CheckpointError(f"{path}: safetensors file has no quantization-wrapper description in its metadata "
                                  f"(nor MLX-quantized tensors); accepted: {ACCEPTED_FORMATS}")
        source = f"{path} (metadata 'quantization_wrapper')"
        try:
            info = json.loads(meta["quantization_wrapper"])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{source}: invalid JSON ({e})") from e
    else:
        recover(path)
        desc = path / QUANT_CONFIG_NAME
        if not desc.exists() and not desc.is_symlink():
            raise CheckpointError(f"{path}: no {QUANT_CONFIG_NAME}; not a quantization-wrapper checkpoint, nor a "
                                  f"native format this package reads; accepted: {ACCEPTED_FORMATS}")
        confined_file(path, QUANT_CONFIG_NAME, "the checkpoint")
        source = str(desc)
        info = read_description_file(desc)
    _check_description(info, source, directory=path.is_dir())
    return info


def _check_description(info: Any, source: str, *, directory: bool) -> None:
    """Raise ``CheckpointError(source: field ...)`` unless ``info`` has the description's schema."""

    def bad(field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{source}: field {field} {problem}; the description is damaged or was not "
                               f"written by quantization-wrapper")

    def typed(value: Any, kind: type | tuple, field: str, what: str) -> Any:
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise bad(field, f"must be {what}, got {type(value).__name__} {value!r:.60}")
        return value

    typed(info, dict, "<top level>", "a JSON object")
    if "format" in info and info["format"] != "quantization-wrapper":
        raise bad("format", f"is {info['format']!r}, expected 'quantization-wrapper'")
    version = info.get("format_version")
    typed(version, int, "format_version", "an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{source}: format_version {version} is newer than this quantization-wrapper "
                              f"understands ({FORMAT_VERSION}); upgrade the package")
    if version < 1:
        raise bad("format_version", f"is {version}; versions start at 1")
    for field in ("quantization_config", "plan"):
        if field not in info:
            raise bad(field, "is missing")
    try:
        QuantizationConfig.from_dict(typed(info["quantization_config"], dict, "quantization_config", "an object"))
    except (ValueError, TypeError) as e:
        raise bad("quantization_config", f"is invalid ({e})") from e
    plan = typed(info["plan"], dict, "plan", "an object")
    typed(plan.get("method"), str, "plan.method", "a string")
    layers = typed(plan.get("layers"), list, "plan.layers", "a list")
    kinds = {"name": str, "in_features": int, "out_features": int, "bias": bool, "method": str,
             "bytes_before": int, "bytes_after": int, "status": str}
    seen: set[str] = set()
    for i, layer in enumerate(layers):
        where = f"plan.layers[{i}]"
        typed(layer, dict, where, "an object")
        unknown = sorted(set(layer) - set(kinds) - {"bits", "group_size", "reason"})
        if unknown:
            raise bad(f"{where}", f"has unknown keys {unknown}")
        for key, kind in kinds.items():
            if key not in layer:
                raise bad(f"{where}.{key}", "is missing")
            typed(layer[key], kind, f"{where}.{key}", "a " + kind.__name__)
        for key in ("bits", "group_size"):
            if layer.get(key) is not None:
                typed(layer[key], int, f"{where}.{key}", "an integer or null")
        if layer["in_features"] <= 0 or layer["out_features"] <= 0:
            raise bad(f"{where}", "has a non-positive shape")
        if layer["status"] not in ("quantized", "float", "skipped"):
            raise bad(f"{where}.status", f"is {layer['status']!r}; allowed: quantized, float, skipped")
        if layer["status"] != "skipped":
            try:
                QuantizationMethod.parse(layer["method"])
            except ValueError as e:
                raise bad(f"{where}.method", f"is invalid ({e})") from e
        if layer["name"] in seen:
            raise bad(f"{where}.name", f"repeats layer {layer['name']!r}")
        seen.add(layer["name"])
    for field in ("tied", "libraries"):
        value = typed(info.get(field, {}), dict, field, "an object")
        for k, v in value.items():
            typed(v, str, f"{field}[{k!r}]", "a string")
    if "config" in info:
        typed(info["config"], dict, "config", "an object")
    if directory:
        files = info.get("files")
        if files is None:
            raise bad("files", "is missing (it lists every file with its size and checksums)")
        typed(files, dict, "files", "an object")
        if not files:
            raise bad("files", "is empty; without it nothing could be verified")
        for name, rec in files.items():
            where = f"files[{name!r}]"
            typed(rec, dict, where, "an object")
            size = typed(rec.get("size"), int, f"{where}.size", "an integer")
            if size < 0:
                raise bad(f"{where}.size", f"is negative ({size})")
            digest = typed(rec.get("sha256"), str, f"{where}.sha256", "a hex string")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise bad(f"{where}.sha256", "is not 64 lower-case hex digits")
            if "block_size" in rec or "block_crc32" in rec:
                block = typed(rec.get("block_size"), int, f"{where}.block_size", "an integer")
                sums = typed(rec.get("block_crc32"), list, f"{where}.block_crc32", "a list")
                if block <= 0 or len(sums) != -(-size // block):
                    raise bad(f"{where}.block_crc32", f"has {len(sums)} sums for {size} bytes in blocks of {block}")
                for v in sums:
                    typed(v, int, f"{where}.block_crc32[]", "an integer")
        if not any(n.endswith(".safetensors") for n in files):
            raise bad("files", "lists no .safetensors weights")
    else:
        crcs = typed(info.get("tensor_crc32"), dict, "tensor_crc32", "an object (a CRC-32 per tensor)")
        for k, v in crcs.items():
            typed(v, int, f"tensor_crc32[{k!r}]", "an integer")
