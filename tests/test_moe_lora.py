"""LoRA on quantized MoE experts in peft's own terms: ``target_parameters`` of the fused expert
parameters train per-expert LoRA layers on a quantized model, an adapter peft trained on
transformers' float model loads onto the quantized one, and an adapter trained on the quantized
model is written so that plain ``PeftModel.from_pretrained`` applies it to the float model."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import ParamWrapper

from quantization_wrapper import load_lora_adapter, save_lora_adapter
from quantization_wrapper.experts import UnfusedExperts
from tests.test_moe import TOKENS, mixtral, qwen3_moe, quantize

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def gpt_oss(seed: int = 0):
    """GPT-OSS: experts stored transposed ([experts, in, out]) with per-expert biases."""
    torch.manual_seed(seed)
    config = transformers.GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                       vocab_size=128)
    return transformers.GptOssForCausalLM(config).eval()


FAMILIES = {"mixtral": mixtral, "qwen3_moe": qwen3_moe, "gpt_oss": gpt_oss}


def containers(model):
    return {n.replace("base_model.model.", ""): m for n, m in model.named_modules() if isinstance(m, UnfusedExperts)}


def expert_deltas(peft_model) -> dict[str, torch.Tensor]:
    """``{"<container>.<e>.<proj>": delta [out, in]}`` of every per-expert LoRA layer (scaling applied)."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A and ".experts." in name \
                and not isinstance(module, ParamWrapper):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            out[name.replace("base_model.model.", "")] = (b @ a * module.scaling["default"]).detach()
    return out


def fused_deltas(peft_model) -> dict[str, torch.Tensor]:
    """The same from peft's ``ParamWrapper``s on a float model, split per expert as ``[out, in]``."""
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, ParamWrapper) and ".experts" in name:
            delta = module.get_delta_weight("default").detach()  # [E, out, in], or [E, in, out] transposed
            if getattr(module.get_base_layer(), "is_transposed", False):
                delta = delta.transpose(1, 2)
            container = name.replace("base_model.model.", "").replace(".base_layer", "")
            for e in range(delta.shape[0]):
                out[f"{container}.{e}.{module.parameter_name}"] = delta[e]
    return out


def lora(**kwargs) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **kwargs})


def train(peft_model, steps: int = 4) -> list[float]:
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(steps):
        loss = peft_model(TOKENS, labels=TOKENS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", ["hqq", "bnb_nf4", "quanto_int4", "mlx_int4"])
def test_target_parameters_train_one_lora_per_quantized_expert(method):
    float_model = mixtral()
    reference = get_peft_model(copy.deepcopy(float_model), lora(target_modules=["q_proj"], target_parameters=EXPERT_PARAMS))
    model = copy.deepcopy(float_model)
    quantize(model, method)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, lora(target_modules=["q_proj"], target_parameters=EXPERT_PARAMS))
    wrapped = set(expert_deltas(peft_model))
    assert len(wrapped) == 2 * 8 * 2  # 2 blocks x 8 experts x (gate_up, down)
    # the same trainable parameters as peft's ParamWrapper on the float model: r per expert
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(peft_model) == count(reference) > 0
    losses = train(peft_model, 6)
    assert losses[-1] < 0.9 * losses[0], losses
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in peft_model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in base.items())


