from pathlib import Path

import pytest

from backend_manager import Backend
from quantization_wrapper import (
    COMPATIBILITY_MATRIX,
    FALLBACK_CHAINS,
    QuantizationMethod,
    get_support,
    is_supported,
    render_compatibility_markdown,
    supported_methods,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"

# The primary design document's table, verbatim.
DESIGN_TABLE = """
| CUDA    | ✓ | ✓ | ✓ | ✗ | ✗ | ✓ | ✓ | ✓ |
| MPS     | ✗ | ✗ | ✓ | ✓ | ✓ | ✓ | ✓ | ✓ |
| MLX     | ✗ | ✗ | ✓ | ✓ | ✓ | ✗ | ✗ | ✗ |
| CPU     | ✗ | ✗ | ✓ | ✗ | ✗ | ✓ | ✓ | ✓ |
"""
DESIGN_COLUMNS = ["BNB_NF4", "BNB_INT8", "HQQ", "MLX_INT4", "MLX_INT8", "QUANTO_INT2", "QUANTO_INT4", "QUANTO_INT8"]
# Measured on our machines (SPEC.md, "What runs where"): bitsandbytes >= 0.48 and mlx[cpu] run on CPU.
DEPARTURES = {(Backend.CPU, m) for m in ("BNB_NF4", "BNB_INT8", "MLX_INT4", "MLX_INT8")}


def test_doc_is_rendered_from_the_data():
    assert DOC.read_text(encoding="utf-8") == render_compatibility_markdown(), (
        "docs/compatibility.md is stale: run `python scripts/render_compatibility.py`"
    )


def test_matrix_matches_design_table_except_documented_departures():
    for line in DESIGN_TABLE.strip().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        backend = Backend[cells[0]]
        for column, mark in zip(DESIGN_COLUMNS, cells[1:]):
            cell = COMPATIBILITY_MATRIX[backend][QuantizationMethod[column]]
            assert cell.design is (mark == "✓"), (backend, column)
            if (backend, column) in DEPARTURES:
                assert cell.departs_from_design and cell.reason
            else:
                assert cell.supported is (mark == "✓"), (backend, column)


def test_every_cell_present_with_reason():
    for backend in Backend:
        for method in QuantizationMethod:
            cell = COMPATIBILITY_MATRIX[backend][method]
            assert cell.reason.endswith(".") and len(cell.reason) > 20


def test_lookups_accept_strings():
    assert is_supported("cuda", "bnb_nf4") and not is_supported("mps", "bnb_nf4")
    assert get_support(Backend.MLX, QuantizationMethod.QUANTO_INT4).supported is False
    assert QuantizationMethod.NONE in supported_methods("mlx")
    with pytest.raises(ValueError, match="allowed"):
        is_supported("tpu", "hqq")


def test_fallback_chains_end_in_none_and_never_repeat():
    for method, chain in FALLBACK_CHAINS.items():
        if method is QuantizationMethod.NONE:
            assert chain == ()
            continue
        methods = [m for m, _ in chain]
        assert methods[-1] is QuantizationMethod.NONE
        assert method not in methods
        # every backend has some usable entry in the chain according to the matrix
        for backend in Backend:
            assert any(COMPATIBILITY_MATRIX[backend][m].supported for m in methods)
