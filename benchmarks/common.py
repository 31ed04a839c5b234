"""Shared helpers of the benchmark scripts: a generated Llama checkpoint, child processes that
report wall time and peak RSS, and writing a section of docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
DOC = ROOT / "docs" / "benchmarks.md"

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)


def generated_llama(name: str = "llama-1.1b", shard: str = "500MB", **overrides) -> Path:
    """A Llama checkpoint with random weights (bf16 safetensors shards), built once and cached."""
    return generated_checkpoint(name, "Llama", {**LLAMA_1B, **overrides}, shard)


def generated_checkpoint(name: str, family: str, fields: dict, shard: str = "500MB", init_bf16: bool = False) -> Path:
    """A ``<family>ForCausalLM`` checkpoint with random weights (bf16 safetensors shards as
    ``save_pretrained`` writes them), built once in a child process and cached under ``name``.
    ``init_bf16``: initialize in bfloat16 (half the memory) instead of float32 then cast."""
    out = CACHE / name
    if (out / "config.json").exists():
        return out
    if not os.environ.get("QW_BENCH_GENERATING"):
        # Generate in a child: Linux carries a process' peak RSS (ru_maxrss) over to the children it
        # starts, so building 1.1B parameters here would inflate every measurement that follows.
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import common; "
                f"common.generated_checkpoint({name!r}, {family!r}, {fields!r}, {shard!r}, {init_bf16!r})")
        subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, QW_BENCH_GENERATING="1"))
        return out
    import torch
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**fields, dtype="bfloat16")
    cls = getattr(transformers, f"{family}ForCausalLM")
    if init_bf16:
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = cls(config)
        finally:
            torch.set_default_dtype(torch.float32)
    else:
        with torch.device("cpu"):
            model = cls(config).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size=shard)
    tmp.rename(out)
    del model
    return out


def run_child(code: str, timeout: int = 1800) -> dict:
    """Run ``code`` in a fresh Python; it must print one JSON line starting with RESULT=.

    The child measures itself: ``baseline_rss`` after its imports, ``peak_rss`` from
    ``resource.getrusage`` (the kernel's high-water mark), ``seconds`` of the timed section.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1",
               PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT="):
            return json.loads(line[len("RESULT="):])
    raise RuntimeError(f"benchmark child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


CHILD_PRELUDE = """
import json, resource, time, os, warnings, logging
warnings.simplefilter("ignore"); logging.disable(logging.WARNING)
import psutil, torch, transformers, quantization_wrapper
torch.manual_seed(0)
def rss(): return psutil.Process().memory_info().rss / 2**30
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
def report(**kw): print("RESULT=" + json.dumps(kw), flush=True)
baseline = rss()
"""


def write_section(marker: str, text: str) -> None:
    """Replace the part of docs/benchmarks.md between ``<!-- marker:start -->`` and ``:end``."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    doc = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n\n"
    block = f"<!-- {marker}:start -->\n{text.rstrip()}\n<!-- {marker}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(marker)}:start -->.*?<!-- {re.escape(marker)}:end -->", re.S)
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(doc, encoding="utf-8")


def machine_line(runs: str = "One run per cell") -> str:
    import platform

    import psutil
    import torch

    return (f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
            f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"torch {torch.__version__}. {runs}; compare ratios, not absolute times.")
