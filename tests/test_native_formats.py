"""The peers' own checkpoints load: mlx-lm directories and MLX .npz/.safetensors files written with
MLX's writers, and hqq's save_quantized directories and HQQLinear .pt states written by hqq."""

import json
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import quantization_wrapper as qw  # noqa: E402
from quantization_wrapper.adapters.hqq import HQQAdapter  # noqa: E402
from quantization_wrapper.adapters.mlx import MLXAdapter, MLXQuantizedLinear  # noqa: E402
from quantization_wrapper.serialization import CheckpointError  # noqa: E402

CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=128)
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CFG)).eval()


def hf_config(model):
    data = model.config.to_dict()
    data["architectures"] = [type(model).__name__]
    return data


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def roundtrip(model, tmp_path):
    """Save in our format, reload: must be bit-identical."""
    path = qw.save_quantized_model(model, tmp_path / "ours")
    again = qw.load_quantized_model(path)
    assert torch.equal(logits(again), logits(model))
    same_tensors(again, model)
    assert again.quantization_plan.to_dict() == model.quantization_plan.to_dict()
    return again


# ------------------------------------------------------------------------------------------- MLX
mx = pytest.importorskip("mlx.core")
import mlx.nn as mnn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

#: Per-layer exceptions as mlx-lm's quant_predicate returns them (recorded in config["quantization"]).
MLX_OVERRIDES = {"model.layers.0.mlp.up_proj": {"group_size": 64, "bits": 8},
                 "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 8},
                 "model.layers.1.self_attn.v_proj": {"group_size": 64, "bits": 2}}


def mlx_peer(model, *, group_size=32, bits=4, overrides=MLX_OVERRIDES, keep=("lm_head", "model.embed_tokens"),
             dtype=None):
    """The torch model's layers as an MLX module tree, quantized by ``mlx.nn.quantize`` as mlx-lm does:
    returns (the tree, every tensor by mlx-lm's name, mlx-lm's ``quantization`` entry)."""
    dtype = dtype or mx.float32
    root = mnn.Module()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        *parents, leaf = name.split(".")
        parent = root
        for part in parents:
            if part not in parent:
                setattr(parent, part, mnn.Module())
            parent = parent[part]
        layer = mnn.Linear(module.in_features, module.out_features, bias=module.bias is not None) \
            if isinstance(module, nn.Linear) else mnn.Embedding(module.num_embeddings, module.embedding_dim)
        layer.weight = mx.array(module.weight.detach().numpy()).astype(dtype)
        setattr(parent, leaf, layer)

    def predicate(path, module):
        if path in keep or not hasattr(module, "to_quantized"):
            return False
        return dict(overrides[path]) if path in overrides else True

    mnn.quantize(root, group_size, bits, class_predicate=predicate)
    weights = dict(tree_flatten(root.parameters()))
    for key, value in model.state_dict().items():  # norms and other tensors, as mlx-lm holds them
        if key not in weights and ".rotary_emb." not in key:
            weights[key] = mx.array(value.numpy()).astype(dtype)
    quantization = {"group_size": group_size, "bits": bits, "mode": "affine", **overrides}
    return root, weights, quantization


def write_mlx_lm_dir(path, model, weights, quantization, shards=1):
    """The layout mlx-lm's save_model writes (mx.save_safetensors, metadata format=mlx)."""
    path.mkdir()
    config = dict(hf_config(model), quantization=quantization, quantization_config=quantization)
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(weights)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        file = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(str(path / file), {k: weights[k] for k in part}, metadata={"format": "mlx"})
        weight_map.update({k: file for k in part})
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def mlx_reference(model):
    """The same torch model quantized by our MLX adapter with the same per-layer settings."""
    config = qw.QuantizationConfig(method="mlx_int4", group_size=32, skip_modules=["lm_head"],
                                   layer_configs={k: dict(v) for k, v in MLX_OVERRIDES.items()})
    return qw.create_quantization_adapter("cpu", config, strict=True).quantize_model(model)


@pytest.fixture(scope="module")
def mlx_checkpoint(tmp_path_factory):
    model = llama()
    root, weights, quantization = mlx_peer(model)
    path = write_mlx_lm_dir(tmp_path_factory.mktemp("mlx") / "mlx-lm", model, weights, quantization)
    return model, root, weights, path


def mlx_layer(root, name):
    node = root
    for part in name.split("."):
        node = node[part]
    return node


