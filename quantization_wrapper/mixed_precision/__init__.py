"""Mixed precision under a memory budget: per-layer sensitivity, then an optimal bit allocation.

:func:`plan_mixed_precision` chooses, for every linear layer, one of a list of candidate settings
(bit width, group size, method) so that the sum of the layers' sensitivities is minimal while the
bytes they hold stay within a budget. It returns a :class:`MixedPrecisionPlan` whose
``layer_configs`` go straight into :class:`~quantization_wrapper.QuantizationConfig`.

The modules, bottom up (each imports only modules listed before it):

* :mod:`.candidates`: :class:`Candidate`, :data:`METHOD_FAMILIES`, :func:`default_candidates`.
* :mod:`.calibration`: running calibration batches, :func:`collect_calibration_stats`.
* :mod:`.sensitivity`: :class:`SensitivityAnalyzer` and its per-model cache.
* :mod:`.solver`: :func:`pareto_frontier` and :func:`solve_greedy` (independent of the rest).
* :mod:`.planner`: :func:`plan_mixed_precision`, :class:`MixedPrecisionPlan`.
"""

from __future__ import annotations

from .calibration import CalibrationStats, collect_calibration_stats
from .calibration import default_output  # noqa: F401  (its old import path)
from .candidates import METHOD_FAMILIES, Candidate, default_candidates, mixes_bit_widths
from .planner import InfeasibleBudgetError, LayerChoice, MixedPrecisionPlan, plan_mixed_precision
from .sensitivity import SensitivityAnalyzer
from .solver import pareto_frontier, solve_greedy

__all__ = [
    "Candidate",
    "METHOD_FAMILIES",
    "default_candidates",
    "mixes_bit_widths",
    "CalibrationStats",
    "collect_calibration_stats",
    "SensitivityAnalyzer",
    "LayerChoice",
    "MixedPrecisionPlan",
    "plan_mixed_precision",
    "pareto_frontier",
    "solve_greedy",
    "InfeasibleBudgetError",
]
