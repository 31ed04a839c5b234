"""Which quantization libraries are installed, importable and usable on a backend.

A library is imported for real the first time its status is asked (never when this package is
imported), then checked against the backend: some libraries need a native library or a working
kernel there, which is tested by running a tiny operation, not assumed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import platform
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional

from .backend import Backend, cached, detect_backend, is_apple_silicon

__all__ = [
    "KNOWN_LIBRARIES",
    "LibrarySpec",
    "LibraryStatus",
    "get_import_status",
    "get_library_status",
    "is_library_usable",
    "register_library",
    "unregister_library",
    "report_import_status",
]

# (module, backend, version) -> None when usable, else the reason it is not.
_Check = Callable[[ModuleType, Backend, str], Optional[str]]


@dataclass(frozen=True)
class LibrarySpec:
    """How to find, install and check one library (a row of :data:`KNOWN_LIBRARIES`)."""

    module: str
    dist: str
    pip: str
    pip_linux: str | None = None
    check: _Check | None = None

    def install_hint(self) -> str:
        spec = self.pip_linux if self.pip_linux and platform.system() == "Linux" else self.pip
        return f"pip install {spec}"


@dataclass(frozen=True)
class LibraryStatus:
    """Whether one library can be used on one backend.

    Attributes:
        name: the library's name in :data:`KNOWN_LIBRARIES`, e.g. ``"optimum-quanto"``.
        installed: a distribution or a module of that name was found.
        version: the installed distribution's version, or None.
        usable: it imports and works on ``backend``.
        reason: why it is not usable (None when usable).
        install_hint: the ``pip install`` line that installs it.
        backend: the backend the status was computed for.
    """

    name: str
    installed: bool
    version: str | None
    usable: bool
    reason: str | None
    install_hint: str
    backend: Backend | None = None

    def __str__(self) -> str:
        where = f"usable on {self.backend.value}" if self.backend else "usable"
        if not self.installed:
            return f"{self.name}: not installed, {where}: no; fix: {self.install_hint}"
        line = f"{self.name}: installed {self.version or '(no version)'}, {where}: "
        if self.usable:
            return line + "yes"
        return line + f"no ({' '.join((self.reason or 'unknown reason').split())})"


def _check_bitsandbytes(module: ModuleType, backend: Backend, version: str) -> str | None:
    if backend in (Backend.MPS, Backend.MLX):
        return "bitsandbytes has no supported Apple backend; use HQQ, optimum-quanto or MLX"
    lib = importlib.import_module("bitsandbytes.cextension").lib
    kind = type(lib).__name__
    if "ErrorHandler" in kind or "Mock" in kind:
        detail = " ".join(str(getattr(lib, "error_msg", "")).split())
        return f"bitsandbytes could not load its native library ({kind}: {detail})"
    if backend is Backend.CUDA:
        if getattr(lib, "compiled_with_cuda", False):
            return None
        return f"bitsandbytes loaded a library without CUDA support ({kind}); reinstall bitsandbytes"
    from packaging.version import Version

    if Version(version) < Version("0.48"):
        return f"bitsandbytes {version} has no CPU backend; need bitsandbytes>=0.48"
    try:
        import torch

        functional = importlib.import_module("bitsandbytes.functional")
        x = torch.linspace(-1.0, 1.0, 64, dtype=torch.float32)
        packed, state = functional.quantize_4bit(x, blocksize=64, quant_type="nf4")
        error = (functional.dequantize_4bit(packed, state).reshape(-1) - x).abs().max().item()
    except Exception as e:  # the probe exists to turn any failure into a reason
        return f"bitsandbytes NF4 round trip on CPU failed: {type(e).__name__}: {e}"
    # NF4's widest gap is ~0.3 of absmax, so a correct round trip is within ~0.15.
    if not error <= 0.2:
        return f"bitsandbytes NF4 round trip on CPU is wrong (max error {error:.3g} > 0.2)"
    return None


def _check_mlx(module: ModuleType, backend: Backend, version: str) -> str | None:
    if backend is Backend.CUDA:
        return "mlx runs on Apple GPUs or the CPU, not on CUDA tensors"
    if backend is Backend.MPS and not is_apple_silicon():
        return "mlx runs on Apple silicon GPUs or the CPU; this MPS device is not Apple silicon"
    try:
        packed = module.quantize(module.ones((8, 64)), group_size=64, bits=4)
        module.eval(*packed)
    except Exception as e:
        return f"mlx.core.quantize failed: {type(e).__name__}: {e}"
    return None


#: Known libraries: name -> import module, distribution, pip spec and backend check.
KNOWN_LIBRARIES: dict[str, LibrarySpec] = {
    "bitsandbytes": LibrarySpec("bitsandbytes", "bitsandbytes", "bitsandbytes", check=_check_bitsandbytes),
    "hqq": LibrarySpec("hqq", "hqq", "hqq"),
    "optimum-quanto": LibrarySpec("optimum.quanto", "optimum-quanto", "optimum-quanto"),
    "mlx": LibrarySpec("mlx.core", "mlx", "mlx", pip_linux='"mlx[cpu]"', check=_check_mlx),
    "peft": LibrarySpec("peft", "peft", "peft"),
    "transformers": LibrarySpec("transformers", "transformers", "transformers"),
}


def register_library(name: str, spec: LibrarySpec, *, replace: bool = False) -> None:
    """Add a library to :data:`KNOWN_LIBRARIES` (a backend outside this package declares its own).

    Raises:
        ValueError: ``name`` is known already (``replace=True`` replaces it) or ``spec`` is not a
            :class:`LibrarySpec`.
    """
    if not isinstance(spec, LibrarySpec):
        raise ValueError(f"register_library: spec must be a LibrarySpec, got {type(spec).__name__}")
    if name in KNOWN_LIBRARIES and not replace:
        raise ValueError(f"library {name!r} is known already; pass replace=True to replace it")
    KNOWN_LIBRARIES[name] = spec


def unregister_library(name: str) -> None:
    """Forget a library added with :func:`register_library`."""
    KNOWN_LIBRARIES.pop(name, None)


def _library(name: str) -> LibrarySpec:
    try:
        return KNOWN_LIBRARIES[name]
    except KeyError:
        raise ValueError(
            f"library={name!r} is not a known library; known: {', '.join(KNOWN_LIBRARIES)}"
        ) from None


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# Import-time log lines that are noise for our users: (logger, substring). bitsandbytes 0.50 logs
# that the optional `kernels` package is missing; it only speeds up a CPU path we switch off.
_IMPORT_NOISE = {"bitsandbytes": ("bitsandbytes.backends.cpu.ops", "kernels-community")}


@cached
def _import_probe(name: str) -> tuple[ModuleType | None, str | None]:
    """Import the library for real; return ``(module, None)`` or ``(None, error text)``."""
    noise = _IMPORT_NOISE.get(name)
    log_filter = None
    if noise is not None:
        log_filter = logging.Filter()
        log_filter.filter = lambda record, text=noise[1]: text not in record.getMessage()  # type: ignore[method-assign]
        logging.getLogger(noise[0]).addFilter(log_filter)
    try:
        return importlib.import_module(_library(name).module), None
    except Exception as e:  # a broken install can raise anything; report it, don't crash
        return None, f"{type(e).__name__}: {e}"
    finally:
        if log_filter is not None:
            logging.getLogger(noise[0]).removeFilter(log_filter)


@cached
def _usability(name: str, backend: Backend) -> str | None:
    lib = _library(name)
    module, error = _import_probe(name)
    if module is None:
        return error
    version = _dist_version(lib.dist)
    if version is None:
        return (
            f"found a module named {lib.module} but no installed distribution {lib.dist!r}; "
            "a stub or a copy on sys.path?"
        )
    return lib.check(module, backend, version) if lib.check else None


def get_library_status(name: str, backend: Backend | str | None = None) -> LibraryStatus:
    """Report whether a known library is installed and usable on a backend.

    Args:
        name: a key of :data:`KNOWN_LIBRARIES`, e.g. ``"bitsandbytes"``.
        backend: a Backend or its string; None means :func:`detect_backend`.

    Returns:
        A :class:`LibraryStatus`.

    Raises:
        ValueError: for an unknown library name (the known ones are listed) or backend.
    """
    lib = _library(name)
    backend = detect_backend() if backend is None else Backend.parse(backend)
    version = _dist_version(lib.dist)
    top_level = lib.module.partition(".")[0]
    if version is None and importlib.util.find_spec(top_level) is None:
        reason = f"{name} is not installed"
        return LibraryStatus(name, False, None, False, reason, lib.install_hint(), backend)
    reason = _usability(name, backend)
    return LibraryStatus(name, True, version, reason is None, reason, lib.install_hint(), backend)


def is_library_usable(name: str, backend: Backend | str | None = None) -> bool:
    """Return True when ``name`` imports and works on ``backend`` (None = detected)."""
    return get_library_status(name, backend).usable


def get_import_status(backend: Backend | str | None = None) -> dict[str, LibraryStatus]:
    """Return the status of every known library on ``backend`` (None = detected), keyed by name."""
    backend = detect_backend() if backend is None else Backend.parse(backend)
    return {name: get_library_status(name, backend) for name in KNOWN_LIBRARIES}


def report_import_status(backend: Backend | str | None = None) -> str:
    """Return one readable line per known library: installed?, version, usable here?, why not.

    Args:
        backend: a Backend or its string; None means :func:`detect_backend`.

    Returns:
        Lines joined with ``"\\n"``, in the order of :data:`KNOWN_LIBRARIES`.
    """
    return "\n".join(str(status) for status in get_import_status(backend).values())
