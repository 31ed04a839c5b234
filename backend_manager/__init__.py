"""Hardware detection for quantization: which backend (CUDA, MLX, MPS, CPU) this process runs on,
what it can do, and which quantization libraries work there.

Importing this package imports no heavy library; detection runs (and is cached) on first use.
Set ``$QUANTIZATION_WRAPPER_BACKEND`` to override detection.
"""

from .backend import BACKEND_ENV_VAR, Backend, available_backends, clear_caches, detect_backend
from .capabilities import BackendCapabilities
from .imports import (
    KNOWN_LIBRARIES,
    LibrarySpec,
    LibraryStatus,
    get_import_status,
    get_library_status,
    is_library_usable,
    register_library,
    report_import_status,
    unregister_library,
)
from .manager import BackendManager

__all__ = [
    "BACKEND_ENV_VAR",
    "Backend",
    "BackendCapabilities",
    "BackendManager",
    "KNOWN_LIBRARIES",
    "LibrarySpec",
    "LibraryStatus",
    "available_backends",
    "clear_caches",
    "detect_backend",
    "get_import_status",
    "get_library_status",
    "is_library_usable",
    "register_library",
    "report_import_status",
    "unregister_library",
]
