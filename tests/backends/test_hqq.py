"""HQQAdapter against the real hqq library on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

hqq_quantize = pytest.importorskip("hqq.core.quantize", reason="hqq is not installed")
HQQLinear, BaseQuantizeConfig = hqq_quantize.HQQLinear, hqq_quantize.BaseQuantizeConfig

from quantization_wrapper import QuantizationConfig, create_quantization_adapter  # noqa: E402
from quantization_wrapper.adapters.hqq import HQQAdapter, hqq_group_size_problem  # noqa: E402
from quantization_wrapper.recommend import bits_per_weight  # noqa: E402
from quantization_wrapper.validation import validate_quantization_config  # noqa: E402

BITS = (1, 2, 3, 4, 8)
GROUPS = (32, 64, 128)
SHAPES = ((64, 128), (96, 48), (100, 48), (256, 256))  # (in_features, out_features)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Relative output error vs. the fp32 layer, measured on nn.Linear's default (uniform) init over 3
# seeds, every shape/group/dtype below: worst 0.98 (1-bit), 0.33, 0.14, 0.067, 0.0065 (8-bit, bf16).
# 1-bit keeps little more than the sign pattern; its bound only says it is not broken further.
ERROR_BOUND = {1: 1.3, 2: 0.45, 3: 0.2, 4: 0.1, 8: 0.012}


def hqq_config(**kwargs) -> QuantizationConfig:
    return QuantizationConfig(method="hqq", **kwargs)


def adapter_for(config: QuantizationConfig) -> HQQAdapter:
    return HQQAdapter(config, "cpu")


def copy_linear(linear: nn.Linear, dtype: torch.dtype | None = None) -> nn.Linear:
    new = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None,
                    dtype=dtype or linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def direct_hqq(linear: nn.Linear, bits: int, group: int, dtype: torch.dtype, **kwargs) -> HQQLinear:
    """HQQLinear built the way hqq's README does, on a copy of ``linear``."""
    return HQQLinear(copy_linear(linear), BaseQuantizeConfig(nbits=bits, group_size=group, **kwargs),
                     compute_dtype=dtype, device="cpu")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def layer_tensors(module: HQQLinear) -> list[torch.Tensor]:
    return [module.W_q, module.bias, *(v for v in module.meta.values() if isinstance(v, torch.Tensor))]


# ---------------------------------------------------------------------- layer quantization
def check_layer(bits: int, group: int, shape: tuple[int, int], bias: bool, dtype: torch.dtype) -> None:
    """The adapter's layer equals HQQLinear built directly (bit for bit), its error vs. the fp32
    layer is within ERROR_BOUND, and the input layer is left untouched."""
    reference = nn.Linear(*shape, bias=bias)  # fp32 original
    linear = copy_linear(reference, dtype)
    before = [p.detach().clone() for p in linear.parameters()]
    config = hqq_config(bits=bits, group_size=group)
    adapter = adapter_for(config)
    fitted, _ = adapter.fit_group_size(*shape, config)
    assert fitted is not None and hqq_group_size_problem(*shape, fitted) is None

    q = adapter.quantize_linear(linear, config=fitted)
    direct = direct_hqq(linear, bits, fitted.group_size, dtype)
    x = torch.randn(5, shape[0])
    out = q(x.to(dtype))

    assert isinstance(q, HQQLinear)
    assert q.meta["nbits"] == bits and q.meta["group_size"] == fitted.group_size
    assert out.dtype == dtype and (q.bias is not None) == bias
    assert torch.equal(q.W_q, direct.W_q)
    assert torch.equal(out, direct(x.to(dtype)))
    assert rel_error(out, reference(x)) < ERROR_BOUND[bits]
    params = list(linear.parameters())
    assert len(params) == len(before) and all(torch.equal(a, b) for a, b in zip(before, params))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
