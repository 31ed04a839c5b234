"""Quantization methods, the configuration dataclass and named presets.

A :class:`QuantizationConfig` describes *what* to do (method, bits, group size, dtypes, which
modules to skip, per-layer overrides); adapters decide *how*. Every field is validated when the
config is built, so a bad value fails at the line that wrote it, not deep inside a library.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from .methods import METHOD_SPECS, MethodSpec, QuantizationMethod, method_spec
from .patterns import best_match, validate_pattern

__all__ = [
    "QuantizationMethod",
    "QuantizationConfig",
    "METHOD_SPECS",
    "bits_per_weight",
    "TYPICAL_IN_FEATURES",
    "LAYER_FIELDS",
    "MethodSpec",
    "CONFIG_FORMAT_VERSION",
    "parse_dtype",
    "dtype_to_str",
    "get_config",
    "register_config",
    "list_configs",
    "unregister_config",
]

CONFIG_FORMAT_VERSION = 1


_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "uint8": torch.uint8, "int8": torch.int8,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: The fields a ``layer_configs`` override may set.
LAYER_FIELDS = ("method", "bits", "group_size", "compute_dtype", "storage_dtype", "double_quant",
               "quant_type", "backend_options")


def parse_dtype(value: torch.dtype | str | None, field_name: str) -> torch.dtype | None:
    """Accept a ``torch.dtype`` or its name (``"bfloat16"``, ``"torch.float16"``, ``"bf16"``)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(
        f"{field_name}={value!r} is not a dtype; allowed: a torch.dtype or one of "
        f"{', '.join(sorted(set(_DTYPES)))}"
    )


