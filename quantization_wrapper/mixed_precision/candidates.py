"""Candidate settings a layer may get: the method families, their default candidates and the
parsing of ``candidates=`` (bit widths, pairs, method names, dicts, configs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from ..config import METHOD_SPECS, QuantizationConfig, QuantizationMethod, dtype_to_str

__all__ = ["Candidate", "METHOD_FAMILIES", "parse_family", "default_candidates", "parse_candidates",
           "mixes_bit_widths"]

M = QuantizationMethod


class _Families(Mapping):
    """``{family: base method}`` for every family whose base method declares default mixed-precision
    candidates (:attr:`~quantization_wrapper.methods.MethodSpec.mixed_precision`), read from the
    method registry each time."""

    def _items(self) -> dict[str, QuantizationMethod]:
        return {m.family: m for m, spec in METHOD_SPECS.items() if spec.mixed_precision}

    def __getitem__(self, family: str) -> QuantizationMethod:
        return self._items()[family]

    def __iter__(self):
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


#: Method families and their base method; each base method declares the family's default candidates.
METHOD_FAMILIES: Mapping[str, QuantizationMethod] = _Families()


def _family_aliases() -> dict[str, str | None]:
    """Library names accepted for their family (``"bitsandbytes"`` -> ``"bnb"``), and ``"none"``."""
    out: dict[str, str | None] = {METHOD_SPECS[m].library: f for f, m in METHOD_FAMILIES.items()
                                  if METHOD_SPECS[m].library and METHOD_SPECS[m].library != f}
    out["none"] = None
    return out


@dataclass(frozen=True)
class Candidate:
    """One setting a layer may get: overrides applied on top of the base config.

    Attributes:
        overrides: ``layer_configs``-style fields, e.g. ``{"method": "hqq", "bits": 4,
            "group_size": 64}``; ``{"method": "none"}`` keeps the layer in full precision.
    """

    overrides: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, overrides: Mapping[str, Any]) -> "Candidate":
        items = []
        for key, value in sorted(overrides.items()):
            if isinstance(value, QuantizationMethod):
                value = value.value
            elif isinstance(value, torch.dtype):
                value = dtype_to_str(value)
            elif isinstance(value, Mapping):
                value = json.dumps(value, sort_keys=True)  # hashable; decoded by as_dict
            items.append((key, value))
        return cls(tuple(items))

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.overrides)
        if isinstance(out.get("backend_options"), str):
            out["backend_options"] = json.loads(out["backend_options"])
        return out

    @property
    def label(self) -> str:
        d = self.as_dict()
        method = d.get("method", "?")
        if method == "none":
            return "none"
        parts = [method]
        if "bits" in d:
            parts.append(f"{d['bits']}b")
        if d.get("group_size"):
            parts.append(f"g{d['group_size']}")
        return "/".join(parts)

    def __str__(self) -> str:
        return self.label


def parse_family(method_family: Any) -> tuple[str, QuantizationMethod]:
    aliases = _family_aliases()
    if isinstance(method_family, str) and method_family.strip().lower() in (*METHOD_FAMILIES, *aliases):
        key = method_family.strip().lower()
        key = aliases.get(key, key)
        if key is None:
            raise ValueError("method_family='none' has nothing to allocate; allowed: "
                             + ", ".join(METHOD_FAMILIES))
        return key, METHOD_FAMILIES[key]
    try:
        method = QuantizationMethod.parse(method_family, "method_family")
    except ValueError as e:
        raise ValueError(f"method_family={method_family!r} is not a method family; allowed: "
                         f"{', '.join(METHOD_FAMILIES)} or a quantization method of one") from e
    if method.family not in METHOD_FAMILIES:
        raise ValueError(f"method_family={method_family!r} cannot be mixed; allowed: {', '.join(METHOD_FAMILIES)}")
    return method.family, method


def default_candidates(method_family: str | QuantizationMethod) -> list[Candidate]:
    """The candidates :func:`plan_mixed_precision` tries when none are given, as the family's base
    method declares them (:attr:`MethodSpec.mixed_precision`). The built-in families:

    * ``hqq``: 2, 3, 4 and 8 bits, each at group size 32, 64 and 128 (1 bit is allowed but not
      tried by default: without calibration it rarely pays for its error).
    * ``mlx``: 2, 3, 4, 5, 6 and 8 bits at group size 32, 64 and 128.
    * ``quanto``: ``quanto_int2``, ``quanto_int4``, ``quanto_int8`` (quanto fixes the group size).
    * ``bnb``: ``bnb_nf4``, ``bnb_int8`` and ``none`` (kept in full precision).
    """
    _, base = parse_family(method_family)
    items = METHOD_SPECS[base].mixed_precision
    return [Candidate.of(item) for item in items]


def parse_candidates(candidates: Any, family_method: QuantizationMethod,
                      base: QuantizationConfig) -> list[Candidate]:
    if candidates is None:
        return default_candidates(family_method)
    if isinstance(candidates, (str, Mapping)) or not isinstance(candidates, Iterable):
        raise ValueError(f"candidates={candidates!r} must be a list (of bit widths, (bits, group_size) "
                         f"pairs, method names, dicts of overrides or QuantizationConfigs)")
    spec = METHOD_SPECS[family_method]
    out: list[Candidate] = []
    for item in candidates:
        if isinstance(item, bool):
            overrides = None
        elif isinstance(item, Candidate):
            overrides = item.as_dict()
        elif isinstance(item, int):
            overrides = dict(method=family_method, bits=item)
            if spec.default_group_size is not None:
                overrides["group_size"] = base.group_size if base.method is family_method else spec.default_group_size
        elif isinstance(item, tuple) and len(item) == 2 and all(isinstance(v, int) for v in item):
            overrides = dict(method=family_method, bits=item[0], group_size=item[1])
        elif isinstance(item, (str, QuantizationMethod)):
            overrides = dict(method=QuantizationMethod.parse(item, "candidates"))
        elif isinstance(item, QuantizationConfig):
            overrides = dict(method=item.method, bits=item.bits, group_size=item.group_size)
        elif isinstance(item, Mapping):
            overrides = dict(item)
            overrides.setdefault("method", family_method)
        else:
            overrides = None
        if overrides is None:
            raise ValueError(f"candidates contains {item!r}; each must be a bit width, a (bits, group_size) "
                             f"pair, a method name, a dict of overrides or a QuantizationConfig")
        try:
            base.with_overrides(overrides)
        except ValueError as e:
            raise ValueError(f"candidates entry {item!r}: {e}") from e
        cand = Candidate.of(overrides)
        if cand not in out:
            out.append(cand)
    if not out:
        raise ValueError("candidates is empty; give at least one setting (e.g. [2, 3, 4, 8])")
    return out


def mixes_bit_widths(family: str) -> bool:
    """Whether ``family``'s default candidates vary only the bit width (and group size) of one method:
    a mix within one library, what a recommendation may propose (HQQ, MLX); ``False`` for a family
    whose candidates switch methods (bitsandbytes NF4/INT8/none) or that declares none."""
    base = METHOD_FAMILIES.get(family)
    if base is None:
        return False
    methods = {QuantizationMethod.parse(c.get("method", base)) for c in METHOD_SPECS[base].mixed_precision}
    return len(methods) == 1
