"""Model surgery: the one model walker every adapter uses, and the per-layer plan it records.

:func:`replace_linear_with_quantized` decides layer by layer (skip list, module filter,
``layer_configs``, shape vs. group size), converts every chosen layer, and installs the new modules
with ``set_submodule`` -- all or nothing: if one layer fails, every layer already replaced is put
back and the error names the layer. The plan it followed is stored on the model
(``model.quantization_plan``) and prints as a table.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .registry import Adapter, is_quantized_module
from .tensors import tensor_nbytes
from .units import format_bytes
from .config import QuantizationConfig, QuantizationMethod
from .experts import is_fused_experts, iter_fused_experts, unfuse_experts
from .filters import as_module_filter
from .patterns import best_match, validate_pattern

__all__ = [
    "LayerPlan",
    "QuantizationPlan",
    "QuantizationError",
    "replace_linear_with_quantized",
    "get_quantization_plan",
    "iter_linear_layers",
    "LayerDecision",
    "plan_linear_layers",
    "convert_layer",
    "record_plan",
    "check_finite_weights",
    "refuse_quantized_model",
]

logger = logging.getLogger(__name__)


class QuantizationError(RuntimeError):
    """A layer could not be converted; the model was restored to its state before the call."""


@dataclass
class LayerPlan:
    """What happened to one linear layer.

    Attributes:
        name: dotted module name.
        in_features, out_features: the layer's shape.
        bias: whether it has a bias (always kept).
        method: the method used (``"none"`` when kept in full precision).
        bits, group_size: effective settings (after fitting the group size to the shape).
        bytes_before, bytes_after: bytes of every tensor the layer held before and holds after.
        status: ``"quantized"``, ``"float"`` (converted by the no-quantization fallback) or
            ``"skipped"``.
        reason: why it was skipped, or why its settings differ from the config.
    """

    name: str
    in_features: int
    out_features: int
    bias: bool
    method: str
    bits: int | None
    group_size: int | None
    bytes_before: int
    bytes_after: int
    status: str
    reason: str | None = None

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight of this layer, every tensor counted (bias included)."""
        return 8 * self.bytes_after / self.numel


