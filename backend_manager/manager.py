"""`BackendManager`: the one object a training or serving script asks about its hardware."""

from __future__ import annotations

import os
from functools import cached_property
from typing import TYPE_CHECKING, Any

from . import capabilities as caps
from .backend import Backend, available_backends, detect_backend
from .imports import report_import_status

if TYPE_CHECKING:
    import torch

__all__ = ["BackendManager"]


class BackendManager:
    """Selects a backend and answers questions about it.

    Args:
        backend: a Backend or its string; None detects one (CUDA > MLX > MPS > CPU, or
            ``$QUANTIZATION_WRAPPER_BACKEND``).

    Raises:
        ValueError: if ``backend`` is not a backend name, or names one not present here.
    """

    def __init__(self, backend: Backend | str | None = None) -> None:
        if backend is None:
            self.backend = detect_backend()
            return
        self.backend = Backend.parse(backend)
        present = available_backends()
        if self.backend not in present:
            raise ValueError(
                f"backend {self.backend.value!r} was requested but is not available on this "
                f"machine; available: {', '.join(b.value for b in present)}"
            )

    @property
    def device_index(self) -> int:
        """The CUDA device of this process: ``$LOCAL_RANK`` (set by torchrun), default 0."""
        value = os.environ.get("LOCAL_RANK", "0")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"LOCAL_RANK={value!r} is not an integer device index") from None

    @property
    def device(self) -> "torch.device":
        """The torch device for tensors: ``cuda:<LOCAL_RANK>``, ``mps`` (MPS and MLX) or ``cpu``."""
        import torch

        if self.backend is Backend.CUDA:
            return torch.device("cuda", self.device_index)
        if self.backend in (Backend.MPS, Backend.MLX):
            return torch.device("mps")
        return torch.device("cpu")

    @cached_property
    def capabilities(self) -> caps.BackendCapabilities:
        """The backend's capabilities, gathered on first access."""
        index = self.device_index if self.backend is Backend.CUDA else 0
        return caps.get_capabilities(self.backend, index)

    def get_dtype(self, prefer_bfloat16: bool = True) -> "torch.dtype":
        """Return the compute dtype to use here.

        Args:
            prefer_bfloat16: take bfloat16 where the backend supports it.

        Returns:
            bfloat16 if preferred and supported; else float16 on CUDA/MPS/MLX, float32 on CPU.
        """
        import torch

        if prefer_bfloat16 and caps.supports_bf16(self.backend):
            return torch.bfloat16
        return torch.float32 if self.backend is Backend.CPU else torch.float16

    def get_memory_info(self) -> dict[str, Any]:
        """Return current memory figures of the device (see :func:`capabilities.memory_info`).

        Returns:
            ``{"total_gb", "available_gb", "used_gb", "percent_used", "device", "source"}``.
        """
        index = self.device_index if self.backend is Backend.CUDA else 0
        return caps.memory_info(self.backend, index)

    def get_distributed_backend(self) -> str | None:
        """Return ``"nccl"``, ``"gloo"`` or None (torch.distributed unavailable)."""
        return caps.distributed_backend(self.backend)

    def report_import_status(self) -> str:
        """Return one line per quantization library: installed?, version, usable here?, why not."""
        return report_import_status(self.backend)

    def __repr__(self) -> str:
        return f"BackendManager(backend={self.backend.value!r}, device={str(self.device)!r})"
