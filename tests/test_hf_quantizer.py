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


@pytest.mark.parametrize("producer", ["quantize_model", "load_quantized_model", "load_and_quantize"])
def test_every_model_carries_a_truthful_hf_quantizer(checkpoint, tmp_path, producer):
    config = qw.QuantizationConfig(method="hqq", bits=4, group_size=32)
    model = qw.create_quantization_adapter("cpu", config).quantize_model(LlamaForCausalLM.from_pretrained(checkpoint))
    if producer == "load_quantized_model":
        model = qw.load_quantized_model(qw.save_quantized_model(model, tmp_path / "q"))
    elif producer == "load_and_quantize":
        model = qw.load_and_quantize(checkpoint, config, backend="cpu", progress=False)
    quantizer = model.hf_quantizer
    assert isinstance(quantizer, transformers.quantizers.HfQuantizer)
    assert quantizer.is_trainable and not quantizer.is_qat_trainable and not quantizer.is_serializable()
    assert quantizer.quantization_config.method.value == "hqq"
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "hf_out")
    assert not list((tmp_path / "hf_out").glob("*.safetensors")) if (tmp_path / "hf_out").exists() else True


def test_config_round_trips_through_the_config_json_dict():
    config = qw.QuantizationConfig(**CONFIGS["mixed"])
    data = config.to_dict()
    assert data["quant_method"] == "quantization_wrapper"
    from transformers.quantizers.auto import AutoQuantizationConfig

    back = AutoQuantizationConfig.from_dict(data)
    assert back == config
    with pytest.raises(ValueError, match="another library's config"):
        qw.QuantizationConfig.from_dict({**data, "quant_method": "bitsandbytes"})


def test_pre_quantized_checkpoint_is_refused_with_the_way_to_load_it(checkpoint, tmp_path):
    """A config.json claiming our format goes to load_quantized_model, not to random weights."""
    import json
    import shutil

    shutil.copytree(checkpoint, tmp_path / "c")
    data = json.loads((tmp_path / "c" / "config.json").read_text())
    data["quantization_config"] = qw.QuantizationConfig(method="hqq", bits=4, group_size=32).to_dict()
    (tmp_path / "c" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="load_quantized_model"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")


def test_registration_needs_no_eager_transformers_import():
    import subprocess
    import sys

    code = ("import sys, quantization_wrapper as qw; assert 'transformers' not in sys.modules; "
            "c = qw.QuantizationConfig(method='hqq'); "
            "from transformers import AutoModelForCausalLM; "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; "
            "assert 'quantization_wrapper' not in M; c.quant_method; assert 'quantization_wrapper' in M")
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
