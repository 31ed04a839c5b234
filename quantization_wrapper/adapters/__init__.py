"""Backend adapters. Each module registers its adapter class on import; optional libraries are
imported only when an adapter is used."""

from .base import (
    ADAPTER_REGISTRY,
    QuantizationAdapter,
    get_adapter_class,
    is_quantized_module,
    register_adapter,
    registered_methods,
    tensor_nbytes,
)
from .fallback import FallbackAdapter
from . import bnb, hqq, mlx, quanto  # noqa: E402  (each registers its adapter; no library import)

__all__ = [
    "ADAPTER_REGISTRY",
    "QuantizationAdapter",
    "FallbackAdapter",
    "get_adapter_class",
    "is_quantized_module",
    "register_adapter",
    "registered_methods",
    "tensor_nbytes",
]
