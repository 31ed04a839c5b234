"""What each rank holds under FSDP2, for every registered method: 2 ranks (torchrun, gloo, CPU).

Model: a Llama built from its config (hidden 256, intermediate 768, 2 decoder layers, 4 heads, 2 KV
heads, vocabulary 1024, bfloat16, as QLoRA runs), every projection quantized with the method's defaults (MLX with
``storage_dtype="uint8"``, which FSDP2 needs; see docs/fsdp.md), then ``apply_fsdp`` (one FSDP unit
per decoder layer and one for the rest). Each rank measures ``fsdp_quantized_bytes`` (the quantized
layers: its shards of their parameters, plus what stays whole on every rank: scales kept as
buffers or library-side state) and the whole model (every parameter's local shard, every buffer,
plus the quantized layers' library-side state).

Writes the table to docs/fsdp.md (section ``fsdp_bytes``).

    .venv/bin/python benchmarks/fsdp_bytes.py [--methods quanto_int4,bnb_int8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "fsdp.md"
MARKER = "fsdp_bytes"
STORAGE = {"mlx_int4": "uint8", "mlx_int8": "uint8"}


def build_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(torch.bfloat16)


def model_bytes(model) -> int:
    """Bytes this rank holds of the whole model: local shards of parameters, buffers, and the
    quantized layers' tensors outside parameters and buffers (``replicated`` minus buffers)."""
    from torch.distributed.tensor import DTensor

    from quantization_wrapper.tensors import tensor_nbytes

    total = 0
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total + tensor_nbytes(list(model.buffers()))


def worker(methods: list[str], out: Path) -> None:
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from quantization_wrapper import QuantizationConfig, create_quantization_adapter
    from quantization_wrapper.fsdp import FSDP_SUPPORT, apply_fsdp, fsdp_quantized_bytes
    from quantization_wrapper.surgery import get_quantization_plan

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rows = {}
    for method in methods:
        try:
            kwargs = {"storage_dtype": STORAGE[method]} if method in STORAGE else {}
            config = QuantizationConfig(method=method, **kwargs)
            adapter = create_quantization_adapter("cpu", config, strict=True)
            model = adapter.quantize_model(build_model())
            plan = get_quantization_plan(model)
            library_side = sum(l.bytes_after for l in plan.converted) - sum(
                t.numel() * t.element_size() for l in plan.converted
                for t in list(model.get_submodule(l.name).parameters()) + list(model.get_submodule(l.name).buffers()))
            whole = model_bytes(model) + max(library_side, 0)
            apply_fsdp(model)
            held = fsdp_quantized_bytes(model)
            rows[method] = dict(held, model_rank=model_bytes(model) + max(library_side, 0), model_whole=whole,
                                storage=kwargs.get("storage_dtype"), fsdp2=FSDP_SUPPORT[config.method].fsdp2)
        except Exception as e:  # a method this machine cannot run: reported, not fatal
            rows[method] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
        dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def kib(n: int) -> str:
    return f"{n / 1024:,.1f}"


def table(ranks: list[dict], methods: list[str]) -> str:
    import torch

    lines = [f"Measured {time.strftime('%Y-%m-%d')} by `benchmarks/fsdp_bytes.py`: 2 ranks (torchrun, gloo, CPU), "
             f"torch {torch.__version__}, FSDP2 through `apply_fsdp`; a bfloat16 Llama (hidden 256, intermediate "
             f"768, 2 layers, vocabulary 1024) with its 14 projections quantized (MLX with storage_dtype uint8). "
             f"KiB. \"packed shard\": rank 0's shards of the quantized layers' parameters (`local_shards`, out of "
             f"`full_sharded`); \"whole on each rank\": the rest of those layers (scales kept as buffers, "
             f"bitsandbytes' QuantState, HQQ's meta; `replicated`); rank 1 holds the same amounts.",
             "",
             "| method | FSDP2 | packed shard on rank 0 / all packed | whole on each rank | quantized layers on rank 0 "
             "/ unsharded | share | whole model on rank 0 / unsharded |",
             "|---|---|---|---|---|---|---|"]
    for method in methods:
        r0, r1 = ranks[0][method], ranks[1][method]
        if "error" in r0:
            lines.append(f"| `{method}` | n/a ({r0['error']}) | | | | | |")
            continue
        assert r0["total"] == r1["total"] and r0["full_sharded"] == r1["full_sharded"]
        share = r0["per_rank"] / r0["total"] if r0["total"] else float("nan")
        lines.append(f"| `{method}` | {r0['fsdp2']} | {kib(r0['local_shards'])} / {kib(r0['full_sharded'])} | "
                     f"{kib(r0['replicated'])} | {kib(r0['per_rank'])} / {kib(r0['total'])} | {share:.0%} | "
                     f"{kib(r0['model_rank'])} / {kib(r0['model_whole'])} |")
    return "\n".join(lines)


def write_section(text: str) -> None:
    doc = DOC.read_text(encoding="utf-8")
    block = f"<!-- {MARKER}:start -->\n{text.rstrip()}\n<!-- {MARKER}:end -->"
    pattern = re.compile(rf"<!-- {MARKER}:start -->.*?<!-- {MARKER}:end -->", re.S)
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(doc, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.methods:
        methods = args.methods.split(",")
    else:
        sys.path.insert(0, str(ROOT))
        from quantization_wrapper.methods import METHOD_SPECS

        methods = [m.value for m in METHOD_SPECS]
    if args.worker:
        worker(methods, Path(args.worker))
        return
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--methods", ",".join(methods), "--worker", tmp]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            raise SystemExit(proc.stdout[-3000:] + proc.stderr[-5000:])
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]
    text = table(ranks, methods)
    write_section(text)
    print(text)


if __name__ == "__main__":
    main()
