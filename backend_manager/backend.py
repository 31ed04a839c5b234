"""Which compute backend this process runs on: one cached, side-effect-free function per check.

Nothing here imports torch (or anything heavy) until a check is called, and every check is
cached; :func:`clear_caches` resets them, e.g. after monkeypatching in tests.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
from enum import Enum
from typing import Any, Callable, TypeVar

__all__ = [
    "BACKEND_ENV_VAR",
    "Backend",
    "available_backends",
    "clear_caches",
    "detect_backend",
    "is_apple_silicon",
    "is_cuda_available",
    "is_mlx_installed",
    "is_mps_available",
]

#: Environment variable that overrides automatic detection, e.g. ``QUANTIZATION_WRAPPER_BACKEND=cpu``.
BACKEND_ENV_VAR = "QUANTIZATION_WRAPPER_BACKEND"

_F = TypeVar("_F", bound=Callable[..., Any])
_CACHES: list[Any] = []


def cached(func: _F) -> _F:
    """Memoize ``func`` with :func:`functools.lru_cache` and register it for :func:`clear_caches`."""
    wrapped = functools.lru_cache(maxsize=None)(func)
    _CACHES.append(wrapped)
    return wrapped  # type: ignore[return-value]


def clear_caches() -> None:
    """Forget every cached detection and library-status result of this package."""
    for func in _CACHES:
        func.cache_clear()


class Backend(str, Enum):
    """A compute backend. Priority when detecting: CUDA > MLX > MPS > CPU."""

    CUDA = "cuda"
    MPS = "mps"
    MLX = "mlx"
    CPU = "cpu"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: "Backend | str", field: str = "backend") -> "Backend":
        """Turn a :class:`Backend` or its (case-insensitive) string into a :class:`Backend`.

        Args:
            value: a Backend, or one of ``"cuda"``, ``"mps"``, ``"mlx"``, ``"cpu"``.
            field: the name to use in the error message (an argument or environment variable).

        Returns:
            The matching Backend.

        Raises:
            ValueError: naming ``field``, the value and the allowed values.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        allowed = ", ".join(b.value for b in cls)
        raise ValueError(f"{field}={value!r} is not a backend; allowed: {allowed}")


@cached
def is_cuda_available() -> bool:
    """Return True when torch sees a usable CUDA device."""
    import torch

    return bool(torch.cuda.is_available())


@cached
def is_mps_available() -> bool:
    """Return True when torch's Apple Metal (MPS) backend is usable."""
    import torch

    return bool(torch.backends.mps.is_available())


@cached
def is_apple_silicon() -> bool:
    """Return True on macOS on an Apple (arm64) chip."""
    return platform.system() == "Darwin" and platform.machine() == "arm64"


@cached
def is_mlx_installed() -> bool:
    """Return True when the ``mlx`` package can be found (it is not imported)."""
    return importlib.util.find_spec("mlx") is not None


@cached
def _available() -> tuple[Backend, ...]:
    found = []
    if is_cuda_available():
        found.append(Backend.CUDA)
    # mlx[cpu] on Linux is a CPU library: the backend there is still CPU.
    if is_apple_silicon() and is_mlx_installed():
        found.append(Backend.MLX)
    if is_mps_available():
        found.append(Backend.MPS)
    found.append(Backend.CPU)
    return tuple(found)


def available_backends() -> list[Backend]:
    """Return the backends present on this machine, best first (CUDA > MLX > MPS > CPU).

    Returns:
        A new list; CPU is always last and always present.
    """
    return list(_available())


@cached
def detect_backend() -> Backend:
    """Return the backend to use: ``$QUANTIZATION_WRAPPER_BACKEND`` if set, else the best present.

    Returns:
        The selected Backend.

    Raises:
        ValueError: if the environment variable names no backend, or one not present here.
    """
    present = available_backends()
    value = os.environ.get(BACKEND_ENV_VAR)
    if not value:
        return present[0]
    backend = Backend.parse(value, field=BACKEND_ENV_VAR)
    if backend not in present:
        raise ValueError(
            f"{BACKEND_ENV_VAR}={value!r} asks for backend {backend.value!r}, which is not "
            f"available on this machine; available: {', '.join(b.value for b in present)}"
        )
    return backend
