"""Quantization methods, the configuration dataclass and named presets.

A :class:`QuantizationConfig` describes *what* to do (method, bits, group size, dtypes, which
modules to skip, per-layer overrides); adapters decide *how*. Every field is validated when the
config is built, so a bad value fails at the line that wrote it, not deep inside a library.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable, Mapping

import torch

__all__ = [
    "QuantizationMethod",
    "QuantizationConfig",
    "METHOD_SPECS",
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


class QuantizationMethod(str, Enum):
    """Weight quantization methods. The value is the lower-case name (``"bnb_nf4"``)."""

    BNB_NF4 = "bnb_nf4"
    BNB_FP4 = "bnb_fp4"
    BNB_INT8 = "bnb_int8"
    HQQ = "hqq"
    MLX_INT4 = "mlx_int4"
    MLX_INT8 = "mlx_int8"
    QUANTO_INT2 = "quanto_int2"
    QUANTO_INT4 = "quanto_int4"
    QUANTO_INT8 = "quanto_int8"
    QUANTO_FP8 = "quanto_fp8"
    NONE = "none"

    @classmethod
    def parse(cls, value: "QuantizationMethod | str", field_name: str = "method") -> "QuantizationMethod":
        """Return the method for an enum member or its (case-insensitive) string value.

        Raises:
            ValueError: naming ``field_name``, the value and the allowed values.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for member in cls:
                if key in (member.value, member.name.lower()):
                    return member
        allowed = ", ".join(m.value for m in cls)
        raise ValueError(f"{field_name}={value!r} is not a quantization method; allowed: {allowed}")

    @property
    def family(self) -> str:
        """The library family: ``"bnb"``, ``"hqq"``, ``"mlx"``, ``"quanto"`` or ``"none"``."""
        return self.value.split("_")[0]


@dataclass(frozen=True)
class MethodSpec:
    """What a method allows: the bit widths, group sizes and the library that implements it."""

    library: str | None
    bits: tuple[int, ...]
    default_bits: int
    group_sizes: tuple[int, ...] | None  # None: any positive group size
    default_group_size: int | None
    description: str
    library_required: bool = True  # False: a pure-torch path works without the library


# bitsandbytes block sizes for 4-bit: powers of two it has kernels for.
_BNB_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)

