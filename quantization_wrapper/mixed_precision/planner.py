"""The planner: every candidate fitted and sized per layer, scored by a
:class:`~quantization_wrapper.mixed_precision.SensitivityAnalyzer`, then allocated by a solver.

**Bytes** are exact: every candidate is sized with :func:`~quantization_wrapper.sizing.layer_nbytes`
(packed weights, scales, zero points, quant maps, padding and bias), the same number
``model.quantization_plan`` reports after quantizing. A budget in bits per weight counts every
stored byte of the planned layers, as mlx-lm counts it: ``8 * bytes / weights``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..config import QuantizationConfig, QuantizationMethod, dtype_to_str
from ..patterns import best_match
from ..sizing import LinearShape, fit_layer_config, layer_nbytes, linear_layer_shapes, parse_memory_size
from ..experts import experts_unfused
from ..units import format_bytes
from .candidates import METHOD_FAMILIES, Candidate, parse_candidates, parse_family
from .sensitivity import SensitivityAnalyzer
from .solver import pareto_frontier, solve_greedy

__all__ = ["InfeasibleBudgetError", "LayerChoice", "MixedPrecisionPlan", "plan_mixed_precision"]

logger = logging.getLogger(__name__)
M = QuantizationMethod


class InfeasibleBudgetError(ValueError):
    """The budget is below the smallest size any choice of candidates reaches."""


@dataclass
class LayerChoice:
    """The setting chosen for one layer."""

    name: str
    in_features: int
    out_features: int
    candidate: str
    overrides: dict[str, Any]
    method: str
    bits: int | None
    group_size: int | None
    bytes: int
    sensitivity: float

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.numel


@dataclass
class MixedPrecisionPlan:
    """The result of :func:`plan_mixed_precision`.

    Attributes:
        base_config: the config the overrides apply to.
        layer_configs: ``{layer name: overrides}`` for every planned layer (exact names, so they
            win over any other pattern); pass to ``QuantizationConfig(layer_configs=...)`` or use
            :attr:`config`.
        choices: per-layer choices (candidate, bytes, sensitivity).
        budget_bytes: the budget, in bytes of the planned layers.
        predicted_bytes: bytes the planned layers will hold (exact; equals the quantized model's
            ``quantization_plan`` bytes of those layers).
        num_weights: weights of the planned layers.
        total_sensitivity: the minimized objective.
        metric: ``"weight"``, ``"activation"`` or ``"activation+end_to_end"``.
        solver: ``"knapsack"`` or ``"greedy"``.
        candidates: the candidates' labels.
    """

    base_config: QuantizationConfig
    layer_configs: dict[str, dict[str, Any]]
    choices: list[LayerChoice]
    budget_bytes: int
    predicted_bytes: int
    num_weights: int
    total_sensitivity: float
    metric: str
    solver: str
    candidates: list[str] = field(default_factory=list)
    fixed_bytes: int = 0

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight of the planned layers, every byte counted."""
        return 8 * self.predicted_bytes / self.num_weights

    @property
    def budget_bits_per_weight(self) -> float:
        return 8 * self.budget_bytes / self.num_weights

    @property
    def config(self) -> QuantizationConfig:
        """``base_config`` with :attr:`layer_configs`: ready for ``create_quantization_adapter``."""
        return self.base_config.replace(layer_configs=dict(self.layer_configs))

    def histogram(self) -> dict[str, int]:
        """Weights per candidate label."""
        counts: Counter = Counter()
        for c in self.choices:
            counts[c.candidate] += c.numel
        return dict(sorted(counts.items()))

    def table(self) -> str:
        header = ("layer", "shape", "choice", "bytes", "bits/w", "sensitivity")
        rows = [(c.name, f"{c.out_features}x{c.in_features}", c.candidate, format_bytes(c.bytes),
                 f"{c.bits_per_weight:.2f}", f"{c.sensitivity:.3g}") for c in self.choices]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header).rstrip(), "  ".join("-" * w for w in widths)]
        lines += [fmt.format(*r).rstrip() for r in rows]
        lines.append(self.summary())
        return "\n".join(lines)

    def summary(self) -> str:
        mix = ", ".join(f"{k} {100 * v / self.num_weights:.0f}%" for k, v in self.histogram().items())
        return (f"{len(self.choices)} layers, {format_bytes(self.predicted_bytes)} of {format_bytes(self.budget_bytes)} "
                f"budget ({self.bits_per_weight:.3f} of {self.budget_bits_per_weight:.3f} bits/weight); "
                f"{self.metric} sensitivity {self.total_sensitivity:.4g} ({self.solver}); weights: {mix}")

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_config": self.base_config.to_dict(),
            "layer_configs": self.config.to_dict()["layer_configs"],
            "budget_bytes": self.budget_bytes, "predicted_bytes": self.predicted_bytes,
            "num_weights": self.num_weights, "bits_per_weight": self.bits_per_weight,
            "total_sensitivity": self.total_sensitivity, "metric": self.metric, "solver": self.solver,
            "candidates": list(self.candidates),
            "choices": [dataclasses.asdict(c) for c in self.choices],
        }