def dtype_to_str(dtype: torch.dtype | None) -> str | None:
    """``torch.bfloat16`` -> ``"bfloat16"`` (``None`` stays ``None``)."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


@dataclass
class QuantizationConfig:
    """How to quantize a model.

    Args:
        method: a :class:`QuantizationMethod` or its string value.
        bits: bit width; ``None`` derives it from the method (4 for NF4, 8 for INT8, ...).
        group_size: elements that share one scale (bitsandbytes block size, HQQ/MLX group size).
            ``None`` uses the method's default. Methods whose library fixes it (quanto) only accept
            their own value.
        compute_dtype: dtype of the matmul and of the dequantized weights.
        storage_dtype: dtype the packed weights are stored as. Set a float dtype (e.g.
            ``torch.bfloat16``) so FSDP can shard the quantized weights with the rest of the model.
        double_quant: quantize the bitsandbytes 4-bit scales again (about 0.37 bits/weight saved).
            ``None`` means the method's default (``True`` for bitsandbytes 4-bit); other methods
            ignore it and validation says so when it is set.
        quant_type: ``"nf4"`` or ``"fp4"`` (bitsandbytes 4-bit only; derived from the method).
        skip_modules: modules left in full precision; matching rules in
            :mod:`quantization_wrapper.patterns`.
        layer_configs: per-layer overrides, ``{pattern: {"bits": 8, ...}}``; keys follow the same
            matching rules, the most specific pattern wins.
        backend_options: library-specific options passed through to the adapter.
    """

    method: QuantizationMethod | str = QuantizationMethod.BNB_NF4
    bits: int | None = None
    group_size: int | None = None
    compute_dtype: torch.dtype | str | None = None
    storage_dtype: torch.dtype | str | None = None
    double_quant: bool | None = None
    quant_type: str | None = None
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    layer_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    backend_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.method = QuantizationMethod.parse(self.method)
        spec = method_spec(self.method)
        self.compute_dtype = parse_dtype(self.compute_dtype, "compute_dtype")
        self.storage_dtype = parse_dtype(self.storage_dtype, "storage_dtype")
        if self.compute_dtype is not None and self.compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype} is not a compute dtype; allowed: "
                             + ", ".join(dtype_to_str(d) for d in _COMPUTE_DTYPES))
        if self.storage_dtype is not None and self.storage_dtype not in _STORAGE_DTYPES:
            raise ValueError(f"storage_dtype={self.storage_dtype} cannot hold packed weights; allowed: "
                             + ", ".join(dtype_to_str(d) for d in _STORAGE_DTYPES))

        if self.bits is None:
            self.bits = spec.default_bits
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"bits={self.bits!r} must be an int; allowed for {self.method.value}: "
                             f"{', '.join(map(str, spec.bits))}")
        if self.bits not in spec.bits:
            raise ValueError(f"bits={self.bits} is not valid for method={self.method.value!r}; allowed: "
                             f"{', '.join(map(str, spec.bits))}")

        if self.group_size is None:
            self.group_size = spec.default_group_size
        elif isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size!r} must be a positive int (or None for the "
                             f"method's default)")
        elif spec.group_sizes is not None and self.group_size not in spec.group_sizes:
            raise ValueError(f"group_size={self.group_size} is not valid for method={self.method.value!r}; "
                             f"allowed: {', '.join(map(str, spec.group_sizes))}")
        if self.quant_type is not None and not isinstance(self.quant_type, str):
            raise ValueError(f"quant_type={self.quant_type!r} must be a string or None")
        if spec.normalize is not None:  # the fields only this method gives meaning to
            spec.normalize(self)
        if self.double_quant is not None and not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant={self.double_quant!r} must be True, False or None")
        if isinstance(self.skip_modules, str) or not isinstance(self.skip_modules, Iterable):
            raise ValueError(f"skip_modules={self.skip_modules!r} must be a list of module names or "
                             f"patterns, e.g. ['lm_head']")
        self.skip_modules = list(self.skip_modules)
        for name in self.skip_modules:
            if not isinstance(name, str) or not name:
                raise ValueError(f"skip_modules contains {name!r}; every entry must be a non-empty string")
        if not isinstance(self.backend_options, Mapping):
            raise ValueError(f"backend_options={self.backend_options!r} must be a dict")
        self.backend_options = dict(self.backend_options)
        self.layer_configs = self._validated_layer_configs(self.layer_configs)
        for name in self.skip_modules:
            validate_pattern(name, "skip_modules")

    def _validated_layer_configs(self, layer_configs: Any) -> dict[str, dict[str, Any]]:
        if not isinstance(layer_configs, Mapping):
            raise ValueError(f"layer_configs={layer_configs!r} must be a dict of "
                             f"{{module pattern: {{field: value}}}}")
        result: dict[str, dict[str, Any]] = {}
        for pattern, overrides in layer_configs.items():
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"layer_configs key {pattern!r} must be a non-empty module pattern")
            validate_pattern(pattern, "layer_configs")
            if not isinstance(overrides, Mapping):
                raise ValueError(f"layer_configs[{pattern!r}]={overrides!r} must be a dict of overrides")
            unknown = sorted(set(overrides) - set(LAYER_FIELDS))
            if unknown:
                raise ValueError(f"layer_configs[{pattern!r}] has unknown keys {unknown}; allowed: "
                                 f"{', '.join(LAYER_FIELDS)}")
            overrides = dict(overrides)
            try:  # normalize (strings -> enum/dtypes), then validate by building the layer config once
                if "method" in overrides:
                    overrides["method"] = QuantizationMethod.parse(overrides["method"], "method")
                for key in ("compute_dtype", "storage_dtype"):
                    if key in overrides:
                        overrides[key] = parse_dtype(overrides[key], key)
                self.with_overrides(overrides)
            except ValueError as e:
                raise ValueError(f"layer_configs[{pattern!r}]: {e}") from e
            result[pattern] = overrides
        return result

    def with_overrides(self, overrides: Mapping[str, Any] | None = None, /, **fields: Any) -> "QuantizationConfig":
        """The config of one layer: this config with per-layer ``overrides`` (a ``layer_configs``
        value, or keyword fields) applied, without ``skip_modules`` and ``layer_configs``. A different
        ``method`` brings its own default bits, group size and options unless the overrides set them,
        and drops another library's ``backend_options``.

        Raises:
            ValueError: an override is not a per-layer field, or the result is not a valid config.
        """
        overrides = {**(overrides or {}), **fields}
        unknown = sorted(set(overrides) - set(LAYER_FIELDS))
        if unknown:
            raise ValueError(f"with_overrides: unknown per-layer fields {unknown}; allowed: {', '.join(LAYER_FIELDS)}")
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values.update(skip_modules=[], layer_configs={})
        if "method" in overrides and QuantizationMethod.parse(overrides["method"]) is not self.method:
            # A different method brings its own defaults unless the override sets them.
            method = QuantizationMethod.parse(overrides["method"])
            values.update(bits=None, group_size=None, quant_type=None, double_quant=None)
            if method_spec(method).library != method_spec(self.method).library:
                values.update(backend_options={})  # another library's options would not apply
        values.update(overrides)
        return QuantizationConfig(**values)

    # ------------------------------------------------------------------ per-layer resolution
    def for_layer(self, name: str) -> "QuantizationConfig":
        """The effective config of module ``name``: this config with the best-matching
        ``layer_configs`` override applied (no skip list, no further overrides)."""
        pattern = best_match(name, self.layer_configs)
        return self.with_overrides(self.layer_configs[pattern] if pattern is not None else {})

    def is_skipped(self, name: str) -> bool:
        """True when ``name`` matches ``skip_modules`` (see :mod:`quantization_wrapper.patterns`)."""
        return best_match(name, self.skip_modules) is not None

    @property
    def bytes_per_weight(self) -> float:
        """Average stored bytes per quantized weight, metadata included (the method's declared size
        model, :attr:`MethodSpec.bits_per_weight`, at a typical 4096 input features)."""
        return bits_per_weight(self) / 8

    # ------------------------------------------------------------------ serialization
    @property
    def quant_method(self) -> str:
        """The name transformers files this config under (``from_pretrained(quantization_config=...)``,
        ``config.json``'s ``quantization_config``); see :mod:`quantization_wrapper.hf_quantizer`.
        transformers dispatches on it; our quantizer is registered with transformers as soon as
        transformers loads its quantizer registry (``hf_quantizer.register_when_transformers_loads``)."""
        return "quantization_wrapper"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (dtypes as strings) that :meth:`from_dict` turns back into this config
        (with ``quant_method``, the key transformers dispatches on)."""
        return {
            "quant_method": self.quant_method,
            "method": self.method.value,
            "bits": self.bits,
            "group_size": self.group_size,
            "compute_dtype": dtype_to_str(self.compute_dtype),
            "storage_dtype": dtype_to_str(self.storage_dtype),
            "double_quant": self.double_quant,
            "quant_type": self.quant_type,
            "skip_modules": list(self.skip_modules),
            "layer_configs": {
                k: {kk: (dtype_to_str(vv) if isinstance(vv, torch.dtype)
                         else vv.value if isinstance(vv, QuantizationMethod) else vv)
                    for kk, vv in v.items()}
                for k, v in self.layer_configs.items()
            },
            "backend_options": copy.deepcopy(self.backend_options),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantizationConfig":
        """Build a config from :meth:`to_dict` output (or a hand-written dict).

        Raises:
            ValueError: for unknown keys (the known keys are listed) or invalid values.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"QuantizationConfig.from_dict expects a dict, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known) - {"format_version", "quant_method"})
        if unknown:
            raise ValueError(f"unknown QuantizationConfig keys {unknown}; known keys: {', '.join(known)}")
        if data.get("quant_method", "quantization_wrapper") != "quantization_wrapper":
            raise ValueError(f"quant_method={data['quant_method']!r} is another library's config; this is "
                             f"quantization-wrapper's (quant_method 'quantization_wrapper')")
        version = data.get("format_version", CONFIG_FORMAT_VERSION)
        if not isinstance(version, int) or version > CONFIG_FORMAT_VERSION:
            raise ValueError(f"format_version={version!r} is newer than this quantization-wrapper "
                             f"understands ({CONFIG_FORMAT_VERSION}); upgrade the package")
        return cls(**{k: copy.deepcopy(v) for k, v in data.items() if k not in ("format_version", "quant_method")})

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "QuantizationConfig":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "QuantizationConfig":
        """A copy with ``changes`` applied and validated (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------- named presets
# Each backend registers its own presets (``register_config`` in its adapter module).
_PRESETS: dict[str, dict[str, Any]] = {}


def register_config(name: str, config: QuantizationConfig | Mapping[str, Any], *, overwrite: bool = False) -> None:
    """Register a named preset that :func:`get_config` returns.

    Args:
        name: the preset name (case-insensitive).
        config: a config or the dict form of one; validated now.
        overwrite: replace an existing preset of that name instead of raising.
    """
    key = name.strip().lower()
    if not key:
        raise ValueError("register_config: name must be a non-empty string")
    if key in _PRESETS and not overwrite:
        raise ValueError(f"a preset named {key!r} exists already; pass overwrite=True to replace it")
    data = config.to_dict() if isinstance(config, QuantizationConfig) else dict(config)
    QuantizationConfig.from_dict(data)
    _PRESETS[key] = data


def unregister_config(name: str) -> None:
    """Remove a preset registered with :func:`register_config`."""
    key = name.strip().lower()
    if key not in _PRESETS:
        raise ValueError(f"no preset named {name!r}; known: {', '.join(sorted(_PRESETS))}")
    del _PRESETS[key]


def get_config(name: str, **overrides: Any) -> QuantizationConfig:
    """A fresh config from a named preset, with ``overrides`` applied.

    Example: ``get_config("nf4", compute_dtype=torch.float16)``.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _PRESETS:
        raise ValueError(f"no preset named {name!r}; known presets: {', '.join(sorted(_PRESETS))}")
    data = copy.deepcopy(_PRESETS[key])
    data.update(overrides)
    return QuantizationConfig.from_dict(data)


def list_configs() -> list[str]:
    """Names of the registered presets."""
    return sorted(_PRESETS)


#: Input features assumed by :func:`bits_per_weight` when the layer's are not known.
TYPICAL_IN_FEATURES = 4096


def bits_per_weight(config: QuantizationConfig, in_features: int = TYPICAL_IN_FEATURES) -> float:
    """Stored bits per quantized weight for ``config``, every stored byte counted: the size model the
    method's backend declares (:attr:`MethodSpec.bits_per_weight`). Examples: NF4 with double
    quantization at block 64 -> 4.127; HQQ 4-bit at group 64 with fp16 scale and zero -> 4.5.

    Raises:
        ValueError: the method's backend declares no size model.
    """
    model = method_spec(config.method).bits_per_weight
    if model is None:
        raise ValueError(f"method={config.method.value!r} declares no size model (MethodSpec.bits_per_weight); "
                         f"its backend must declare one for sizing and recommendations")
    return float(model(config, in_features))
