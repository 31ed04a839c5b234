"""transformers' `from_pretrained(quantization_config=...)`: our `QuantizationConfig` vs transformers'
own configs for the same method (bnb NF4, bnb INT8, quanto int4), and, for MLX and HQQ (which
transformers cannot quantize on the fly on a CPU), vs loading in bf16 and calling `quantize_model`.

Each measurement runs in a fresh process that reports its wall time and peak RSS. Writes the table
to docs/benchmarks.md (section `from_pretrained`).

    python benchmarks/from_pretrained.py [--methods bnb_nf4,mlx_int4] [--small] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_quantize as lq  # noqa: E402
from common import generated_llama, machine_line, run_child, write_section  # noqa: E402


def ours_from_pretrained(ckpt: Path, method: str) -> dict:
    return run_child(lq.prelude(method) + lq.MODEL_BYTES + f"""
import quantization_wrapper
from quantization_wrapper import QuantizationConfig
config = QuantizationConfig(**{lq.OURS[method]})
start = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, dtype=torch.bfloat16, quantization_config=config)
seconds = time.perf_counter() - start
assert model.quantization_plan.quantized, "nothing quantized"
report(seconds=seconds, peak_rss=peak(), baseline_rss=baseline, size_gb=model_bytes(model))
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="bnb_nf4,bnb_int8,quanto_int4,mlx_int4", help="comma-separated methods")
    parser.add_argument("--small", action="store_true", help="a 4-layer 1024-wide Llama (for HQQ on 2 cores)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement under 15 s (median shown)")
    args = parser.parse_args()
    lq.REPEAT = max(1, args.repeat)
    ckpt = generated_llama("llama-small", num_hidden_layers=4, hidden_size=1024, intermediate_size=2816,
                           num_attention_heads=16, num_key_value_heads=4) if args.small else generated_llama()
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        ours = lq.median_of_runs(lambda: ours_from_pretrained(ckpt, method))
        if method in lq.PEER:
            peer, peer_name = lq.median_of_runs(lambda: lq.peer_transformers(ckpt, method)), \
                "transformers' own config"
        else:
            peer, peer_name = lq.median_of_runs(lambda: lq.ours_full_then_quantize(ckpt, method)), \
                "bf16 from_pretrained + quantize_model"
        rows.append((method, peer_name, ours, peer))
        print(f"{method}: ours {ours['seconds']:.1f}s {ours['peak_rss']:.2f}GB | {peer_name} "
              f"{peer['seconds']:.1f}s {peer['peak_rss']:.2f}GB", flush=True)
    config = json.loads((ckpt / "config.json").read_text())
    lines = [
        "## from_pretrained with our QuantizationConfig (issue: work with the real clients)"
        + (" -- small model" if args.small else ""),
        "",
        machine_line(f"Each measurement in a fresh process, the median time of {lq.REPEAT} runs (one run when it "
                     f"takes over 15 s) and the highest peak RSS"),
        f"Model: generated Llama, {json.dumps({k: config[k] for k in ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'vocab_size')})}, "
        "bf16 safetensors shards of 500 MB, loaded with `dtype=torch.bfloat16`. `ours` = "
        "`AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_wrapper.QuantizationConfig(...))`, "
        "each layer quantized by our adapter as soon as transformers has read its weights. Peak RSS includes the "
        "process baseline (torch + transformers + the method's library imported). Both sides pay for the pages of "
        "the checkpoint that transformers' loader keeps mapped (2.2 GB here); `load_and_quantize`, which hands "
        "them back layer by layer, peaks lower still (the `load_quantize` table above).",
        "",
        "| method | peer | ours time (s) | peer time (s) | time ratio ours/peer | ours peak RSS (GB) | peer peak RSS (GB) | RSS ratio | quantized size ours / peer (GB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, peer_name, ours, peer in rows:
        lines.append(f"| {method} | {peer_name} | {ours['seconds']:.1f} | {peer['seconds']:.1f} | "
                     f"{ours['seconds'] / peer['seconds']:.2f} | {ours['peak_rss']:.2f} | {peer['peak_rss']:.2f} | "
                     f"{ours['peak_rss'] / peer['peak_rss']:.2f} | {ours['size_gb']:.2f} / {peer['size_gb']:.2f} |")
    text = "\n".join(lines)
    print(text)
    write_section("from_pretrained_small" if args.small else "from_pretrained", text)


if __name__ == "__main__":
    main()
