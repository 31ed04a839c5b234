"""Write docs/compatibility.md from the compatibility matrix in quantization_wrapper/compatibility.py."""

from pathlib import Path

from quantization_wrapper.compatibility import render_compatibility_markdown

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"
    out.write_text(render_compatibility_markdown(), encoding="utf-8")
    print(f"wrote {out}")