def test_mlx_lm_directory_loads_and_matches_mlx(mlx_checkpoint, tmp_path):
    model, root, weights, path = mlx_checkpoint
    assert qw.detect_native_format(path) == "mlx"
    loaded = qw.load_quantized_model(path)
    assert type(loaded) is LlamaForCausalLM and not loaded.training

    # per-layer bits and group sizes honoured; lm_head (no .scales) stays float
    for name, layer in loaded.named_modules():
        if isinstance(layer, MLXQuantizedLinear):
            want = MLX_OVERRIDES.get(name, {"group_size": 32, "bits": 4})
            assert (layer.group_size, layer.bits) == (want["group_size"], want["bits"]), name
            for key in ("weight", "scales", "biases"):  # the stored tensors, unchanged
                assert np.array_equal(MLXAdapter().layer_state_dict(layer)[key].numpy(),
                                      np.array(weights[f"{name}.{key}"])), (name, key)
            # the peer's own layer (mlx.nn.QuantizedLinear) gives the same outputs: same MLX kernel
            x = torch.randn(3, layer.in_features)
            with torch.no_grad():
                ours = layer(x)
            theirs = torch.from_numpy(np.array(mlx_layer(root, name)(mx.array(x.numpy()))))
            assert torch.equal(ours, theirs), name
    assert type(loaded.lm_head) is nn.Linear
    assert sum(isinstance(m, MLXQuantizedLinear) for m in loaded.modules()) == 14

    # the whole model equals the same weights quantized by our MLX adapter (mx.quantize): bit-identical
    assert torch.equal(logits(loaded), logits(mlx_reference(llama())))

    config, plan = loaded.quantization_config, loaded.quantization_plan
    assert config.method is qw.QuantizationMethod.MLX_INT4 and (config.bits, config.group_size) == (4, 32)
    assert config.skip_modules == ["lm_head"] and config.compute_dtype == torch.float32
    assert {k: (v["bits"], v["group_size"]) for k, v in config.layer_configs.items()} == \
        {k: (v["bits"], v["group_size"]) for k, v in MLX_OVERRIDES.items()}
    assert plan["model.layers.0.mlp.up_proj"].bits == 8 and plan["model.layers.1.self_attn.v_proj"].bits == 2
    assert plan["lm_head"].status == "skipped" and len(plan.quantized) == 14
    adapter = MLXAdapter()
    for layer in plan.quantized:  # plan bytes = module bytes = the checkpoint's bytes for the layer
        module = loaded.get_submodule(layer.name)
        stored = sum(weights[f"{layer.name}.{k}"].nbytes for k in ("weight", "scales", "biases"))
        assert layer.bytes_after == adapter.module_nbytes(module) == stored, layer.name
        assert layer.bytes_before == layer.in_features * layer.out_features * 4
    roundtrip(loaded, tmp_path)


def test_mlx_lm_sharded_directory(tmp_path):
    model = llama(1)
    _, weights, quantization = mlx_peer(model)
    path = write_mlx_lm_dir(tmp_path / "sharded", model, weights, quantization, shards=3)
    loaded = qw.load_mlx_checkpoint(path)
    assert torch.equal(logits(loaded), logits(mlx_reference(llama(1))))


