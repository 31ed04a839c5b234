"""Our checkpoints open with the peers' own loaders: transformers (bitsandbytes), optimum-quanto's
``requantize`` with ``quantization_map.json``, and MLX with mlx-lm's ``config["quantization"]``."""

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import quantization_wrapper as qw  # noqa: E402

CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=128)
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def saved(tmp_path, **config):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw.create_quantization_adapter("cpu", qw.QuantizationConfig(**config), strict=True).quantize_model(model)
    path = qw.save_quantized_model(model, tmp_path / "ckpt")
    with torch.no_grad():
        return model, path, model(IDS).logits


@pytest.mark.parametrize("method", ["bnb_nf4", "bnb_fp4", "bnb_int8"])
def test_transformers_loads_bitsandbytes_checkpoint(tmp_path, method):
    bnb = pytest.importorskip("bitsandbytes")
    model, path, expected = saved(tmp_path, method=method)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["llm_int8_skip_modules"] == ["lm_head"]
    peer = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu").eval()
    layer = peer.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if method == "bnb_int8" else bnb.nn.Linear4bit)
    for module in peer.modules():  # the same CPU kernel our layers use (see adapters/bnb.py)
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        assert torch.equal(peer(IDS).logits, expected)
    # and the transformers-written keys are ours: the same tensors, byte for byte
    ours = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    theirs = peer.state_dict()
    for key, value in ours.items():
        if ".layers." in key and key in theirs:
            assert torch.equal(value, theirs[key]), key


@pytest.mark.parametrize("method", ["quanto_int4", "quanto_int8"])
def test_quanto_requantize_loads_checkpoint(tmp_path, method):
    quanto = pytest.importorskip("optimum.quanto")
    from safetensors.torch import load_file

    _, path, expected = saved(tmp_path, method=method)
    qmap = json.loads((path / "quantization_map.json").read_text())
    assert qmap["model.layers.0.self_attn.q_proj"] == {"weights": "qint4" if method.endswith("4") else "qint8",
                                                       "activations": "none"}
    assert "lm_head" not in qmap
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**CFG))
    state = {k: v for k, v in load_file(path / "model.safetensors").items() if not k.startswith("__buffer__.")}
    quanto.requantize(skeleton, state, qmap, device=torch.device("cpu"))
    skeleton.model.rotary_emb.inv_freq = LlamaForCausalLM(LlamaConfig(**CFG)).model.rotary_emb.inv_freq
    skeleton.eval()
    with torch.no_grad():
        out = skeleton(IDS).logits
    # quanto's own CPU kernels for some shapes differ from the generic path our layer takes
    # (see adapters/quanto.py); the stored tensors are identical, outputs agree to rounding.
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)


def test_mlx_lm_reads_the_checkpoint(tmp_path):
    mx = pytest.importorskip("mlx.core")
    import mlx.nn as mnn
    import numpy as np

    model, path, _ = saved(tmp_path, method="mlx_int4", group_size=32,
                           layer_configs={"model.layers.0.mlp": {"bits": 8, "group_size": 64}})
    quant = json.loads((path / "config.json").read_text())["quantization"]
    assert quant["group_size"] == 32 and quant["bits"] == 4
    assert quant["model.layers.0.mlp.up_proj"] == {"group_size": 64, "bits": 8}
    weights = mx.load(str(path / "model.safetensors"))
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"]:
        settings = quant.get(name, {"group_size": quant["group_size"], "bits": quant["bits"]})
        torch_layer = model.get_submodule(name)
        x = torch.randn(3, torch_layer.in_features)
        layer = mnn.QuantizedLinear(torch_layer.in_features, torch_layer.out_features, bias=False,
                                    group_size=settings["group_size"], bits=settings["bits"])
        layer.load_weights([(k, weights[f"{name}.{k}"]) for k in ("weight", "scales", "biases")], strict=True)
        y_mlx = np.array(layer(mx.array(x.numpy())))
        with torch.no_grad():
            y = torch_layer(x)
        torch.testing.assert_close(torch.from_numpy(y_mlx), y, rtol=1e-5, atol=1e-5)


def test_no_peer_entries_for_other_methods(tmp_path):
    _, path, _ = saved(tmp_path, method="hqq", group_size=32)
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and "quantization" not in config
    assert not (path / "quantization_map.json").exists()
