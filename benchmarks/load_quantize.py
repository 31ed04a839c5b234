"""Checkpoint -> quantized model: our streaming `load_and_quantize` vs transformers'
`from_pretrained(quantization_config=...)` (bnb NF4, bnb INT8, quanto int4) and vs our own
full-load-then-quantize (HQQ, MLX, which transformers cannot quantize on the fly on CPU); then
loading our saved quantized checkpoint vs quantizing again.

Each measurement runs in a fresh process that reports its wall time and peak RSS (the kernel's
high-water mark). Writes the tables to docs/benchmarks.md.

    python benchmarks/load_quantize.py [--methods bnb_nf4,hqq] [--small]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, CHILD_PRELUDE, generated_llama, machine_line, run_child, write_section  # noqa: E402

OURS = {
    "bnb_nf4": "dict(method='bnb_nf4', double_quant=True, compute_dtype='bfloat16')",
    "bnb_int8": "dict(method='bnb_int8')",
    "quanto_int4": "dict(method='quanto_int4')",
    "hqq": "dict(method='hqq', bits=4, group_size=64)",
    "mlx_int4": "dict(method='mlx_int4', bits=4, group_size=64)",
}
# Imported before the baseline is taken, so times and RSS measure the work, not the imports: the
# method's library and transformers' Llama modeling code (whose import chain pulls in torch's
# compiler, 2-6 s, paid once per process by whichever loader comes first).
LIBRARY = {"bnb_nf4": "bitsandbytes", "bnb_int8": "bitsandbytes", "quanto_int4": "optimum.quanto",
           "hqq": "hqq.core.quantize", "mlx_int4": "mlx.core"}


def prelude(method: str) -> str:
    return CHILD_PRELUDE.replace(
        "baseline = rss()",
        f"import {LIBRARY[method]}\nimport transformers.models.llama.modeling_llama\nbaseline = rss()")


PEER = {
    "bnb_nf4": "transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
               "bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)",
    "bnb_int8": "transformers.BitsAndBytesConfig(load_in_8bit=True)",
    "quanto_int4": "transformers.QuantoConfig(weights='int4')",
}

MODEL_BYTES = """
def model_bytes(model):
    from quantization_wrapper.adapters.base import tensor_nbytes
    plan = getattr(model, "quantization_plan", None)
    inside = set(l.name for l in plan.converted) if plan else set()
    rest = [t for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if not any(n.startswith(p + ".") for p in inside)]
    return ((plan.bytes_after if plan else 0) + tensor_nbytes(rest)) / 2**30
"""


REPEAT = 3  # set by --repeat
NOTE = ("transformers' quanto size is what its `get_memory_footprint()` reports, which counts quanto's int4 weights at "
        "their bfloat16 size: both hold the same int4 tensors (ours are bit-identical to quanto's `freeze`). On the CPU, "
        "the libraries' quantizers (whole-tensor torch code) are called on slices of each weight, 256K weights for "
        "bitsandbytes 4-bit and quanto int4 and ~1M for INT8: the same bytes as one call, from cache-sized temporaries. "
        "quanto int4 nibbles are packed once, for torch's CPU int4 kernel; a saved checkpoint holds quanto's own "
        "layout, which loading regroups for the kernel in one transposing copy and 64-bit nibble operations. A second "
        "quantizing worker is used only when its temporaries fit in 256 MiB.")


def median_of_runs(run) -> dict:
    """``run()`` up to REPEAT times in fresh processes: the median time and the highest peak RSS.
    A run over 15 s is not repeated (its noise is small next to its length)."""
    results = [run()]
    while len(results) < REPEAT and results[0]["seconds"] < 15:
        results.append(run())
    times = sorted(r["seconds"] for r in results)
    out = dict(results[0])
    out.update(seconds=times[len(times) // 2], peak_rss=max(r["peak_rss"] for r in results),
               baseline_rss=min(r["baseline_rss"] for r in results), runs=len(results))
    return out


def ours_stream(ckpt: Path, method: str) -> dict:
    return run_child(prelude(method) + MODEL_BYTES + f"""
from quantization_wrapper import QuantizationConfig
from quantization_wrapper.loading import load_and_quantize
config = QuantizationConfig(**{OURS[method]})
start = time.perf_counter()
model = load_and_quantize({str(ckpt)!r}, config, dtype=torch.bfloat16, progress=False)
seconds = time.perf_counter() - start
report(seconds=seconds, peak_rss=peak(), baseline_rss=baseline, size_gb=model_bytes(model))
""")


def ours_full_then_quantize(ckpt: Path, method: str) -> dict:
    return run_child(prelude(method) + MODEL_BYTES + f"""
from quantization_wrapper import QuantizationConfig, create_quantization_adapter
config = QuantizationConfig(**{OURS[method]})
start = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, dtype=torch.bfloat16)
create_quantization_adapter('cpu', config).quantize_model(model)
seconds = time.perf_counter() - start
report(seconds=seconds, peak_rss=peak(), baseline_rss=baseline, size_gb=model_bytes(model))
""")


def peer_transformers(ckpt: Path, method: str) -> dict:
    return run_child(prelude(method) + f"""
qc = {PEER[method]}
start = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, dtype=torch.bfloat16, quantization_config=qc, device_map='cpu')
seconds = time.perf_counter() - start
report(seconds=seconds, peak_rss=peak(), baseline_rss=baseline, size_gb=model.get_memory_footprint() / 2**30)
""")


def save_then_load(ckpt: Path, method: str, out: Path) -> dict:
    run_child(prelude(method) + f"""
