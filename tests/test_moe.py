"""Mixture-of-experts models: fused 3-D expert weights (transformers 5's layout) are quantized per
expert by every method, addressed by name, counted by the plan, saved, reloaded and trained."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from quantization_wrapper import QuantizationConfig, create_quantization_adapter
from quantization_wrapper.experts import UnfusedExperts, fuse_experts, is_fused_experts, unfuse_experts

METHODS = ["bnb_nf4", "bnb_int8", "hqq", "mlx_int4", "quanto_int4", "quanto_int8"]
#: max relative error of one expert projection's output, by method (4-bit ~ 10%, 8-bit ~ 1%)
EXPERT_ERROR = {"bnb_nf4": 0.15, "bnb_int8": 0.03, "hqq": 0.15, "mlx_int4": 0.15, "quanto_int4": 0.15,
                "quanto_int8": 0.03}


def mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=128,
                           max_position_embeddings=64)
    return MixtralForCausalLM(config).eval()


def qwen3_moe(seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
                            num_experts_per_tok=2, vocab_size=128, max_position_embeddings=64)
    return Qwen3MoeForCausalLM(config).eval()


MODELS = {"mixtral": mixtral, "qwen3_moe": qwen3_moe}
TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def quantize(model, method, **fields):
    adapter = create_quantization_adapter("cpu", QuantizationConfig(method=method, **fields), strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter.quantize_model(model)
    return adapter


@pytest.mark.parametrize("family", sorted(MODELS))
def test_unfused_experts_compute_what_the_fused_module_computes(family):
    model = MODELS[family]()
    experts = model.model.layers[0].mlp.experts
    h = torch.randn(20, experts.hidden_dim)
    index = torch.randint(0, experts.num_experts, (20, 2))
    weights = torch.rand(20, 2)
    with torch.no_grad():
        reference = experts(h, index, weights)
        unfused = unfuse_experts(experts)
        out = unfused(h, index, weights)
        again = fuse_experts(unfused)(h, index, weights)
    assert isinstance(unfused, UnfusedExperts) and isinstance(unfused, type(experts))
    # same routing; transformers' default grouped_mm sums in another order than the eager loop
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(again, reference)
    # the expert layers view the fused weights: nothing was copied
    assert unfused._modules["3"].down_proj.weight.data_ptr() == experts.down_proj[3].data_ptr()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(MODELS))
def test_every_method_quantizes_every_expert(family, method):
    model = MODELS[family]()
    fused = model.model.layers[1].mlp.experts
    float_gate_up = fused.gate_up_proj[5].detach().clone()
    with torch.no_grad():
        reference = model(TOKENS).logits
    adapter = quantize(model, method)
    plan = model.quantization_plan
    experts = [layer for layer in plan.layers if ".experts." in layer.name]
    assert len(experts) == 2 * 2 * 8 and all(layer.status == "quantized" for layer in experts)
    assert plan.quantized_share > 0.95, plan.summary() if hasattr(plan, "summary") else plan
    assert plan["lm_head"].status == "skipped"
    router = model.model.layers[0].mlp.gate  # transformers 5's router holds a plain weight: stays in float
    assert router.weight.dtype == torch.float32 and not any(layer.name.endswith("mlp.gate") for layer in plan.layers)
    # one expert's projection, as the method quantizes a plain linear layer of the same weight
    layer = model.model.layers[1].mlp.experts._modules["5"].gate_up_proj
    x = torch.randn(7, float_gate_up.shape[1])
    with torch.no_grad():
        got = layer(x)
        want = x @ float_gate_up.t()
    assert (got.float() - want).norm() / want.norm() < EXPERT_ERROR[method]
    with torch.no_grad():
        logits = model(TOKENS).logits
    cos = nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)
    assert cos > (0.99 if method.endswith("int8") else 0.9)



def test_size_estimate_counts_the_experts():
    from quantization_wrapper import estimate_model_size

    model = mixtral()
    config = QuantizationConfig(method="hqq", bits=4, group_size=64)
    estimate = estimate_model_size(model, config)
    assert estimate.num_parameters == sum(p.numel() for p in model.parameters())
    experts = [layer for layer in estimate.plan.layers if ".experts." in layer.name]
    assert len(experts) == 32 and all(layer.status == "quantized" for layer in experts)
    quantize(model, "hqq", bits=4, group_size=64)
    actual = model.quantization_plan
    by_name = {layer.name: layer.bytes_after for layer in actual.layers}
    assert {layer.name: layer.bytes_after for layer in estimate.plan.layers} == by_name


def test_recommendation_counts_the_experts():
    from quantization_wrapper import get_recommended_config
    from quantization_wrapper.recommend import estimate_footprint_gb, recommendation_candidates

    model = mixtral().to("meta")
    size_b = sum(p.numel() for p in model.parameters()) / 1e9
    hqq4 = next(c for c in recommendation_candidates("cpu") if c.method.value == "hqq" and c.bits == 4)
    # memory for the whole model (experts included) at HQQ 4-bit, not at 16 bits: counting only the
    # attention (6% of the parameters) would have recommended no quantization
    memory = estimate_footprint_gb(hqq4, size_b) * 1.0001
    config = get_recommended_config("cpu", model=model, available_memory_gb=memory, check_libraries=False)
    assert (config.method.value, config.bits) == ("hqq", 4)


@pytest.mark.parametrize("skip, quantized_experts", [
    (["lm_head", "mlp.experts"], 0),                       # every expert of every block
    (["lm_head", "layers.0.mlp.experts"], 16),             # one block's experts
    (["lm_head", "layers.0.mlp.experts.3"], 30),           # one expert
    (["lm_head", "*.down_proj"], 16),                      # one projection of every expert
])
def test_skip_modules_address_experts(skip, quantized_experts):
    model = mixtral()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_quantization_adapter("cpu", QuantizationConfig(method="hqq", skip_modules=skip)).quantize_model(model)
    plan = model.quantization_plan
    quantized = [layer for layer in plan.layers if ".experts." in layer.name and layer.status == "quantized"]
    assert len(quantized) == quantized_experts
    blocks = [model.model.layers[i].mlp.experts for i in range(2)]
    for i, block in enumerate(blocks):
        whole_block_skipped = not any(layer.name.startswith(f"model.layers.{i}.mlp.experts.") for layer in quantized)
        assert is_fused_experts(block) == whole_block_skipped  # untouched blocks keep transformers' module
    if quantized_experts == 0:
        assert any("in full precision" in str(w.message) and "experts" in str(w.message) for w in caught)
        assert plan.quantized_share < 0.5


def test_layer_configs_address_experts():
    model = mixtral()
    config = QuantizationConfig(method="hqq", bits=4, group_size=64,
                                layer_configs={"mlp.experts": {"bits": 2, "group_size": 32},
                                               "layers.1.mlp.experts.7": {"bits": 8, "group_size": 128}})
    quantize(model, config.method.value, bits=4, group_size=64, layer_configs=config.layer_configs)
    plan = model.quantization_plan
    assert plan["model.layers.0.mlp.experts.2.gate_up_proj"].bits == 2
    assert plan["model.layers.1.mlp.experts.7.down_proj"].bits == 8
    assert plan["model.layers.0.self_attn.q_proj"].bits == 4


@pytest.mark.parametrize("method", ["hqq", "bnb_nf4", "quanto_int4", "mlx_int4"])
def test_qlora_trains_attention_and_experts(method):
    from peft import LoraConfig, get_peft_model

    model = mixtral()
    adapter = quantize(model, method)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(adapter.prepare_model_for_training(model),
                                LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    wrapped = {n.replace("base_model.model.", "") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    experts = {n for n in wrapped if ".experts." in n}
    assert len(experts) == 2 * 8 * 2 and "model.layers.0.self_attn.q_proj" in wrapped
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = peft_model(TOKENS, labels=TOKENS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    grads = [n for n, p in peft_model.named_parameters() if p.requires_grad and ".experts." in n]
    assert grads and all("lora_" in n for n in grads)
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in peft_model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in base.items() if k in after)
    assert set(base) <= set(after)


def test_mixed_precision_plans_each_expert():
    from quantization_wrapper import plan_mixed_precision

    model = mixtral()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = [TOKENS]
    plan = plan_mixed_precision(model, 5.0, method_family="hqq", calibration=calibration,
                                candidates=[(2, 64), (4, 64), (8, 128)])
    # the model is left as it was (fused experts, same tensors)
    assert is_fused_experts(model.model.layers[0].mlp.experts)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    names = [c.name for c in plan.choices]
    experts = [c for c in plan.choices if ".experts." in c.name]
    assert len(experts) == 32 and len(names) == 32 + 2 * 4
    assert plan.bits_per_weight <= 5.0 + 1e-9
    assert len({c.candidate for c in experts}) > 1  # bits spent unevenly across experts
    # the plan's config quantizes the experts as planned
    quantize(model, "hqq", **{k: v for k, v in plan.config.to_dict().items()
                              if k in ("bits", "group_size", "layer_configs", "skip_modules")})
    quantized = model.quantization_plan
    for choice in experts:
        assert quantized[choice.name].bits == plan.config.for_layer(choice.name).bits


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(MODELS))
def test_save_and_load_are_bit_exact(family, method, tmp_path):
    from quantization_wrapper import load_quantized_model, save_quantized_model

    model = MODELS[family]()
    # block 0: every expert but one quantized; block 1: its experts kept in float (fused module)
    quantize(model, method, skip_modules=["lm_head", "layers.0.mlp.experts.3", "layers.1.mlp.experts"])
    assert is_fused_experts(model.model.layers[1].mlp.experts)
    with torch.no_grad():
        reference = model(TOKENS).logits
    save_quantized_model(model, tmp_path / "ckpt")
    loaded = load_quantized_model(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, reference)
    assert isinstance(loaded.model.layers[0].mlp.experts, UnfusedExperts)
    assert type(loaded.model.layers[0].mlp.experts._modules["3"].down_proj) is nn.Linear
    assert is_fused_experts(loaded.model.layers[1].mlp.experts)
    assert [l.name for l in loaded.quantization_plan.quantized] == [l.name for l in model.quantization_plan.quantized]


@pytest.mark.parametrize("method", ["hqq", "bnb_nf4", "mlx_int4", "quanto_int4"])
def test_from_pretrained_quantizes_experts_as_quantize_model_does(method, tmp_path):
    from transformers import AutoModelForCausalLM

    mixtral().save_pretrained(tmp_path / "float")
    config = QuantizationConfig(method=method, skip_modules=["lm_head", "layers.0.mlp.experts.3"])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    create_quantization_adapter("cpu", config).quantize_model(reference)
    assert sorted((l.name, l.status, l.bits, l.bytes_after) for l in loaded.quantization_plan.layers) == \
        sorted((l.name, l.status, l.bits, l.bytes_after) for l in reference.quantization_plan.layers)
    assert loaded.quantization_plan.quantized_share > 0.9  # one expert of 16 skipped
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, reference(TOKENS).logits)


@pytest.mark.parametrize("method", ["hqq", "bnb_nf4", "mlx_int4", "quanto_int4"])
def test_save_pretrained_and_from_pretrained_round_trip(method, tmp_path):
    from transformers import AutoModelForCausalLM

    model = mixtral()
    quantize(model, method, skip_modules=["lm_head", "layers.0.mlp.experts.3", "layers.1.mlp.experts"])
    with torch.no_grad():
        reference = model(TOKENS).logits
    model.save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, reference)
    assert isinstance(loaded.model.layers[0].mlp.experts, UnfusedExperts)
    assert is_fused_experts(loaded.model.layers[1].mlp.experts)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_mlx_lm_reads_the_switch_glu_layout_and_so_do_we(family, tmp_path):
    mx = pytest.importorskip("mlx.core")
    import numpy as np
    from mlx_lm.utils import load_model

    from quantization_wrapper import load_quantized_model, save_mlx_lm

    model = MODELS[family]()
    quantize(model, "mlx_int4", group_size=32)
    with torch.no_grad():
        reference = model(TOKENS).logits
    path = save_mlx_lm(model, tmp_path / "mlx")
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
        prefix = "block_sparse_moe" if family == "mixtral" else "mlp"
        stacked = handle.get_tensor(f"model.layers.0.{prefix}.switch_mlp.gate_proj.weight")
    assert stacked.shape[0] == 8 and not any(".experts." in n for n in names)
    peer, _ = load_model(path)  # mlx-lm's strict loader: every tensor used, none missing
    logits = torch.from_numpy(np.array(peer(mx.array(TOKENS.numpy())).astype(mx.float32)))
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)
    back = load_quantized_model(path)  # mlx-lm's layout read back per expert
    with torch.no_grad():
        assert torch.equal(back(TOKENS).logits, reference)
    assert isinstance(back.model.layers[1].mlp.experts, UnfusedExperts)


def test_mlx_lm_layout_needs_one_format_per_block_and_our_format_says_so(tmp_path):
    from quantization_wrapper import save_mlx_lm, save_quantized_model

    model = mixtral()
    quantize(model, "mlx_int4", group_size=32, skip_modules=["lm_head", "layers.0.mlp.experts.3"])
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts: mlx-lm's SwitchLinear .* is a Linear"):
        save_mlx_lm(model, tmp_path / "mlx")
    assert not (tmp_path / "mlx").exists()
    with pytest.warns(UserWarning, match="save_mlx_lm"):
        save_quantized_model(model, tmp_path / "ours")
    import json

    assert "quantization" not in json.loads((tmp_path / "ours" / "config.json").read_text())


@pytest.mark.parametrize("method", ["hqq", "bnb_nf4"])
def test_each_active_expert_runs_its_quantized_matmul_once_on_its_own_tokens(method):
    """The forward costs the library's matmul once per active expert, on the tokens routed to it:
    no expert outside the router's top-k runs, none runs twice, none sees other tokens."""
    model = mixtral()
    quantize(model, method)
    routed, calls = {}, {}

    def record_routing(block_name):
        def hook(module, args):
            routed[block_name] = args[1].detach().clone()  # top_k_index [tokens, k]
        return hook

    def record_call(layer_name):
        def hook(module, args):
            calls.setdefault(layer_name, []).append(args[0].shape[0])
        return hook

    for name, module in model.named_modules():
        if isinstance(module, UnfusedExperts):
            module.register_forward_pre_hook(record_routing(name))
            for e in range(module.num_experts):
                for proj in ("gate_up_proj", "down_proj"):
                    module.get_submodule(f"{e}.{proj}").register_forward_pre_hook(record_call(f"{name}.{e}.{proj}"))
    for tokens in (TOKENS, TOKENS[:1, :1]):  # 24 tokens; one token: 2 experts active of 8
        routed.clear()
        calls.clear()
        with torch.no_grad():
            model(tokens)
        assert len(routed) == 2
        for block, index in routed.items():
            tokens_per_expert = torch.bincount(index.flatten(), minlength=8)
            for e in range(8):
                expected = [int(tokens_per_expert[e])] if tokens_per_expert[e] else []
                assert calls.get(f"{block}.{e}.gate_up_proj", []) == expected
                assert calls.get(f"{block}.{e}.down_proj", []) == expected
    assert sum(len(v) for v in calls.values()) == 2 * 2 * 2  # the last input: 2 blocks x 2 experts x 2 matmuls
