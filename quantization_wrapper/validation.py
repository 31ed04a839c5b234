"""Check a config against a backend before anything is quantized.

:func:`validate_quantization_config` returns a list of :class:`ValidationIssue` -- empty when the
config is fine. Each issue prints as one readable sentence with the fix, and carries a severity:
``error`` (it cannot run as asked) or ``warning`` (it runs, but an option is ignored or risky).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from backend_manager import Backend, get_library_status

from .compatibility import FALLBACK_CHAINS, get_support, method_library
from .config import METHOD_SPECS, QuantizationConfig, QuantizationMethod, dtype_to_str
from .methods import method_spec
from .registry import ADAPTER_REGISTRY

__all__ = ["Severity", "ValidationIssue", "validate_quantization_config", "errors_only", "resolve_fallback",
           "require_runnable", "raise_for_errors"]

M = QuantizationMethod


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class ValidationIssue:
    """One problem found in a config.

    Attributes:
        severity: :class:`Severity` (``error`` or ``warning``).
        field: the config field concerned (``"method"``, ``"compute_dtype"``, ...).
        message: what is wrong, as a sentence.
        suggestion: how to fix it.
    """

    severity: Severity
    field: str
    message: str
    suggestion: str

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR

    def __str__(self) -> str:
        return f"[{self.severity.value}] {self.field}: {self.message} Fix: {self.suggestion}"


def _error(field: str, message: str, suggestion: str) -> ValidationIssue:
    return ValidationIssue(Severity.ERROR, field, message, suggestion)


def _warning(field: str, message: str, suggestion: str) -> ValidationIssue:
    return ValidationIssue(Severity.WARNING, field, message, suggestion)


def _method_issues(method: QuantizationMethod, backend: Backend, where: str) -> list[ValidationIssue]:
    field = "method" if not where else f"layer_configs[{where!r}].method"
    support = get_support(backend, method)
    if not support.supported:
        alternatives = [m.value for m, _ in FALLBACK_CHAINS[method]
                        if m is not M.NONE and get_support(backend, m).supported]
        hint = f"use method={alternatives[0]!r}" if alternatives else "use method='none'"
        return [_error(field, f"{method.value} is not supported on the {backend.value} backend: "
                              f"{support.reason}", f"{hint} (or create the adapter with strict=False "
                                                   f"to substitute automatically).")]
    library = method_library(method)
    if library is not None:
        status = get_library_status(library, backend)
        if not status.usable:
            what = "not installed" if not status.installed else "installed but not usable here"
            detail = f" ({status.reason})." if status.reason else "."
            if not METHOD_SPECS[method].library_required:
                return [_warning(field, f"{library} is {what}{detail} {method.value} runs on its pure-torch "
                                        f"path (same numbers, no {library} kernels).",
                                 f"{status.install_hint} for the {library} kernels.")]
            return [_error(field, f"{method.value} needs {library}, which is {what}{detail}",
                           f"{status.install_hint}, or pick another method.")]
    if method not in ADAPTER_REGISTRY:
        return [_error(field, f"no adapter is registered for {method.value}.",
                       "import the module that registers it, or pick another method.")]
    return []


def _option_issues(config: QuantizationConfig, backend: Backend, where: str) -> list[ValidationIssue]:
    prefix = "" if not where else f"layer_configs[{where!r}]."
    issues: list[ValidationIssue] = []
    method = config.method
    if config.compute_dtype is torch.bfloat16 and backend in (Backend.MPS, Backend.MLX):
        issues.append(_error(prefix + "compute_dtype",
                             f"bfloat16 is not supported for compute on the {backend.value} backend.",
                             "use compute_dtype=torch.float16."))
    spec = method_spec(method)
    if config.double_quant is not None and "double_quant" not in spec.options:
        issues.append(_warning(prefix + "double_quant",
                               f"double_quant={config.double_quant} is ignored by {method.value}; only "
                               f"bitsandbytes 4-bit quantizes its scales a second time.",
                               "leave double_quant unset (None)."))
    if config.group_size is not None and spec.default_group_size is None:
        issues.append(_warning(prefix + "group_size",
                               f"group_size={config.group_size} is ignored: {method.value} uses one scale "
                               f"per output row.", "leave group_size unset (None)."))
    if spec.option_warnings is not None:
        issues += [_warning(prefix + field, message, suggestion)
                   for field, message, suggestion in spec.option_warnings(config)]
    if method is M.NONE and config.bits != METHOD_SPECS[M.NONE].default_bits:
        issues.append(_warning(prefix + "bits",
                               f"bits={config.bits} is ignored by method 'none': weights stay in floating point.",
                               "set compute_dtype (e.g. torch.bfloat16) to choose their dtype, or pick a "
                               "quantization method."))
    if config.storage_dtype is not None:
        if config.storage_dtype in (torch.uint8, torch.int8):
            issues.append(_warning(prefix + "storage_dtype",
                                   f"storage_dtype={dtype_to_str(config.storage_dtype)}: FSDP1 flattens the "
                                   f"parameters of a unit into one tensor of one dtype, so integer storage "
                                   f"cannot be sharded with the float parameters (FSDP2 shards per tensor).",
                                   "for FSDP set storage_dtype to the model's dtype (e.g. torch.bfloat16)."))
        if method is M.NONE:
            issues.append(_warning(prefix + "storage_dtype", "storage_dtype is ignored by method 'none'.",
                                   "set compute_dtype to choose the weights' dtype."))
    return issues


def validate_quantization_config(config: QuantizationConfig, backend: Backend | str) -> list[ValidationIssue]:
    """Every problem of ``config`` on ``backend`` (empty list: fine).

    Checks the method against the compatibility matrix, the library's availability on the backend,
    the adapter registry, dtypes the backend cannot compute in, options the method ignores or cannot
    honour, and ``storage_dtype`` choices FSDP cannot shard -- for the config and for each
    ``layer_configs`` override.

    Args:
        config: the config to check.
        backend: a :class:`~backend_manager.Backend` or its string.

    Returns:
        A list of :class:`ValidationIssue`, errors first.
    """
    if not isinstance(config, QuantizationConfig):
        raise ValueError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    backend = Backend.parse(backend)
    issues = _method_issues(config.method, backend, "") + _option_issues(config, backend, "")
    if config.method in ADAPTER_REGISTRY:
        issues += ADAPTER_REGISTRY[config.method].check_config(config, backend)
    seen = {str(i) for i in issues}
    for pattern, overrides in config.layer_configs.items():
        layer = config.with_overrides(overrides)
        layer_issues = []
        if "method" in overrides:
            layer_issues += _method_issues(layer.method, backend, pattern)
        layer_issues += _option_issues(layer, backend, pattern)
        if layer.method in ADAPTER_REGISTRY and (layer.method is not config.method or
                                                 "backend_options" in overrides):
            layer_issues += [
                ValidationIssue(i.severity, f"layer_configs[{pattern!r}].{i.field}", i.message, i.suggestion)
                for i in ADAPTER_REGISTRY[layer.method].check_config(layer, backend)
            ]
        for issue in layer_issues:
            # An inherited problem is reported once, on the top-level field.
            bare = str(issue).replace(f"layer_configs[{pattern!r}].", "")
            if bare not in seen and str(issue) not in seen:
                seen.add(str(issue))
                issues.append(issue)
    return sorted(issues, key=lambda i: not i.is_error)


def errors_only(issues: list[ValidationIssue]) -> list[ValidationIssue]:
    """The error-level issues of ``issues``."""
    return [i for i in issues if i.is_error]


def _substitute(config: QuantizationConfig, method: QuantizationMethod, bits: int | None) -> QuantizationConfig | None:
    spec = method_spec(method)
    bits = config.bits if bits is None else bits
    if method is QuantizationMethod.NONE:
        return config.replace(method=method, bits=None, group_size=None, quant_type=None,
                              double_quant=None, storage_dtype=None)
    if bits not in spec.bits:
        return None
    group = config.group_size
    if group is None or (spec.group_sizes is not None and group not in spec.group_sizes):
        group = spec.default_group_size
    if spec.default_group_size is None:  # the method has no groups (per-row scales)
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


def require_runnable(config: QuantizationConfig, backend: Backend | str) -> list[ValidationIssue]:
    """Raise unless ``config`` runs on ``backend`` as asked; return its issues (warnings) otherwise.

    Raises:
        ValueError: see :func:`raise_for_errors`.
    """
    backend = Backend.parse(backend)
    issues = validate_quantization_config(config, backend)
    raise_for_errors(issues, backend)
    return issues


def raise_for_errors(issues: list[ValidationIssue], backend: Backend | str, *, options_only: bool = False) -> None:
    """Raise for the error-level ``issues`` of a validation: ``invalid backend_options`` first (a typo
    in an option), else every error, one per line. ``options_only``: only the option errors raise.

    Raises:
        ValueError: as above; nothing when there is no (such) error.
    """
    backend = Backend.parse(backend)
    errors = errors_only(issues)
    option_errors = [e for e in errors if e.field.endswith("backend_options")]
    if option_errors:  # a typo in an option must not silently switch the method
        raise ValueError("invalid backend_options:\n" + "\n".join(f"  - {e}" for e in option_errors))
    if errors and not options_only:
        raise ValueError(
            f"config cannot run on the {backend.value} backend ({len(errors)} problem"
            f"{'s' if len(errors) > 1 else ''}):\n" + "\n".join(f"  - {e}" for e in errors)
        )
