"""Mixed precision under a memory budget: per-layer sensitivity, then an optimal bit allocation.

:func:`plan_mixed_precision` chooses, for every linear layer, one of a list of candidate settings
(bit width, group size, method) so that the sum of the layers' sensitivities is minimal while the
bytes they hold stay within a budget. It returns a :class:`MixedPrecisionPlan` whose
``layer_configs`` go straight into :class:`~quantization_wrapper.QuantizationConfig`.

**Bytes** are exact: every candidate is sized with :func:`~quantization_wrapper.sizing.layer_nbytes`
(packed weights, scales, zero points, quant maps, padding and bias), the same number
``model.quantization_plan`` reports after quantizing. A budget in bits per weight counts every
stored byte of the planned layers, as mlx-lm counts it: ``8 * bytes / weights``.

**Sensitivity** of layer ``l`` to candidate ``c`` is measured with the real adapter: the layer is
quantized (``quantize_linear``) and dequantized (``dequantize_module``), and the error ``dW`` is
scored.

* Without calibration data: the relative weight error ``||dW||^2 / ||W||^2`` (noise-to-signal
  ratio of the layer's output for white inputs).
* With calibration batches: forward hooks collect each layer's per-input-channel second moment
  ``E[x^2]``, and the error becomes ``||dW diag(sqrt(E x^2))||^2 / ||W diag(sqrt(E x^2))||^2``
  (the layer's relative output error on the calibration inputs, channels weighted by their
  energy). Layers do not matter equally, though: measured on all-MiniLM-L6-v2, the same relative
  error in a feed-forward output projection moves the final embeddings several hundred times more
  than in an attention query projection. So each layer also gets an end-to-end gain
  ``g_l = E2E_l / local_l(ref)``: its quantization error at a reference candidate (the cheapest) is
  put into the model alone and the relative change of the model's output on the calibration
  batches is measured (one forward pass per layer and batch, with
  :func:`torch.func.functional_call`, nothing modified). The sensitivity is ``g_l * local_l(c)``.
  ``end_to_end=False`` skips those passes.

Measurements are cached per model (a weak reference): the quantization error of a layer under a
candidate (its per-input-channel squared error, from which every metric is computed) by layer
name, the weight tensor's identity and version and the candidate's fitted settings; the scores and
gains additionally by the calibration statistics' fingerprint. Planning one model for several
budgets quantizes each layer once per candidate; new calibration data only re-runs the end-to-end
passes (and one quantization per layer for the reference).

**Allocation** is a multiple-choice knapsack. ``solver="knapsack"`` (default) builds the exact
Pareto frontier of (bytes, total sensitivity) over the layers and picks the best point within the
budget; the frontier does not depend on the budget, so more budget never gives a worse plan.
``solver="greedy"`` upgrades the layer with the best sensitivity saved per byte while the budget
allows, then runs exchange steps (one layer up, another down) until no exchange helps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .config import METHOD_SPECS, QuantizationConfig, QuantizationMethod, dtype_to_str
from .patterns import best_match
from .sizing import LinearShape, fit_layer_config, layer_nbytes, linear_layer_shapes, parse_memory_size
from .surgery import _fmt_bytes

__all__ = [
    "Candidate",
    "METHOD_FAMILIES",
    "default_candidates",
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

logger = logging.getLogger(__name__)
M = QuantizationMethod


class InfeasibleBudgetError(ValueError):
    """The budget is below the smallest size any choice of candidates reaches."""


# ---------------------------------------------------------------------- candidates
#: Method families and their base method; each family's default candidates are listed in
#: :func:`default_candidates`.
METHOD_FAMILIES: dict[str, QuantizationMethod] = {
    "hqq": M.HQQ, "mlx": M.MLX_INT4, "quanto": M.QUANTO_INT4, "bnb": M.BNB_NF4,
}
_FAMILY_ALIASES = {"bitsandbytes": "bnb", "optimum-quanto": "quanto", "none": None}


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


def _parse_family(method_family: Any) -> tuple[str, QuantizationMethod]:
    if isinstance(method_family, str) and method_family.strip().lower() in (*METHOD_FAMILIES, *_FAMILY_ALIASES):
        key = method_family.strip().lower()
        key = _FAMILY_ALIASES.get(key, key)
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
    """The candidates :func:`plan_mixed_precision` tries when none are given.

    * ``hqq``: 2, 3, 4 and 8 bits, each at group size 32, 64 and 128 (1 bit is allowed but not
      tried by default: without calibration it rarely pays for its error).
    * ``mlx``: 2, 3, 4, 5, 6 and 8 bits at group size 32, 64 and 128.
    * ``quanto``: ``quanto_int2``, ``quanto_int4``, ``quanto_int8`` (quanto fixes the group size).
    * ``bnb``: ``bnb_nf4``, ``bnb_int8`` and ``none`` (kept in full precision).
    """
    family, _ = _parse_family(method_family)
    if family == "hqq":
        items = [dict(method="hqq", bits=b, group_size=g) for b in (2, 3, 4, 8) for g in (32, 64, 128)]
    elif family == "mlx":
        items = [dict(method="mlx_int4", bits=b, group_size=g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)]
    elif family == "quanto":
        items = [dict(method=m) for m in ("quanto_int2", "quanto_int4", "quanto_int8")]
    else:
        items = [dict(method="bnb_nf4"), dict(method="bnb_int8"), dict(method="none")]
    return [Candidate.of(item) for item in items]


def _parse_candidates(candidates: Any, family_method: QuantizationMethod,
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
            base._merged(overrides)
        except ValueError as e:
            raise ValueError(f"candidates entry {item!r}: {e}") from e
        cand = Candidate.of(overrides)
        if cand not in out:
            out.append(cand)
    if not out:
        raise ValueError("candidates is empty; give at least one setting (e.g. [2, 3, 4, 8])")
    return out


# ---------------------------------------------------------------------- calibration
def _batch_tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [v for v in batch.values() if isinstance(v, torch.Tensor)]
    if isinstance(batch, (list, tuple)):
        return [v for v in batch if isinstance(v, torch.Tensor)]
    return []


def _run(model: nn.Module, batch: Any, device: torch.device, params: dict | None = None) -> Any:
    def move(v):
        return v.to(device) if isinstance(v, torch.Tensor) else v

    if isinstance(batch, Mapping):
        args, kwargs = (), {k: move(v) for k, v in batch.items()}
    elif isinstance(batch, (list, tuple)):
        args, kwargs = tuple(move(v) for v in batch), {}
    else:
        args, kwargs = (move(batch),), {}
    if params:
        return torch.func.functional_call(model, params, args, kwargs)
    return model(*args, **kwargs)


def default_output(output: Any, batch: Any) -> torch.Tensor:
    """The tensor the end-to-end error compares: ``last_hidden_state``, else ``logits``, else the
    first tensor of the output; positions the batch's ``attention_mask`` masks out are zeroed."""
    tensor = None
    for key in ("last_hidden_state", "logits"):
        value = getattr(output, key, None)
        if value is None and isinstance(output, Mapping):
            value = output.get(key)
        if isinstance(value, torch.Tensor):
            tensor = value
            break
    if tensor is None:
        if isinstance(output, torch.Tensor):
            tensor = output
        elif isinstance(output, (tuple, list)) or hasattr(output, "to_tuple"):
            items = output.to_tuple() if hasattr(output, "to_tuple") else output
            tensor = next((v for v in items if isinstance(v, torch.Tensor)), None)
    if tensor is None:
        raise ValueError(f"cannot find a tensor in the model output ({type(output).__name__}); pass "
                         f"output_fn=lambda output, batch: <tensor> to plan_mixed_precision")
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tensor.dim() == 3 and tensor.shape[:2] == mask.shape:
        tensor = tensor * mask.to(tensor.device, tensor.dtype).unsqueeze(-1)
    return tensor