from quantization_wrapper import QuantizationConfig, save_quantized_model
from quantization_wrapper.loading import load_and_quantize
model = load_and_quantize({str(ckpt)!r}, QuantizationConfig(**{OURS[method]}), dtype=torch.bfloat16, progress=False)
save_quantized_model(model, {str(out)!r})
report(ok=True)
""")
    return median_of_runs(lambda: run_child(prelude(method) + MODEL_BYTES + f"""
from quantization_wrapper import load_quantized_model
start = time.perf_counter()
model = load_quantized_model({str(out)!r})
seconds = time.perf_counter() - start
report(seconds=seconds, peak_rss=peak(), baseline_rss=baseline, size_gb=model_bytes(model))
"""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(OURS), help="comma-separated methods")
    parser.add_argument("--small", action="store_true",
                        help="a 4-layer 1024-wide Llama (for HQQ, whose optimizer takes minutes per GB on 2 cores)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per measurement under 15 s; the table shows the median time (default 3)")
    args = parser.parse_args()
    global REPEAT
    REPEAT = max(1, args.repeat)
    methods = [m for m in args.methods.split(",") if m]
    ckpt = generated_llama("llama-small", num_hidden_layers=4, hidden_size=1024, intermediate_size=2816,
                           num_attention_heads=16, num_key_value_heads=4) if args.small else generated_llama()
    rows, load_rows = [], []
    for method in methods:
        ours = median_of_runs(lambda: ours_stream(ckpt, method))
        if method in PEER:
            peer, peer_name = median_of_runs(lambda: peer_transformers(ckpt, method)), "transformers from_pretrained"
        else:
            peer = median_of_runs(lambda: ours_full_then_quantize(ckpt, method))
            peer_name = "full bf16 load + quantize_model"
        budget = ours["baseline_rss"] + ours["size_gb"] + 0.5
        rows.append((method, peer_name, ours, peer, budget))
        print(f"{method}: ours {ours['seconds']:.1f}s {ours['peak_rss']:.2f}GB (budget {budget:.2f}) | "
              f"{peer_name} {peer['seconds']:.1f}s {peer['peak_rss']:.2f}GB", flush=True)
        out = CACHE / f"saved-{method}"
        shutil.rmtree(out, ignore_errors=True)
        loaded = save_then_load(ckpt, method, out)
        load_rows.append((method, loaded, ours))
        print(f"  reload: {loaded['seconds']:.2f}s {loaded['peak_rss']:.2f}GB vs requantize {ours['seconds']:.1f}s",
              flush=True)
        shutil.rmtree(out, ignore_errors=True)

    lines = [
        "## Checkpoint to quantized model (issue: one-step low-memory loading)"
        + (" -- small model" if args.small else ""),
        "",
        machine_line(f"Each measurement in a fresh process, the median time of {REPEAT} runs (one run when it "
                     f"takes over 15 s) and the highest peak RSS"),
        f"Model: generated Llama, {json.dumps({k: v for k, v in json.loads((ckpt / 'config.json').read_text()).items() if k in ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'vocab_size')})}, "
        "bf16 safetensors shards of 500 MB. `ours` = `load_and_quantize` (streaming); the peer is the same "
        "method through transformers, or, where transformers cannot quantize on the fly on CPU, our own full "
        "bf16 load followed by `quantize_model`. Budget = process baseline + quantized size + 0.5 GB.",
        "",
        "| method | peer | ours time (s) | peer time (s) | time ratio ours/peer | ours peak RSS (GB) | peer peak RSS (GB) | RSS ratio | budget (GB) | within budget | quantized size ours / peer (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, peer_name, ours, peer, budget in rows:
        lines.append(
            f"| {method} | {peer_name} | {ours['seconds']:.1f} | {peer['seconds']:.1f} | "
            f"{ours['seconds'] / peer['seconds']:.2f} | {ours['peak_rss']:.2f} | {peer['peak_rss']:.2f} | "
            f"{ours['peak_rss'] / peer['peak_rss']:.2f} | {budget:.2f} | {'yes' if ours['peak_rss'] <= budget else 'NO'} | "
            f"{ours['size_gb']:.2f} / {peer['size_gb']:.2f} |")
    lines += [
        "",
        NOTE,
        "",
        "## Loading a saved quantized checkpoint vs quantizing again (issue: save and load)"
        + (" -- small model" if args.small else ""),
        "",
        "Goal: loading at least 5x faster than re-quantizing, peak RSS at most 1.3x the quantized size plus "
        "the process baseline. `load_quantized_model` with its defaults: the files are memory-mapped (their "
        "pages come in from the OS cache when first used, so the peak RSS after loading is below the model's "
        "size), every 64 MiB block's CRC-32 is checked before the model is returned, and quanto's CPU int4 "
        "layers are regrouped for torch's int4 kernel. Re-quantize = the `ours` time above.",
        "",
        "| method | load (s) | re-quantize (s) | speed-up | load peak RSS (GB) | baseline + 1.3 x size (GB) | within |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, loaded, ours in load_rows:
        limit = loaded["baseline_rss"] + 1.3 * loaded["size_gb"]
        lines.append(f"| {method} | {loaded['seconds']:.2f} | {ours['seconds']:.1f} | "
                     f"{ours['seconds'] / loaded['seconds']:.1f}x | {loaded['peak_rss']:.2f} | {limit:.2f} | "
                     f"{'yes' if loaded['peak_rss'] <= limit else 'NO'} |")
    text = "\n".join(lines)
    print(text)
    write_section("load_quantize_small" if args.small else "load_quantize", text)


if __name__ == "__main__":
    main()
