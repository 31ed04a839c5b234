"""What a backend can do: memory, dtypes, distributed training, quantization methods.

One small function per capability; :func:`get_capabilities` gathers them into a dataclass.
Memory is in GB of 2**30 bytes (``*_gb`` keys) and, under the design document's names
(``total_memory``, ``used_memory``, ``available_memory``), in bytes. MPS and MLX share memory with
the CPU (Apple unified memory), so their figures come from psutil.
"""

from __future__ import annotations

import logging

import platform
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

from .backend import Backend, cached

logger = logging.getLogger(__name__)

__all__ = [
    "register_method_provider",
    "BackendCapabilities",
    "compute_capability",
    "device_name",
    "distributed_backend",
    "get_capabilities",
    "memory_info",
    "supports_bf16",
    "supports_distributed",
    "supports_fp16",
    "supports_fsdp",
]

_GB = 1024**3


@dataclass
class BackendCapabilities:
    """A snapshot of what one backend offers (memory figures are taken when it is built).

    ``supports_distributed`` (the design document's name) is derived from
    ``distributed_backend``: True exactly when that is ``"nccl"`` or ``"gloo"``.
    """

    backend: Backend
    device_name: str
    total_memory_gb: float
    available_memory_gb: float
    supports_bf16: bool
    supports_fp16: bool
    compute_capability: tuple[int, int] | None
    distributed_backend: str | None
    supports_fsdp: bool
    quantization_methods: list[str] = field(default_factory=list)
    device_count: int = 1

    @property
    def supports_distributed(self) -> bool:
        """True when a torch.distributed backend (``distributed_backend``) is usable here."""
        return self.distributed_backend is not None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly dict (backend as its string, compute capability as a list,
        plus the derived ``supports_distributed``)."""
        data = asdict(self)
        data["backend"] = self.backend.value
        data["supports_distributed"] = self.supports_distributed
        if self.compute_capability is not None:
            data["compute_capability"] = list(self.compute_capability)
        return data


def memory_info(backend: Backend, device_index: int = 0) -> dict[str, Any]:
    """Return total, available and used memory of the backend's device.

    Args:
        backend: the backend; CUDA reads ``torch.cuda.mem_get_info``, the others psutil.
        device_index: the CUDA device (ignored elsewhere).

    Returns:
        ``{"total_gb", "available_gb", "used_gb", "percent_used", "device", "source"}`` (floats
        in GB of 2**30 bytes) and the same figures as int bytes under the design document's
        names, ``"total_memory"``, ``"available_memory"``, ``"used_memory"``; in both units
        used = total - available, all from one reading.
    """
    if backend is Backend.CUDA:
        import torch

        free, total = torch.cuda.mem_get_info(device_index)
        device, source = f"cuda:{device_index}", "torch.cuda.mem_get_info"
    else:
        import psutil

        vm = psutil.virtual_memory()
        free, total = vm.available, vm.total
        device, source = ("mps" if backend in (Backend.MPS, Backend.MLX) else "cpu"), "psutil"
    total, free = int(total), int(free)
    used = total - free
    return {
        "total_gb": total / _GB,
        "available_gb": free / _GB,
        "used_gb": used / _GB,
        "percent_used": 100.0 * used / total if total else 0.0,
        "device": device,
        "source": source,
        "total_memory": total,
        "available_memory": free,
        "used_memory": used,
    }


@cached
def device_name(backend: Backend, device_index: int = 0) -> str:
    """Return a human-readable name of the backend's device."""
    if backend is Backend.CUDA:
        import torch

        return str(torch.cuda.get_device_name(device_index))
    chip = _cpu_model() or platform.processor() or platform.machine() or "unknown CPU"
    return f"{chip} ({backend.value})" if backend in (Backend.MPS, Backend.MLX) else chip


def _cpu_model() -> str | None:
    if platform.system() == "Darwin":
        return f"Apple {platform.machine()}"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip() or None
    except OSError:
        pass
    return None


