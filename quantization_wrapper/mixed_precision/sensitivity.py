"""Per-layer sensitivity to a candidate setting, measured with the real adapter and cached per model.

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
"""

from __future__ import annotations

import json
import weakref
from typing import Any, Callable

import torch
from torch import nn

from backend_manager import Backend, detect_backend

from ..config import QuantizationConfig, QuantizationMethod, dtype_to_str
from ..registry import build_adapter
from ..validation import require_runnable
from .calibration import (
    CalibrationStats,
    calibration_batches,
    collect_calibration_stats,
    default_output,
    inputs_digest,
    model_device,
    run_batch,
)

__all__ = ["SensitivityAnalyzer"]

M = QuantizationMethod


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

    def refresh_modules(self) -> None:
        """Look the model's layers up again (after its structure changed, e.g. MoE experts unfused)."""
        self._modules = dict(self.model.named_modules())

    def _stats_for(self, calibration: Any) -> CalibrationStats:
        batches = calibration_batches(calibration)
        digest = inputs_digest(batches) + ":" + ",".join(
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
        key = _config_key(config)
        if key not in self._adapters:
            config = config.replace(skip_modules=[], layer_configs={})
            backend = detect_backend() if self.backend is None else Backend.parse(self.backend)
            require_runnable(config, backend)
            self._adapters[key] = build_adapter(config, backend)
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
            device = model_device(self.model)
            with torch.no_grad():
                self._reference_outputs = [self.output_fn(run_batch(self.model, b, device), b).detach().float()
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
        device = model_device(self.model)
        num = den = 0.0
        with torch.no_grad():
            for batch, ref in zip(self.stats.batches, reference_outputs):
                out = self.output_fn(run_batch(self.model, batch, device, params), batch).detach().float()
                num += float((out - ref).square().sum())
                den += float(ref.square().sum())
        self.forward_passes += len(self.stats.batches)
        value = (num / den) / local if den > 0 and local > 0 else 0.0
        self.cache.gain[key] = value
        return value
