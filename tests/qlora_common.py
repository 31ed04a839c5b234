"""Shared by the QLoRA/FSDP tests and their torchrun worker: a small Llama built from a config
(no download), the LoRA targets and deterministic token batches."""

from __future__ import annotations

import torch

from quantization_wrapper import QuantizationConfig

#: Every projection of a Llama decoder layer (lm_head stays out, as with "all-linear").
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 128
BATCH = 4  # sequences per rank
SEQ = 16


def build_model(dtype: torch.dtype = torch.float32, seed: int = 0):
    """``LlamaForCausalLM`` with hidden 64, 2 layers, 4 heads (2 KV heads), vocabulary 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype)


def rank_batches(world: int = 2) -> list[torch.Tensor]:
    """One ``(BATCH, SEQ)`` batch of token ids per rank; their concatenation is the global batch.
    The tokens repeat a short pattern, so a few LoRA steps lower the loss clearly."""
    g = torch.Generator().manual_seed(1234)
    pattern = torch.randint(0, VOCAB, (BATCH * world, 4), generator=g)
    return list(pattern.repeat(1, SEQ // 4).chunk(world))


def case_config(case: str) -> tuple[QuantizationConfig, int]:
    """``"method:fsdp_version[:storage_dtype]"`` -> (config, version)."""
    method, version, *storage = case.split(":")
    kwargs = {"storage_dtype": storage[0]} if storage else {}
    return QuantizationConfig(method=method, **kwargs), int(version)


#: LoRA targets of the MoE cases: every linear layer, each expert's projections included.
MOE_TARGETS = "all-linear"


def build_moe_model(dtype: torch.dtype = torch.float32, seed: int = 0):
    """``MixtralForCausalLM`` with hidden 64, 2 layers, 4 experts (2 per token), 4 heads (2 KV heads),
    vocabulary 128: quantize_model turns its fused experts into per-expert layers
    (``mlp.experts.<e>.gate_up_proj`` / ``down_proj``)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=VOCAB,
                           max_position_embeddings=64)
    return MixtralForCausalLM(config).to(dtype)


def build_bf16_model(seed: int = 0):
    """A bfloat16 ``LlamaForCausalLM`` with hidden 256 (intermediate 512, 2 layers, 4 heads, 2 KV heads,
    vocabulary 128): its projections have groups of 128, so quanto int4 holds them in torch's CPU int4
    kernel layout (``TinyGemmWeightQBitsTensor``), as in QLoRA on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(torch.bfloat16)


def split_case(case: str) -> tuple[str, str]:
    """``"[family/]method:fsdp_version[:storage_dtype]"`` -> (model family: ``llama`` (default),
    ``llama_bf16`` or ``mixtral``, the rest)."""
    family, _, rest = case.rpartition("/")
    return family or "llama", rest


def case_model(case: str):
    """``(model builder, LoRA target_modules)`` of a case (see :func:`split_case`)."""
    family, _ = split_case(case)
    if family == "mixtral":
        return build_moe_model, MOE_TARGETS
    if family == "llama_bf16":
        return build_bf16_model, TARGETS
    if family == "llama":
        return build_model, TARGETS
    raise ValueError(f"unknown model family {family!r} in case {case!r}")