@cached
def compute_capability(backend: Backend, device_index: int = 0) -> tuple[int, int] | None:
    """Return the CUDA compute capability ``(major, minor)``, or None off CUDA."""
    if backend is not Backend.CUDA:
        return None
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return int(major), int(minor)


@cached
def supports_bf16(backend: Backend) -> bool:
    """Return True when bfloat16 compute is supported (MPS/MLX: no by design — use float16)."""
    if backend is Backend.CUDA:
        import torch

        return bool(torch.cuda.is_bf16_supported())
    return backend is Backend.CPU


def supports_fp16(backend: Backend) -> bool:
    """Return True when float16 compute is supported (it is on every backend here)."""
    return isinstance(backend, Backend)


@cached
def distributed_backend(backend: Backend) -> str | None:
    """Return the torch.distributed backend to use: ``"nccl"``, ``"gloo"`` or None."""
    import torch.distributed as dist

    if not dist.is_available():
        return None
    if backend is Backend.CUDA and dist.is_nccl_available():
        return "nccl"
    return "gloo" if dist.is_gloo_available() else None


def supports_distributed(backend: Backend) -> bool:
    """Return True when a torch.distributed backend is usable: nccl (CUDA) or gloo."""
    return distributed_backend(backend) is not None


def supports_fsdp(backend: Backend) -> bool:
    """Return True when FSDP can run: CUDA, or CPU over gloo (not MPS/MLX)."""
    if backend is Backend.CUDA:
        return distributed_backend(backend) is not None
    return backend is Backend.CPU and distributed_backend(backend) == "gloo"


#: Entry-point group through which packages tell ``capabilities.quantization_methods`` which of
#: their methods are usable on a backend: each entry is a callable ``(backend) -> [method names]``
#: (quantization-wrapper declares ``quantization_wrapper.compatibility:usable_methods``). This
#: package knows the machine and imports none of them: the dependency points up through the entry
#: point, which is loaded only when capabilities are asked for.
METHOD_PROVIDERS_GROUP = "backend_manager.method_providers"


_PROVIDERS: list[Callable[[Backend], Iterable[Any]]] = []


def register_method_provider(provider: Callable[[Backend], Iterable[Any]]) -> None:
    """Add a ``(backend) -> [method names]`` callable to ``capabilities.quantization_methods`` (for a
    package used without being installed, where its entry point is not visible). Idempotent."""
    if provider not in _PROVIDERS:
        _PROVIDERS.append(provider)


def _providers() -> list[Callable[[Backend], Iterable[Any]]]:
    from importlib.metadata import entry_points

    providers = list(_PROVIDERS)
    for entry in entry_points(group=METHOD_PROVIDERS_GROUP):
        try:
            provider = entry.load()
        except Exception as e:  # a broken plugin must not break device detection
            logger.warning("method provider %s could not be loaded: %s", entry.value, e)
            continue
        if provider not in providers:
            providers.append(provider)
    return providers


def _usable_methods(backend: Backend) -> list[str]:
    methods: list[str] = []
    for provider in _providers():
        methods.extend(str(getattr(m, "value", m)) for m in provider(backend) if str(getattr(m, "value", m))
                       not in methods)
    return methods


def get_capabilities(backend: Backend, device_index: int = 0) -> BackendCapabilities:
    """Gather the capabilities of ``backend`` (memory is read now, not cached).

    Args:
        backend: the backend to describe.
        device_index: the CUDA device to describe (ignored elsewhere).

    Returns:
        A :class:`BackendCapabilities`.
    """
    memory = memory_info(backend, device_index)
    if backend is Backend.CUDA:
        import torch

        count = int(torch.cuda.device_count())
    else:
        count = 1
    return BackendCapabilities(
        backend=backend,
        device_name=device_name(backend, device_index),
        total_memory_gb=memory["total_gb"],
        available_memory_gb=memory["available_gb"],
        supports_bf16=supports_bf16(backend),
        supports_fp16=supports_fp16(backend),
        compute_capability=compute_capability(backend, device_index),
        distributed_backend=distributed_backend(backend),
        supports_fsdp=supports_fsdp(backend),
        quantization_methods=_usable_methods(backend),
        device_count=count,
    )
