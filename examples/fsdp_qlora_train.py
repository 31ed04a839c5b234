#!/usr/bin/env python
"""QLoRA fine-tuning of a quantized causal LM, sharded with FSDP when launched by torchrun.

    torchrun --nproc_per_node=2 examples/fsdp_qlora_train.py --method hqq --steps 20 --output-dir out/
    python examples/fsdp_qlora_train.py --steps 5 --output-dir out/          # one process, no FSDP

What it does, the same on an NVIDIA GPU, an Apple laptop or a plain CPU:

1. detects the backend (``backend_manager.BackendManager``; ``cuda`` > ``mlx`` > ``mps`` > ``cpu``);
2. loads a local model (``--model DIR``) or builds a small Llama from a config (no download);
3. picks a quantization config for the model size and the free memory
   (``get_recommended_config``; ``--method`` overrides the method); under FSDP the packed weights
   get a float ``storage_dtype`` so they shard (see ``docs/fsdp.md``);
4. quantizes, prepares for training (frozen base, gradient checkpointing) and adds LoRA on every
   linear layer (``target_modules="all-linear"``);
5. with ``WORLD_SIZE > 1``: initializes ``torch.distributed`` (``nccl`` on CUDA, ``gloo``
   elsewhere) and shards one FSDP unit per decoder layer (``--fsdp-version 2``: ``fully_shard``;
   ``1``: ``FullyShardedDataParallel``);
6. trains a few steps on a small built-in text (byte-level tokens unless the model brings a
   tokenizer), each rank on its own windows;
7. writes ``<output-dir>/base`` (the quantized base, ``load_quantized_model`` reloads it),
   ``<output-dir>/adapter`` (the LoRA adapter, ``PeftModel.from_pretrained`` or
   ``quantization_wrapper.load_lora_adapter`` reloads it) and ``<output-dir>/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from backend_manager import Backend, BackendManager
from quantization_wrapper import (
    FSDP_SUPPORT,
    QuantizationMethod,
    apply_fsdp,
    create_quantization_adapter,
    fsdp_quantized_bytes,
    get_recommended_config,
    save_lora_adapter,
    save_quantized_model,
)

logger = logging.getLogger("fsdp_qlora_train")

TEXT = (
    "Quantization stores the weights of a neural network in fewer bits than they were trained in. "
    "A four-bit weight takes an eighth of the memory of a thirty-two-bit one, so a model that did "
    "not fit on one device fits, and a model that fitted leaves room for longer sequences. The "
    "price is a small error in every weight. Low-rank adapters train a few million new parameters "
    "next to the frozen quantized ones and recover most of what quantization lost. Sharding the "
    "quantized base over several processes divides its memory once more: each process keeps its "
    "own slice of the packed weights and gathers a layer only while it computes with it. "
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local transformers causal-LM directory (default: a small Llama "
                                        "built from a config)")
    parser.add_argument("--method", choices=[m.value for m in QuantizationMethod],
                        help="quantization method (default: get_recommended_config's choice)")
    parser.add_argument("--backend", choices=[b.value for b in Backend], help="force a backend")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the model and of the quantized layers' compute")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per process and step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--fsdp-version", type=int, choices=[1, 2], default=2)
    parser.add_argument("--output-dir", default="qlora-out")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build_model(args: argparse.Namespace, dtype: torch.dtype):
    """The model to fine-tune and a function turning text into token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            return model, lambda text: torch.tensor(tokenizer(text)["input_ids"])
        except (OSError, ValueError):
            logger.warning("%s has no tokenizer; using byte-level tokens", args.model)
    else:
        torch.manual_seed(args.seed)
        config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256, max_position_embeddings=max(args.seq_len, 128))
        model = LlamaForCausalLM(config).to(dtype)
    vocab = model.config.vocab_size
    return model, lambda text: torch.tensor(list(text.encode("utf-8"))) % vocab


def batches(tokens: torch.Tensor, args: argparse.Namespace, rank: int):
    """Windows of ``seq_len`` tokens, different on each rank and step, the same on every run."""
    g = torch.Generator().manual_seed(args.seed * 1000 + rank)
    while True:
        starts = torch.randint(0, len(tokens) - args.seq_len, (args.batch_size,), generator=g)
        yield torch.stack([tokens[s:s + args.seq_len] for s in starts.tolist()])


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    bm = BackendManager(args.backend)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = bm.device
    if bm.backend is Backend.CUDA:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(bm.get_distributed_backend() or "gloo")
    main_process = rank == 0
    out = Path(args.output_dir)
    dtype = getattr(torch, args.dtype)
    try:
        model, tokenize = build_model(args, dtype)
        model.to(device)
        size_b = sum(p.numel() for p in model.parameters()) / 1e9
        config = get_recommended_config(bm.backend, model_size_b=size_b,
                                        available_memory_gb=bm.get_memory_info()["available_gb"],
                                        compute_dtype=dtype)
        if args.method:
            config = config.replace(method=args.method, bits=None, group_size=None, quant_type=None,
                                    double_quant=None)
        if world_size > 1 and FSDP_SUPPORT[config.method].shards and config.method is not QuantizationMethod.NONE:
            # Packed bytes viewed as a float dtype shard with the rest: FSDP2 takes the model's dtype;
            # FSDP1 needs the dtype of every other parameter, float32 once training is prepared.
            config = config.replace(storage_dtype=dtype if args.fsdp_version == 2 else torch.float32)
        if main_process:
            logger.info("backend %s (%s), %d process(es); %.4fB parameters -> %s", bm.backend.value, device,
                        world_size, size_b, config)
        adapter = create_quantization_adapter(bm.backend, config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the no-quantization fallback says so
            model = adapter.quantize_model(model)
        if main_process:
            logger.info("quantized:\n%s", model.quantization_plan.table(max_rows=8))
            save_quantized_model(model, out / "base")
        model = adapter.prepare_model_for_training(model)

        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                      target_modules="all-linear"))
        if main_process:
            peft_model.print_trainable_parameters()
        trained = peft_model
        if world_size > 1:
            trained = apply_fsdp(peft_model, version=args.fsdp_version)
        held = fsdp_quantized_bytes(trained)
        optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=args.lr)

        tokens = tokenize(TEXT * 4)
        data = batches(tokens, args, rank)
        losses, start = [], time.perf_counter()
        trained.train()
        for step in range(args.steps):
            ids = next(data).to(device)
            loss = trained(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mean = loss.detach().clone()
            if world_size > 1:
                dist.all_reduce(mean)
                mean /= world_size
            losses.append(mean.item())
            if main_process:
                logger.info("step %d/%d  loss %.4f", step + 1, args.steps, losses[-1])
        seconds = time.perf_counter() - start

        save_lora_adapter(trained, out / "adapter", peft_model=peft_model, overwrite=True)  # a re-run replaces it
        if main_process:
            metrics = {"backend": bm.backend.value, "method": config.method.value, "world_size": world_size,
                       "fsdp": f"fsdp{args.fsdp_version}" if world_size > 1 else None, "losses": losses,
                       "train_seconds": seconds, "quantized_bytes": held}
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
            logger.info("loss %.4f -> %.4f; quantized layers: %d of %d bytes on this rank; saved to %s",
                        losses[0], losses[-1], held["per_rank"], held["total"], out)
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