def _budget_bytes(budget: Any, num_weights: int) -> int:
    if isinstance(budget, bool):
        raise ValueError(f"budget={budget!r} must be bits per weight (a number, e.g. 4.2) or a memory "
                         f"size (a string, e.g. '12MB')")
    if isinstance(budget, (int, float)):
        if not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"budget={budget!r} bits per weight must be a positive number")
        return int(math.floor(budget * num_weights / 8))
    if isinstance(budget, str):
        return parse_memory_size(budget)
    raise ValueError(f"budget={budget!r} must be bits per weight (a number, e.g. 4.2) or a memory size "
                     f"(a string, e.g. '12MB')")


def _reference_index(costs: np.ndarray, row: int) -> int:
    """The cheapest quantizing candidate of a layer: its error is the largest and best measured."""
    ok = np.flatnonzero(costs[row] >= 0)
    return int(ok[np.argmin(costs[row, ok])]) if len(ok) else -1


def plan_mixed_precision(model: nn.Module, budget: float | str, *, method_family: Any = None,
                         candidates: Sequence[Any] | None = None, calibration: Any = None,
                         base_config: QuantizationConfig | None = None, solver: str = "knapsack",
                         end_to_end: bool = True, output_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                         budget_scope: str = "layers", analyzer: SensitivityAnalyzer | None = None,
                         backend: Any = None, progress: bool = False) -> MixedPrecisionPlan:
    """Choose a setting per linear layer that minimizes the total sensitivity within ``budget``.

    Args:
        model: the float model (real weights; not modified).
        budget: bits per weight of the planned layers, every stored byte counted (a number, e.g.
            ``4.2``), or a memory size (a string, e.g. ``"12MB"``; binary units).
        method_family: ``"hqq"``, ``"mlx"``, ``"quanto"``, ``"bnb"`` or a method of one
            (``"mlx_int4"``); default: ``base_config``'s.
        candidates: the settings to choose from (default: :func:`default_candidates`): bit widths
            (``[2, 3, 4, 8]``), ``(bits, group_size)`` pairs, method names (``"bnb_int8"``,
            ``"none"``), dicts of ``layer_configs`` overrides or ``QuantizationConfig`` objects.
        calibration: model inputs (an iterable of tensors or tokenizer dicts) for activation-aware,
            end-to-end calibrated sensitivity, or :class:`CalibrationStats`; ``None`` uses
            weight-space errors.
        base_config: compute dtype, skip list, backend options and other fields the plan keeps
            (default: the family's method with default settings). Layers it skips are not planned.
        solver: ``"knapsack"`` (exact Pareto frontier) or ``"greedy"`` (with exchange steps).
        end_to_end: with calibration, scale layer errors by their measured end-to-end gain.
        output_fn: ``(model_output, batch) -> tensor`` for the end-to-end passes.
        budget_scope: ``"layers"`` (the budget covers the planned layers) or ``"model"`` (a memory
            size for the whole model: the other tensors and skipped layers are subtracted first).
        analyzer: a :class:`SensitivityAnalyzer` to reuse (its calibration wins).
        backend: backend whose adapters measure the errors (default: this machine's).
        progress: show a progress bar over the layers.

    Returns:
        A :class:`MixedPrecisionPlan`; ``plan.config`` quantizes the model as planned.

    Raises:
        InfeasibleBudgetError: the budget is below the smallest achievable size (which it names).
        ValueError: for bad arguments.
    """
    # MoE experts are planned per expert: the analysis hooks and swaps the per-expert layers, which
    # exist only while the fused modules are unfused (views; put back afterwards)
    with experts_unfused(model):
        if analyzer is not None:
            analyzer.refresh_modules()
        return _plan_mixed_precision(model, budget, method_family=method_family, candidates=candidates,
                                     calibration=calibration, base_config=base_config, solver=solver,
                                     end_to_end=end_to_end, output_fn=output_fn, budget_scope=budget_scope,
                                     analyzer=analyzer, backend=backend, progress=progress)