METHOD_SPECS: dict[QuantizationMethod, MethodSpec] = {
    QuantizationMethod.BNB_NF4: MethodSpec("bitsandbytes", (4,), 4, _BNB_BLOCKS, 64,
                                           "bitsandbytes 4-bit NormalFloat (QLoRA)"),
    QuantizationMethod.BNB_FP4: MethodSpec("bitsandbytes", (4,), 4, _BNB_BLOCKS, 64,
                                           "bitsandbytes 4-bit float"),
    QuantizationMethod.BNB_INT8: MethodSpec("bitsandbytes", (8,), 8, None, None,
                                            "bitsandbytes LLM.int8() row-wise absmax"),
    QuantizationMethod.HQQ: MethodSpec("hqq", (1, 2, 3, 4, 8), 4, None, 64,
                                       "Half-Quadratic Quantization, calibration-free affine"),
    QuantizationMethod.MLX_INT4: MethodSpec("mlx", (2, 3, 4, 5, 6, 8), 4, (32, 64, 128), 64,
                                            "MLX affine packed format (mx.quantize)", library_required=False),
    QuantizationMethod.MLX_INT8: MethodSpec("mlx", (2, 3, 4, 5, 6, 8), 8, (32, 64, 128), 64,
                                            "MLX affine packed format, 8-bit", library_required=False),
    QuantizationMethod.QUANTO_INT2: MethodSpec("optimum-quanto", (2,), 2, None, 128,
                                               "optimum-quanto qint2 weights"),
    QuantizationMethod.QUANTO_INT4: MethodSpec("optimum-quanto", (4,), 4, None, 128,
                                               "optimum-quanto qint4 weights"),
    QuantizationMethod.QUANTO_INT8: MethodSpec("optimum-quanto", (8,), 8, None, None,
                                               "optimum-quanto qint8 weights, per output channel"),
    QuantizationMethod.QUANTO_FP8: MethodSpec("optimum-quanto", (8,), 8, None, None,
                                              "optimum-quanto qfloat8 (e4m3) weights"),
    QuantizationMethod.NONE: MethodSpec(None, (1, 2, 3, 4, 5, 6, 8, 16, 32), 16, None, None,
                                        "no quantization (fallback): weights stay in float"),
}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "uint8": torch.uint8, "int8": torch.int8,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LAYER_KEYS = ("method", "bits", "group_size", "compute_dtype", "storage_dtype", "double_quant",
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
        spec = METHOD_SPECS[self.method]
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
        elif self.method is QuantizationMethod.HQQ and self.group_size % 8:
            raise ValueError(f"group_size={self.group_size} is not valid for method='hqq'; it must be a "
                             f"multiple of 8 (e.g. 32, 64, 128)")

        is_bnb4 = self.method in (QuantizationMethod.BNB_NF4, QuantizationMethod.BNB_FP4)
        if self.quant_type is not None and self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type={self.quant_type!r} is not valid; allowed: nf4, fp4")
        if is_bnb4:
            implied = "fp4" if self.method is QuantizationMethod.BNB_FP4 else "nf4"
            if self.quant_type not in (None, implied):
                other = "bnb_fp4" if implied == "nf4" else "bnb_nf4"
                raise ValueError(f"quant_type={self.quant_type!r} contradicts method={self.method.value!r}; "
                                 f"use method={other!r} instead")
            self.quant_type = implied
            if self.double_quant is None:
                self.double_quant = True
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
        from .patterns import validate_pattern

        for name in self.skip_modules:
            validate_pattern(name, "skip_modules")

    def _validated_layer_configs(self, layer_configs: Any) -> dict[str, dict[str, Any]]:
        from .patterns import validate_pattern

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
            unknown = sorted(set(overrides) - set(_LAYER_KEYS))
            if unknown:
                raise ValueError(f"layer_configs[{pattern!r}] has unknown keys {unknown}; allowed: "
                                 f"{', '.join(_LAYER_KEYS)}")
            overrides = dict(overrides)
            try:  # normalize (strings -> enum/dtypes), then validate by building the layer config once
                if "method" in overrides:
                    overrides["method"] = QuantizationMethod.parse(overrides["method"], "method")
                for key in ("compute_dtype", "storage_dtype"):
                    if key in overrides:
                        overrides[key] = parse_dtype(overrides[key], key)
                self._merged(overrides)
            except ValueError as e:
                raise ValueError(f"layer_configs[{pattern!r}]: {e}") from e
            result[pattern] = overrides
        return result

    def _merged(self, overrides: Mapping[str, Any]) -> "QuantizationConfig":
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values.update(skip_modules=[], layer_configs={})
        if "method" in overrides and QuantizationMethod.parse(overrides["method"]) is not self.method:
            # A different method brings its own defaults unless the override sets them.
            method = QuantizationMethod.parse(overrides["method"])
            values.update(bits=None, group_size=None, quant_type=None, double_quant=None)
            if METHOD_SPECS[method].library != METHOD_SPECS[self.method].library:
                values.update(backend_options={})  # another library's options would not apply
        values.update(overrides)
        return QuantizationConfig(**values)

    # ------------------------------------------------------------------ per-layer resolution
    def for_layer(self, name: str) -> "QuantizationConfig":
        """The effective config of module ``name``: this config with the best-matching
        ``layer_configs`` override applied (no skip list, no further overrides)."""
        from .patterns import best_match

        pattern = best_match(name, self.layer_configs)
        return self._merged(self.layer_configs[pattern] if pattern is not None else {})

    def is_skipped(self, name: str) -> bool:
        """True when ``name`` matches ``skip_modules`` (see :mod:`quantization_wrapper.patterns`)."""
        from .patterns import best_match

        return best_match(name, self.skip_modules) is not None

    @property
    def bytes_per_weight(self) -> float:
        """Average stored bytes per quantized weight, metadata included (see ``planning``)."""
        from .recommend import bits_per_weight

        return bits_per_weight(self) / 8

    # ------------------------------------------------------------------ serialization
    @property
    def quant_method(self) -> str:
        """The name transformers files this config under (``from_pretrained(quantization_config=...)``,
        ``config.json``'s ``quantization_config``); see :mod:`quantization_wrapper.hf_quantizer`.
        transformers reads it first, so reading it registers our quantizer with transformers (once,
        and only when transformers is imported: this package never imports it on its own)."""
        if "transformers" in sys.modules:
            from .hf_quantizer import register_with_transformers

            register_with_transformers()
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
_PRESETS: dict[str, dict[str, Any]] = {
    "nf4": dict(method="bnb_nf4", double_quant=True, compute_dtype="bfloat16"),
    "fp4": dict(method="bnb_fp4", double_quant=True, compute_dtype="bfloat16"),
    "int8": dict(method="bnb_int8"),
    "hqq4": dict(method="hqq", bits=4, group_size=64),
    "hqq8": dict(method="hqq", bits=8, group_size=128),
    "hqq2": dict(method="hqq", bits=2, group_size=16),
    "mlx4": dict(method="mlx_int4", bits=4, group_size=64, compute_dtype="float16"),
    "mlx8": dict(method="mlx_int8", bits=8, group_size=64, compute_dtype="float16"),
    "quanto4": dict(method="quanto_int4"),
    "quanto8": dict(method="quanto_int8"),
    "none": dict(method="none"),
    # Attention at 8 bits, feed-forward at 4 bits (design document 002's mixed precision).
    "mixed_attn8_ffn4": dict(
        method="hqq", bits=4, group_size=64,
        layer_configs={"re:.*(attn|attention).*": {"bits": 8, "group_size": 128}},
    ),
}


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
