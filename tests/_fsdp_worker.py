"""One rank of the FSDP test (tests/test_fsdp.py launches two with torchrun, gloo on CPU).

For each case ``[mixtral/]method:fsdp_version[:storage_dtype]`` it quantizes a small Llama (or a
small Mixtral, whose experts become per-expert quantized layers; identical on every rank), saves the quantized base (rank 0), adds LoRA, shards it with ``apply_fsdp``, trains a
few steps on this rank's half of the batch, and writes what the test asserts on to
``<out>/<case>/rank<r>.json``: losses, bytes held per rank, a hash of the gathered LoRA weights,
whether the quantized tensors are bit-identical after training; plus the gathered LoRA weights and
eval logits (rank 0) and the saved adapter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from qlora_common import BATCH, SEQ, case_config, case_model, rank_batches, split_case

warnings.filterwarnings("ignore")


def _quantized_tensors(model) -> dict[str, torch.Tensor]:
    """Every tensor of the quantized layers, full (gathered when sharded), as plain CPU copies."""
    from torch.distributed.tensor import DTensor

    from quantization_wrapper.fsdp import _layer_methods

    out = {}
    for name, _, module in _layer_methods(model).values():
        for key, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            t = p.full_tensor() if isinstance(p, DTensor) else p
            out[f"{name}.{key}"] = t.detach().to("cpu", copy=True).as_subclass(torch.Tensor)
        state = getattr(module, "quant_state", None) or getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            out[f"{name}.absmax"] = state.absmax.detach().clone()
        scb = getattr(getattr(module, "state", None), "SCB", None)  # bitsandbytes INT8 row scales
        if isinstance(scb, torch.Tensor):
            out[f"{name}.SCB"] = scb.detach().clone()
        meta = getattr(module, "meta", None)
        if isinstance(meta, dict):
            for key in ("scale", "zero"):
                if isinstance(meta.get(key), torch.Tensor):
                    out[f"{name}.{key}"] = meta[key].detach().clone()
    return out


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (packed bytes viewed as float may hold NaN patterns, which ``torch.equal`` rejects)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def run_case(case: str, out: Path, steps: int) -> None:
    from peft import LoraConfig, get_peft_model

    from quantization_wrapper import create_quantization_adapter, save_quantized_model
    from quantization_wrapper.fsdp import apply_fsdp, fsdp_quantized_bytes, full_lora_state_dict, save_lora_adapter

    rank = dist.get_rank()
    config, version = case_config(split_case(case)[1])
    build, targets = case_model(case)
    folder = out / case.replace(":", "_").replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    adapter = create_quantization_adapter("cpu", config)
    model = adapter.quantize_model(build())
    if rank == 0:
        save_quantized_model(model, folder / "base")
    model = adapter.prepare_model_for_training(model)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    before = _quantized_tensors(peft_model)
    unsharded = sum(t.numel() * t.element_size() for t in before.values())

    wrapped = apply_fsdp(peft_model, version=version)
    held = fsdp_quantized_bytes(wrapped if version == 1 else peft_model)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = rank_batches()[rank]
    losses = []
    wrapped.train()
    for _ in range(steps):
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())

    lora = full_lora_state_dict(wrapped)
    digest = hashlib.sha256()
    for key in sorted(lora):
        digest.update(key.encode())
        digest.update(lora[key].numpy().tobytes())
    wrapped.eval()
    probe = torch.arange(2 * SEQ).remainder(97).reshape(2, SEQ)
    with torch.no_grad():
        logits = wrapped(input_ids=probe).logits
    if version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
            after = _quantized_tensors(peft_model)
    else:
        after = _quantized_tensors(peft_model)
    identical = sorted(before) == sorted(after) and all(_same_bytes(before[k], after[k]) for k in before)
    save_lora_adapter(wrapped, folder / "adapter", peft_model=peft_model)
    if rank == 0:
        torch.save({"lora": lora, "logits": logits, "probe": probe}, folder / "result.pt")
    (folder / f"rank{rank}.json").write_text(json.dumps({
        "losses": losses, "bytes": held, "unsharded_quantized_bytes": unsharded,
        "lora_sha256": digest.hexdigest(), "quantized_identical": identical,
        "batch": [BATCH, SEQ],
    }))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", required=True,
                        help="comma-separated [mixtral/]method:fsdp_version[:storage_dtype]")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for case in args.cases.split(","):
            run_case(case, Path(args.out), args.steps)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