def test_mlx_npz_bfloat16_with_quantized_embedding(tmp_path):
    """mx.savez writes bfloat16 as 2-byte void arrays ('<V2'); mlx-lm also quantizes embed_tokens."""
    model = llama(2)
    root, weights, quantization = mlx_peer(model, group_size=64, keep=(), overrides={}, dtype=mx.bfloat16)
    assert weights["model.embed_tokens.scales"].dtype == mx.bfloat16
    mx.savez(str(tmp_path / "weights.npz"), **weights)
    assert np.load(tmp_path / "weights.npz")["model.norm.weight"].dtype == np.dtype("V2")
    mx.save_safetensors(str(tmp_path / "weights.safetensors"), weights)
    with pytest.raises(CheckpointError, match="holds no model config; pass model_config"):
        qw.load_quantized_model(tmp_path / "weights.npz")

    with pytest.warns(UserWarning, match="model.embed_tokens is a quantized embedding .*identical to mx.dequantize"):
        from_npz = qw.load_quantized_model(tmp_path / "weights.npz", hf_config(model))
    with pytest.warns(UserWarning, match="quantized embedding"):  # the config's quantization entry is checked too
        from_st = qw.load_quantized_model(tmp_path / "weights.safetensors",
                                          dict(hf_config(model), quantization=quantization))
    # every tensor is MLX's, bit for bit, including bfloat16 ones and the dequantized embedding
    embedding = mx.dequantize(weights["model.embed_tokens.weight"], weights["model.embed_tokens.scales"],
                              weights["model.embed_tokens.biases"], group_size=64, bits=4)
    as_torch = lambda a: torch.from_numpy(np.array(a.view(mx.uint16))).view(torch.bfloat16)  # noqa: E731
    assert torch.equal(from_npz.model.embed_tokens.weight, as_torch(embedding))
    assert torch.equal(from_npz.model.norm.weight, as_torch(weights["model.norm.weight"]))
    q = from_npz.model.layers[1].mlp.down_proj
    assert q.compute_dtype == torch.bfloat16 and (q.bits, q.group_size) == (4, 64)
    assert torch.equal(q.scales, as_torch(weights["model.layers.1.mlp.down_proj.scales"]))
    assert isinstance(from_npz.lm_head, MLXQuantizedLinear)
    config = from_npz.quantization_config
    assert config.skip_modules == [] and config.compute_dtype == torch.bfloat16
    same_tensors(from_npz, from_st)
    assert torch.equal(logits(from_npz), logits(from_st))
    # MLX's CPU kernel accumulates bfloat16 in bfloat16; ours computes in float32 from the same
    # bfloat16 tensors (see adapters/mlx.py), so layer outputs agree to bfloat16 rounding only.
    x = torch.randn(3, 128)
    peer = torch.from_numpy(np.array(mlx_layer(root, "model.layers.1.mlp.down_proj")(
        mx.array(x.numpy()).astype(mx.bfloat16)).astype(mx.float32)))
    with torch.no_grad():
        ours = q(x.to(torch.bfloat16)).float()
    torch.testing.assert_close(ours, peer, rtol=0.02, atol=0.02)
    roundtrip(from_npz, tmp_path)


@pytest.fixture
def mlx_dir(tmp_path):
    model = llama()
    _, weights, quantization = mlx_peer(model)
    return write_mlx_lm_dir(tmp_path / "mlx", model, weights, quantization)


def edit_config(path, change):
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


def drop_tensor(path, key):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    del tensors[key]
    save_file(tensors, path / "model.safetensors")


def test_mlx_config_without_quantization(mlx_dir):
    edit_config(mlx_dir, lambda c: (c.pop("quantization"), c.pop("quantization_config")))
    with pytest.raises(CheckpointError, match=r"config.json has no 'quantization' entry.*\"bits\": 4"):
        qw.load_quantized_model(mlx_dir)


def test_mlx_settings_disagree_with_tensors(mlx_dir):
    edit_config(mlx_dir, lambda c: c["quantization"].update({"model.layers.0.self_attn.q_proj": {"group_size": 32,
                                                                                                   "bits": 8}}))
    with pytest.raises(CheckpointError, match="gives 'model.layers.0.self_attn.q_proj' bits=8, group_size=32, but its "
                                              "tensors are 4-bit with group size 32"):
        qw.load_quantized_model(mlx_dir)


def test_mlx_non_affine_mode(mlx_dir):
    edit_config(mlx_dir, lambda c: c["quantization"].update(mode="mxfp4"))
    with pytest.raises(CheckpointError, match="mode 'mxfp4' is not supported"):
        qw.load_quantized_model(mlx_dir)


@pytest.mark.parametrize("key, message", [
    ("model.layers.1.self_attn.o_proj.biases", r"quantized layer 'model.layers.1.self_attn.o_proj' lacks tensors "
                                               r"\['model.layers.1.self_attn.o_proj.biases'\]"),
    ("model.norm.weight", r"lacks tensors the architecture needs: \['model.norm.weight'\]"),
    ("model.layers.0.mlp.up_proj.scales", r"'quantization' has settings for \['model.layers.0.mlp.up_proj'\], which "
                                          r"have no .scales"),
], ids=["biases", "norm", "scales"])
def test_mlx_missing_tensors(mlx_dir, key, message):
    drop_tensor(mlx_dir, key)
    with pytest.raises(CheckpointError, match=message):
        qw.load_quantized_model(mlx_dir)


