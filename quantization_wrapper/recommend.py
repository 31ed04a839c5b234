"""Memory model and method recommendation.

:func:`bits_per_weight` gives the stored bits per quantized weight of a config, metadata included
(scales, zeros, second-level statistics). :func:`estimate_footprint_gb` turns that into the memory
a run needs: weights (quantized linear layers plus the float parameters that stay unquantized), and
for training the LoRA weights with their AdamW state, checkpointed activations and the runtime's
own overhead. :func:`get_recommended_config` picks, per backend, the highest-precision method whose
footprint fits the memory available.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from backend_manager import Backend, BackendManager, detect_backend

from .methods import method_spec
from .config import METHOD_SPECS, TYPICAL_IN_FEATURES, QuantizationConfig, QuantizationMethod, bits_per_weight
from .mixed_precision import default_candidates, mixes_bit_widths, plan_mixed_precision
from .sizing import checkpoint_parameter_count
from .validation import resolve_fallback

__all__ = [
    "bits_per_weight",
    "estimate_footprint_gb",
    "get_recommended_config",
    "recommendation_candidates",
    "achievable_bits_per_weight",
    "MemoryWarning",
]

logger = logging.getLogger(__name__)
M = QuantizationMethod

# Share of an LLM's parameters in linear layers that get quantized (Llama-2-7B: 96%; embeddings
# and the skipped lm_head make up the rest and stay 16-bit).
LINEAR_FRACTION = 0.96
RUNTIME_OVERHEAD_GB = 1.0  # CUDA context / Metal / allocator pools
ACTIVATION_GB_PER_B = 0.15  # checkpointed activations, batch 1 x 2048 tokens, per billion params
LORA_FRACTION = 0.006  # r=16 on all linear layers of a Llama-like model
FRAGMENTATION = 1.05


class MemoryWarning(UserWarning):
    """The recommended config is estimated not to fit the memory given."""


def estimate_footprint_gb(config: QuantizationConfig, model_size_b: float, *, training: bool = True,
                          lora_fraction: float = LORA_FRACTION) -> float:
    """Memory (GiB) to run a ``model_size_b``-billion-parameter model quantized with ``config``.

    Args:
        config: the quantization config.
        model_size_b: parameters, in billions.
        training: include LoRA weights + AdamW state (16 bytes per LoRA parameter) and
            checkpointed activations; otherwise inference (weights + a KV/activation allowance).
        lora_fraction: LoRA parameters as a share of the model's.
    """
    if model_size_b <= 0:
        raise ValueError(f"model_size_b={model_size_b} must be positive (billions of parameters)")
    params = model_size_b * 1e9
    float_bytes = 2 if (config.compute_dtype or torch.float16).itemsize <= 2 else 4
    linear = params * LINEAR_FRACTION * bits_per_weight(config) / 8
    rest = params * (1 - LINEAR_FRACTION) * float_bytes
    weights = (linear + rest) * FRAGMENTATION / 2**30
    extra = RUNTIME_OVERHEAD_GB + ACTIVATION_GB_PER_B * model_size_b
    if training:
        extra += params * lora_fraction * 16 / 2**30
    return weights + extra


_BACKEND_DTYPES = {Backend.CUDA: torch.bfloat16, Backend.MPS: torch.float16, Backend.MLX: torch.float16,
                   Backend.CPU: torch.bfloat16}


def recommendation_candidates(backend: Backend | str, *, training: bool = True) -> list[QuantizationConfig]:
    """The configs :func:`get_recommended_config` chooses from, most precise first: every registered
    method's declared candidates for ``backend`` (:attr:`MethodSpec.candidates`), in rank order.

    Training leaves out the inference-only ones (8-bit bitsandbytes/MLX: QLoRA at 4 bits matches
    16-bit fine-tuning quality at half the memory, and LLM.int8() backward is slow).
    """
    backend = Backend.parse(backend)
    ranked = []
    for method, spec in METHOD_SPECS.items():
        for cand in spec.candidates:
            if backend.value in cand.backends and not (cand.inference_only and training):
                ranked.append((cand.rank, len(ranked), method, cand))
    out = []
    for _, _, method, cand in sorted(ranked, key=lambda r: r[:2]):
        fields = {"method": method, "compute_dtype": _BACKEND_DTYPES.get(backend, torch.bfloat16), **cand.config}
        out.append(QuantizationConfig(**fields))
    return out


_OPTIONS = {"training", "check_libraries", "lora_fraction", "calibration", "mixed_precision"}
_CONFIG_FIELDS = set(QuantizationConfig.__dataclass_fields__) - {"method", "bits", "group_size"}
# A mixed plan is proposed only when the memory allows at least this many more bits per weight
# than the uniform choice.
MIN_MIXED_GAIN_BITS = 0.25


def get_recommended_config(backend: Backend | str | None = None, model_size_b: float | None = None,
                           available_memory_gb: float | None = None, *, model: Any = None,
                           checkpoint_dir: Any = None, **kwargs: Any) -> QuantizationConfig:
    """The most precise config whose estimated footprint fits ``available_memory_gb``.

    Args:
        backend: a :class:`~backend_manager.Backend` or its string; ``None`` detects it.
        model_size_b: parameters in billions. ``None`` returns the backend's default 4-bit config
            (NF4 on CUDA, MLX 4-bit on Apple, HQQ 4-bit on CPU), unless ``model`` or
            ``checkpoint_dir`` gives the size.
        available_memory_gb: memory for the run; ``None`` reads it from this machine (only when
            ``backend`` is the detected one).
        model: the model (an ``nn.Module``, real or on the meta device): its parameters are
            counted. With real weights, when the memory falls between two uniform candidates, the
            result is a mixed plan of the chosen method (HQQ or MLX) at the bits per weight the
            memory allows (see :func:`~quantization_wrapper.plan_mixed_precision`; it quantizes
            every layer a few times to measure its sensitivity, so it takes a while on big models).
        checkpoint_dir: a directory of ``*.safetensors`` files: parameters are counted from their
            headers (nothing is loaded).
        **kwargs: ``training`` (default ``True``), ``check_libraries`` (default: ``True`` when
            ``backend`` is this machine's; then a method whose library is not usable here is
            replaced along its fallback chain), ``lora_fraction``, ``mixed_precision`` (default
            ``True``: allow the mixed plan when ``model`` has real weights), ``calibration``
            (model inputs for the mixed plan's sensitivity),
            and any :class:`QuantizationConfig` field except method/bits/group_size
            (e.g. ``skip_modules``, ``compute_dtype``), applied to the result.

    Returns:
        A :class:`QuantizationConfig`, always valid for ``backend``. When even the smallest
        candidate does not fit, that candidate is returned with a :class:`MemoryWarning`.
    """
    unknown = sorted(set(kwargs) - _OPTIONS - _CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"get_recommended_config got unknown arguments {unknown}; allowed: "
                         f"{', '.join(sorted(_OPTIONS | _CONFIG_FIELDS | {'model', 'checkpoint_dir'}))}")
    training = kwargs.pop("training", True)
    lora_fraction = kwargs.pop("lora_fraction", LORA_FRACTION)
    calibration = kwargs.pop("calibration", None)
    mixed = kwargs.pop("mixed_precision", True)
    given = [n for n, v in (("model_size_b", model_size_b), ("model", model), ("checkpoint_dir", checkpoint_dir))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"get_recommended_config got {' and '.join(given)}; give only one of them "
                         f"(the model's size is read from model or checkpoint_dir)")
    if model is not None:
        model_size_b = _count_model_parameters(model) / 1e9
    elif checkpoint_dir is not None:
        model_size_b = checkpoint_parameter_count(checkpoint_dir) / 1e9
    backend = detect_backend() if backend is None else Backend.parse(backend)
    # Libraries can only be checked for the machine we run on.
    check_libraries = kwargs.pop("check_libraries", backend is detect_backend())
    candidates = recommendation_candidates(backend, training=training)
    if model_size_b is None:
        chosen = next(c for c in candidates if c.method is not M.NONE and c.bits == 4)
        return _finish(chosen, backend, kwargs, check_libraries)
    if not isinstance(model_size_b, (int, float)) or model_size_b <= 0:
        raise ValueError(f"model_size_b={model_size_b!r} must be a positive number of billions of parameters")
    if available_memory_gb is None:
        if backend is not detect_backend():
            raise ValueError(f"available_memory_gb is required when recommending for {backend.value} "
                             f"on a machine whose backend is {detect_backend().value}")
        available_memory_gb = BackendManager(backend).get_memory_info()["available_gb"]
    if not isinstance(available_memory_gb, (int, float)) or available_memory_gb <= 0:
        raise ValueError(f"available_memory_gb={available_memory_gb!r} must be a positive number of GB")

    for k, candidate in enumerate(candidates):
        need = estimate_footprint_gb(candidate, model_size_b, training=training, lora_fraction=lora_fraction)
        if need <= available_memory_gb:
            logger.info("recommend %s %s-bit for %.1fB params: needs %.1f GB of %.1f GB",
                        candidate.method.value, candidate.bits, model_size_b, need, available_memory_gb)
            chosen = _finish(candidate, backend, kwargs, check_libraries)
            if k > 0 and mixed and _has_weights(model):
                planned = _mixed_plan(model, chosen, candidates[k - 1], model_size_b, available_memory_gb,
                                      training, lora_fraction, calibration)
                if planned is not None:
                    return planned
            return chosen
    smallest = candidates[-1]
    need = estimate_footprint_gb(smallest, model_size_b, training=training, lora_fraction=lora_fraction)
    warnings.warn(f"a {model_size_b:g}B-parameter model is estimated to need {need:.1f} GB even at "
                  f"{smallest.method.value} {smallest.bits}-bit, more than the {available_memory_gb:.1f} GB "
                  f"available; it will likely not fit (use a smaller model, more memory, or offloading)",
                  MemoryWarning, stacklevel=2)
    return _finish(smallest, backend, kwargs, check_libraries)


def _finish(config: QuantizationConfig, backend: Backend, overrides: dict[str, Any],
            check_libraries: bool) -> QuantizationConfig:
    if overrides:
        config = config.replace(**overrides)
    if check_libraries:
        config, _ = resolve_fallback(config, backend)
    return config


def _count_model_parameters(model: Any) -> int:
    from torch import nn

    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    count = sum(p.numel() for p in model.parameters())
    if count == 0:
        raise ValueError("model has no parameters to count")
    return count


def _has_weights(model: Any) -> bool:
    return model is not None and any(p.device.type != "meta" for p in model.parameters())


def achievable_bits_per_weight(config: QuantizationConfig, model_size_b: float, available_memory_gb: float, *,
                               training: bool = True, lora_fraction: float = LORA_FRACTION) -> float:
    """The bits per quantized weight at which :func:`estimate_footprint_gb` of ``config``'s memory
    model equals ``available_memory_gb`` (the footprint is linear in the bits per weight)."""
    need = estimate_footprint_gb(config, model_size_b, training=training, lora_fraction=lora_fraction)
    per_bit = model_size_b * 1e9 * LINEAR_FRACTION / 8 * FRAGMENTATION / 2**30
    return bits_per_weight(config) + (available_memory_gb - need) / per_bit


def _mixed_plan(model: Any, chosen: QuantizationConfig, upper: QuantizationConfig, model_size_b: float,
                available_memory_gb: float, training: bool, lora_fraction: float,
                calibration: Any) -> QuantizationConfig | None:
    """A mixed plan of ``chosen``'s family between its bits and ``upper``'s, or ``None`` when the
    memory leaves too little room above ``chosen`` or the family cannot mix bit widths."""

    family = chosen.method.family
    if not mixes_bit_widths(family):
        return None
    bpw = achievable_bits_per_weight(chosen, model_size_b, available_memory_gb, training=training,
                                     lora_fraction=lora_fraction)
    ceiling = bits_per_weight(upper) if upper.method is not M.NONE else 16.0
    bpw = min(bpw, ceiling)
    if bpw < bits_per_weight(chosen) + MIN_MIXED_GAIN_BITS:
        return None
    top = upper.bits if upper.method.family == family else max(method_spec(chosen.method).bits)
    candidates = [c for c in default_candidates(family)
                  if chosen.bits - 1 <= c.as_dict().get("bits", chosen.bits) <= top]
    # Sensitivity is measured here, with this machine's adapters, whatever backend the config is for.
    plan = plan_mixed_precision(model, bpw, method_family=family, base_config=chosen, candidates=candidates,
                                calibration=calibration)
    logger.info("recommend a mixed %s plan at %.2f bits/weight (memory allows %.2f): %s",
                family, plan.bits_per_weight, bpw, plan.summary())
    return plan.config

