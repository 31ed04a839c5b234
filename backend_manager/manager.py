"""`BackendManager`: the one object a training or serving script asks about its hardware."""

from __future__ import annotations

import logging
import os
from functools import cached_property
from typing import TYPE_CHECKING, Any

from . import capabilities as caps
from .backend import BACKEND_ENV_VAR, Backend, available_backends, detect_backend
from .imports import report_import_status

if TYPE_CHECKING:
    import torch

__all__ = ["BackendManager"]

logger = logging.getLogger("backend_manager")


class BackendManager:
    """Selects a backend and answers questions about it.

    Args:
        backend: a Backend or its string; None detects one (CUDA > MLX > MPS > CPU, or
            ``$QUANTIZATION_WRAPPER_BACKEND``).
        verbose: log :meth:`describe` (how the backend was chosen, and its capabilities) once,
            now, as one record on the ``backend_manager`` logger: at INFO when logging is
            configured (a handler exists for that logger or its ancestors), else at WARNING so
            that Python's last-resort handler shows it on stderr. No handler or level is changed.

    Raises:
        ValueError: if ``backend`` is not a backend name, or names one not present here.

    Names from the design document, kept next to ours: ``get_memory_info()`` also has the
    byte-valued ``total_memory``, ``used_memory``, ``available_memory``, and
    ``capabilities.supports_distributed`` is ``get_distributed_backend() is not None``.
    """

    def __init__(self, backend: Backend | str | None = None, verbose: bool = False) -> None:
        self.verbose = bool(verbose)
        if backend is None:
            self.backend = detect_backend()
            env = os.environ.get(BACKEND_ENV_VAR)
            self._chosen_by = f"${BACKEND_ENV_VAR}={env}" if env else "detected"
        else:
            self.backend = Backend.parse(backend)
            present = available_backends()
            if self.backend not in present:
                raise ValueError(
                    f"backend {self.backend.value!r} was requested but is not available on this "
                    f"machine; available: {', '.join(b.value for b in present)}"
                )
            self._chosen_by = "requested"
        if self.verbose:
            # The caller asked to see this: INFO where logging would show INFO (a handler and a
            # level that pass it), else WARNING (basicConfig's default level, or no handler at all).
            level = logging.INFO if logger.hasHandlers() and logger.isEnabledFor(logging.INFO) else logging.WARNING
            logger.log(level, "%s", self.describe())

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
            ``{"total_gb", "available_gb", "used_gb", "percent_used", "device", "source"}`` in GB
            of 2**30 bytes, plus aliases in int bytes under the design document's names:
            ``"total_memory"``, ``"available_memory"``, ``"used_memory"`` (= total - available).
        """
        index = self.device_index if self.backend is Backend.CUDA else 0
        return caps.memory_info(self.backend, index)

    def get_distributed_backend(self) -> str | None:
        """Return ``"nccl"``, ``"gloo"`` or None (torch.distributed unavailable).

        ``capabilities.supports_distributed`` (design-document name) is this ``is not None``.
        """
        return caps.distributed_backend(self.backend)

    def describe(self) -> str:
        """Return the report that ``verbose=True`` logs: backend, how it was chosen, capabilities.

        Returns:
            A few lines of text, e.g. ``backend_manager: backend cpu (detected), device cpu``.
        """
        c = self.capabilities
        cc = "n/a" if c.compute_capability is None else ".".join(map(str, c.compute_capability))
        methods = ", ".join(c.quantization_methods) or "none"
        return "\n".join([
            f"backend_manager: backend {self.backend.value} ({self._chosen_by}), device {self.device}",
            f"  device name: {c.device_name} (count {c.device_count}, compute capability {cc})",
            f"  memory: {c.available_memory_gb:.1f} GB available of {c.total_memory_gb:.1f} GB",
            f"  dtypes: bf16 {'yes' if c.supports_bf16 else 'no'}, fp16 {'yes' if c.supports_fp16 else 'no'}",
            f"  distributed: {c.distributed_backend or 'none'}"
            f" (supports_distributed={c.supports_distributed}), FSDP: {'yes' if c.supports_fsdp else 'no'}",
            f"  quantization methods: {methods}",
        ])

    def report_import_status(self) -> str:
        """Return one line per quantization library: installed?, version, usable here?, why not."""
        return report_import_status(self.backend)

    def __repr__(self) -> str:
        return f"BackendManager(backend={self.backend.value!r}, device={str(self.device)!r})"