@dataclass
class QuantizationPlan:
    """The per-layer plan of a quantized model; ``str(plan)`` is a readable table."""

    method: str
    layers: list[LayerPlan] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    #: Parameters of more than FLOAT_REPORT_MIN elements that stay in full precision, outside the
    #: linear layers' plan: ``{"name", "shape", "numel", "reason"}`` (embeddings, fused experts, ...).
    float_parameters: list[dict[str, Any]] = field(default_factory=list)
    #: Parameters of the model (each tensor once) and those stored quantized.
    total_parameters: int = 0
    quantized_parameters: int = 0

    @property
    def quantized_share(self) -> float:
        """Share of the model's parameters stored quantized (NaN when unknown)."""
        return self.quantized_parameters / self.total_parameters if self.total_parameters else float("nan")

    @property
    def quantized(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.status == "quantized"]

    @property
    def converted(self) -> list[LayerPlan]:
        """Layers the adapter replaced (quantized, or kept in float by the fallback adapter)."""
        return [layer for layer in self.layers if layer.status != "skipped"]

    @property
    def skipped(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.status == "skipped"]

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        """Average stored bits per weight over the quantized layers (metadata included)."""
        q = self.quantized
        n = sum(layer.numel for layer in q)
        return 8 * sum(layer.bytes_after for layer in q) / n if n else float("nan")

    def __getitem__(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in the plan")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "config": self.config, "layers": [asdict(l) for l in self.layers],
                "float_parameters": [dict(p) for p in self.float_parameters],
                "total_parameters": self.total_parameters, "quantized_parameters": self.quantized_parameters}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantizationPlan":
        return cls(method=data["method"], config=dict(data.get("config", {})),
                   layers=[LayerPlan(**layer) for layer in data["layers"]],
                   float_parameters=[dict(p) for p in data.get("float_parameters", [])],
                   total_parameters=int(data.get("total_parameters", 0)),
                   quantized_parameters=int(data.get("quantized_parameters", 0)))

    def table(self, max_rows: int | None = None) -> str:
        """The plan as an aligned text table, with a total line."""
        header = ("layer", "shape", "method", "bits", "group", "before", "after", "bits/w", "note")
        rows = []
        shown = self.layers if max_rows is None else self.layers[:max_rows]
        for l in shown:
            rows.append((l.name, f"{l.out_features}x{l.in_features}", l.method,
                         str(l.bits) if l.status != "skipped" else "-",
                         str(l.group_size) if l.group_size else "-",
                         format_bytes(l.bytes_before), format_bytes(l.bytes_after),
                         f"{l.bits_per_weight:.2f}", l.reason or ""))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header).rstrip(), "  ".join("-" * w for w in widths)]
        lines += [fmt.format(*r).rstrip() for r in rows]
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more layers")
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        lines.append(f"{len(self.quantized)} quantized, {len(self.skipped)} skipped; linear layers "
                     f"{format_bytes(self.bytes_before)} -> {format_bytes(self.bytes_after)} "
                     f"({ratio:.2f}x smaller, {self.bits_per_weight:.3f} bits/weight quantized)")
        if self.total_parameters:
            lines.append(f"{100 * self.quantized_share:.1f}% of the model's {self.total_parameters:,} parameters "
                         f"quantized" + ("; in full precision besides skipped layers: " + ", ".join(
                             f"{p['name']} {tuple(p['shape'])} ({p['reason']})" for p in self.float_parameters[:5])
                             + (f" and {len(self.float_parameters) - 5} more" if len(self.float_parameters) > 5 else "")
                             if self.float_parameters else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def get_quantization_plan(model: nn.Module) -> QuantizationPlan | None:
    """The plan recorded on ``model`` by the last quantization (``None`` if never quantized)."""
    return getattr(model, "quantization_plan", None)


def iter_linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """``(name, module)`` for every plain ``nn.Linear`` that is not already quantized."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not is_quantized_module(module):
            yield name, module


def _layer_bytes(linear: nn.Linear) -> int:
    return tensor_nbytes([linear.weight, linear.bias])


def _non_finite(t: torch.Tensor | None) -> tuple[int, int]:
    """``(inf, nan)`` counts of ``t`` (a min/max pass first: it is ~50x cheaper than ``isfinite``
    over the whole tensor, and a weight is nearly always finite)."""
    if t is None or not t.is_floating_point() or t.numel() == 0 or t.device.type == "meta":
        return 0, 0
    lo, hi = torch.aminmax(t.detach())  # nan propagates, and an inf is the min or the max
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return 0, 0
    t = t.detach()
    return int(torch.isinf(t).sum()), int(torch.isnan(t).sum())


def _non_finite_report(name: str, linear: nn.Module) -> str | None:
    parts = []
    for attr in ("weight", "bias"):
        t = getattr(linear, attr, None)
        inf, nan = _non_finite(t)
        if inf or nan:
            parts.append(f"{inf + nan} of {t.numel()} {attr} values are non-finite ({inf} inf, {nan} nan)")
    return f"{name}: {'; '.join(parts)}" if parts else None


def check_finite_weights(decisions: list["LayerDecision"], *, converted: str = "nothing was converted") -> None:
    """Refuse to quantize a layer whose weight or bias holds inf or nan: the quantizer's scales
    absorb it, and a whole block's outputs (bitsandbytes: every output of the layer) turn non-finite.

    Checks every decided layer that will be quantized and holds real tensors (meta layers are
    checked when their weights arrive, in :func:`convert_layer`); layers kept in float, or by the
    no-quantization method, are not checked.

    Args:
        decisions: the layers, from :func:`plan_linear_layers`.
        converted: what the message says about the model's state.

    Raises:
        ValueError: naming each such layer, its count of non-finite values and the fix.
    """
    reports = {d.name: r for d in decisions if d.config is not None and d.config.method is not QuantizationMethod.NONE
               for r in [_non_finite_report(d.name, d.linear)] if r is not None}
    if reports:
        names = list(reports)
        raise ValueError(
            f"cannot quantize layers with non-finite weights: {'; '.join(reports.values())}. Fix: clean the "
            f"weights (e.g. torch.nan_to_num_, or reload them), or keep these layers in full precision "
            f"by adding {names!r} to skip_modules; {converted}.")


def refuse_quantized_model(model: nn.Module, method: QuantizationMethod | str | None = None) -> None:
    """Refuse a model that is already quantized: it holds layers of a registered adapter's type or
    carries a ``quantization_plan``. Quantizing it again would mix one format's layers under
    another method's name, and its checkpoint would not load.

    Args:
        model: the model about to be quantized.
        method: the method asked for, named in the message.

    Raises:
        ValueError: saying what the model holds (layer types and counts, the recorded method) and
            what to do instead.
    """
    counts = Counter(type(m).__name__ for m in model.modules() if is_quantized_module(m))
    plan = get_quantization_plan(model)
    if not counts and plan is None:
        return
    held = []
    if counts:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        held.append(f"{sum(counts.values())} quantized layers ({kinds})")
    if plan is not None:
        held.append(f"a quantization_plan of method {plan.method!r} ({len(plan.converted)} layers converted)")
    asked = f" with {QuantizationMethod.parse(method).value}" if method is not None else ""
    raise ValueError(
        f"the model is already quantized: it holds {' and '.join(held)}. Quantizing it again{asked} would "
        f"leave those layers as they are under another method's name, and its checkpoint would not load. "
        f"Fix: load the full-precision model again (e.g. from_pretrained on the original checkpoint) and "
        f"quantize that; a quantized model is saved and reloaded with save_quantized_model / "
        f"load_quantized_model")


@dataclass
class LayerDecision:
    """What the walker decided for one linear layer before converting anything."""

    name: str
    linear: nn.Linear
    config: QuantizationConfig | None  # None: keep in full precision
    reason: str | None


def plan_linear_layers(model: nn.Module, adapter: Adapter, skip_modules: list[str] | None = None,
                       module_filter: Any = None) -> list[LayerDecision]:
    """Decide, for every ``nn.Linear`` of ``model``, whether and how it will be quantized.

    Applies ``skip_modules``, ``module_filter`` (then its ``validate()``), ``layer_configs`` and the
    group-size fit; warns about skip/override patterns that matched nothing; refuses layers to
    quantize whose real weights are not finite (:func:`check_finite_weights`). Converts nothing, so it
    works on a meta-device skeleton too. Used by :func:`replace_linear_with_quantized` and by the
    streaming loader.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError("model is a single nn.Linear; use adapter.quantize_linear(layer) for one layer")
    config: QuantizationConfig = adapter.config
    skip = list(config.skip_modules if skip_modules is None else skip_modules)
    for pattern in skip:
        validate_pattern(pattern, "skip_modules")
    module_filter = as_module_filter(module_filter)
    if module_filter is not None:
        module_filter.reset()

    decisions: list[LayerDecision] = []
    skip_hits: set[str] = set()
    override_hits: set[str] = set()
    overruled: dict[str, str] = {}  # layer_configs pattern -> the skip_modules pattern that won
    for name, module in model.named_modules():
        wanted = module_filter(module, name) if module_filter is not None else True
        if not isinstance(module, nn.Linear) or is_quantized_module(module):
            continue
        pattern = best_match(name, skip)
        if pattern is not None:
            skip_hits.add(pattern)
            override = best_match(name, config.layer_configs)
            reason = f"skip_modules: {pattern!r}"
            if override is not None:  # skip_modules wins over layer_configs, whatever their specificity
                overruled.setdefault(override, pattern)
                reason += f" (wins over layer_configs[{override!r}])"
            decisions.append(LayerDecision(name, module, None, reason))
            continue
        if not wanted:
            decisions.append(LayerDecision(name, module, None, "excluded by module_filter"))
            continue
        override = best_match(name, config.layer_configs)
        if override is not None:
            override_hits.add(override)
        layer_cfg = config.for_layer(name)
        if layer_cfg.method is QuantizationMethod.NONE and config.method is not QuantizationMethod.NONE:
            decisions.append(LayerDecision(name, module, None, f"layer_configs[{override!r}] sets method 'none'"))
            continue
        target = adapter.for_method(layer_cfg.method)
        fitted, reason = target.fit_group_size(module.in_features, module.out_features, layer_cfg)
        if fitted is None:
            logger.info("%s: %s", name, reason)
        decisions.append(LayerDecision(name, module, fitted, reason))

    if module_filter is not None:
        module_filter.validate()
    _warn_unmatched(skip, skip_hits, config, override_hits, overruled)
    _warn_untied(model, decisions)
    check_finite_weights(decisions)
    return decisions


def _warn_untied(model: nn.Module, decisions: list[LayerDecision]) -> None:
    """Quantizing one side of tied weights (a tied ``lm_head``) unties them: say so."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for d in decisions:
        if d.config is None:
            continue
        others = [n for n in owners.get(id(d.linear.weight), []) if n != f"{d.name}.weight"]
        if others:
            warnings.warn(f"{d.name}.weight is tied to {others[0]}; quantizing {d.name} unties them: {others[0]} stays "
                          f"in full precision beside it ({d.linear.weight.numel() * d.linear.weight.element_size() / 2**20:.1f} MiB) "
                          f"and saved checkpoints record tie_word_embeddings=false. Add {d.name!r} to skip_modules to "
                          f"keep the tie", stacklevel=3)


def convert_layer(adapter: Adapter, decision: LayerDecision, *, check_finite: bool = True) -> nn.Module:
    """Build the replacement module for one decided layer (empty on meta, quantized otherwise).

    Args:
        check_finite: refuse non-finite weights (see :func:`check_finite_weights`); ``False`` when
            the caller has checked them (:func:`plan_linear_layers` does for real weights).

    Raises:
        ValueError: the layer holds non-finite weights.
        QuantizationError: the adapter failed, naming the layer, shape and method.
    """
    linear, layer_cfg = decision.linear, decision.config
    if check_finite:
        check_finite_weights([decision], converted="the layer was not converted")
    target = adapter.for_method(layer_cfg.method)
    try:
        if linear.weight.device.type == "meta":
            new = target.create_quantized_linear(linear.in_features, linear.out_features,
                                                 linear.bias is not None, config=layer_cfg,
                                                 device="meta", dtype=linear.weight.dtype)
        else:
            new = target.quantize_linear(linear, decision.name, config=layer_cfg)
    except Exception as e:
        raise QuantizationError(
            f"quantizing {decision.name} ({linear.out_features}x{linear.in_features}) with "
            f"{layer_cfg.method.value} {layer_cfg.bits}-bit failed: {type(e).__name__}: {e}. "
            f"The model was left unchanged."
        ) from e
    new.train(linear.training)  # a fresh module defaults to training mode
    return new


def record_plan(model: nn.Module, adapter: Adapter, decisions: list[LayerDecision], *,
                warn_if_unchanged: bool = True) -> QuantizationPlan:
    """Build the plan from the decisions and the modules now installed, store it on ``model`` with
    the config, and set the flags peft/transformers read (every library used).

    Args:
        warn_if_unchanged: warn when no layer was converted (a loader whose checkpoint says so
            passes False: nothing was asked of it).
    """
    config = adapter.config
    plan = QuantizationPlan(method=config.method.value, config=config.to_dict())
    for d in decisions:
        linear = d.linear
        before = _layer_bytes(linear)
        if d.config is None:  # kept: measure the module as it is now (the streaming loader filled it)
            try:
                before = _layer_bytes(model.get_submodule(d.name))
            except AttributeError:  # an expert of a block that kept its fused module: the view's bytes
                before = _layer_bytes(linear)
            plan.layers.append(LayerPlan(d.name, linear.in_features, linear.out_features, linear.bias is not None,
                                         "none", None, None, before, before, "skipped", d.reason))
            continue
        target = adapter.for_method(d.config.method)
        new = model.get_submodule(d.name)
        bits, status = d.config.bits, "quantized"
        if d.config.method is QuantizationMethod.NONE:  # fallback: report the float width it kept
            bits, status = new.weight.element_size() * 8, "float"
        plan.layers.append(LayerPlan(d.name, linear.in_features, linear.out_features, linear.bias is not None,
                                     d.config.method.value, bits, d.config.group_size, before,
                                     target.module_nbytes(new), status, d.reason))
    if not plan.converted and warn_if_unchanged:
        warnings.warn(f"{type(adapter).__name__}: no linear layer was quantized "
                      f"({len(decisions)} found, all skipped); the model is unchanged", stacklevel=3)
    previous = get_quantization_plan(model)
    if previous is not None:  # a second pass over a partly quantized model: keep both records
        known = {l.name for l in plan.layers}
        plan.layers = [l for l in previous.layers if l.name not in known] + plan.layers
    _count_parameters(model, plan)
    if plan.converted and warn_if_unchanged and plan.quantized_share < 0.5:
        warnings.warn(f"only {100 * plan.quantized_share:.0f}% of the model's {plan.total_parameters:,} parameters "
                      f"are quantized; in full precision: " + (", ".join(
                          f"{p['name']} ({p['reason']})" for p in plan.float_parameters[:4])
                          + (f" and {len(plan.float_parameters) - 4} more" if len(plan.float_parameters) > 4 else "")
                          or "small tensors")
                      + " (model.quantization_plan lists them)", stacklevel=3)
    model.quantization_plan = plan
    model.quantization_config = config
    used = {l.method for l in plan.converted} - {config.method.value}
    for method in sorted(used):  # flags of the other libraries first (e.g. is_loaded_in_8bit) ...
        adapter.for_method(method).mark_model(model)
    adapter.mark_model(model)  # ... then the main method's, which wins for shared attributes
    return plan


#: Parameters larger than this that stay in float are listed in the plan by name.
FLOAT_REPORT_MIN = 1_000_000


def _count_parameters(model: nn.Module, plan: QuantizationPlan) -> None:
    """Fill the plan's parameter accounting: every parameter once (tied ones too), the converted
    layers' weights as quantized (``float`` status: as float), the rest listed when large."""
    converted = {l.name: l for l in plan.layers if l.status != "skipped"}
    skipped = {l.name: l.reason for l in plan.layers if l.status == "skipped"}
    total = sum(l.numel for l in plan.quantized)
    quantized = total
    seen: set[int] = set()
    floats = []
    for module_name, module in model.named_modules():
        if module_name in converted:
            if converted[module_name].status == "float":
                total += converted[module_name].numel
            continue
        if any(module_name.startswith(c + ".") for c in converted):
            continue
        for attr, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            fused_expert = p.dim() == 3 and is_fused_experts(module)
            if p.numel() <= FLOAT_REPORT_MIN and not fused_expert:  # experts are listed whatever their size
                continue
            expert_reasons = sorted({r for n, r in skipped.items() if n.startswith(f"{module_name}.")}) \
                if fused_expert else []
            if module_name in skipped:
                reason = skipped[module_name] or "skipped"
            elif expert_reasons:
                reason = "fused experts, every expert skipped: " + "; ".join(expert_reasons)
            elif fused_expert:
                reason = "fused experts: not planned"
            elif isinstance(module, nn.Embedding):
                reason = "embedding"
            else:
                reason = f"{type(module).__name__} is not a linear layer"
            floats.append({"name": f"{module_name}.{attr}" if module_name else attr,
                           "shape": list(p.shape), "numel": p.numel(), "reason": reason})
    plan.total_parameters, plan.quantized_parameters = total, quantized
    plan.float_parameters = sorted(floats, key=lambda f: -f["numel"])


def replace_linear_with_quantized(model: nn.Module, adapter: Adapter,
                                  skip_modules: list[str] | None = None, module_filter: Any = None, *,
                                  progress: bool = False) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` by ``adapter``'s quantized layers, in place.

    A linear layer is left in full precision when its name matches ``skip_modules`` (default:
    ``adapter.config.skip_modules``; matching rules in :mod:`quantization_wrapper.patterns`), when
    ``module_filter`` returns ``False`` for it, when its ``layer_configs`` override sets
    ``method="none"``, or when no valid group size divides its ``in_features`` (a smaller valid
    group is used when one exists). Each decision and its reason lands in the plan.

    Args:
        model: the model; layers on the meta device become empty quantized layers (nothing is
            allocated), ready to be filled from a checkpoint.
        adapter: the adapter that quantizes (``layer_configs`` may route layers to other methods).
        skip_modules: patterns of modules to keep, replacing the config's list.
        module_filter: a :class:`~quantization_wrapper.filters.QuantizeModuleFilter` or callable
            ``(module, name) -> bool``; it sees every module, and ``validate()`` runs afterwards.
        progress: show a tqdm progress bar over the layers.

    Returns:
        The same ``model`` with ``model.quantization_plan`` set.

    Raises:
        QuantizationError: a layer failed; the model is left exactly as it was.
        ValueError: bad arguments, a module filter whose names matched nothing, or a layer to
            quantize with non-finite weights (found before any layer is converted).
    """
    # Fused MoE experts (3-D parameters) become per-expert linear layers for planning; a block none
    # of whose experts is to be quantized gets its original module back (its decisions stay in the plan).
    unfused = [(name, module) for name, module in iter_fused_experts(model) if name] \
        if isinstance(model, nn.Module) else []
    for name, module in unfused:
        model.set_submodule(name, unfuse_experts(module))
    try:
        decisions = plan_linear_layers(model, adapter, skip_modules, module_filter)
    except BaseException:
        for name, original in unfused:
            model.set_submodule(name, original)
        raise
    quantized_names = [d.name for d in decisions if d.config is not None]
    for name, original in list(unfused):
        if not any(n.startswith(f"{name}.") for n in quantized_names):
            model.set_submodule(name, original)
            unfused.remove((name, original))
    replaced: list[tuple[str, nn.Module]] = list(unfused)
    todo = [d for d in decisions if d.config is not None]
    bar = tqdm(todo, desc=f"quantizing ({adapter.config.method.value})", unit="layer", disable=not progress)
    try:
        for decision in bar:
            new = convert_layer(adapter, decision, check_finite=False)  # plan_linear_layers checked them
            model.set_submodule(decision.name, new)
            replaced.append((decision.name, decision.linear))
    except BaseException:
        for name, original in reversed(replaced):  # expert layers first, then their fused modules
            model.set_submodule(name, original)
        raise
    finally:
        bar.close()
    record_plan(model, adapter, decisions)
    return model


def _warn_unmatched(skip: list[str], skip_hits: set[str], config: QuantizationConfig,
                    override_hits: set[str], overruled: dict[str, str]) -> None:
    default_skip = QuantizationConfig.__dataclass_fields__["skip_modules"].default_factory()
    unmatched_skip = [p for p in skip if p not in skip_hits and p not in default_skip]
    if unmatched_skip:
        warnings.warn(f"skip_modules {unmatched_skip} matched no linear layer; check the names "
                      f"against model.named_modules()", stacklevel=3)
    for override, pattern in overruled.items():
        if override not in override_hits:
            warnings.warn(f"layer_configs[{override!r}] applies only to modules that skip_modules[{pattern!r}] keeps "
                          f"in full precision; skip_modules wins over layer_configs, so the override has no "
                          f"effect. Remove one of the two entries", stacklevel=3)
    unmatched_overrides = [p for p in config.layer_configs if p not in override_hits and p not in overruled]
    if unmatched_overrides:
        warnings.warn(f"layer_configs {unmatched_overrides} matched no linear layer; check the names "
                      f"against model.named_modules()", stacklevel=3)