@pytest.mark.parametrize("group", GROUPS, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_layer_matches_direct_hqq_per_shape_and_group(bits, group, shape):
    check_layer(bits, group, shape, bias=True, dtype=torch.float32)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_layer_matches_direct_hqq_per_dtype_and_bias(bits, bias, dtype_name):
    check_layer(bits, 64, (100, 48), bias=bias, dtype=DTYPES[dtype_name])


@pytest.mark.parametrize("shape,bits,group,expected", [
    ((100, 48), 4, 64, 32),    # 4800/64 = 75 groups, odd: 4-bit packs 2 group rows per byte row
    ((100, 48), 2, 64, 16),    # 2-bit needs groups % 4 == 0: 300 groups at 16
    ((100, 48), 1, 128, 8),    # 4800 % 128 != 0; 1-bit needs groups % 8 == 0: 600 groups at 8
    ((100, 48), 3, 64, 64),    # 3-bit pads to 10 per int32: any group dividing numel fits
    ((96, 48), 1, 128, 64),    # 36 groups at 128 (not % 8); 72 at 64 fits
    ((256, 256), 4, 128, 128),
], ids=["4bit-odd-groups", "2bit", "1bit-numel", "3bit-padded", "1bit-96", "fits"])
def test_fit_group_size_follows_hqq_packing(shape, bits, group, expected):
    config = hqq_config(bits=bits, group_size=group)
    fitted, reason = adapter_for(config).fit_group_size(*shape, config)
    assert fitted.group_size == expected
    assert (reason is None) == (expected == group)
    if reason:
        assert f"using group_size={expected}" in reason
        with pytest.raises(Exception):  # hqq itself fails on the unfitted group size (at forward at latest)
            direct_hqq(nn.Linear(*shape), bits, group, torch.float32)(torch.randn(1, shape[0]))


def test_fit_group_size_skips_when_nothing_fits():
    config = hqq_config(bits=4, group_size=64)
    fitted, reason = adapter_for(config).fit_group_size(100, 49, config)  # numel 4900 = 4 * 1225
    assert fitted is None and "full precision" in reason


def test_quantize_linear_rejects_unfitted_group_with_hint():
    adapter = adapter_for(hqq_config(bits=4, group_size=64))
    with pytest.raises(ValueError, match="fit_group_size"):
        adapter.quantize_linear(nn.Linear(100, 48))


def test_quantize_linear_rejects_non_float_layer_with_fix():
    adapter = adapter_for(hqq_config(bits=4, group_size=64))
    with pytest.raises(ValueError, match="compute_dtype"):
        adapter.quantize_linear(nn.Linear(64, 64).double())
    q = adapter_for(hqq_config(bits=4, group_size=64, compute_dtype="float32")).quantize_linear(
        nn.Linear(64, 64).double())
    assert q.compute_dtype is torch.float32


def test_explicit_compute_dtype_sets_scales_bias_and_output():
    adapter = adapter_for(hqq_config(bits=4, group_size=64, compute_dtype=torch.bfloat16))
    q = adapter.quantize_linear(nn.Linear(128, 64))
    assert q.meta["scale"].dtype == q.meta["zero"].dtype == q.bias.dtype == torch.bfloat16
    assert q(torch.randn(2, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------------- storage vs. theory
def expected_bits(bits: int, group: int, compute: torch.dtype, in_features: int, out_features: int) -> float:
    """hqq's real layout: packed W_q (3-bit: 10 per int32, group rows padded to a multiple of 10)
    plus one scale and one zero per group, both in the compute dtype."""
    numel = in_features * out_features
    groups = numel // group
    packed = 32 * math.ceil(groups / 10) * group / numel if bits == 3 else bits
    return packed + 2 * 8 * compute.itemsize / group


@pytest.mark.parametrize("bits,group,compute,theory", [
    (4, 64, torch.float16, 4.5),
    (4, 64, torch.bfloat16, 4.5),
    (8, 128, torch.float16, 8.25),
    (2, 16, torch.float16, 4.0),
    (3, 64, torch.float16, 3.2 + 0.5),
    (1, 32, torch.float16, 2.0),
    (4, 64, torch.float32, 5.0),  # fp32 scale and zero: 64 bits per group, not 32
], ids=["4bit-g64-fp16", "4bit-g64-bf16", "8bit-g128", "2bit-g16", "3bit-g64", "1bit-g32", "4bit-g64-fp32"])
def test_measured_storage_matches_theory(bits, group, compute, theory):
    in_features, out_features = 1024, 512
    config = hqq_config(bits=bits, group_size=group, compute_dtype=compute)
    adapter = adapter_for(config)
    q = adapter.quantize_linear(nn.Linear(in_features, out_features, bias=False))
    measured = 8 * adapter.module_nbytes(q) / (in_features * out_features)
    assert measured == pytest.approx(expected_bits(bits, group, compute, in_features, out_features), rel=1e-12)
    assert measured == pytest.approx(theory, rel=0.01)
    if compute.itemsize == 2:  # recommend.bits_per_weight assumes 16-bit scale and zero
        assert measured == pytest.approx(bits_per_weight(config, in_features), rel=0.01)


def test_module_nbytes_counts_meta_dict_and_bias():
    adapter = adapter_for(hqq_config(bits=4, group_size=64, compute_dtype=torch.float16))
    q = adapter.quantize_linear(nn.Linear(128, 64))
    # 8192 weights: 4096 packed bytes + 128 groups x (2 + 2) bytes + 64 x 2 bias bytes
    assert adapter.module_nbytes(q) == 4096 + 128 * 4 + 64 * 2
    assert sum(p.numel() * p.element_size() for p in q.parameters()) == 4096  # only W_q is a parameter


# ---------------------------------------------------------------------- dequantize
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_dequantize_module_reproduces_layer_output(bits, dtype_name):
    dtype = DTYPES[dtype_name]
    adapter = adapter_for(hqq_config(bits=bits, group_size=32))
    q = adapter.quantize_linear(nn.Linear(96, 48).to(dtype))
    linear = adapter.dequantize_module(q)
    assert type(linear) is nn.Linear and linear.weight.dtype == dtype and linear.bias is not None
    assert torch.equal(linear.weight, q.dequantize())
    assert torch.equal(linear.bias, q.bias)
    x = torch.randn(4, 96, dtype=dtype)
    out, ref = linear(x), q(x)
    # Same weights; nn.Linear fuses the bias add (addmm), HQQLinear adds it after the matmul.
    eps = torch.finfo(dtype).eps
    assert (out - ref).abs().max().item() <= 4 * eps * ref.abs().max().item()


# ---------------------------------------------------------------------- empty layers and state
@pytest.mark.parametrize("bits,group,storage,options", [
    (4, 64, None, {}),
    (3, 32, None, {}),
    (2, 16, torch.bfloat16, {}),
    (1, 32, None, {"axis": 0}),
    (8, 128, torch.float32, {"optimize": False}),
    (3, 64, torch.float16, {"axis": 0}),
], ids=["4bit", "3bit", "2bit-bf16-storage", "1bit-axis0", "8bit-fp32-storage", "3bit-axis0-fp16-storage"])
def test_meta_skeleton_then_load_state_is_bit_identical(tmp_path, bits, group, storage, options):
    from safetensors.torch import load_file, save_file

    config = hqq_config(bits=bits, group_size=group, storage_dtype=storage, backend_options=options)
    adapter = adapter_for(config)
    q = adapter.quantize_linear(nn.Linear(256, 128), config=config)
    state = adapter.layer_state_dict(q)
    assert state and all(type(v) is torch.Tensor for v in state.values())
    save_file(state, tmp_path / "layer.safetensors")  # safetensors accepts it as is

    empty = adapter.create_quantized_linear(256, 128, True, config=config, device="meta", dtype=torch.float32)
    assert isinstance(empty, HQQLinear)
    assert all(t.device.type == "meta" for t in layer_tensors(empty))  # nothing allocated
    assert adapter.module_nbytes(empty) == adapter.module_nbytes(q)  # the plan's bytes hold already
    assert {k: (v.shape, v.dtype) for k, v in _skeleton_state(empty).items()} == \
        {k: (v.shape, v.dtype) for k, v in state.items()}

    loaded = adapter.load_layer_state(empty, load_file(tmp_path / "layer.safetensors"))
    x = torch.randn(3, 256)
    assert loaded.W_q.device.type == "cpu" and loaded.W_q.dtype == q.W_q.dtype
    assert torch.equal(loaded(x), q(x))
    assert torch.equal(loaded.dequantize(), q.dequantize())


def _skeleton_state(module: HQQLinear) -> dict[str, torch.Tensor]:
    # state_dict() of a meta layer: the same keys, meta tensors.
    module.encoded_state_dict = True
    return {k: v for k, v in module.state_dict().items()}


def test_load_layer_state_without_copy_and_with_hqq_keys():
    adapter = adapter_for(hqq_config(bits=4, group_size=64))
    q = adapter.quantize_linear(nn.Linear(128, 64))
    state = adapter.layer_state_dict(q)
    # The keys hqq (and transformers' HQQ integration) save.
    assert {"W_q", "scale", "zero", "nbits", "group_size", "shape", "axis", "packing", "compute_dtype",
            "bias", "encoded_state_dict"} <= set(state)
    loaded = adapter.load_layer_state(adapter.create_quantized_linear(128, 64, config=adapter.config,
                                                                      device="meta"), dict(state))
    assert loaded.W_q.data_ptr() == state["W_q"].data_ptr()
    assert loaded.meta["scale"].data_ptr() == state["scale"].data_ptr()


def test_load_layer_state_rejects_mismatched_config():
    adapter = adapter_for(hqq_config(bits=4, group_size=64))
    state = adapter.layer_state_dict(adapter.quantize_linear(nn.Linear(128, 64)))
    other = hqq_config(bits=2, group_size=64)
    with pytest.raises(ValueError, match="nbits=4.*nbits=2"):
        adapter.load_layer_state(adapter.create_quantized_linear(128, 64, config=other, device="meta"), dict(state))
    with pytest.raises(ValueError, match="bias"):
        adapter.load_layer_state(adapter.create_quantized_linear(128, 64, False, config=adapter.config,
                                                                 device="meta"), dict(state))
    with pytest.raises(ValueError, match="missing"):
        adapter.load_layer_state(adapter.create_quantized_linear(128, 64, config=adapter.config,
                                                                 device="meta"),
                                 {k: v for k, v in state.items() if k != "zero"})


def test_load_layer_state_never_evals_dtype_strings():
    adapter = adapter_for(hqq_config(bits=4, group_size=64))
    state = adapter.layer_state_dict(adapter.quantize_linear(nn.Linear(128, 64)))
    state["compute_dtype"] = torch.tensor(list(b"__import__('os')"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="compute_dtype"):
        adapter.load_layer_state(adapter.create_quantized_linear(128, 64, config=adapter.config,
                                                                 device="meta"), state)


# ---------------------------------------------------------------------- storage_dtype (view_as_float)
@pytest.mark.parametrize("bits,storage,compute", [
    (4, torch.bfloat16, torch.bfloat16),  # hqq's own view_as_float path
    (4, torch.bfloat16, torch.float32),   # view chosen by the adapter
    (2, torch.float32, torch.bfloat16),
    (3, torch.float16, torch.float32),    # int32-packed 3-bit
    (3, torch.uint8, torch.float32),
    (8, torch.int8, torch.float32),
], ids=["4bit-bf16-in-bf16", "4bit-bf16-in-fp32", "2bit-fp32-in-bf16", "3bit-fp16", "3bit-uint8", "8bit-int8"])
def test_storage_dtype_views_packed_weights(bits, storage, compute):
    linear = nn.Linear(128, 64)
    native = adapter_for(hqq_config(bits=bits, group_size=32, compute_dtype=compute)).quantize_linear(linear)
    viewed = adapter_for(hqq_config(bits=bits, group_size=32, compute_dtype=compute,
                                    storage_dtype=storage)).quantize_linear(linear)
    assert viewed.W_q.dtype == storage
    assert [p.dtype for p in viewed.parameters()] == [storage]
    assert viewed.meta["view_as_float"] is (storage != native.W_q.dtype)
    assert torch.equal(viewed.W_q.view(native.W_q.dtype), native.W_q)  # same bits
    x = torch.randn(3, 128, dtype=compute)
    assert torch.equal(viewed(x), native(x))
    if storage == compute:  # identical to hqq's own view_as_float=True
        direct = direct_hqq(linear, bits, 32, compute, view_as_float=True)
        assert direct.W_q.dtype == storage  # compare bits: a float view may hold NaN patterns
        assert torch.equal(direct.W_q.view(torch.uint8), viewed.W_q.view(torch.uint8))


def test_storage_dtype_bf16_with_fp32_compute_is_flagged():
    issues = validate_quantization_config(hqq_config(bits=4, storage_dtype="bfloat16", compute_dtype="float32"), "cpu")
    assert [i.field for i in issues] == ["storage_dtype"] and not issues[0].is_error
    assert validate_quantization_config(hqq_config(bits=4, storage_dtype="bfloat16", compute_dtype="bfloat16"),
                                        "cpu") == []


# ---------------------------------------------------------------------- backend_options
def test_backend_options_change_what_is_stored():
    linear = nn.Linear(128, 64)
    base = adapter_for(hqq_config(bits=2, group_size=32)).quantize_linear(linear)
    axis0 = adapter_for(hqq_config(bits=2, group_size=32, backend_options={"axis": 0})).quantize_linear(linear)
    assert base.meta["scale"].shape == (256, 1) and axis0.meta["scale"].shape == (1, 256)
    plain = hqq_config(bits=2, group_size=32, backend_options={"optimize": False, "round_zero": False})
    rounded = hqq_config(bits=2, group_size=32, backend_options={"optimize": False, "round_zero": True})
    z_plain = adapter_for(plain).quantize_linear(linear).meta["zero"]
    z_rounded = adapter_for(rounded).quantize_linear(linear).meta["zero"]
    assert torch.equal(z_rounded, z_rounded.round()) and not torch.equal(z_plain, z_plain.round())
    assert not torch.equal(z_plain, base.meta["zero"])  # optimize=False skips hqq's solver


@pytest.mark.parametrize("options,match", [
    ({"axsi": 1}, "unknown key 'axsi'.*accepted: axis, optimize, round_zero"),
    ({"quant_scale": True}, "ignores quantized scales"),
    ({"offload_meta": True}, "offload"),
    ({"view_as_float": True}, "storage_dtype"),
    ({"axis": 2}, "allowed: 0, 1"),
    ({"optimize": "yes"}, "must be a bool"),
], ids=["typo", "quant_scale", "offload_meta", "view_as_float", "axis", "type"])
def test_bad_backend_options_raise_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        HQQAdapter(hqq_config(backend_options=options), "cpu")
    with pytest.raises(ValueError, match=match):
        create_quantization_adapter("cpu", hqq_config(backend_options=options))
    with pytest.raises(ValueError, match=r"layer_configs\['mlp'\]"):
        HQQAdapter(hqq_config(layer_configs={"mlp": {"backend_options": options}}), "cpu")


# ---------------------------------------------------------------------- whole models
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128)


@pytest.fixture
def llama():
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 16))
    with torch.no_grad():
        logits = model(ids).logits
    return model, ids, logits


def linear_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, HQQLinear)))