def test_mlx_wrong_architecture(mlx_dir):
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.down_proj.weight \(64, 32\) / .scales \(64, 2\) "
                                              r"do not fit the architecture's 96x128 Linear"):
        qw.load_quantized_model(mlx_dir, dict(hf_config(llama()), hidden_size=96))


def test_mlx_adapter_refuses_other_methods(mlx_dir):
    with pytest.raises(CheckpointError, match="is a 'mlx_int4' checkpoint; this adapter serves hqq"):
        HQQAdapter(qw.QuantizationConfig(method="hqq")).load_quantized_model(mlx_dir)
    assert isinstance(MLXAdapter().load_quantized_model(mlx_dir), LlamaForCausalLM)


# ------------------------------------------------------------------------------------------- HQQ
hqq_quantize = pytest.importorskip("hqq.core.quantize")
from hqq.models.hf.base import AutoHQQHFModel  # noqa: E402

HQQ_TAGS = {"self_attn.q_proj": dict(nbits=4, group_size=64), "self_attn.k_proj": dict(nbits=4, group_size=64),
            "self_attn.v_proj": dict(nbits=3, group_size=32), "self_attn.o_proj": dict(nbits=4, group_size=64),
            "mlp.gate_proj": None, "mlp.up_proj": dict(nbits=8, group_size=32),
            "mlp.down_proj": dict(nbits=2, group_size=32)}


class NotATensor:
    """Stands for any object a pickle may smuggle in."""

    def __reduce__(self):
        return (NotATensor, ())


@pytest.fixture(scope="module")
def hqq_checkpoint(tmp_path_factory):
    """A Llama quantized and saved by hqq's own model-level API (it runs on CPU)."""
    model = llama()
    config = {tag: None if q is None else hqq_quantize.BaseQuantizeConfig(**q) for tag, q in HQQ_TAGS.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=torch.float32, device="cpu")
    path = tmp_path_factory.mktemp("hqq") / "hqq-model"
    AutoHQQHFModel.save_quantized(model, str(path))
    return model, path


def test_hqq_save_quantized_directory(hqq_checkpoint, tmp_path):
    peer, path = hqq_checkpoint
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "qmodel.pt"]
    assert qw.detect_native_format(path) == "hqq"
    loaded = qw.load_quantized_model(path)
    # the same HQQLinear kernels on the same tensors: bit-identical to hqq's own model
    assert torch.equal(logits(loaded), logits(peer))
    HQQLinear = hqq_quantize.HQQLinear
    for i in range(2):
        for tag, q in HQQ_TAGS.items():
            name = f"model.layers.{i}.{tag}"
            module = loaded.get_submodule(name)
            if q is None:
                assert type(module) is nn.Linear
                assert torch.equal(module.weight, peer.get_submodule(name).weight)
                continue
            assert isinstance(module, HQQLinear)
            assert (module.meta["nbits"], module.meta["group_size"]) == (q["nbits"], q["group_size"]), name
            assert torch.equal(module.W_q, peer.get_submodule(name).W_q)
    config, plan = loaded.quantization_config, loaded.quantization_plan
    assert config.method is qw.QuantizationMethod.HQQ and (config.bits, config.group_size) == (4, 64)
    assert config.compute_dtype == torch.float32
    assert sorted(config.skip_modules) == ["lm_head", "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]
    assert config.for_layer("model.layers.1.mlp.down_proj").bits == 2
    assert plan["model.layers.0.self_attn.v_proj"].bits == 3 and plan["model.layers.0.mlp.up_proj"].group_size == 32
    assert len(plan.quantized) == 12 and plan["lm_head"].status == "skipped"
    adapter = HQQAdapter()
    for layer in plan.quantized:
        module = loaded.get_submodule(layer.name)
        stored = sum(t.numel() * t.element_size() for t in (module.W_q, module.meta["scale"], module.meta["zero"]))
        assert layer.bytes_after == adapter.module_nbytes(module) == stored, layer.name
    assert loaded.hqq_quantized is True
    roundtrip(loaded, tmp_path)


def test_hqq_weights_file_with_model_config(hqq_checkpoint):
    peer, path = hqq_checkpoint
    loaded = qw.load_hqq_checkpoint(path / "qmodel.pt", hf_config(llama()))
    assert torch.equal(logits(loaded), logits(peer))
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta, rotary tables real
        skeleton = LlamaForCausalLM(LlamaConfig(**CFG))
    assert torch.equal(logits(qw.load_quantized_model(path, skeleton)), logits(peer))
    with torch.device("meta"):  # buffers on meta too: computed as from_pretrained computes them
        all_meta = LlamaForCausalLM(LlamaConfig(**CFG))
    assert torch.equal(logits(qw.load_quantized_model(path, all_meta)), logits(peer))
    with torch.device("meta"):
        uncomputable = LlamaForCausalLM(LlamaConfig(**CFG))
    uncomputable.model._init_weights = lambda module: None  # a model that cannot rebuild its rotary tables
    with pytest.raises(CheckpointError, match=r"buffers \['model.rotary_emb.inv_freq'.* are on the meta device"):
        qw.load_quantized_model(path, uncomputable)


@pytest.mark.parametrize("nbits, group_size, axis, encoded", [(3, 32, 1, True), (4, 64, 0, False)],
                         ids=["3bit-encoded", "4bit-axis0-raw"])
def test_hqq_layer_state_file(tmp_path, nbits, group_size, axis, encoded):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    quant_config = hqq_quantize.BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=axis)
    peer = hqq_quantize.HQQLinear(linear, quant_config, compute_dtype=torch.float32, device="cpu")
    peer.encoded_state_dict = encoded
    torch.save(peer.state_dict(), tmp_path / "layer.pt")
    layer = qw.load_quantized_model(tmp_path / "layer.pt")
    assert isinstance(layer, hqq_quantize.HQQLinear)
    assert (layer.meta["nbits"], layer.meta["group_size"], layer.meta["axis"]) == (nbits, group_size, axis)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), peer(x))


