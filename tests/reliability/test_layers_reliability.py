"""Reliability promises of quantized layers, for every method, against the real libraries on CPU:
non-finite weights are refused before anything is converted, a quantized model is not quantized
again, a save/load round trip restores every parameter and output bit for bit, and a checkpoint
whose layer tensors do not match their format is refused naming the tensor."""

from __future__ import annotations

import re
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import quantization_wrapper as qw
from conftest import TinyModel
from quantization_wrapper import (
    QuantizationConfig,
    create_quantization_adapter,
    get_adapter_class,
    get_quantization_plan,
    load_quantized_model,
    save_quantized_model,
)
from quantization_wrapper.adapters.base import leaf_tensors
from quantization_wrapper.errors import CheckpointError
from quantization_wrapper.surgery import LayerDecision, convert_layer

METHODS = {
    "bnb_nf4": dict(method="bnb_nf4"),
    "bnb_int8": dict(method="bnb_int8"),
    "hqq": dict(method="hqq", group_size=32),
    "quanto_int4": dict(method="quanto_int4"),
    "mlx_int4": dict(method="mlx_int4", group_size=32),
}
ROUND_TRIPS = {**METHODS, "bnb_nf4+mlx_int4": dict(method="bnb_nf4",
                                                  layer_configs={"layers.0.attn.q_proj": {"method": "mlx_int4"}})}
LAYER = "layers.0.attn.q_proj"  # 64x64 with a bias
#: Per method, a tensor of LAYER to tamper with and a dtype it must not have.
TAMPERED = {
    "bnb_nf4": ("weight.nested_absmax", torch.float16),  # bitsandbytes then gives NaN outputs
    "bnb_int8": ("SCB", torch.float16),
    "hqq": ("scale", torch.float16),
    "quanto_int4": ("weight._scale", torch.float16),
    "mlx_int4": ("scales", torch.float16),
}


def adapter(fields: dict):
    config = QuantizationConfig(**fields)
    for method in {config.method} | {QuantizationConfig(**{**fields, **o}).method for o in config.layer_configs.values()}:
        pytest.importorskip(get_adapter_class(method).library_module)
    return create_quantization_adapter("cpu", config, strict=True)


