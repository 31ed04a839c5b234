"""Bit allocation as a multiple-choice knapsack over (bytes, sensitivity) per layer and candidate.

**Allocation** is a multiple-choice knapsack. ``solver="knapsack"`` (default) builds the exact
Pareto frontier of (bytes, total sensitivity) over the layers and picks the best point within the
budget; the frontier does not depend on the budget, so more budget never gives a worse plan.
``solver="greedy"`` upgrades the layer with the best sensitivity saved per byte while the budget
allows, then runs exchange steps (one layer up, another down) until no exchange helps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["pareto_frontier", "solve_greedy"]


@dataclass
class _Frontier:
    """Pareto frontier of (bytes, sensitivity) over layers; ``back`` rebuilds the choices."""

    bytes: np.ndarray
    sens: np.ndarray
    back: list[tuple[np.ndarray, np.ndarray]]
    exact: bool

    def best(self, budget: int) -> tuple[list[int], int, float] | None:
        """Choices (candidate index per layer) of the least sensitive point within ``budget``."""
        k = int(np.searchsorted(self.bytes, budget, side="right")) - 1
        if k < 0:
            return None
        total_bytes, total_sens = int(self.bytes[k]), float(self.sens[k])
        choice = [0] * len(self.back)
        for i in range(len(self.back) - 1, -1, -1):
            parent, cand = self.back[i]
            choice[i] = int(cand[k])
            k = int(parent[k])
        return choice, total_bytes, total_sens


def pareto_frontier(costs: np.ndarray, sens: np.ndarray, *, max_states: int = 200_000) -> _Frontier:
    """The exact Pareto frontier of a multiple-choice knapsack.

    Args:
        costs: ``(layers, candidates)`` integer bytes; a negative entry marks a candidate the layer
            cannot take.
        sens: ``(layers, candidates)`` sensitivities.
        max_states: when the frontier grows past this, states are merged into byte buckets (each
            keeps its true bytes, so budgets stay exact; only optimality becomes approximate).
    """
    costs = np.asarray(costs, dtype=np.int64)
    sens = np.asarray(sens, dtype=np.float64)
    f_bytes, f_sens = np.zeros(1, dtype=np.int64), np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    exact = True
    for i in range(costs.shape[0]):
        ok = np.flatnonzero(costs[i] >= 0)
        nb = (f_bytes[:, None] + costs[i, ok][None, :]).ravel()
        ns = (f_sens[:, None] + sens[i, ok][None, :]).ravel()
        parent = np.repeat(np.arange(len(f_bytes), dtype=np.int64), len(ok))
        cand = np.tile(ok, len(f_bytes))
        order = np.lexsort((ns, nb))
        nb, ns, parent, cand = nb[order], ns[order], parent[order], cand[order]
        running = np.minimum.accumulate(ns)
        keep = np.ones(len(ns), dtype=bool)
        keep[1:] = ns[1:] < running[:-1]
        nb, ns, parent, cand = nb[keep], ns[keep], parent[keep], cand[keep]
        if len(nb) > max_states:
            exact = False
            unit = (int(nb[-1]) - int(nb[0])) / max_states + 1
            bucket = np.ceil((nb - nb[0]) / unit).astype(np.int64)
            last = np.ones(len(nb), dtype=bool)
            last[:-1] = bucket[1:] != bucket[:-1]  # the least sensitive state of each bucket
            nb, ns, parent, cand = nb[last], ns[last], parent[last], cand[last]
        f_bytes, f_sens = nb, ns
        back.append((parent, cand))
    return _Frontier(f_bytes, f_sens, back, exact)


def solve_greedy(costs: np.ndarray, sens: np.ndarray, budget: int, *,
                 max_steps: int = 10_000) -> list[int] | None:
    """Greedy allocation with exchange steps (``None`` when even the cheapest choice is over
    ``budget``).

    Start from each layer's cheapest candidate and repeatedly take the change with the most
    sensitivity saved per extra byte that still fits. Then improve by exchanges: apply the best of
    (a) one layer's change that fits and (b) a pair -- one layer made cheaper to pay for another
    one's upgrade -- until neither lowers the total sensitivity.
    """
    costs = np.asarray(costs, dtype=np.int64)
    sens = np.asarray(sens, dtype=np.float64)
    L, C = costs.shape
    big = np.iinfo(np.int64).max // 4
    cost = np.where(costs >= 0, costs, big)
    score = np.where(costs >= 0, sens, np.inf)
    choice = np.array([np.lexsort((score[i], cost[i]))[0] for i in range(L)], dtype=np.int64)
    rows = np.arange(L)
    used = int(cost[rows, choice].sum())
    if used > budget:
        return None
    eps = 1e-15

    def moves():
        dc = cost - cost[rows, choice][:, None]
        ds = score[rows, choice][:, None] - score  # sensitivity saved
        return dc, np.where(costs >= 0, ds, -np.inf)

    for _ in range(max_steps):  # upgrades, most efficient first
        dc, ds = moves()
        fits = (dc <= budget - used) & (ds > eps)
        if not fits.any():
            break
        eff = np.where(dc > 0, ds / np.maximum(dc, 1), np.inf)
        i, c = np.unravel_index(int(np.argmax(np.where(fits, eff, -np.inf))), eff.shape)
        used += int(dc[i, c])
        choice[i] = c
    for _ in range(max_steps):  # exchange steps
        dc, ds = moves()
        slack = budget - used
        fits = (dc <= slack) & (ds > eps)
        best_single = float(ds[fits].max()) if fits.any() else 0.0
        down = np.flatnonzero(((dc < 0) & np.isfinite(ds)).ravel())
        up = np.flatnonzero(((dc > 0) & (ds > eps)).ravel())
        best_pair, pair = 0.0, None
        if len(down) and len(up):
            total_c = dc.ravel()[down][:, None] + dc.ravel()[up][None, :]
            total_s = ds.ravel()[down][:, None] + ds.ravel()[up][None, :]
            ok = (total_c <= slack) & ((down // C)[:, None] != (up // C)[None, :]) & (total_s > eps)
            if ok.any():
                a, b = np.unravel_index(int(np.argmax(np.where(ok, total_s, -np.inf))), ok.shape)
                best_pair, pair = float(total_s[a, b]), (down[a], up[b])
        if best_single <= eps and best_pair <= eps:
            break
        if best_single >= best_pair:
            i, c = np.unravel_index(int(np.argmax(np.where(fits, ds, -np.inf))), ds.shape)
            choice[i] = c
        else:
            for flat in pair:
                choice[flat // C] = flat % C
        used = int(cost[rows, choice].sum())
    return [int(c) for c in choice]
