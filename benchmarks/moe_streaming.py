"""MoE checkpoint -> quantized model: our streaming `load_and_quantize` vs transformers'
`from_pretrained` followed by `quantize_model`, on a generated ~1.1B Mixtral whose experts are
stored per expert (as `save_pretrained` writes them).

`load_and_quantize` unfuses the skeleton's experts, assembles each expert's gate/up and down
matrices from the checkpoint's per-expert tensors and quantizes it at once; `from_pretrained` fuses
every block's experts into [experts, 2 x intermediate, hidden] tensors first, and `quantize_model`
then quantizes views of them. Both give the same bytes (the `same bytes` column compares a sha256
of every layer's state, as a save writes it).

Each measurement runs in a fresh process that reports its wall time and peak RSS (the kernel's
high-water mark). Writes the table to docs/benchmarks.md (section `moe_streaming`).

    python benchmarks/moe_streaming.py [--methods hqq,bnb_nf4,mlx_int4,quanto_int4]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CHILD_PRELUDE, generated_checkpoint, machine_line, run_child, write_section  # noqa: E402

#: ~1.09B parameters: 22 layers of 8 experts (44M expert weights per layer), 32K vocabulary.
MIXTRAL_1B = dict(hidden_size=1024, intermediate_size=1792, num_hidden_layers=22, num_attention_heads=16,
                  num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                  max_position_embeddings=2048, tie_word_embeddings=False)

OURS = {
    "hqq": "dict(method='hqq', bits=4, group_size=64)",
    "bnb_nf4": "dict(method='bnb_nf4', double_quant=True, compute_dtype='bfloat16')",
    "mlx_int4": "dict(method='mlx_int4', bits=4, group_size=64)",
    "quanto_int4": "dict(method='quanto_int4')",
}
LIBRARY = {"bnb_nf4": "bitsandbytes", "quanto_int4": "optimum.quanto", "hqq": "hqq.core.quantize",
           "mlx_int4": "mlx.core"}


def generated_mixtral(name: str = "mixtral-1.1b", shard: str = "500MB") -> Path:
    """A Mixtral checkpoint with random weights (bf16 safetensors shards, experts stored per
    expert as save_pretrained writes them), built once in a child process and cached."""
    return generated_checkpoint(name, "Mixtral", MIXTRAL_1B, shard, init_bf16=True)


def warm(ckpt: Path) -> None:
    """Read the checkpoint's files once (into the OS page cache, not into this process), so that no
    measurement pays for the disk reads that the one before it saved the next."""
    for f in sorted(ckpt.iterdir()):
        with open(f, "rb") as handle:
            while handle.read(64 * 2**20):
                pass


def prelude(method: str) -> str:
    return CHILD_PRELUDE.replace(
        "baseline = rss()",
        f"import {LIBRARY[method]}\nimport transformers.models.mixtral.modeling_mixtral\nbaseline = rss()")


MEASURE = """
def model_bytes(model):
    from quantization_wrapper.tensors import tensor_nbytes
    plan = model.quantization_plan
    inside = {l.name for l in plan.converted}
    rest = [t for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if not any(".".join(n.split(".")[:i]) in inside for i in range(1, n.count(".") + 1))]
    return (plan.bytes_after + tensor_nbytes(rest)) / 2**30

def digest(model):
    # sha256 of every converted layer's state (the adapter's layer_state_dict, what a save writes)
    # and of every other tensor, by name
    import hashlib
    from quantization_wrapper import create_quantization_adapter
    plan = model.quantization_plan
    adapter = create_quantization_adapter("cpu", model.quantization_config)
    inside = {l.name for l in plan.converted}
    items = {}
    for l in plan.converted:
        for k, v in adapter.for_method(l.method).layer_state_dict(model.get_submodule(l.name)).items():
            items[l.name + "." + k] = v
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not any(".".join(n.split(".")[:i]) in inside for i in range(1, n.count(".") + 1)):
            items[n] = t
    h = hashlib.sha256()
    for name in sorted(items):
        t = items[name].detach().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(items[name].shape)}".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()