def test_a_target_matching_experts_left_fused_stays_for_peft():
    """A block whose experts stay in float (skipped) keeps transformers' fused module: peft's own
    ParamWrapper adapts it, the quantized block gets per-expert layers, from one config."""
    model = mixtral()
    quantize(model, "hqq", skip_modules=["lm_head", "layers.1.mlp.experts"])
    peft_model = get_peft_model(model, lora(target_parameters=EXPERT_PARAMS))
    assert {n.split(".experts.")[0] for n in expert_deltas(peft_model)} == {"model.layers.0.mlp"}
    fused = [n for n, m in peft_model.named_modules() if isinstance(m, ParamWrapper)]
    assert fused and all(".layers.1.mlp.experts" in n for n in fused)
    assert sorted(peft_model.peft_config["default"].target_parameters) == sorted(EXPERT_PARAMS)
    losses = train(peft_model, 6)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_an_adapter_peft_trained_on_the_float_model_loads_onto_the_quantized_one(family, tmp_path):
    float_model = FAMILIES[family]()
    peft_float = get_peft_model(copy.deepcopy(float_model),
                                lora(target_modules=["q_proj"], target_parameters=EXPERT_PARAMS,
                                     init_lora_weights=False))  # random lora_B: a non-zero update
    peft_float.save_pretrained(tmp_path / "adapter")
    model = copy.deepcopy(float_model)
    quantize(model, "bnb_int8")
    loaded = load_lora_adapter(model, str(tmp_path / "adapter"))
    ours, theirs = expert_deltas(loaded), fused_deltas(peft_float)
    assert set(ours) == set(theirs) and len(ours) > 0
    for key in ours:  # the same numbers, rearranged: equal
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-7)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference, as peft does
    # the update changes the output as on the float model (up to 8-bit quantization of the base)
    with torch.no_grad(), loaded.disable_adapter():
        q_base = loaded(TOKENS).logits
    with torch.no_grad():
        q_lora = loaded(TOKENS).logits
        with peft_float.disable_adapter():
            f_base = peft_float(TOKENS).logits
        f_lora = peft_float(TOKENS).logits
    change, expected = q_lora - q_base, f_lora - f_base
    assert expected.norm() > 0.05 * f_base.norm()
    # (8-bit base weights move a few tokens to another expert: GPT-OSS, 4 experts, shows 13%)
    assert (change - expected).norm() < 0.2 * expected.norm()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("targets", ["target_parameters", "all-linear"])
def test_an_adapter_trained_on_the_quantized_model_loads_onto_the_float_one_with_plain_peft(family, targets, tmp_path):
    float_model = FAMILIES[family]()
    model = copy.deepcopy(float_model)
    quantize(model, "hqq")
    config = lora(target_modules=["q_proj"], target_parameters=EXPERT_PARAMS) if targets == "target_parameters" \
        else lora(target_modules="all-linear")
    peft_model = get_peft_model(model, config)
    train(peft_model, 3)
    peft_model.eval()
    save_lora_adapter(peft_model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # (with "all-linear" peft also targets the router's weight, "gate.weight", on transformers 5 MoE models)
    assert set(EXPERT_PARAMS) <= set(saved["target_parameters"])
    assert not any(".experts." in t for t in saved["target_modules"])
    # plain peft, transformers' float model: every expert gets exactly the update trained on the quantized one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_float = PeftModel.from_pretrained(copy.deepcopy(float_model), str(tmp_path / "adapter"))
    ours, theirs = expert_deltas(peft_model), fused_deltas(on_float)
    experts = getattr(float_model.config, "num_local_experts", None) or float_model.config.num_experts
    assert set(ours) == set(theirs) and len(ours) == 2 * 2 * experts  # 2 blocks x (gate_up, down) per expert
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-6, atol=1e-7)
    float_lora = {n.replace("base_model.model.", ""): p for n, p in on_float.named_parameters()
                  if "lora_" in n and ".experts" not in n}
    trained = {n.replace("base_model.model.", ""): p for n, p in peft_model.named_parameters()
               if "lora_" in n and ".experts." not in n}
    assert set(float_lora) == set(trained) and all(torch.equal(float_lora[k], trained[k]) for k in trained)
    # and our loader puts it back onto a fresh quantized model: the same logits as after training
    fresh = copy.deepcopy(float_model)
    quantize(fresh, "hqq")
    reloaded = load_lora_adapter(fresh, str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, peft_model(TOKENS).logits, rtol=1e-5, atol=1e-5)


