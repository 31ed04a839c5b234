"""transformers' from_pretrained with our QuantizationConfig, and the hf_quantizer every model carries."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import quantization_wrapper as qw  # noqa: E402

CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=128)
IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
CONFIGS = {
    "bnb_nf4": dict(method="bnb_nf4"),
    "bnb_int8": dict(method="bnb_int8"),
    "hqq4": dict(method="hqq", bits=4, group_size=32),
    "quanto_int4": dict(method="quanto_int4"),
    "mlx4": dict(method="mlx_int4", group_size=32),
    "mixed": dict(method="hqq", bits=4, group_size=32, skip_modules=["lm_head", "model.layers.1.mlp.down_proj"],
                  layer_configs={"model.layers.0": {"bits": 8}, "self_attn.o_proj": {"method": "mlx_int4"}}),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CFG)).save_pretrained(path)
    return path


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_from_pretrained_equals_quantize_model(checkpoint, name, dtype):
    config = qw.QuantizationConfig(**CONFIGS[name])
    kwargs = {} if dtype is None else {"dtype": dtype}
    ours = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config, **kwargs)
    reference = qw.create_quantization_adapter("cpu", config).quantize_model(
        LlamaForCausalLM.from_pretrained(checkpoint, **kwargs))
    assert torch.equal(logits(ours), logits(reference))
    plan, want = ours.quantization_plan, reference.quantization_plan
    assert [(l.name, l.method, l.bits, l.group_size, l.status, l.bytes_after) for l in plan.layers] == \
        [(l.name, l.method, l.bits, l.group_size, l.status, l.bytes_after) for l in want.layers]
    assert plan.bytes_after < plan.bytes_before
    assert ours.is_quantized and ours.hf_quantizer.is_trainable and ours.hf_quantizer.quantization_config == config
    assert not [n for n, t in ours.state_dict().items() if t.device.type == "meta"]


def test_from_pretrained_layer_types_and_skips(checkpoint):
    config = qw.QuantizationConfig(**CONFIGS["mixed"])
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config)
    layers = model.model.layers
    assert type(layers[0].self_attn.q_proj).__name__ == "HQQLinear"
    assert type(layers[1].self_attn.o_proj).__name__ == "MLXQuantizedLinear"  # layers.0 (more parts) wins there
    assert type(layers[1].mlp.down_proj) is torch.nn.Linear  # skipped: stays in float
    assert type(model.lm_head) is torch.nn.Linear
    assert {l.bits for l in model.quantization_plan.layers if l.name.startswith("model.layers.0.mlp")} == {8}


def plan_rows(model):
    return [(l.name, l.method, l.bits, l.group_size, l.status, l.in_features, l.out_features, l.bias)
            for l in model.quantization_plan.layers]


def reload(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    return model


def assert_same_model(ours, back):
    assert torch.equal(logits(ours), logits(back))
    assert [type(m) for m in back.modules()] == [type(m) for m in ours.modules()]
    assert plan_rows(back) == plan_rows(ours)
    assert back.quantization_config == ours.quantization_config
    assert not [n for n, t in back.state_dict().items() if t.device.type == "meta"]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_save_pretrained_round_trip_without_requantizing(checkpoint, tmp_path, monkeypatch, name, dtype):
    config = qw.QuantizationConfig(**CONFIGS[name])
    kwargs = {} if dtype is None else {"dtype": dtype}
    ours = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config, **kwargs)
    ours.save_pretrained(tmp_path / "q")
    import json

    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "quantization_wrapper" and saved["plan"] == ours.quantization_plan.to_dict()

    def no_quantizing(*args, **kwargs):
        raise AssertionError("reloading must not quantize")

    for method in qw.registered_methods():
        monkeypatch.setattr(qw.get_adapter_class(method), "quantize_linear", no_quantizing)
    back = reload(tmp_path / "q")
    assert back.dtype == (dtype or torch.float32)
    assert_same_model(ours, back)
    assert back.is_quantized and back.hf_quantizer.is_serializable() and back.hf_quantizer.is_trainable


@pytest.mark.parametrize("producer", ["quantize_model", "load_quantized_model", "load_and_quantize", "reloaded"])
def test_every_model_saves_with_save_pretrained(checkpoint, tmp_path, producer):
    config = qw.QuantizationConfig(method="hqq", bits=4, group_size=32)
    model = qw.create_quantization_adapter("cpu", config).quantize_model(LlamaForCausalLM.from_pretrained(checkpoint))
    if producer == "load_quantized_model":
        model = qw.load_quantized_model(qw.save_quantized_model(model, tmp_path / "q"))
    elif producer == "load_and_quantize":
        model = qw.load_and_quantize(checkpoint, config, backend="cpu", progress=False)
    elif producer == "reloaded":  # a model read from a save_pretrained checkpoint saves again
        model.save_pretrained(tmp_path / "first")
        model = reload(tmp_path / "first")
    quantizer = model.hf_quantizer
    assert isinstance(quantizer, transformers.quantizers.HfQuantizer)
    assert quantizer.is_trainable and not quantizer.is_qat_trainable and quantizer.is_serializable()
    assert quantizer.quantization_config.method.value == "hqq"
    model.save_pretrained(tmp_path / "hf_out")
    assert_same_model(model, reload(tmp_path / "hf_out"))


def test_tied_embeddings_stay_tied(tmp_path):
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**CFG, tie_word_embeddings=True)).save_pretrained(tmp_path / "tied")
    config = qw.QuantizationConfig(method="hqq", bits=4, group_size=32)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "tied", quantization_config=config)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ours.save_pretrained(tmp_path / "q")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    back = reload(tmp_path / "q")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert_same_model(ours, back)


def test_quantized_tied_lm_head_is_saved_untied(tmp_path):
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**CFG, tie_word_embeddings=True)).save_pretrained(tmp_path / "tied")
    config = qw.QuantizationConfig(method="hqq", bits=4, group_size=32, skip_modules=[])
    adapter = qw.create_quantization_adapter("cpu", config)
    ours = adapter.quantize_model(LlamaForCausalLM.from_pretrained(tmp_path / "tied"))
    assert type(ours.lm_head).__name__ == "HQQLinear"
    ours.save_pretrained(tmp_path / "q")
    back = reload(tmp_path / "q")
    assert type(back.lm_head).__name__ == "HQQLinear" and not back.config.tie_word_embeddings
    assert_same_model(ours, back)


@pytest.mark.parametrize("tamper", ["dtype", "missing"])
def test_tampered_checkpoint_raises_instead_of_random_weights(checkpoint, tmp_path, tamper):
    from safetensors.torch import load_file, save_file

    config = qw.QuantizationConfig(method="hqq", bits=4, group_size=32)
    AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config).save_pretrained(tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    key = "model.layers.1.self_attn.q_proj.W_q"
    if tamper == "dtype":
        tensors[key] = tensors[key].to(torch.int32)
    else:
        del tensors[key]
    save_file(tensors, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(qw.CheckpointError, match=r"layer 'model\.layers\.1\.self_attn\.q_proj'.*W_q"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_config_round_trips_through_the_config_json_dict():
    config = qw.QuantizationConfig(**CONFIGS["mixed"])
    data = config.to_dict()
    assert data["quant_method"] == "quantization_wrapper"
    from transformers.quantizers.auto import AutoQuantizationConfig

    back = AutoQuantizationConfig.from_dict(data)
    assert back == config
    with pytest.raises(ValueError, match="another library's config"):
        qw.QuantizationConfig.from_dict({**data, "quant_method": "bitsandbytes"})


def test_config_json_without_a_plan_is_refused_with_the_way_to_load_it(checkpoint, tmp_path):
    """A config.json naming our method without the plan save_pretrained writes (hand-made, or
    from another tool) goes to load_quantized_model, not to random weights."""
    import json
    import shutil

    shutil.copytree(checkpoint, tmp_path / "c")
    data = json.loads((tmp_path / "c" / "config.json").read_text())
    data["quantization_config"] = qw.QuantizationConfig(method="hqq", bits=4, group_size=32).to_dict()
    (tmp_path / "c" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no per-layer 'plan'.*load_quantized_model"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")


def test_registration_needs_no_eager_transformers_import():
    import subprocess
    import sys

    # quantization_wrapper first, transformers later: registered when transformers' registry loads
    code = ("import sys, quantization_wrapper as qw; assert 'transformers' not in sys.modules; "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M, AUTO_QUANTIZATION_CONFIG_MAPPING as C; "
            "assert 'quantization_wrapper' in M and 'quantization_wrapper' in C; "
            "assert not [f for f in sys.meta_path if type(f).__name__ == '_RegisterAfterImport']")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    # transformers first: registered at import
    code = ("import transformers.quantizers.auto as a, quantization_wrapper; "
            "assert 'quantization_wrapper' in a.AUTO_QUANTIZER_MAPPING")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_prepare_model_for_training_finds_the_adapter_itself(checkpoint):
    from peft import LoraConfig, get_peft_model

    config = qw.QuantizationConfig(method="hqq", bits=4, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config)
    model = get_peft_model(qw.prepare_model_for_training(model), LoraConfig(r=4, target_modules="all-linear"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len({n.split(".lora_")[0] for n in trainable}) == 14  # every quantized linear layer
    with pytest.raises(ValueError, match="no quantization_config"):
        qw.prepare_model_for_training(LlamaForCausalLM(LlamaConfig(**CFG)))


def test_from_pretrained_of_our_checkpoint_whatever_the_import_order(tmp_path):
    """quantization_wrapper imported before transformers: from_pretrained(dir) still finds our
    quantizer (not transformers' "unknown quantization type, skipping" with random layers)."""
    import subprocess
    import sys

    code = f"""
import quantization_wrapper as qw, torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
m = LlamaForCausalLM(LlamaConfig(**{CFG!r})).eval()
qw.create_quantization_adapter("cpu", qw.QuantizationConfig(method="hqq", bits=4, group_size=32)).quantize_model(m)
m.save_pretrained({str(tmp_path / 'c')!r})
r = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'c')!r}).eval()
ids = torch.arange(8).reshape(1, 8)
with torch.no_grad():
    assert torch.equal(r(ids).logits, m(ids).logits)
assert type(r.model.layers[0].self_attn.q_proj).__name__ == "HQQLinear"
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_from_pretrained_quantizes_a_tied_output_layer_from_the_embedding(tmp_path):
    """A tied checkpoint has no lm_head.weight: with lm_head not skipped, from_pretrained quantizes
    the embedding's values for it, as quantize_model does, says it unties them, and round-trips."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CFG, tie_word_embeddings=True)).save_pretrained(tmp_path / "hf")
    config = qw.QuantizationConfig(method="hqq", bits=4, group_size=32, skip_modules=[])
    reference = qw.create_quantization_adapter("cpu", config).quantize_model(
        LlamaForCausalLM.from_pretrained(tmp_path / "hf"))
    with pytest.warns(UserWarning, match="lm_head.weight is tied to the input embedding; quantizing lm_head unties"):
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", quantization_config=config)
    assert type(ours.lm_head).__name__ == "HQQLinear"
    assert not [k for k in ours.lm_head.state_dict() if k == "weight"]
    assert torch.equal(logits(ours), logits(reference))
    ours.save_pretrained(tmp_path / "rt")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "rt")), logits(reference))
