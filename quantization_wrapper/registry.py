"""The adapter registry: which adapter class serves which method, and which class a quantized layer
belongs to.

Adapters register themselves with :func:`register_adapter` (``adapters/bnb.py`` for the three
bitsandbytes methods, ...). Everything that needs an adapter (the factory, the model walker,
save/load, training, peft and transformers glue) looks it up here, duck-typed, so none of them
imports an adapter module: the dependency points from the backends to the framework.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from torch import nn

from .config import QuantizationConfig, QuantizationMethod

__all__ = [
    "Adapter",
    "ADAPTER_REGISTRY",
    "register_adapter",
    "unregister_adapter",
    "get_adapter_class",
    "registered_methods",
    "adapter_class_for_module",
    "is_quantized_module",
    "build_adapter",
]

#: An instance of a registered adapter class (a
#: :class:`~quantization_wrapper.adapters.base.QuantizationAdapter`), as the modules below the
#: backends annotate it: they use it through its methods and never import the base class.
Adapter = Any

#: ``{method: adapter class}``; the classes are subclasses of
#: :class:`~quantization_wrapper.adapters.base.QuantizationAdapter` (checked by their shape here:
#: the base class lives with the backends, above this module).
ADAPTER_REGISTRY: dict[QuantizationMethod, type] = {}

_ADAPTER_HOOKS = ("create_quantized_linear", "quantize_linear", "quantized_module_types", "layer_state_dict")


def register_adapter(*methods: QuantizationMethod | str) -> Callable[[type], type]:
    """Class decorator: make ``cls`` the adapter for ``methods``.

    Example::

        @register_adapter(QuantizationMethod.HQQ)
        class HQQAdapter(QuantizationAdapter): ...
    """
    parsed = tuple(QuantizationMethod.parse(m) for m in methods)
    if not parsed:
        raise ValueError("register_adapter needs at least one QuantizationMethod")

    def decorator(cls: type) -> type:
        if not (isinstance(cls, type) and all(callable(getattr(cls, h, None)) for h in _ADAPTER_HOOKS)):
            raise TypeError(f"register_adapter: {cls!r} is not a QuantizationAdapter subclass")
        cls.methods = parsed
        for method in parsed:
            ADAPTER_REGISTRY[method] = cls
        return cls

    return decorator


def get_adapter_class(method: QuantizationMethod | str) -> type:
    """The adapter class registered for ``method``.

    Raises:
        ValueError: when no adapter serves the method (the registered methods are listed).
    """
    method = QuantizationMethod.parse(method)
    try:
        return ADAPTER_REGISTRY[method]
    except KeyError:
        known = ", ".join(m.value for m in ADAPTER_REGISTRY) or "none"
        raise ValueError(f"no adapter is registered for method={method.value!r}; registered: {known}") from None


def registered_methods() -> list[QuantizationMethod]:
    """Methods that have an adapter, in enum order."""
    return [m for m in QuantizationMethod.members() if m in ADAPTER_REGISTRY]



def unregister_adapter(method: QuantizationMethod | str, cls: type | None = None) -> None:
    """Forget the adapter of ``method`` (only if it is ``cls``, when given)."""
    method = QuantizationMethod.parse(method)
    if cls is None or ADAPTER_REGISTRY.get(method) is cls:
        ADAPTER_REGISTRY.pop(method, None)


def adapter_class_for_module(module: nn.Module) -> type | None:
    """The registered adapter class whose quantized layer type ``module`` is (``None`` if none).

    Only adapters whose library is already imported are asked: a module of a library's type cannot
    exist before the library is imported, and asking must not import anything.
    """
    for cls in dict.fromkeys(ADAPTER_REGISTRY.values()):
        types_module = getattr(cls, "types_module", None) or getattr(cls, "library_module", None)
        if types_module and types_module not in sys.modules:
            continue
        types = cls.quantized_module_types()
        if types and isinstance(module, types):
            return cls
    return None


def is_quantized_module(module: nn.Module) -> bool:
    """True when some registered adapter recognizes ``module`` as one of its quantized layers."""
    return adapter_class_for_module(module) is not None


def build_adapter(config: QuantizationConfig, backend: Any = None, *, device: Any = None) -> Any:
    """The registered adapter for ``config.method``, built for ``config`` (no validation, no fallback:
    that is :func:`~quantization_wrapper.factory.create_quantization_adapter`'s job). The one way the
    package builds an adapter for a layer whose config differs from the model's."""
    return get_adapter_class(config.method)(config, backend, device=device)