def quantized(fields: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = TinyModel().to(dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter(fields).quantize_model(model)
    return model


def plain(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a (possibly quanto-subclassed) parameter holds."""
    return [leaf.detach().as_subclass(torch.Tensor) for leaf in leaf_tensors(t)]


# ---------------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["weight_inf", "bias_nan"])
def test_non_finite_weights_are_refused_before_any_layer_is_converted(method, where):
    model = TinyModel()
    bad = model.layers[1].mlp["down_proj"]  # 64x128, among the last layers the walker reaches
    with torch.no_grad():
        if where == "weight_inf":
            bad.weight[3, 5] = float("inf")
        else:
            bad.bias[2] = float("nan")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    what = ("1 of 8192 weight values are non-finite (1 inf, 0 nan)" if where == "weight_inf"
            else "1 of 64 bias values are non-finite (0 inf, 1 nan)")
    with pytest.raises(ValueError) as caught:
        adapter(METHODS[method]).quantize_model(model)
    message = str(caught.value)
    assert f"layers.1.mlp.down_proj: {what}" in message
    assert "adding ['layers.1.mlp.down_proj'] to skip_modules; nothing was converted" in message
    assert dict(model.named_modules()) == modules
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0, equal_nan=True)
    assert get_quantization_plan(model) is None


@pytest.mark.parametrize("method", METHODS)
def test_streaming_conversion_refuses_non_finite_weights(method):
    """load_and_quantize converts layer by layer through convert_layer: the check is there too."""
    ad = adapter(METHODS[method])
    linear = nn.Linear(64, 64)
    with torch.no_grad():
        linear.weight[0, :3] = float("-inf")
    config, _ = ad.fit_group_size(64, 64, ad.config)
    with pytest.raises(ValueError, match=re.escape("blk.q: 3 of 4096 weight values are non-finite (3 inf, 0 nan)")):
        convert_layer(ad, LayerDecision("blk.q", linear, config, None))


# ---------------------------------------------------------------------- quantizing twice
@pytest.mark.parametrize("first, second, held", [
    ("bnb_nf4", "hqq", "8 quantized layers (8 Linear4bit) and a quantization_plan of method 'bnb_nf4'"),
    ("hqq", "hqq", "8 quantized layers (8 HQQLinear) and a quantization_plan of method 'hqq'"),
], ids=["bnb_then_hqq", "hqq_then_hqq"])
def test_quantizing_a_quantized_model_is_refused(first, second, held):
    model = quantized(METHODS[first])
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match=re.escape(f"already quantized: it holds {held} (8 layers converted)")) as caught:
        adapter(METHODS[second]).quantize_model(model)
    assert f"again with {second}" in str(caught.value) and "full-precision model" in str(caught.value)
    assert dict(model.named_modules()) == modules
    assert model.quantization_plan.method == first


def test_a_model_carrying_a_plan_is_refused_even_without_quantized_layers():
    model = TinyModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        create_quantization_adapter("cpu", QuantizationConfig(method="none")).quantize_model(model)
    with pytest.raises(ValueError, match=r"already quantized: it holds a quantization_plan of method 'none' \(8 layers"):
        adapter(METHODS["hqq"]).quantize_model(model)


# ---------------------------------------------------------------------- save/load round trip
@pytest.mark.parametrize("name", ROUND_TRIPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_restores_every_parameter_and_output_exactly(name, dtype, tmp_path):
    """Loaded into a float32 skeleton (TinyModel()): the checkpoint, not the skeleton, sets dtypes."""
    model = quantized(ROUND_TRIPS[name], dtype)
    x = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        reference = model(x)
    save_quantized_model(model, tmp_path / "ckpt")
    loaded = load_quantized_model(tmp_path / "ckpt", model_config=TinyModel)

    before = dict(model.named_parameters())
    after = dict(loaded.named_parameters())
    assert after.keys() == before.keys()
    for key, p in before.items():
        q = after[key]
        assert (q.dtype, q.shape, q.requires_grad) == (p.dtype, p.shape, p.requires_grad), key
        assert all(torch.equal(a, b) for a, b in zip(plain(p), plain(q), strict=True)), key
    before_buffers, after_buffers = dict(model.named_buffers()), dict(loaded.named_buffers())
    assert after_buffers.keys() == before_buffers.keys()
    assert all(b.dtype == after_buffers[k].dtype and torch.equal(b, after_buffers[k]) for k, b in before_buffers.items())
    if "+" in name:  # the layer layer_configs switched to another library
        assert type(loaded.get_submodule(LAYER)).__name__ == "MLXQuantizedLinear"
        assert sum(type(m).__name__ == "Linear4bit" for m in loaded.modules()) == 7
    with torch.no_grad():
        assert torch.equal(loaded(x), reference)


# ---------------------------------------------------------------------- tampered checkpoints
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One checkpoint per method, saved once for the module."""
    paths = {}

    def get(method: str):
        if method not in paths:
            paths[method] = tmp_path_factory.mktemp(method) / "ckpt"
            save_quantized_model(quantized(METHODS[method]), paths[method])
        return paths[method]

    return get


def rewrite(path, edit) -> None:
    """Rewrite ``model.safetensors`` in ``path`` with ``edit(tensors)`` applied (metadata kept)."""
    file = path / "model.safetensors"
    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    edit(tensors)
    save_file(tensors, file, metadata=metadata)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("edit", ["dtype", "shape", "unknown_key"])
def test_a_layer_tensor_that_does_not_match_its_format_is_refused(method, edit, saved, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(saved(method), path)
    key, dtype = TAMPERED[method]
    name = f"{LAYER}.{key}"
    with safe_open(path / "model.safetensors", "pt") as f:
        original = f.get_tensor(name)

    def tamper(tensors):
        if edit == "dtype":
            tensors[name] = original.to(dtype)
        elif edit == "shape":
            tensors[name] = torch.cat([original, original[:1]])
        else:
            tensors[f"{LAYER}.extra"] = torch.zeros(3)

    rewrite(path, tamper)
    with pytest.raises(CheckpointError) as caught:
        load_quantized_model(path, model_config=TinyModel, verify=False)  # checksums would catch it first
    message = str(caught.value)
    shape = tuple(original.shape)
    if edit == "dtype":
        assert f"{key!r} is float16" in message and f"expected {str(original.dtype)[6:]}" in message
    elif edit == "shape":
        grown = (shape[0] + 1, *shape[1:])
        assert f"{key!r} is {str(original.dtype)[6:]} {grown}, expected {str(original.dtype)[6:]} {shape}" in message
    else:
        assert "unknown keys ['extra']" in message


@pytest.mark.parametrize("method", METHODS)
def test_an_untouched_checkpoint_rewritten_the_same_way_still_loads_exactly(method, saved, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(saved(method), path)
    rewrite(path, lambda tensors: None)
    loaded = load_quantized_model(path, model_config=TinyModel, verify=False)
    reference = load_quantized_model(saved(method), model_config=TinyModel)
    x = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


@pytest.mark.parametrize("method", ["bnb_nf4", "bnb_int8", "hqq", "quanto_int4", "mlx_int4", "none"])
def test_streamed_model_equals_quantize_model_flags_included(method, tmp_path):
    """load_and_quantize gives what from_pretrained + quantize_model give: outputs and the
    requires_grad of every parameter (biases, the fallback's float weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    qconfig = qw.QuantizationConfig(method=method, **({"bits": 4, "group_size": 32} if method == "hqq" else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamed = qw.load_and_quantize(tmp_path / "hf", qconfig, backend="cpu", progress=False)
        direct = qw.create_quantization_adapter("cpu", qconfig).quantize_model(
            LlamaForCausalLM.from_pretrained(tmp_path / "hf"))
    flags = lambda m: {n: p.requires_grad for n, p in m.named_parameters()}  # noqa: E731
    assert flags(streamed) == flags(direct)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, direct(ids).logits)
