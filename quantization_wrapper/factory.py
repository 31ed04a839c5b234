"""``create_quantization_adapter``: pick the adapter for a config on a backend, or a fallback."""

from __future__ import annotations

import logging
import warnings

from backend_manager import Backend, detect_backend

from .adapters.base import QuantizationAdapter, get_adapter_class
from .compatibility import FALLBACK_CHAINS
from .config import METHOD_SPECS, QuantizationConfig, QuantizationMethod
from .validation import errors_only, validate_quantization_config

__all__ = ["create_quantization_adapter", "resolve_fallback", "QuantizationFallbackWarning"]

logger = logging.getLogger(__name__)
_warned: set[tuple[str, str, str]] = set()


class QuantizationFallbackWarning(UserWarning):
    """Emitted (once per substitution) when the factory replaces a method that cannot run here."""


def _substitute(config: QuantizationConfig, method: QuantizationMethod, bits: int | None) -> QuantizationConfig | None:
    spec = METHOD_SPECS[method]
    bits = config.bits if bits is None else bits
    if method is QuantizationMethod.NONE:
        return config.replace(method=method, bits=None, group_size=None, quant_type=None,
                              double_quant=None, storage_dtype=None)
    if bits not in spec.bits:
        return None
    group = config.group_size
    if group is None or (spec.group_sizes is not None and group not in spec.group_sizes):
        group = spec.default_group_size
    if method in (QuantizationMethod.QUANTO_INT8, QuantizationMethod.BNB_INT8, QuantizationMethod.QUANTO_FP8):
        group = None
    try:
        return config.replace(method=method, bits=bits, group_size=group, quant_type=None,
                              double_quant=None)
    except ValueError:
        return None


def resolve_fallback(config: QuantizationConfig, backend: Backend | str) -> tuple[QuantizationConfig, list]:
    """The first config of ``config.method``'s fallback chain that validates without errors.

    Returns:
        ``(config, problems)`` -- the usable config (``config`` itself when it has no error) and
        the error-level issues of the original config.
    """
    backend = Backend.parse(backend)
    problems = errors_only(validate_quantization_config(config, backend))
    if not problems:
        return config, []
    for method, bits in FALLBACK_CHAINS[config.method]:
        candidate = _substitute(config, method, bits)
        if candidate is not None and not errors_only(validate_quantization_config(candidate, backend)):
            return candidate, problems
    raise ValueError(  # only reachable if even the no-quantization adapter is unusable
        "no usable quantization method found for this config on "
        f"{backend.value}: " + "; ".join(map(str, problems))
    )


def create_quantization_adapter(backend: Backend | str | None = None, config: QuantizationConfig | None = None,
                                *, strict: bool = False, device=None) -> QuantizationAdapter:
    """The adapter for ``config`` on ``backend``.

    Args:
        backend: a :class:`~backend_manager.Backend` or its string; ``None`` detects it.
        config: the config; ``None`` means the recommended config for the backend.
        strict: raise ``ValueError`` listing every error-level validation issue instead of falling
            back. With ``strict=False`` a method that cannot run here is replaced by the first usable
            method of its fallback chain (``docs/compatibility.md``), with one warning naming the
            substitution; ``layer_configs`` overrides that cannot run are dropped the same way.
        device: where quantized layers are built (``None``: each layer's own device).

    Returns:
        A :class:`~quantization_wrapper.adapters.base.QuantizationAdapter`.
    """
    backend = detect_backend() if backend is None else Backend.parse(backend)
    if config is None:
        from .recommend import get_recommended_config

        config = get_recommended_config(backend)
    if not isinstance(config, QuantizationConfig):
        raise ValueError(f"config must be a QuantizationConfig (or None), got {type(config).__name__}")

    issues = validate_quantization_config(config, backend)
    errors = errors_only(issues)
    option_errors = [e for e in errors if e.field.endswith("backend_options")]
    if option_errors:  # a typo in an option must not silently switch the method
        raise ValueError("invalid backend_options:\n" + "\n".join(f"  - {e}" for e in option_errors))
    if errors and strict:
        raise ValueError(
            f"config cannot run on the {backend.value} backend ({len(errors)} problem"
            f"{'s' if len(errors) > 1 else ''}):\n" + "\n".join(f"  - {e}" for e in errors)
        )
    if errors:
        top_errors = [e for e in errors if not e.field.startswith("layer_configs[")]
        chosen = config
        if top_errors:
            chosen, _ = resolve_fallback(config.replace(layer_configs={}), backend)
            chosen = chosen.replace(layer_configs=config.layer_configs)
        chosen = _drop_unusable_overrides(chosen, backend)
        _warn_once(config, chosen, backend, errors)
        config = chosen
    for issue in validate_quantization_config(config, backend):
        logger.info("quantization config: %s", issue)
    adapter_cls = get_adapter_class(config.method)
    return adapter_cls(config, backend, device=device)


def _drop_unusable_overrides(config: QuantizationConfig, backend: Backend) -> QuantizationConfig:
    kept = {}
    for pattern, overrides in config.layer_configs.items():
        layer = config._merged(overrides)
        if errors_only(validate_quantization_config(layer, backend)):
            substitute, _ = resolve_fallback(layer, backend)
            overrides = {**{k: v for k, v in overrides.items() if k not in ("method", "bits", "group_size")},
                         "method": substitute.method.value, "bits": substitute.bits,
                         "group_size": substitute.group_size}
            warnings.warn(
                f"layer_configs[{pattern!r}] asks for {layer.method.value}, which cannot run on "
                f"{backend.value}; using {substitute.method.value} ({substitute.bits}-bit) for those layers",
                QuantizationFallbackWarning, stacklevel=3,
            )
        kept[pattern] = overrides
    return config.replace(layer_configs=kept)


def _warn_once(requested: QuantizationConfig, chosen: QuantizationConfig, backend: Backend, errors: list) -> None:
    if requested.method is chosen.method:
        return
    key = (requested.method.value, chosen.method.value, backend.value)
    message = (f"{requested.method.value} ({requested.bits}-bit) cannot run on {backend.value}: "
               f"{errors[0].message} Using {chosen.method.value}"
               + (f" ({chosen.bits}-bit)" if chosen.method is not QuantizationMethod.NONE else
                  " (no quantization)")
               + " instead. Pass strict=True to raise instead of substituting.")
    logger.warning(message)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, QuantizationFallbackWarning, stacklevel=3)