def test_per_expert_layout_round_trips_and_saving_keeps_the_users_files(tmp_path):
    float_model = mixtral()
    model = copy.deepcopy(float_model)
    quantize(model, "quanto_int4")
    peft_model = get_peft_model(model, lora(target_modules="all-linear", init_lora_weights=False))
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    save_lora_adapter(peft_model, folder, experts_layout="per_expert")
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert not any("experts" in t for t in saved["target_parameters"] or [])
    from safetensors import safe_open
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.layers.1.mlp.experts.3.gate_up_proj.lora_B.weight" in set(f.keys())
    before = (folder / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_lora_adapter(peft_model, folder)
    assert (folder / "adapter_model.safetensors").read_bytes() == before
    with pytest.raises(ValueError, match="experts_layout='stacked'.*allowed"):
        save_lora_adapter(peft_model, tmp_path / "other", experts_layout="stacked")
    assert not (tmp_path / "other").exists()
    fresh = copy.deepcopy(float_model)
    quantize(fresh, "quanto_int4")
    reloaded = load_lora_adapter(fresh, str(folder))
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, peft_model(TOKENS).logits)
    save_lora_adapter(peft_model, folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"
    assert set(EXPERT_PARAMS) <= set(json.loads((folder / "adapter_config.json").read_text())["target_parameters"])


def test_options_peft_cannot_honour_on_fused_experts_are_refused_or_said(tmp_path):
    model = mixtral()
    quantize(model, "hqq")
    peft_model = get_peft_model(model, lora(target_modules=["q_proj", "gate_up_proj", "down_proj"], lora_dropout=0.1))
    with pytest.warns(UserWarning, match="lora_dropout=0.1.*refuses dropout"):
        save_lora_adapter(peft_model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["lora_dropout"] == 0.0
    model = mixtral()
    quantize(model, "hqq")
    with pytest.raises(ValueError, match="rank_pattern names expert parameters"):
        get_peft_model(model, lora(target_parameters=EXPERT_PARAMS, rank_pattern={"mlp.experts.down_proj": 8}))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_all_linear_reaches_every_quantized_expert(family):
    """peft rewrites a transformers 5 MoE config's targets as if the model's experts were fused
    (Qwen-MoE's ``down_proj`` becomes the fused parameter): every per-expert layer still gets LoRA."""
    model = FAMILIES[family]()
    quantize(model, "hqq")
    peft_model = get_peft_model(model, lora(target_modules="all-linear"))
    experts = sum(c.num_experts for c in containers(peft_model).values())
    assert len(expert_deltas(peft_model)) == 2 * experts
    assert "model.layers.0.self_attn.o_proj" in {n.replace("base_model.model.", "") for n, m in
                                                   peft_model.named_modules() if hasattr(m, "lora_A")}


def test_trl_sft_trainer_trains_quantized_experts_and_the_adapter_reaches_the_float_model(tmp_path):
    """The world's path: TRL's SFTTrainer with peft's MoE config on a quantized Qwen3-MoE,
    ``trainer.save_model``, then the adapter on a fresh quantized base (plain peft) and, rewritten by
    ``save_lora_adapter``, on transformers' float model (plain peft)."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tests.test_trainers import SENTENCES, word_tokenizer

    tokenizer = word_tokenizer()
    float_model = qwen3_moe()
    model = copy.deepcopy(float_model)
    adapter = quantize(model, "hqq")
    model = adapter.prepare_model_for_training(model)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=8, learning_rate=2e-2, logging_steps=1,
                     report_to=[], save_strategy="no", use_cpu=True, bf16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": SENTENCES * 8}),
                         processing_class=tokenizer,
                         peft_config=lora(target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_PARAMS,
                                          task_type="CAUSAL_LM"))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0] - 0.5, losses
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    assert len(expert_deltas(trained)) == 2 * 8 * 2
    trainer.save_model(str(tmp_path / "adapter"))  # peft's save_pretrained: one LoRA per expert layer
    probe = TOKENS % len(tokenizer)
    fresh = copy.deepcopy(float_model)
    quantize(fresh, "hqq")
    reloaded = PeftModel.from_pretrained(adapter.prepare_model_for_training(fresh), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, trained(probe).logits)
    save_lora_adapter(reloaded, tmp_path / "fused")  # rewritten in peft's fused layout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_float = PeftModel.from_pretrained(copy.deepcopy(float_model), str(tmp_path / "fused"))
    ours, theirs = expert_deltas(trained), fused_deltas(on_float)
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key].to(theirs[key].dtype), rtol=1e-6, atol=1e-7)
