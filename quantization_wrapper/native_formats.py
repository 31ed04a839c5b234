"""The peers' own checkpoint formats (mlx-lm / MLX, hqq): the names this module always had, now
defined in :mod:`quantization_wrapper.checkpoint.native` (the readers themselves are the backends':
``adapters/mlx/checkpoint.py``, ``adapters/hqq.py``)."""

from typing import Any

from .checkpoint import native as _native
from .checkpoint.native import (
    ACCEPTED_FORMATS,
    detect_native_format,
    load_hqq_checkpoint,
    load_mlx_checkpoint,
    load_native_checkpoint,
)

__all__ = [
    "NATIVE_FORMATS",
    "ACCEPTED_FORMATS",
    "detect_native_format",
    "load_native_checkpoint",
    "load_mlx_checkpoint",
    "load_hqq_checkpoint",
]


def __getattr__(name: str) -> Any:
    # NATIVE_FORMATS is computed from the registered adapters on each access
    if name == "NATIVE_FORMATS":
        return _native.native_formats()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
