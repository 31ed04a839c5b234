"""Our checkpoints open with the peers' own loaders: transformers (bitsandbytes), optimum-quanto's
``requantize`` with ``quantization_map.json``, and mlx-lm (strict) with ``config["quantization"]``.

Tied embeddings are saved as transformers saves them (``model.embed_tokens.weight`` kept,
``lm_head.weight`` dropped), and buffers the model computes itself (rotary tables) are not saved:
mlx-lm's strict loader refuses any name it does not know."""

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
TIES = pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])


def llama(tied=False):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CFG, tie_word_embeddings=tied)).eval()


def saved(tmp_path, tied=False, **config):
    model = llama(tied)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw.create_quantization_adapter("cpu", qw.QuantizationConfig(**config), strict=True).quantize_model(model)
    path = qw.save_quantized_model(model, tmp_path / "ckpt")
    with torch.no_grad():
        return model, path, model(IDS).logits, embeddings


def saved_names(path):
    from safetensors import safe_open

    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


@pytest.mark.parametrize("method, tied", [("bnb_nf4", False), ("bnb_fp4", False), ("bnb_int8", False),
                                          ("bnb_nf4", True)],
                         ids=["nf4", "fp4", "int8", "nf4-tied"])
def test_transformers_loads_bitsandbytes_checkpoint(tmp_path, method, tied):
    bnb = pytest.importorskip("bitsandbytes")
    model, path, expected, embeddings = saved(tmp_path, tied, method=method)
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
    assert (peer.lm_head.weight is peer.model.embed_tokens.weight) is tied
    assert torch.equal(peer.model.embed_tokens.weight, embeddings)
    # and the transformers-written keys are ours: the same tensors, byte for byte
    ours = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    theirs = peer.state_dict()
    for key, value in ours.items():
        if ".layers." in key and key in theirs:
            assert torch.equal(value, theirs[key]), key


@TIES
@pytest.mark.parametrize("method", ["quanto_int4", "quanto_int8"])
def test_quanto_requantize_loads_checkpoint(tmp_path, method, tied):
    """quanto's documented flow: an empty model, ``requantize(model, state_dict, quantization_map)``,
    then, for tied embeddings, ``tie_weights()`` -- what quanto's own ``QuantizedModelForCausalLM.from_pretrained``
    does (requantize gives every module new parameters, which unties them). Its empty model comes
    from ``init_empty_weights()``, which keeps the rotary tables real: a model built under
    ``torch.device("meta")`` would get uninitialized ones from requantize, whatever the checkpoint."""
    quanto = pytest.importorskip("optimum.quanto")
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    _, path, expected, embeddings = saved(tmp_path, tied, method=method)
    qmap = json.loads((path / "quantization_map.json").read_text())
    assert qmap["model.layers.0.self_attn.q_proj"] == {"weights": "qint4" if method.endswith("4") else "qint8",
                                                       "activations": "none"}
    assert "lm_head" not in qmap
    assert sorted(p.name for p in path.glob("*.safetensors")) == ["model.safetensors"]
    state = load_file(path / "model.safetensors")
    assert "model.embed_tokens.weight" in state and ("lm_head.weight" in state) is not tied
    with init_empty_weights():
        peer = LlamaForCausalLM(LlamaConfig(**CFG, tie_word_embeddings=tied))
    quanto.requantize(peer, state, qmap, device=torch.device("cpu"))
    if tied:
        peer.tie_weights()
        assert peer.lm_head.weight is peer.model.embed_tokens.weight
    peer.eval()
    with torch.no_grad():
        assert torch.equal(peer(IDS).logits, expected)
    assert torch.equal(peer.model.embed_tokens.weight, embeddings)


def word_level_tokenizer(path):
    """A 128-word tokenizer built in code (``w3`` ... ``w127``, ``</s>`` = 2), saved next to the weights
    as transformers saves one, for ``mlx_lm.load``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, CFG["vocab_size"])}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


@pytest.mark.parametrize("tied, skip_modules", [(True, None), (False, None), (True, [])],
                         ids=["tied", "untied", "tied-lm_head-quantized"])
def test_mlx_lm_loads_the_checkpoint_strictly(tmp_path, tied, skip_modules):
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    import numpy as np
    from mlx_lm.utils import load_model

    extra = {} if skip_modules is None else {"skip_modules": skip_modules}
    model, path, expected, embeddings = saved(tmp_path, tied, method="mlx_int4", group_size=32, **extra)
    config = json.loads((path / "config.json").read_text())
    names = saved_names(path)
    assert not any(n.startswith("__buffer__.") for n in names)
    assert "model.embed_tokens.weight" in names
    if skip_modules is None:  # lm_head stays float: tied, it is saved once, as transformers saves it
        assert config["tie_word_embeddings"] is tied and ("lm_head.weight" in names) is not tied
    else:  # a quantized lm_head no longer shares the embedding: the config says so
        assert config["tie_word_embeddings"] is False and "lm_head.scales" in names
    word_level_tokenizer(path)

    peer, _ = load_model(path)  # strict=True, its default
    peer_model, tokenizer = mlx_lm.load(str(path))
    for loaded in (peer, peer_model):
        logits = torch.from_numpy(np.array(loaded(mx.array(IDS.numpy())).astype(mx.float32)))
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    assert np.array_equal(np.array(peer.model.embed_tokens.weight), embeddings.numpy())

    prompt = tokenizer.encode("w5 w17 w99 w3")
    text = mlx_lm.generate(peer_model, tokenizer, prompt=prompt, max_tokens=8)  # greedy by default
    with torch.no_grad():
        ours = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=2,
                              pad_token_id=2)[0, len(prompt):].tolist()
    assert text == tokenizer.decode([t for t in ours if t != 2]) and text


@pytest.mark.parametrize("architecture", ["Qwen3", "Gemma"])
def test_mlx_lm_loads_other_tied_architectures_strictly(tmp_path, architecture):
    """Small Qwen3 and Gemma tie their embeddings; Gemma also holds a computed ``embed_scale`` buffer."""
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    import numpy as np
    from mlx_lm.utils import load_model

    config = getattr(transformers, f"{architecture}Config")(**CFG, head_dim=16, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = getattr(transformers, f"{architecture}ForCausalLM")(config).eval()
    qw.create_quantization_adapter("cpu", qw.QuantizationConfig(method="mlx_int4", group_size=32)).quantize_model(model)
    path = qw.save_quantized_model(model, tmp_path / "ckpt")
    names = saved_names(path)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert not any(n.startswith("__buffer__.") for n in names)
    peer, _ = load_model(path)
    with torch.no_grad():
        expected = model(IDS).logits
    logits = torch.from_numpy(np.array(peer(mx.array(IDS.numpy())).astype(mx.float32)))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_mlx_lm_reads_mixed_settings(tmp_path):
    mx = pytest.importorskip("mlx.core")
    import mlx.nn as mnn
    import numpy as np

    model, path, _, _ = saved(tmp_path, method="mlx_int4", group_size=32,
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
    _, path, _, _ = saved(tmp_path, method="hqq", group_size=32)
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and "quantization" not in config
    assert not (path / "quantization_map.json").exists()