def test_quantize_llama_4bit(llama):
    model, ids, ref = llama
    names = linear_names(model)
    adapter = create_quantization_adapter("cpu", hqq_config(bits=4, group_size=32))
    assert isinstance(adapter, HQQAdapter)
    model = adapter.quantize_model(model)
    modules = dict(model.named_modules())
    assert [n for n in names if not isinstance(modules[n], HQQLinear)] == ["lm_head"]
    assert type(modules["lm_head"]) is nn.Linear
    plan = model.quantization_plan
    for layer in plan.quantized:
        assert layer.bytes_after == adapter.module_nbytes(modules[layer.name])
        assert modules[layer.name].meta["nbits"] == 4 and layer.bits == 4 and layer.group_size == 32
    # fp32 compute: 4 bits + 2 x 32 bits per group of 32 = 6 bits/weight
    assert plan.bits_per_weight == pytest.approx(6.0)
    assert model.quantization_method == "hqq" and model.hqq_quantized is True
    with torch.no_grad():
        out = model(ids).logits
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert cos.min().item() > 0.97  # measured 0.990 worst token


def test_quantize_llama_per_layer_bits(llama):
    model, ids, ref = llama
    config = hqq_config(bits=4, group_size=32, layer_configs={"model.layers.0": {"bits": 8},
                                                             "model.layers.1": {"bits": 2, "group_size": 16}})
    model = create_quantization_adapter("cpu", config).quantize_model(model)
    plan = model.quantization_plan
    modules = dict(model.named_modules())
    expected = {"model.layers.0": (8, 32), "model.layers.1": (2, 16)}
    assert len(plan.quantized) == 14
    for layer in plan.quantized:
        bits, group = expected[layer.name[:len("model.layers.0")]]
        module = modules[layer.name]
        assert (layer.bits, layer.group_size) == (bits, group)
        assert (module.meta["nbits"], module.meta["group_size"]) == (bits, group)
        assert layer.bytes_after == HQQAdapter(config, "cpu").module_nbytes(module)
    with torch.no_grad():
        out = model(ids).logits
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert cos.min().item() > 0.9  # measured 0.961 worst token, 0.979 overall (2-bit layer dominates)