def _plan_mixed_precision(model: nn.Module, budget: float | str, *, method_family: Any = None,
                         candidates: Sequence[Any] | None = None, calibration: Any = None,
                         base_config: QuantizationConfig | None = None, solver: str = "knapsack",
                         end_to_end: bool = True, output_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                         budget_scope: str = "layers", analyzer: SensitivityAnalyzer | None = None,
                         backend: Any = None, progress: bool = False) -> MixedPrecisionPlan:
    """The body of :func:`plan_mixed_precision`, on a model whose experts are unfused."""
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if solver not in ("knapsack", "greedy"):
        raise ValueError(f"solver={solver!r} is not valid; allowed: 'knapsack', 'greedy'")
    if budget_scope not in ("layers", "model"):
        raise ValueError(f"budget_scope={budget_scope!r} is not valid; allowed: 'layers', 'model'")
    if base_config is not None and not isinstance(base_config, QuantizationConfig):
        raise ValueError(f"base_config must be a QuantizationConfig, got {type(base_config).__name__}")
    if method_family is None:
        if base_config is None:
            raise ValueError("plan_mixed_precision needs method_family (one of "
                             f"{', '.join(METHOD_FAMILIES)}) or a base_config")
        method_family = base_config.method
    family, family_method = parse_family(method_family)
    if base_config is None:
        base_config = QuantizationConfig(method=family_method)
    elif base_config.method.family != family:
        raise ValueError(f"base_config.method={base_config.method.value!r} is not of method_family={family!r}")
    cands = parse_candidates(candidates, family_method, base_config)

    shapes = [s for s in linear_layer_shapes(model) if not base_config.is_skipped(s.name)]
    if not shapes:
        raise ValueError("the model has no linear layer to plan (all skipped or none present)")
    if any(s.dtype not in (torch.float32, torch.float16, torch.bfloat16) for s in shapes):
        raise ValueError("plan_mixed_precision needs a float model (float32/float16/bfloat16 weights)")
    num_weights = sum(s.numel for s in shapes)

    # Per layer and candidate: the fitted config (None: the layer cannot take it) and its bytes.
    L, C = len(shapes), len(cands)
    configs: list[list[QuantizationConfig | None]] = []
    costs = np.full((L, C), -1, dtype=np.int64)
    for i, shape in enumerate(shapes):
        row = []
        for j, cand in enumerate(cands):
            fitted = _fitted(base_config, shape, cand)
            row.append(fitted)
            if fitted is not None and fitted.method is M.NONE:
                costs[i, j] = shape.nbytes  # surgery leaves a layer set to 'none' as it is
            elif fitted is not None:
                costs[i, j] = layer_nbytes(fitted, shape.in_features, shape.out_features, shape.bias, shape.dtype)
        configs.append(row)
    # A layer no candidate fits stays in float: a fixed cost inside the budget.
    stuck = [i for i in range(L) if (costs[i] < 0).all()]
    fixed = sum(shapes[i].nbytes for i in stuck)

    budget_bytes = _budget_bytes(budget, num_weights)
    if budget_scope == "model":
        if not isinstance(budget, str):
            raise ValueError("budget_scope='model' needs a memory size (e.g. '12MB'), not bits per weight")
        from ..sizing import estimate_model_size

        estimate = estimate_model_size(model, base_config)
        planned = {s.name for s in shapes}
        outside = estimate.other_bytes + sum(l.bytes_after for l in estimate.plan.layers if l.name not in planned)
        budget_bytes -= outside
    plannable = [i for i in range(L) if i not in stuck]
    min_bytes = fixed + sum(int(costs[i][costs[i] >= 0].min()) for i in plannable)
    if budget_bytes < min_bytes:
        raise InfeasibleBudgetError(
            f"budget={budget!r} ({format_bytes(max(budget_bytes, 0))}, {8 * max(budget_bytes, 0) / num_weights:.3f} "
            f"bits/weight for {L} layers) is below the minimum achievable {format_bytes(min_bytes)} "
            f"({8 * min_bytes / num_weights:.3f} bits/weight) with candidates "
            f"{', '.join(c.label for c in cands)}; raise the budget or add cheaper candidates")

    if analyzer is None:
        analyzer = SensitivityAnalyzer(model, calibration, end_to_end=end_to_end, output_fn=output_fn,
                                       backend=backend)
    elif analyzer.model is not model:
        raise ValueError("analyzer was built for another model")
    sens = np.zeros((L, C))
    for i in tqdm(plannable, desc="sensitivity", unit="layer", disable=not progress):
        shape = shapes[i]
        ref = _reference_index(costs, i)
        gain = analyzer.gain(shape.name, configs[i][ref]) if ref >= 0 else 1.0
        for j in range(C):
            if configs[i][j] is not None:
                sens[i, j] = gain * analyzer.local_error(shape.name, configs[i][j])

    sub_costs, sub_sens = costs[plannable], sens[plannable]
    remaining = budget_bytes - fixed
    if solver == "knapsack":
        frontier = pareto_frontier(sub_costs, sub_sens)
        choice, _, _ = frontier.best(remaining)
        if not frontier.exact:  # bucketed: the greedy answer may be better
            greedy = solve_greedy(sub_costs, sub_sens, remaining)
            if greedy is not None and _objective(sub_sens, greedy) < _objective(sub_sens, choice):
                choice = greedy
    else:
        choice = solve_greedy(sub_costs, sub_sens, remaining)
    picked = dict(zip(plannable, choice))

    choices, layer_configs = [], {}
    for i, shape in enumerate(shapes):
        if i in picked:
            j = picked[i]
            fitted, cand = configs[i][j], cands[j]
            layer_bytes, score = int(costs[i, j]), float(sens[i, j])
            overrides = _layer_overrides(base_config, shape.name, cand)
            label = cand.label
        else:
            fitted, overrides, label, layer_bytes, score = None, {"method": "none"}, "none (nothing fits)", shape.nbytes, 0.0
        layer_configs[shape.name] = overrides
        method = fitted.method.value if fitted is not None else "none"
        bits = fitted.bits if fitted is not None and fitted.method is not M.NONE else None
        group = fitted.group_size if fitted is not None else None
        choices.append(LayerChoice(shape.name, shape.in_features, shape.out_features, label, overrides,
                                   method, bits, group, layer_bytes, score))
    predicted = sum(c.bytes for c in choices)
    plan = MixedPrecisionPlan(base_config=base_config, layer_configs=layer_configs, choices=choices,
                              budget_bytes=budget_bytes, predicted_bytes=predicted, num_weights=num_weights,
                              total_sensitivity=float(sum(c.sensitivity for c in choices)),
                              metric=analyzer.metric, solver=solver, candidates=[c.label for c in cands],
                              fixed_bytes=fixed)
    logger.info("mixed precision: %s", plan.summary())
    return plan


def _objective(sens: np.ndarray, choice: Sequence[int]) -> float:
    return float(sum(sens[i, c] for i, c in enumerate(choice)))


def _layer_overrides(base: QuantizationConfig, name: str, cand: Candidate) -> dict[str, Any]:
    """The override a layer gets: the base config's own override for it (if any) with the
    candidate's fields on top, so one exact-name entry says everything."""
    pattern = best_match(name, base.layer_configs)
    inherited = dict(base.layer_configs[pattern]) if pattern is not None else {}
    overrides = {**inherited, **cand.as_dict()}
    return {k: (v.value if isinstance(v, QuantizationMethod) else dtype_to_str(v) if isinstance(v, torch.dtype) else v)
            for k, v in overrides.items()}


def _fitted(base: QuantizationConfig, shape: LinearShape, cand: Candidate) -> QuantizationConfig | None:
    layer_cfg = base.with_overrides(_layer_overrides(base, shape.name, cand))
    if layer_cfg.method is M.NONE:
        return layer_cfg
    fitted, _ = fit_layer_config(layer_cfg, shape.in_features, shape.out_features)
    return fitted
