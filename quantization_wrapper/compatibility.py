"""The compatibility matrix: which method runs on which backend, and why not.

This table is the single source of truth. Validation reads it, the factory's fallback chain reads
it, ``backend_manager`` reads it for ``capabilities.quantization_methods``, and
``docs/compatibility.md`` is rendered from it (``python scripts/render_compatibility.py``);
a test keeps the document equal to the data.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend_manager import Backend

from .config import METHOD_SPECS, QuantizationMethod

__all__ = [
    "Support",
    "COMPATIBILITY_MATRIX",
    "FALLBACK_CHAINS",
    "get_support",
    "is_supported",
    "supported_methods",
    "usable_methods",
    "method_library",
    "render_compatibility_markdown",
]

M = QuantizationMethod


@dataclass(frozen=True)
class Support:
    """One cell of the matrix.

    Attributes:
        supported: whether the method runs on the backend.
        reason: why (or why not), in one sentence a user can act on.
        design: what the primary design document's table says for this cell (``None`` where the
            design predates the method); cells where ``supported != design`` are deliberate
            departures, explained in ``reason``.
    """

    supported: bool
    reason: str
    design: bool | None = None

    @property
    def departs_from_design(self) -> bool:
        return self.design is not None and self.design != self.supported


_BNB_CUDA = Support(True, "bitsandbytes CUDA kernels.", True)
_BNB_APPLE = Support(False, "bitsandbytes has no supported Apple GPU backend; use QUANTO_INT4/HQQ/MLX.", False)
_BNB_CPU = Support(True, "bitsandbytes >= 0.48 ships CPU kernels (measured here with 0.50); the design "
                         "document predates them.", False)
_HQQ_ANY = Support(True, "HQQ is calibration-free and pure PyTorch, with optional CUDA kernels.", True)
_MLX_CUDA = Support(False, "MLX runs on Apple GPUs and CPUs, not on CUDA tensors; HQQ stores the same "
                           "affine group format and runs on CUDA.", False)
_MLX_APPLE = Support(True, "MLX packed format, mx.quantized_matmul on the Apple GPU.", True)
_MLX_CPU = Support(True, "MLX packed format; mx.quantized_matmul with mlx[cpu] on Linux, otherwise the "
                         "pure-torch path. The design document predates mlx[cpu].", False)
_QUANTO_TORCH = Support(True, "optimum-quanto runs wherever PyTorch does.", True)
_QUANTO_MLX = Support(False, "On the MLX backend the matmul runs in MLX, and optimum-quanto has no MLX "
                             "kernels; use MLX_INT4/MLX_INT8, or the MPS backend for quanto.", False)
_NONE = Support(True, "No quantization: weights stay in floating point.", None)


def _row(bnb: Support, hqq: Support, mlx: Support, quanto: Support) -> dict[QuantizationMethod, Support]:
    return {
        M.BNB_NF4: bnb, M.BNB_FP4: Support(bnb.supported, bnb.reason, None), M.BNB_INT8: bnb,
        M.HQQ: hqq, M.MLX_INT4: mlx, M.MLX_INT8: mlx,
        M.QUANTO_INT2: quanto, M.QUANTO_INT4: quanto, M.QUANTO_INT8: quanto,
        M.QUANTO_FP8: Support(quanto.supported, quanto.reason, None), M.NONE: _NONE,
    }


COMPATIBILITY_MATRIX: dict[Backend, dict[QuantizationMethod, Support]] = {
    Backend.CUDA: _row(_BNB_CUDA, _HQQ_ANY, _MLX_CUDA, _QUANTO_TORCH),
    Backend.MPS: _row(_BNB_APPLE, _HQQ_ANY, _MLX_APPLE, _QUANTO_TORCH),
    Backend.MLX: _row(_BNB_APPLE, _HQQ_ANY, _MLX_APPLE, _QUANTO_MLX),
    Backend.CPU: _row(_BNB_CPU, _HQQ_ANY, _MLX_CPU, _QUANTO_TORCH),
}

# When a method cannot be used (unsupported here, library missing, no adapter), the factory tries
# these in order: closest storage format first, same bit width, ending with no quantization.
# Each entry is (method, bits); bits=None keeps the requested bit width.
FALLBACK_CHAINS: dict[QuantizationMethod, tuple[tuple[QuantizationMethod, int | None], ...]] = {
    M.BNB_NF4: ((M.QUANTO_INT4, 4), (M.HQQ, 4), (M.MLX_INT4, 4), (M.NONE, None)),
    M.BNB_FP4: ((M.BNB_NF4, 4), (M.QUANTO_INT4, 4), (M.HQQ, 4), (M.MLX_INT4, 4), (M.NONE, None)),
    M.BNB_INT8: ((M.QUANTO_INT8, 8), (M.HQQ, 8), (M.MLX_INT8, 8), (M.NONE, None)),
    M.HQQ: ((M.MLX_INT4, None), (M.QUANTO_INT4, None), (M.NONE, None)),
    M.MLX_INT4: ((M.HQQ, None), (M.QUANTO_INT4, 4), (M.BNB_NF4, 4), (M.NONE, None)),
    M.MLX_INT8: ((M.HQQ, None), (M.QUANTO_INT8, 8), (M.BNB_INT8, 8), (M.NONE, None)),
    M.QUANTO_INT2: ((M.HQQ, 2), (M.MLX_INT4, 2), (M.NONE, None)),
    M.QUANTO_INT4: ((M.HQQ, 4), (M.MLX_INT4, 4), (M.BNB_NF4, 4), (M.NONE, None)),
    M.QUANTO_INT8: ((M.HQQ, 8), (M.BNB_INT8, 8), (M.MLX_INT8, 8), (M.NONE, None)),
    M.QUANTO_FP8: ((M.QUANTO_INT8, 8), (M.HQQ, 8), (M.MLX_INT8, 8), (M.NONE, None)),
    M.NONE: (),
}


def get_support(backend: Backend | str, method: QuantizationMethod | str) -> Support:
    """The matrix cell for ``backend`` x ``method`` (strings accepted)."""
    return COMPATIBILITY_MATRIX[Backend.parse(backend)][QuantizationMethod.parse(method)]


def is_supported(backend: Backend | str, method: QuantizationMethod | str) -> bool:
    """Whether ``method`` runs on ``backend`` according to the matrix (libraries not checked)."""
    return get_support(backend, method).supported


def supported_methods(backend: Backend | str) -> list[QuantizationMethod]:
    """Methods the matrix allows on ``backend``, in enum order."""
    row = COMPATIBILITY_MATRIX[Backend.parse(backend)]
    return [m for m, s in row.items() if s.supported]


def method_library(method: QuantizationMethod | str) -> str | None:
    """The library a method needs (``"bitsandbytes"``, ``"hqq"``, ...), ``None`` for NONE."""
    return METHOD_SPECS[QuantizationMethod.parse(method)].library


def usable_methods(backend: Backend | str) -> list[str]:
    """Method values that the matrix allows on ``backend`` *and* whose library is usable here."""
    from backend_manager import is_library_usable

    backend = Backend.parse(backend)
    out = []
    for method in supported_methods(backend):
        lib = method_library(method)
        if lib is None or is_library_usable(lib, backend):
            out.append(method.value)
    return out


def render_compatibility_markdown() -> str:
    """Render the matrix as the Markdown of ``docs/compatibility.md``."""
    methods = list(QuantizationMethod)
    lines = [
        "# Backend compatibility matrix",
        "",
        "<!-- Generated by `python scripts/render_compatibility.py`; do not edit by hand. -->",
        "<!-- The data lives in quantization_wrapper/compatibility.py; a test keeps both equal. -->",
        "",
        "✓ supported, ✗ not supported. A `*` marks a deliberate departure from the design document's",
        "table, explained in the notes below. Whether the *library* is installed and usable on this",
        "machine is a separate check: `quantization-wrapper doctor` or `backend_manager.report_import_status()`.",
        "",
        "| Backend | " + " | ".join(m.name for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for backend, row in COMPATIBILITY_MATRIX.items():
        cells = [("✓" if row[m].supported else "✗") + ("*" if row[m].departs_from_design else "")
                 for m in methods]
        lines.append(f"| {backend.name} | " + " | ".join(cells) + " |")
    lines += ["", "## Why", ""]
    for backend, row in COMPATIBILITY_MATRIX.items():
        lines.append(f"### {backend.name}")
        lines.append("")
        seen: dict[str, list[str]] = {}
        for m in methods:
            seen.setdefault(row[m].reason, []).append(m.name)
        for reason, names in seen.items():
            lines.append(f"- {', '.join(names)}: {reason}")
        lines.append("")
    lines += ["## Fallback chains", "",
              "With `strict=False`, `create_quantization_adapter` replaces a method that cannot run here",
              "(not supported on the backend, library missing or unusable, or no adapter registered) by",
              "the first usable entry of its chain, and warns once naming the substitution.",
              "`strict=True` raises instead, listing every problem.", "",
              "| Requested | Tried in order |", "|---|---|"]
    for method, chain in FALLBACK_CHAINS.items():
        if not chain:
            continue
        steps = ", ".join(f"{m.name}" + (f" ({b}-bit)" if b else " (same bits)" if m is not M.NONE else "")
                          for m, b in chain)
        lines.append(f"| {method.name} | {steps} |")
    lines.append("")
    return "\n".join(lines)