def test_meta_llama_skeleton_has_the_plan_bytes_of_the_real_one(llama):
    transformers = pytest.importorskip("transformers")
    model, _, _ = llama
    config = hqq_config(bits=4, group_size=32, layer_configs={"model.layers.1": {"bits": 3}})
    real = create_quantization_adapter("cpu", config).quantize_model(model).quantization_plan
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    meta = create_quantization_adapter("cpu", config).quantize_model(skeleton).quantization_plan
    assert [(l.name, l.bits, l.bytes_after) for l in meta.layers] == \
        [(l.name, l.bits, l.bytes_after) for l in real.layers]
    assert all(p.device.type == "meta" for p in skeleton.parameters())


def test_peft_wraps_hqq_layers_and_lora_trains(tiny_model):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.hqq import HqqLoraLinear

    adapter = create_quantization_adapter("cpu", hqq_config(bits=4, group_size=32))
    model = adapter.prepare_model_for_training(adapter.quantize_model(tiny_model))
    frozen = {n: m.W_q.detach().clone() for n, m in model.named_modules() if isinstance(m, HQQLinear)}
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj", "down_proj"],
                                                       lora_dropout=0.0))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, HqqLoraLinear)]
    assert len(wrapped) == 6
    ids = torch.randint(0, 50, (4, 8))
    target = torch.randint(0, 50, (4, 8))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    after = {n.removeprefix("base_model.model.").replace(".base_layer", ""): m.W_q
             for n, m in model.named_modules() if isinstance(m, HQQLinear)}
    assert after.keys() == frozen.keys() and all(torch.equal(after[n], frozen[n]) for n in frozen)


def test_input_dtype_other_than_compute_dtype():
    """An fp32 model quantized with compute_dtype=bfloat16: the layer computes in bf16 and returns
    fp32, instead of hqq's own dtype-mismatch error."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    adapter = HQQAdapter(QuantizationConfig(method="hqq", bits=4, group_size=64, compute_dtype=torch.bfloat16), "cpu")
    layer = adapter.quantize_linear(linear)
    x = torch.randn(3, 128)
    with torch.no_grad():
        out = layer(x)
        same = layer(x.to(torch.bfloat16))
    assert out.dtype is torch.float32 and same.dtype is torch.bfloat16
    assert torch.equal(out, same.float())
    rel = ((out - linear(x)).norm() / linear(x).norm()).item()
    assert rel < 0.1