def experts_quantized(model):
    return sum(1 for l in model.quantization_plan.quantized if ".experts." in l.name)
"""


def ours(ckpt: Path, method: str, workers: int | None = None) -> dict:
    warm(ckpt)
    return run_child(prelude(method) + MEASURE + f"""
from quantization_wrapper import QuantizationConfig
from quantization_wrapper.loading import load_and_quantize
config = QuantizationConfig(**{OURS[method]})
import resource
def cpu(): u = resource.getrusage(resource.RUSAGE_SELF); return u.ru_utime + u.ru_stime
load_start, cpu_start, start = os.getloadavg()[0], cpu(), time.perf_counter()
model = load_and_quantize({str(ckpt)!r}, config, dtype=torch.bfloat16, progress=False, workers={workers!r})
seconds, cpu_seconds, load = time.perf_counter() - start, cpu() - cpu_start, max(load_start, os.getloadavg()[0])
peak_rss = peak()
report(seconds=seconds, cpu_seconds=cpu_seconds, load=load, peak_rss=peak_rss, baseline_rss=baseline,
       size_gb=model_bytes(model), digest=digest(model), experts=experts_quantized(model))
""")


def peer(ckpt: Path, method: str) -> dict:
    warm(ckpt)
    return run_child(prelude(method) + MEASURE + f"""
from quantization_wrapper import QuantizationConfig, create_quantization_adapter
config = QuantizationConfig(**{OURS[method]})
import resource
def cpu(): u = resource.getrusage(resource.RUSAGE_SELF); return u.ru_utime + u.ru_stime
load_start, cpu_start, start = os.getloadavg()[0], cpu(), time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, dtype=torch.bfloat16)
create_quantization_adapter('cpu', config).quantize_model(model)
seconds, cpu_seconds, load = time.perf_counter() - start, cpu() - cpu_start, max(load_start, os.getloadavg()[0])
peak_rss = peak()
report(seconds=seconds, cpu_seconds=cpu_seconds, load=load, peak_rss=peak_rss, baseline_rss=baseline,
       size_gb=model_bytes(model), digest=digest(model), experts=experts_quantized(model))
