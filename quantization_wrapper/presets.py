"""Static mixed-precision presets, all expressed as ``layer_configs``.

Three ways to write a per-component policy without measuring anything (for a measured one see
:func:`~quantization_wrapper.mixed_precision.plan_mixed_precision`):

* :func:`component_preset` -- the component-based static policy of design document 003: output
  layers (``lm_head``, classifier, pooler) stay unquantized, attention gets higher precision, the
  feed-forward (MLP / experts) lower, everything else a default.
* :func:`adaptive_preset` -- design document 002's ``AdaptiveQuantizer``: one setting for attention
  layers, another for feed-forward layers.
* :func:`rules_to_layer_configs` -- ordered rule lists in the style of Qwix ``QtRule`` (document
  004): ``module_path`` regex -> settings, the first matching rule wins.

The component patterns (:data:`ATTENTION_PATTERN`, :data:`MLP_PATTERN`, :data:`OUTPUT_PATTERN`) are
``re:`` patterns (see :mod:`quantization_wrapper.patterns`) that know the layer names of Llama /
Mistral / Qwen / Gemma (``self_attn.q_proj``, ``mlp.down_proj``), Mixtral experts
(``block_sparse_moe.experts.N.w1``), GPT-2 / GPT-NeoX / Falcon / Phi (``attn``, ``c_fc``,
``dense_h_to_4h``, ``fc1``) and BERT (``attention.self.query``, ``intermediate.dense``,
``layer.N.output.dense``).

Registered presets (:func:`~quantization_wrapper.get_config`): ``component_hqq``,
``component_mlx``, ``component_bnb``, ``component_quanto``, ``adaptive_hqq``, ``adaptive_mlx``,
``adaptive_bnb`` (the document-002 mix: attention INT8, feed-forward NF4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .config import LAYER_FIELDS as LAYER_CONFIG_KEYS
from .config import QuantizationConfig, QuantizationMethod, list_configs, register_config
from .methods import METHOD_SPECS
from .patterns import REGEX_PREFIX, validate_pattern

__all__ = [
    "ATTENTION_PATTERN",
    "MLP_PATTERN",
    "OUTPUT_PATTERN",
    "FAMILY_SETTINGS",
    "QuantRule",
    "component_layer_configs",
    "component_preset",
    "adaptive_preset",
    "rules_to_layer_configs",
]

#: Attention projections (q/k/v/o, fused qkv, BERT's attention block including its output dense).
ATTENTION_PATTERN = r"re:(.*\.)?(self_attn|attn|attention|self_attention|cross_attn|cross_attention)(\..*)?"
#: Feed-forward layers: MLP blocks, MoE experts and the usual up/gate/down names; BERT's
#: ``intermediate.dense`` and ``layer.N.output.dense`` (the FFN output, not the attention output).
#: MoE routers (``gate``, ``router``) are left out: they are tiny and steer every token.
MLP_PATTERN = (r"re:(?!.*\.(gate|router)\Z)(?:(.*\.)?(mlp|ffn|feed_forward|feedforward|experts|intermediate)(\..*)?"
               r"|(.*\.)?(up_proj|gate_proj|down_proj|gate_up_proj|fc1|fc2|c_fc|w1|w2|w3|"
               r"dense_h_to_4h|dense_4h_to_h)"
               r"|(.*\.)?layers?\.\d+\.output\.dense)")
#: Output layers kept in full precision: the language-model head, classifiers, poolers.
OUTPUT_PATTERN = r"re:(.*\.)?(lm_head|embed_out|output_layer|classifier|score|pooler|qa_outputs)(\..*)?"

class _FamilySettings(Mapping):
    """``{family: {"high": fields, "low": fields, "default": fields}}``: what each family's base
    method declares (:attr:`~quantization_wrapper.methods.MethodSpec.precision_tiers`)."""

    def _items(self) -> dict[str, Mapping[str, Any]]:
        return {m.family: spec.precision_tiers for m, spec in METHOD_SPECS.items() if spec.precision_tiers}

    def __getitem__(self, family: str) -> Mapping[str, Any]:
        return self._items()[family]

    def __iter__(self):
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


#: Per family: the method, and the settings of "high" (attention), "low" (MLP) and "default".
FAMILY_SETTINGS: Mapping[str, Mapping[str, Any]] = _FamilySettings()


def _family(method_family: Any) -> str:
    if isinstance(method_family, str) and method_family.lower() in FAMILY_SETTINGS:
        return method_family.lower()
    try:
        family = QuantizationMethod.parse(method_family, "method_family").family
    except ValueError as e:
        raise ValueError(f"method_family={method_family!r} is not valid; allowed: "
                         f"{', '.join(FAMILY_SETTINGS)} or a method of one") from e
    if family not in FAMILY_SETTINGS:
        raise ValueError(f"method_family={method_family!r} has no preset; allowed: {', '.join(FAMILY_SETTINGS)}")
    return family


def component_layer_configs(attention: Mapping[str, Any], mlp: Mapping[str, Any], *,
                            output: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """``layer_configs`` of the component policy: attention, MLP and output patterns mapped to
    their settings (``output`` default: ``{"method": "none"}``, full precision)."""
    return {
        OUTPUT_PATTERN: dict(output if output is not None else {"method": "none"}),
        ATTENTION_PATTERN: dict(attention),
        MLP_PATTERN: dict(mlp),
    }


def component_preset(method_family: Any = "hqq", *, attention: Mapping[str, Any] | None = None,
                     mlp: Mapping[str, Any] | None = None, default: Mapping[str, Any] | None = None,
                     output: Mapping[str, Any] | None = None, **config_fields: Any) -> QuantizationConfig:
    """Design document 003's static component-based policy as a config.

    Output layers and embeddings stay in full precision (embeddings are not linear layers, so they
    are never quantized), attention layers get the family's higher precision (8 bits), the
    feed-forward layers the lower one (4 bits), any other linear layer the default (8 bits).

    Args:
        method_family: ``"hqq"``, ``"mlx"``, ``"bnb"`` or ``"quanto"`` (or a method of one).
        attention, mlp, default, output: override the family's settings
            (:data:`FAMILY_SETTINGS`) for that component.
        **config_fields: other :class:`QuantizationConfig` fields (``compute_dtype``, ...).
    """
    family = FAMILY_SETTINGS[_family(method_family)]
    base = dict(default if default is not None else family["default"])
    layer_configs = component_layer_configs(attention if attention is not None else family["high"],
                                            mlp if mlp is not None else family["low"], output=output)
    config_fields.setdefault("skip_modules", [])
    return QuantizationConfig(**base, layer_configs=layer_configs, **config_fields)


def adaptive_preset(method_family: Any = "bnb", *, attention: Mapping[str, Any] | None = None,
                    ffn: Mapping[str, Any] | None = None, default: Mapping[str, Any] | None = None,
                    **config_fields: Any) -> QuantizationConfig:
    """Design document 002's adaptive attention/FFN mix: attention layers at the family's higher
    precision (bitsandbytes: INT8), feed-forward layers at the lower one (NF4), the rest at
    ``default`` (the feed-forward setting, as the document's ``AdaptiveQuantizer`` falls back to
    its base config). ``lm_head`` is skipped, as by every default config."""
    family = FAMILY_SETTINGS[_family(method_family)]
    low = dict(ffn if ffn is not None else family["low"])
    base = dict(default if default is not None else low)
    layer_configs = {ATTENTION_PATTERN: dict(attention if attention is not None else family["high"]),
                     MLP_PATTERN: low}
    return QuantizationConfig(**base, layer_configs=layer_configs, **config_fields)


# ---------------------------------------------------------------------- rule lists
_QTYPES: dict[str, dict[str, Any]] = {
    **{f"int{b}": {"bits": b} for b in (1, 2, 3, 4, 5, 6, 8)},
    "nf4": {"method": "bnb_nf4"}, "fp4": {"method": "bnb_fp4"},
    "float8_e4m3fn": {"method": "quanto_fp8"}, "fp8": {"method": "quanto_fp8"},
    "none": {"method": "none"},
}
_UNSUPPORTED_RULE_KEYS = {
    "act_qtype": "activation quantization is not supported (weights only)",
    "bwd_qtype": "quantized backward passes are not supported",
    "op_names": "rules select modules by name only",
}


@dataclass(frozen=True)
class QuantRule:
    """One rule: modules whose dotted name fully matches ``module_path`` (a Python regex; a ``/``
    stands for the ``.`` between module names, as in Qwix paths) get ``settings``.

    Args:
        module_path: the regex.
        weight_qtype: Qwix-style shorthand: ``"int2"`` .. ``"int8"`` (bits), ``"nf4"``, ``"fp4"``,
            ``"fp8"``, or ``None`` / ``"none"`` (keep in full precision).
        settings: ``layer_configs`` fields (``method``, ``bits``, ``group_size``, ...).
    """

    module_path: str
    weight_qtype: str | None = "unset"
    settings: Mapping[str, Any] = field(default_factory=dict)

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.weight_qtype != "unset":
            key = "none" if self.weight_qtype is None else str(self.weight_qtype).lower()
            if key not in _QTYPES:
                raise ValueError(f"weight_qtype={self.weight_qtype!r} is not valid; allowed: "
                                 f"{', '.join(_QTYPES)} or None")
            out.update(_QTYPES[key])
        out.update(self.settings)
        if not out:
            raise ValueError(f"rule for module_path={self.module_path!r} sets nothing; give weight_qtype or "
                             f"settings such as bits=4")
        return out


def _as_rule(rule: Any) -> QuantRule:
    if isinstance(rule, QuantRule):
        return rule
    if isinstance(rule, Mapping):
        rule = dict(rule)
        for key, why in _UNSUPPORTED_RULE_KEYS.items():
            if rule.get(key) is not None:
                raise ValueError(f"rule key {key!r}: {why}")
            rule.pop(key, None)
        if "module_path" not in rule:
            raise ValueError(f"rule {rule!r} has no 'module_path' (the regex of the modules it applies to)")
        path = rule.pop("module_path")
        qtype = rule.pop("weight_qtype", "unset")
        return QuantRule(path, qtype, rule)
    if isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[1], Mapping):
        return _as_rule({"module_path": rule[0], **rule[1]})
    raise ValueError(f"rule {rule!r} must be a QuantRule, a dict with 'module_path', or a "
                     f"(module_path, settings) pair")


def rules_to_layer_configs(rules: Iterable[Any], *, first_match_wins: bool = True) -> dict[str, dict[str, Any]]:
    """An ordered rule list -> ``layer_configs`` (``re:`` patterns).

    Example::

        rules_to_layer_configs([
            {"module_path": r".*layers\\.0\\..*", "weight_qtype": "int8"},
            {"module_path": r".*(q_proj|k_proj)", "bits": 8, "group_size": 128},
            (r".*mlp.*", {"bits": 3}),
            {"module_path": "lm_head", "weight_qtype": None},
        ])

    Args:
        rules: :class:`QuantRule` objects, dicts (``module_path`` plus settings and optionally
            ``weight_qtype``; Qwix's ``act_qtype``/``bwd_qtype``/``op_names`` are refused unless
            ``None``) or ``(module_path, settings)`` pairs.
        first_match_wins: keep the rules' order as their priority (Qwix semantics): each pattern
            excludes the names an earlier rule matches, so the layer_configs rule "most specific
            wins" cannot reorder them. ``False`` leaves the patterns as written.

    Returns:
        ``{"re:<regex>": settings}``, validated as ``QuantizationConfig.layer_configs``.
    """
    if isinstance(rules, (str, Mapping)):
        raise ValueError("rules must be a list of rules, not a single rule")
    parsed = [_as_rule(r) for r in rules]
    out: dict[str, dict[str, Any]] = {}
    earlier: list[str] = []
    for rule in parsed:
        regex = rule.module_path.replace("/", r"\.")
        try:
            re.compile(regex)
        except re.error as e:
            raise ValueError(f"module_path={rule.module_path!r} is not a valid regular expression ({e})") from e
        pattern = regex
        if first_match_wins and earlier:
            pattern = "(?!(?:" + "|".join(f"(?:{e})" for e in earlier) + r")\Z)(?:" + regex + ")"
        key = REGEX_PREFIX + pattern
        if key in out:
            continue  # a repeated rule never matches anything new
        out[key] = rule.overrides()
        earlier.append(regex)
    for key, overrides in out.items():  # values are checked against the base config when used
        validate_pattern(key, "rules")
        unknown = sorted(set(overrides) - set(LAYER_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"rule {key!r} sets unknown keys {unknown}; allowed: weight_qtype, "
                             f"{', '.join(LAYER_CONFIG_KEYS)}")
        if "method" in overrides:
            QuantizationMethod.parse(overrides["method"], f"rule {key!r} method")
    return out


# ---------------------------------------------------------------------- registration
def _builtin_presets() -> dict[str, QuantizationConfig]:
    """The presets this module registers, built fresh on each call (nothing shared is mutated)."""
    presets = {f"component_{family}": component_preset(family) for family in FAMILY_SETTINGS}
    presets.update({f"adaptive_{family}": adaptive_preset(family) for family in FAMILY_SETTINGS})
    return presets


def _register_presets() -> None:
    # Never ``overwrite``: a preset of the same name registered before this module was imported
    # (or re-imported) is the user's and stays as it is.
    registered = set(list_configs())
    for name, config in _builtin_presets().items():
        if name not in registered:
            register_config(name, config)


_register_presets()