@dataclass
class CalibrationStats:
    """What the calibration batches tell about each planned layer.

    Attributes:
        second_moments: layer name -> per-input-channel ``E[x^2]`` (float32, on the CPU).
        tokens: rows (tokens) seen per layer.
        batches: the calibration batches (kept for the end-to-end passes).
        fingerprint: a digest of the statistics; part of every cache key.
    """

    second_moments: dict[str, torch.Tensor]
    tokens: dict[str, int]
    batches: list[Any]
    fingerprint: str


def _inputs_digest(batches: Sequence[Any]) -> str:
    h = hashlib.sha1()
    for batch in batches:
        items = sorted(batch.items()) if isinstance(batch, Mapping) else [("", t) for t in _batch_tensors(batch)]
        for key, t in items:
            if isinstance(t, torch.Tensor):
                h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _calibration_batches(calibration: Any) -> list:
    """``calibration`` as a non-empty list of batches (one tensor or dict is one batch)."""
    if isinstance(calibration, (torch.Tensor, Mapping)):
        calibration = [calibration]
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise ValueError(f"calibration must be an iterable of model inputs (tensors or dicts of tensors), "
                         f"got {type(calibration).__name__}")
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty; give at least one batch of model inputs")
    return batches


def collect_calibration_stats(model: nn.Module, calibration: Iterable[Any], *,
                              layers: Iterable[str] | None = None) -> CalibrationStats:
    """Run ``calibration`` through ``model`` with forward hooks on its linear layers and collect
    each layer's per-input-channel second moment ``E[x^2]`` (over the tokens a batch's
    ``attention_mask`` marks as real, when it has one).

    Args:
        model: the float model.
        calibration: model inputs: tensors (``model(t)``), dicts of keyword tensors as a tokenizer
            returns them (``model(**d)``), or tuples (``model(*t)``).
        layers: names of the linear layers to watch (default: all).

    Raises:
        ValueError: when ``calibration`` is empty or holds something that is not a model input.
    """
    batches = _calibration_batches(calibration)
    for i, batch in enumerate(batches):
        if not _batch_tensors(batch):
            raise ValueError(f"calibration batch {i} is a {type(batch).__name__} without tensors; each batch "
                             f"must be a tensor, a dict of tensors (e.g. a tokenizer's output) or a tuple")
    wanted = set(layers) if layers is not None else None
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    padding: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0].detach()
            mask = padding["mask"]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(x.device).bool()]  # padded positions are not real inputs
            x = x.reshape(-1, x.shape[-1]).float()
            s = (x * x).sum(0).cpu()
            sums[name] = sums[name] + s if name in sums else s
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and (wanted is None or n in wanted)]
    device = _model_device(model)
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                padding["mask"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                _run(model, batch, device)
    finally:
        for h in handles:
            h.remove()
    moments = {n: sums[n] / max(counts[n], 1) for n in sums}
    h = hashlib.sha1(_inputs_digest(batches).encode())
    for name in sorted(moments):
        h.update(name.encode())
        h.update(moments[name].numpy().tobytes())
    return CalibrationStats(moments, counts, batches, h.hexdigest())


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# ---------------------------------------------------------------------- sensitivity
class _ModelCache:
    """Measurements of one model, shared by every analyzer built on it."""

    def __init__(self) -> None:
        self.columns: dict[tuple, torch.Tensor] = {}
        self.local: dict[tuple, float] = {}
        self.gain: dict[tuple, float] = {}
        self.stats: dict[str, CalibrationStats] = {}


_CACHES: "weakref.WeakKeyDictionary[nn.Module, _ModelCache]" = weakref.WeakKeyDictionary()


def _config_key(config: QuantizationConfig) -> tuple:
    return (config.method.value, config.bits, config.group_size, dtype_to_str(config.compute_dtype),
            dtype_to_str(config.storage_dtype), config.double_quant, config.quant_type,
            json.dumps(config.backend_options, sort_keys=True, default=str))


def _weight_key(linear: nn.Linear) -> tuple:
    w = linear.weight
    return (w.data_ptr(), w._version, tuple(w.shape), str(w.dtype), str(w.device))


class SensitivityAnalyzer:
    """Measures how much each linear layer of ``model`` suffers from each candidate setting.

    Args:
        model: the float model (real weights; it is not modified).
        calibration: ``None`` (weight-space errors), an iterable of model inputs, or
            :class:`CalibrationStats` from :func:`collect_calibration_stats`.
        end_to_end: with calibration, scale each layer's error by its measured end-to-end gain
            (see the module docstring).
        output_fn: ``(model_output, batch) -> tensor`` compared by the end-to-end passes
            (default: :func:`default_output`).
        backend: the backend whose adapters quantize (default: this machine's); the layers are
            quantized where their weights are.

    Attributes:
        measurements: quantizations performed by this analyzer (cache hits do none).
        forward_passes: end-to-end forward passes run.
        cache_hits: answers served from the cache.
    """

    def __init__(self, model: nn.Module, calibration: Any = None, *, end_to_end: bool = True,
                 output_fn: Callable[[Any, Any], torch.Tensor] | None = None, backend: Any = None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.backend = backend
        self.end_to_end = bool(end_to_end)
        self.output_fn = output_fn or default_output
        self.cache = _CACHES.setdefault(model, _ModelCache())
        self.measurements = self.forward_passes = self.cache_hits = 0
        self._modules = dict(model.named_modules())
        self._adapters: dict[tuple, Any] = {}
        self._reference_outputs: list[torch.Tensor] | None = None
        if calibration is None or isinstance(calibration, CalibrationStats):
            self.stats = calibration
        else:
            self.stats = self._stats_for(calibration)

    def _stats_for(self, calibration: Any) -> CalibrationStats:
        batches = _calibration_batches(calibration)
        digest = _inputs_digest(batches) + ":" + ",".join(
            f"{n}@{_weight_key(m)}" for n, m in self._modules.items() if isinstance(m, nn.Linear))
        if digest not in self.cache.stats:
            self.cache.stats[digest] = collect_calibration_stats(self.model, batches)
        else:
            self.cache_hits += 1
        return self.cache.stats[digest]

    @property
    def metric(self) -> str:
        """``"weight"``, ``"activation"`` or ``"activation+end_to_end"``."""
        if self.stats is None:
            return "weight"
        return "activation+end_to_end" if self.end_to_end else "activation"

    def _linear(self, name: str) -> nn.Linear:
        module = self._modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name!r} is not an nn.Linear of the model")
        if module.weight.device.type == "meta":
            raise ValueError(f"{name} is on the meta device; sensitivity needs the real weights "
                             f"(estimate_model_size works on meta models)")
        return module

    def _adapter(self, config: QuantizationConfig):
        from .factory import create_quantization_adapter

        key = _config_key(config)
        if key not in self._adapters:
            self._adapters[key] = create_quantization_adapter(self.backend, config.replace(skip_modules=[],
                                                                                           layer_configs={}),
                                                              strict=True)
        return self._adapters[key]

    def quantization_error(self, name: str, config: QuantizationConfig) -> torch.Tensor:
        """``W_q - W`` (float32) for layer ``name`` quantized with ``config`` by the real adapter."""
        linear = self._linear(name)
        adapter = self._adapter(config)
        with torch.no_grad():
            module = adapter.quantize_linear(linear, name, config=config)
            weight = adapter.dequantize_module(module).weight.detach()
        self.measurements += 1
        return weight.float().to(linear.weight.device) - linear.weight.detach().float()

    def column_errors(self, name: str, config: QuantizationConfig) -> torch.Tensor:
        """Per input channel ``j``: ``sum_i (W_q - W)[i, j]^2`` for layer ``name`` under ``config``.

        Every local metric is a weighted sum of these, so one quantization serves the weight-only
        and every activation-aware score; cached per layer, weight version and fitted config
        (independent of calibration data)."""
        key = (name, _weight_key(self._linear(name)), _config_key(config))
        if key not in self.cache.columns:
            self.cache.columns[key] = self.quantization_error(name, config).square().sum(0).cpu()
        return self.cache.columns[key]

    def _local(self, name: str, columns: torch.Tensor) -> float:
        W2 = self._linear(name).weight.detach().float().square().sum(0).cpu()
        if self.stats is None:
            num, den = columns.sum(), W2.sum()
        else:
            moments = self.stats.second_moments.get(name)
            if moments is None:
                raise ValueError(f"{name} saw no calibration input (is it used in the forward pass?)")
            num, den = (columns * moments).sum(), (W2 * moments).sum()
        return float(num / den) if den > 0 else 0.0

    def _key(self, name: str, config: QuantizationConfig) -> tuple:
        fp = self.stats.fingerprint if self.stats is not None else "weight"
        return (name, _weight_key(self._linear(name)), _config_key(config), fp)

    def local_error(self, name: str, config: QuantizationConfig) -> float:
        """The layer's relative error under ``config`` (weight-space, or activation-weighted with
        calibration), cached by layer, weight version, fitted config and calibration fingerprint.
        ``config`` must already fit the layer (see
        :func:`~quantization_wrapper.sizing.fit_layer_config`); method ``none`` scores 0."""
        if config.method is M.NONE:
            return 0.0
        key = self._key(name, config)
        if key in self.cache.local:
            self.cache_hits += 1
            return self.cache.local[key]
        value = self._local(name, self.column_errors(name, config))
        self.cache.local[key] = value
        return value

    def _reference(self) -> list[torch.Tensor]:
        if self._reference_outputs is None:
            device = _model_device(self.model)
            with torch.no_grad():
                self._reference_outputs = [self.output_fn(_run(self.model, b, device), b).detach().float()
                                           for b in self.stats.batches]
            self.forward_passes += len(self.stats.batches)
        return self._reference_outputs

    def gain(self, name: str, reference: QuantizationConfig) -> float:
        """End-to-end gain of layer ``name``: the relative change of the model's output when only
        this layer carries its ``reference`` quantization error, divided by the layer's local
        error (1 without calibration or with ``end_to_end=False``)."""
        if self.stats is None or not self.end_to_end or reference.method is M.NONE:
            return 1.0
        key = self._key(name, reference) + ("gain", id(self.output_fn))
        if key in self.cache.gain:
            self.cache_hits += 1
            return self.cache.gain[key]
        linear = self._linear(name)
        dW = self.quantization_error(name, reference)
        columns = dW.square().sum(0).cpu()
        self.cache.columns.setdefault((name, _weight_key(linear), _config_key(reference)), columns)
        local = self._local(name, columns)
        reference_outputs = self._reference()
        params = {f"{name}.weight": (linear.weight.detach().float() + dW).to(linear.weight.dtype)}
        device = _model_device(self.model)
        num = den = 0.0
        with torch.no_grad():
            for batch, ref in zip(self.stats.batches, reference_outputs):
                out = self.output_fn(_run(self.model, batch, device, params), batch).detach().float()
                num += float((out - ref).square().sum())
                den += float(ref.square().sum())
        self.forward_passes += len(self.stats.batches)
        value = (num / den) / local if den > 0 and local > 0 else 0.0
        self.cache.gain[key] = value
        return value


# ---------------------------------------------------------------------- allocation
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


# ---------------------------------------------------------------------- the plan
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
        rows = [(c.name, f"{c.out_features}x{c.in_features}", c.candidate, _fmt_bytes(c.bytes),
                 f"{c.bits_per_weight:.2f}", f"{c.sensitivity:.3g}") for c in self.choices]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header).rstrip(), "  ".join("-" * w for w in widths)]
        lines += [fmt.format(*r).rstrip() for r in rows]
        lines.append(self.summary())
        return "\n".join(lines)

    def summary(self) -> str:
        mix = ", ".join(f"{k} {100 * v / self.num_weights:.0f}%" for k, v in self.histogram().items())
        return (f"{len(self.choices)} layers, {_fmt_bytes(self.predicted_bytes)} of {_fmt_bytes(self.budget_bytes)} "
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
    family, family_method = _parse_family(method_family)
    if base_config is None:
        base_config = QuantizationConfig(method=family_method)
    elif base_config.method.family != family:
        raise ValueError(f"base_config.method={base_config.method.value!r} is not of method_family={family!r}")
    cands = _parse_candidates(candidates, family_method, base_config)

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
        from .sizing import estimate_model_size

        estimate = estimate_model_size(model, base_config)
        planned = {s.name for s in shapes}
        outside = estimate.other_bytes + sum(l.bytes_after for l in estimate.plan.layers if l.name not in planned)
        budget_bytes -= outside
    plannable = [i for i in range(L) if i not in stuck]
    min_bytes = fixed + sum(int(costs[i][costs[i] >= 0].min()) for i in plannable)
    if budget_bytes < min_bytes:
        raise InfeasibleBudgetError(
            f"budget={budget!r} ({_fmt_bytes(max(budget_bytes, 0))}, {8 * max(budget_bytes, 0) / num_weights:.3f} "
            f"bits/weight for {L} layers) is below the minimum achievable {_fmt_bytes(min_bytes)} "
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
    layer_cfg = base._merged(_layer_overrides(base, shape.name, cand))
    if layer_cfg.method is M.NONE:
        return layer_cfg
    fitted, _ = fit_layer_config(layer_cfg, shape.in_features, shape.out_features)
    return fitted