""")


NOTE = ("`load_and_quantize` quantizes two layers side by side on one core each where their temporaries fit, "
        "`quantize_model` one layer on every core. bitsandbytes' double quantization subtracts the mean of a layer's "
        "absmax (`absmax.mean()`, as bitsandbytes computes it), a torch reduction whose rounding depends on the "
        "number of threads summing, here for the gate/up experts' 57,344 blocks: the same layer quantized on one "
        "thread and on two can differ in that offset's last bit. Streamed with one worker (`workers=1`, every core, "
        "as `quantize_model` runs) the bytes are equal; the tests compare at equal thread counts.")


def measured_pair(ckpt: Path, method: str, repeat: int) -> tuple[dict, dict]:
    """Ours and the peer, alternately, ``repeat`` times while a run takes under 60 s (once for HQQ,
    whose runs take minutes): the median wall and CPU times, the highest peak RSS and load."""
    runs: tuple[list[dict], list[dict]] = ([], [])
    while not runs[0] or (len(runs[0]) < repeat and max(r["seconds"] for r in runs[0] + runs[1]) < 60):
        runs[0].append(ours(ckpt, method))
        runs[1].append(peer(ckpt, method))

    def combine(results: list[dict]) -> dict:
        out = dict(results[0])
        for key in ("seconds", "cpu_seconds"):
            values = sorted(r[key] for r in results)
            out[key] = values[len(values) // 2]
        out.update(peak_rss=max(r["peak_rss"] for r in results), load=max(r["load"] for r in results),
                   baseline_rss=min(r["baseline_rss"] for r in results), runs=len(results))
        assert len({r["digest"] for r in results}) == 1, f"{method}: the runs gave different bytes"
        return out

    return combine(runs[0]), combine(runs[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(OURS), help="comma-separated methods")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each side, alternating, for methods whose runs take under 60 s (default 3)")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    ckpt = generated_mixtral()
    config = json.loads((ckpt / "config.json").read_text())
    rows = []
    for method in methods:
        a, b = measured_pair(ckpt, method, max(1, args.repeat))
        budget = a["baseline_rss"] + a["size_gb"] + 0.5
        same = "yes" if a["digest"] == b["digest"] else None
        if same is None:  # reductions (bnb's mean of the absmax) round by the thread count: compare at equal counts
            same = "yes, at 1 worker (see note)" if ours(ckpt, method, workers=1)["digest"] == b["digest"] else "NO"
        rows.append((method, a, b, budget, same))
        print(f"{method}: ours {a['seconds']:.1f}s {a['peak_rss']:.2f}GB (budget {budget:.2f}) | from_pretrained + "
              f"quantize_model {b['seconds']:.1f}s {b['peak_rss']:.2f}GB | same bytes {same} | "
              f"{a['experts']} expert layers quantized", flush=True)
    from quantization_wrapper.checkpoint.safetensors_io import CheckpointFiles

    with CheckpointFiles(ckpt) as files:
        params = sum(math.prod(shape) for shape in files.shapes().values())
    shown = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts",
                                    "num_experts_per_tok", "vocab_size")}
    lines = [
        "## MoE checkpoint to quantized model: experts quantized while streaming",
        "",
        machine_line(f"Each measurement in a fresh process; ours and the peer alternately, {args.repeat} runs each "
                     f"(one for runs over 60 s: HQQ), the median time and the highest peak RSS"),
        f"Model: generated Mixtral, {params / 1e9:.2f}B parameters, {json.dumps(shown)}, bf16 safetensors shards of "
        "500 MB with the experts stored per expert (`block_sparse_moe.experts.N.w1/w2/w3.weight`, as `save_pretrained` "
        "writes them), loaded with `dtype=torch.bfloat16`. `ours` = `load_and_quantize`: the skeleton's experts are "
        "unfused on the meta device, each expert's gate/up matrix is assembled from its two checkpoint tensors by "
        "transformers' own conversion (run on that expert alone) and quantized at once; no fused [experts, 2 x "
        "intermediate, hidden] tensor is built. The peer is `from_pretrained` (which fuses every block's experts) "
        "followed by `quantize_model` (which quantizes views of the fused tensors, expert by expert). Budget = "
        "process baseline + quantized size + 0.5 GB. Same bytes: a sha256 of every layer's state (the adapter's "
        "`layer_state_dict`, what a save writes) and of every other tensor is equal on both sides. The machine is "
        "shared: wall times depend on what else runs (the load average, the higher of the 1-minute values at the "
        "start and the end of each measurement, is shown); CPU time (user + system, every thread of the process) "
        "depends less on it. Before each measurement the checkpoint's files are read once, so both sides find "
        "them in the OS page cache.",
        "",
        "| method | expert layers quantized | ours time (s) | peer time (s) | time ratio ours/peer "
        "| ours CPU time (s) | peer CPU time (s) | CPU time ratio | load average ours / peer "
        "| ours peak RSS (GB) | peer peak RSS (GB) | RSS ratio | budget (GB) | within budget | quantized size (GB) "
        "| same bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, a, b, budget, same in rows:
        lines.append(
            f"| {method} | {a['experts']} | {a['seconds']:.1f} | {b['seconds']:.1f} | "
            f"{a['seconds'] / b['seconds']:.2f} | {a['cpu_seconds']:.1f} | {b['cpu_seconds']:.1f} | "
            f"{a['cpu_seconds'] / b['cpu_seconds']:.2f} | {a['load']:.1f} / {b['load']:.1f} | "
            f"{a['peak_rss']:.2f} | {b['peak_rss']:.2f} | {a['peak_rss'] / b['peak_rss']:.2f} | {budget:.2f} | "
            f"{'yes' if a['peak_rss'] <= budget else 'NO'} | {a['size_gb']:.2f} | "
            f"{same} |")
    if any(same.startswith("yes, at") for *_, same in rows):
        lines += ["", NOTE]
    text = "\n".join(lines)
    print(text)
    write_section("moe_streaming", text)


if __name__ == "__main__":
    main()
