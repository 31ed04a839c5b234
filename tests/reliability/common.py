"""Small quantized models and checkpoints for the reliability tests (fast: HQQ on a 2-layer Llama)."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import quantization_wrapper as qw

CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=128)
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def quantized_model(seed: int = 0, method: str = "hqq", **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CFG)).eval()
    settings = dict(bits=4, group_size=32) if method == "hqq" else {}
    config = qw.QuantizationConfig(method=method, **{**settings, **kwargs})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qw.create_quantization_adapter("cpu", config).quantize_model(model)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def tree(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``directory`` (the state a user would check)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            p = Path(root) / name
            out[str(p.relative_to(directory))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(parent: Path) -> list[str]:
    """Staging or renamed-aside entries a save left in ``parent``."""
    return sorted(n for n in os.listdir(parent) if ".qw-" in n or n.endswith(".tmp") or ".old-" in n)
