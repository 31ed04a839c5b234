"""``create_quantization_adapter``: pick the adapter for a config on a backend, or a fallback."""

from __future__ import annotations

import logging
import warnings

from backend_manager import Backend, detect_backend

from .config import QuantizationConfig, QuantizationMethod
from .recommend import get_recommended_config
from .registry import build_adapter
from .validation import errors_only, raise_for_errors, resolve_fallback, validate_quantization_config

__all__ = ["create_quantization_adapter", "resolve_fallback", "QuantizationFallbackWarning"]

logger = logging.getLogger(__name__)
_warned: set[tuple[str, str, str]] = set()


class QuantizationFallbackWarning(UserWarning):
    """Emitted (once per substitution) when the factory replaces a method that cannot run here."""


def create_quantization_adapter(backend: Backend | str | None = None, config: QuantizationConfig | None = None,
                                *, strict: bool = False, device=None):
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
        config = get_recommended_config(backend)
    if not isinstance(config, QuantizationConfig):
        raise ValueError(f"config must be a QuantizationConfig (or None), got {type(config).__name__}")

    issues = validate_quantization_config(config, backend)
    errors = errors_only(issues)
    raise_for_errors(issues, backend, options_only=not strict)  # every problem, or a typo in an option
    if errors:
        top_errors = [e for e in errors if not e.field.startswith("layer_configs[")]
        chosen = config
        if top_errors:
            chosen, _ = resolve_fallback(config.replace(layer_configs={}), backend)
            chosen = chosen.replace(layer_configs=config.layer_configs)
        chosen = _drop_unusable_overrides(chosen, backend)
        _warn_once(config, chosen, backend, errors)
        config = chosen
        issues = validate_quantization_config(config, backend)  # the substitute's own warnings
    for issue in issues:
        logger.info("quantization config: %s", issue)
    return build_adapter(config, backend, device=device)


def _drop_unusable_overrides(config: QuantizationConfig, backend: Backend) -> QuantizationConfig:
    kept = {}
    for pattern, overrides in config.layer_configs.items():
        layer = config.with_overrides(overrides)
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
