"""The method registry: every fact the package knows about a quantization method, in one record.

Each backend declares its methods here from its own module (``adapters/bnb.py`` registers the three
bitsandbytes methods, ``adapters/hqq.py`` HQQ, ...) with :func:`register_method`. Everything that
used to be a per-method table is built by iterating this registry: the config's allowed values
(:class:`MethodSpec`), the compatibility matrix (:attr:`MethodSpec.support`), the fallback chains,
the FSDP table (:attr:`MethodSpec.fsdp`), the memory model (:attr:`MethodSpec.bits_per_weight`),
the recommendation candidates and the mixed-precision candidates. A new backend registers its
methods from its own file and appears in all of them.

This module sits just above ``errors``/``patterns``: it imports nothing of the package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping

__all__ = [
    "QuantizationMethod",
    "MethodSpec",
    "Support",
    "FSDPSupport",
    "RecommendationCandidate",
    "PACKED_FSDP_STORAGE",
    "WORD_PACKED_FSDP_STORAGE",
    "METHOD_SPECS",
    "register_method",
    "unregister_method",
    "method_spec",
    "registered_method_specs",
]


class QuantizationMethod(str, Enum):
    """Weight quantization methods. The value is the lower-case name (``"bnb_nf4"``).

    The members below are the built-in methods. A backend outside this package adds its own with
    :func:`register_method` (``QuantizationMethod.parse("toy_int4")`` then returns its member).
    """

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
            for member in cls.members():
                if key in (member.value, member.name.lower()):
                    return member
        allowed = ", ".join(m.value for m in cls.members())
        raise ValueError(f"{field_name}={value!r} is not a quantization method; allowed: {allowed}")

    @classmethod
    def members(cls) -> list["QuantizationMethod"]:
        """The built-in members, then the methods backends added with :func:`register_method`."""
        return list(cls) + [m for m in _EXTENSIONS.values() if m not in cls._member_map_.values()]

    @property
    def family(self) -> str:
        """The library family: ``"bnb"``, ``"hqq"``, ``"mlx"``, ``"quanto"`` or ``"none"`` (the part of
        the value before the first underscore)."""
        return self.value.split("_")[0]


_EXTENSIONS: dict[str, QuantizationMethod] = {}


def _extension_member(value: str) -> QuantizationMethod:
    """A new member of :class:`QuantizationMethod` for a method a backend adds (``"toy_int4"``).

    It behaves as the built-in members do (``is``, ``.value``, ``.name``, ``.family``, hashing,
    ``QuantizationMethod(value)`` and :meth:`QuantizationMethod.parse`), without being iterated by
    ``list(QuantizationMethod)``; :meth:`QuantizationMethod.members` lists it.
    """
    if value in _EXTENSIONS:
        return _EXTENSIONS[value]
    member = str.__new__(QuantizationMethod, value)
    member._name_ = value.upper()
    member._value_ = value
    member._sort_order_ = len(QuantizationMethod._member_names_) + len(_EXTENSIONS)
    QuantizationMethod._value2member_map_[value] = member
    _EXTENSIONS[value] = member
    return member


@dataclass(frozen=True)
class Support:
    """One cell of the compatibility matrix.

    Attributes:
        supported: whether the method runs on the backend.
        reason: why (or why not), in one sentence a user can act on.
        design: what the primary design document's table says for this cell (``None`` where the
            design predates the method); cells where ``supported != design`` are deliberate
            departures, explained in ``reason``.
    """

    supported: bool
    reason: str
    design: bool | None = None

    @property
    def departs_from_design(self) -> bool:
        return self.design is not None and self.design != self.supported


@dataclass(frozen=True)
class FSDPSupport:
    """How FSDP treats one method's quantized weights.

    Attributes:
        fsdp2: ``"sharded"``, or ``"replicated"``: the quantized weights stay out of sharding
            (quantized, whole on every rank) while LoRA, norms and embeddings shard.
        fsdp1: the same for FSDP1.
        storage: what ``storage_dtype`` must be.
        note: why.
        verified: how the row was checked (2 CPU ranks, gloo, torch 2.13).
    """

    fsdp2: str
    fsdp1: str
    storage: str
    note: str
    verified: str

    @property
    def shards(self) -> bool:
        return self.fsdp2 == "sharded"


_FSDP1_STORAGE = ("FSDP1: the dtype of all other parameters (float32 once prepare_model_for_training "
                  "has upcast the norms of a half-precision model)")
#: :attr:`FSDPSupport.storage` of a packed layout whose bytes FSDP shards as they are.
PACKED_FSDP_STORAGE = ("any for FSDP2 (integer storage is all-gathered as bytes; a float one must equal "
                       "MixedPrecisionPolicy.param_dtype); " + _FSDP1_STORAGE)
#: :attr:`FSDPSupport.storage` of a packed layout whose default uint32 words FSDP2 cannot all-gather.
WORD_PACKED_FSDP_STORAGE = ("uint8 or a float dtype for FSDP2 (the default uint32 cannot be all-gathered); "
                            + _FSDP1_STORAGE)


@dataclass(frozen=True)
class RecommendationCandidate:
    """A config :func:`~quantization_wrapper.recommend.get_recommended_config` may choose.

    Attributes:
        backends: backend values (``"cuda"``, ``"mps"``, ``"mlx"``, ``"cpu"``) it is offered on.
        rank: its place from most precise (low) to least precise (high) among every backend's
            candidates; the recommendation walks them in rank order and takes the first that fits.
        config: the config's fields (``method`` is this method unless given); ``compute_dtype``
            defaults to the backend's (bf16 on CUDA and CPU, fp16 on Apple).
        inference_only: left out when recommending for training.
    """

    backends: tuple[str, ...]
    rank: float
    config: Mapping[str, Any] = field(default_factory=dict)
    inference_only: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """Everything the package knows about one method, declared by the backend that implements it.

    The first seven fields say what the method allows (checked when a config is built); the
    others feed the tables built from the registry.

    Attributes:
        library: the library's name in ``backend_manager.KNOWN_LIBRARIES`` (``None``: none needed).
        bits / default_bits: the bit widths allowed and the default.
        group_sizes / default_group_size: allowed group sizes (``None``: any positive size).
        description: one line for tables and ``doctor``.
        library_required: ``False`` when a pure-torch path works without the library.
        support: ``{backend value: Support}``, this method's column of the compatibility matrix;
            a backend not listed is reported as not supported ("not declared").
        fallback: ``((method, bits or None), ...)``: what the factory tries, in order, when this
            method cannot run (``None`` keeps the requested bit width).
        fsdp: how FSDP treats the quantized weights (a row of ``docs/fsdp.md``).
        bits_per_weight: ``f(config, in_features) -> float``: stored bits per quantized weight,
            every scale and zero counted (the memory model of recommendations and sizing).
        layer_nbytes: ``f(config, in_features, out_features, bias, weight_dtype, compute_itemsize) ->
            int``: the exact bytes the adapter's ``module_nbytes`` reports for one quantized layer
            (``estimate_model_size``); without it, sizing uses ``bits_per_weight`` and the bias.
        candidates: the configs recommendations may choose for this method.
        mixed_precision: config fields of the default candidates when this method's family is planned
            with mixed precision (``plan_mixed_precision(method_family=...)``); declared on the
            family's base method; empty: the family has no default candidates of its own.
        normalize: ``f(config) -> None``, run when a config with this method is built: fills in
            and checks the fields only this method gives meaning to (raises ``ValueError``).
        options: the optional config fields it honours (``"double_quant"``); validation warns
            that the others, when set, are ignored.
        precision_tiers: ``{"high": fields, "low": fields, "default": fields}``: the family's higher
            and lower precision settings, for the component and adaptive presets (attention high,
            feed-forward low); declared on the family's base method.
        option_warnings: ``f(config) -> [(field, message, suggestion)]``: settings that are valid
            but that the method cannot honour as asked (reported by validation as warnings, per
            layer).
    """

    library: str | None
    bits: tuple[int, ...]
    default_bits: int
    group_sizes: tuple[int, ...] | None  # None: any positive group size
    default_group_size: int | None
    description: str
    library_required: bool = True  # False: a pure-torch path works without the library
    support: Mapping[str, Support] = field(default_factory=dict)
    fallback: tuple[tuple[Any, int | None], ...] = ()
    fsdp: FSDPSupport | None = None
    bits_per_weight: Callable[[Any, int], float] | None = field(default=None, compare=False)
    layer_nbytes: Callable[..., int] | None = field(default=None, compare=False)
    candidates: tuple[RecommendationCandidate, ...] = ()
    mixed_precision: tuple[Mapping[str, Any], ...] = ()
    normalize: Callable[[Any], None] | None = field(default=None, compare=False)
    options: tuple[str, ...] = ()
    precision_tiers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    option_warnings: Callable[[Any], list[tuple[str, str, str]]] | None = field(default=None, compare=False)

    def support_on(self, backend: Any) -> Support:
        """The compatibility cell for ``backend`` (a ``Backend`` or its value)."""
        key = str(getattr(backend, "value", backend))
        cell = self.support.get(key)
        if cell is None:
            return Support(False, f"the backend implementing this method declares no support for {key}.")
        return cell


#: ``{method: MethodSpec}`` for every registered method, built-in members in enum order first.
METHOD_SPECS: dict[QuantizationMethod, MethodSpec] = {}


def register_method(method: QuantizationMethod | str, spec: MethodSpec, *, replace: bool = False) -> QuantizationMethod:
    """Declare ``method`` and its facts. A new name (``"toy_int4"``) becomes a member of
    :class:`QuantizationMethod`; the name's part before the first ``_`` is its family.

    Raises:
        ValueError: when the method is already declared (``replace=True`` replaces it), when its
            value is not a lower-case identifier, or when ``spec`` is not a :class:`MethodSpec`.
    """
    if not isinstance(spec, MethodSpec):
        raise ValueError(f"register_method: spec must be a MethodSpec, got {type(spec).__name__}")
    if isinstance(method, QuantizationMethod):
        member = method
    elif isinstance(method, str) and method.isidentifier() and method == method.lower():
        try:
            member = QuantizationMethod.parse(method)
        except ValueError:
            member = _extension_member(method)
    else:
        raise ValueError(f"register_method: method={method!r} must be a QuantizationMethod or a lower-case "
                         f"identifier such as 'toy_int4'")
    if member in METHOD_SPECS and not replace:
        raise ValueError(f"method {member.value!r} is already declared; pass replace=True to redeclare it")
    if spec.default_bits not in spec.bits:
        raise ValueError(f"register_method({member.value!r}): default_bits={spec.default_bits} is not in "
                         f"bits={spec.bits}")
    METHOD_SPECS[member] = spec
    order = {m: i for i, m in enumerate(QuantizationMethod.members())}
    items = sorted(METHOD_SPECS.items(), key=lambda kv: order.get(kv[0], len(order)))
    METHOD_SPECS.clear()
    METHOD_SPECS.update(items)
    return member


def unregister_method(method: QuantizationMethod | str) -> None:
    """Remove a method declared with :func:`register_method`; a method a backend added is forgotten
    by :meth:`QuantizationMethod.parse` too (built-in members stay members)."""
    member = QuantizationMethod.parse(method)
    METHOD_SPECS.pop(member, None)
    if member.value in _EXTENSIONS:
        del _EXTENSIONS[member.value]
        QuantizationMethod._value2member_map_.pop(member.value, None)


def method_spec(method: QuantizationMethod | str) -> MethodSpec:
    """The declared facts of ``method``.

    Raises:
        ValueError: when no backend declared it (the declared methods are listed).
    """
    member = QuantizationMethod.parse(method)
    try:
        return METHOD_SPECS[member]
    except KeyError:
        known = ", ".join(m.value for m in METHOD_SPECS) or "none"
        raise ValueError(f"method={member.value!r} is not declared by any backend; declared: {known}") from None


def registered_method_specs() -> dict[QuantizationMethod, MethodSpec]:
    """A copy of :data:`METHOD_SPECS`."""
    return dict(METHOD_SPECS)


def replace_spec(spec: MethodSpec, **changes: Any) -> MethodSpec:
    """``spec`` with ``changes`` (for a backend declaring several methods that share most facts)."""
    return dataclasses.replace(spec, **changes)