def test_hqq_refuses_pickled_objects(hqq_checkpoint, tmp_path):
    _, good = hqq_checkpoint
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((good / "config.json").read_text())
    torch.save({"model.norm": {"weight": NotATensor()}}, bad / "qmodel.pt")
    with pytest.raises(CheckpointError, match=r"bad/qmodel.pt: refused to load.*NotATensor.*weights_only=True"):
        qw.load_quantized_model(bad)
    torch.save({"W_q": NotATensor()}, tmp_path / "layer.pt")
    with pytest.raises(CheckpointError, match=r"layer.pt: refused to load"):
        qw.load_hqq_checkpoint(tmp_path / "layer.pt")


def test_hqq_missing_layer_and_config(hqq_checkpoint, tmp_path):
    _, good = hqq_checkpoint
    weights = torch.load(good / "qmodel.pt", weights_only=True)
    del weights["model.layers.1.mlp.down_proj"]
    path = tmp_path / "partial"
    path.mkdir()
    torch.save(weights, path / "qmodel.pt")
    with pytest.raises(CheckpointError, match=r"no config.json beside qmodel.pt; pass model_config"):
        qw.load_quantized_model(path)
    (path / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"lacks tensors the architecture needs: "
                                              r"\['model.layers.1.mlp.down_proj.weight'\]"):
        qw.load_quantized_model(path)
    weights["model.layers.9.mlp.up_proj"] = weights["model.layers.0.mlp.up_proj"]
    torch.save(weights, path / "qmodel.pt")
    with pytest.raises(CheckpointError, match=r"names module 'model.layers.9.mlp.up_proj', which the architecture "
                                              r"does not have"):
        qw.load_quantized_model(path)


# ------------------------------------------------------------------------------------------- detection
def test_detection_leaves_other_paths_alone(tmp_path):
    model = llama()
    (tmp_path / "hf").mkdir()
    model.save_pretrained(tmp_path / "hf")  # a full-precision transformers checkpoint is neither
    assert qw.detect_native_format(tmp_path / "hf") is None
    with pytest.raises(CheckpointError, match="no quantization_config.json; .*accepted: .*mlx-lm directory"):
        qw.load_quantized_model(tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = qw.create_quantization_adapter("cpu", qw.QuantizationConfig(method="mlx_int4"), strict=True)
        adapter.quantize_model(model)
    ours = qw.save_quantized_model(model, tmp_path / "ours")  # has mlx-lm's entry too, but is ours
    single = qw.save_quantized_model(model, tmp_path / "ours.safetensors", single_file=True)
    assert qw.detect_native_format(ours) is None and qw.detect_native_format(single) is None
    assert torch.equal(logits(qw.load_quantized_model(ours)), logits(model))
