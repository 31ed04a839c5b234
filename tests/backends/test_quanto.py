"""QuantoAdapter against the real optimum-quanto 0.2.7 on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

quanto = pytest.importorskip("optimum.quanto")

from quantization_wrapper import QuantizationConfig, create_quantization_adapter  # noqa: E402
from quantization_wrapper.adapters.quanto import QuantoAdapter, quanto_group_size  # noqa: E402
from quantization_wrapper.filters import ExcludeModuleByName  # noqa: E402
from quantization_wrapper.recommend import bits_per_weight  # noqa: E402
from quantization_wrapper.validation import validate_quantization_config  # noqa: E402

METHODS = ["quanto_int2", "quanto_int4", "quanto_int8", "quanto_fp8"]
QTYPE = {"quanto_int2": "qint2", "quanto_int4": "qint4", "quanto_int8": "qint8", "quanto_fp8": "qfloat8_e4m3fn"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHAPES = {"128to64": (128, 64), "256to256": (256, 256), "100to48": (100, 48)}
# Relative output error vs. the float32 layer (nn.Linear default init, 8 random inputs). Measured
# over the cases below: int2 0.29-0.36, int4 0.057-0.073, int8 0.0034-0.0062, fp8 0.021-0.030.
ERROR_BOUND = {"quanto_int2": 0.42, "quanto_int4": 0.09, "quanto_int8": 0.009, "quanto_fp8": 0.04}
# Output difference of the dequantized nn.Linear vs. the quantized layer: float rounding of the dtype.
ROUNDING = {torch.float32: 1e-6, torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2}


def adapter(method: str, **kwargs) -> QuantoAdapter:
    return QuantoAdapter(QuantizationConfig(method=method, **kwargs), "cpu")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def linear(in_features: int, out_features: int, bias: bool = True, dtype=torch.float32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def quanto_reference(layer: nn.Linear, method: str) -> nn.Module:
    """quanto's own route on a copy: quantize(model, weights=...) + freeze(model)."""
    model = nn.Sequential(copy.deepcopy(layer))
    quanto.quantize(model, weights=QTYPE[method])
    quanto.freeze(model)
    return model[0]


def int8pack_broken(method: str, dtype: torch.dtype, in_features: int) -> bool:
    """quanto 0.2.7 sends these to torch._weight_int8pack_mm, wrong on torch 2.13 CPU (garbage or
    a crash) unless in_features % 16 == 0; the adapter takes quanto's generic matmul instead."""
    return method == "quanto_int8" and dtype == torch.bfloat16 and in_features % 4 == 0 and in_features % 16


def leaves(t: torch.Tensor) -> list[torch.Tensor]:
    if not hasattr(type(t), "__tensor_flatten__"):
        return [t]
    return [leaf for name in t.__tensor_flatten__()[0] for leaf in leaves(getattr(t, name))]


# ---------------------------------------------------------------------- one layer
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=list(SHAPES))
@pytest.mark.parametrize("method", METHODS)
def test_layer_equals_quanto_quantize_and_freeze(method, shape, bias, dtype):
    in_features, out_features = shape
    layer = linear(in_features, out_features, bias, dtype)
    before = copy.deepcopy(layer)
    x = torch.randn(8, in_features, dtype=dtype)

    q = adapter(method).quantize_linear(layer)

    assert isinstance(q, quanto.QLinear) and q.frozen
    assert isinstance(q.weight, quanto.QTensor) and q.weight.qtype.name == QTYPE[method]
    assert torch.equal(layer.weight, before.weight) and type(layer.weight) is nn.Parameter  # input untouched
    if bias:
        assert torch.equal(q.bias, layer.bias) and q.bias.data_ptr() != layer.bias.data_ptr()
    else:
        assert q.bias is None
    ref = quanto_reference(before, method)
    assert type(q.weight) is type(ref.weight) and q.weight.equal(ref.weight)
    with torch.no_grad():
        y = q(x)
        if int8pack_broken(method, dtype, in_features):
            w = ref.weight  # quanto's own weight, through quanto's generic CPU matmul
            expected = quanto.library.qbytes_mm.qbytes_mm(x, w._data, w._scale)
            expected = expected + ref.bias if bias else expected
        else:
            expected = ref(x)
        fp32 = before.float()(x.float())
    assert y.dtype == dtype
    assert torch.equal(y, expected)
    assert rel_err(y, fp32) < ERROR_BOUND[method]


def test_bf16_int4_rows_not_multiple_of_16():
    """quanto 0.2.7 packs CPU bf16 int4 for tinygemm, which needs out_features % 16 == 0: quanto's
    own freeze raises; the adapter keeps quanto's kernel-agnostic weight, exact and reloadable."""
    layer = linear(256, 30, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="dividable by 16"):
        quanto_reference(layer, "quanto_int4")
    a = adapter("quanto_int4")
    q = a.quantize_linear(layer)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        y = q(x)
        w = q.weight
        assert type(w) is quanto.WeightQBitsTensor and w._group_size == 128
        assert torch.equal(y, torch.matmul(x, w.dequantize().t()) + layer.bias)  # quanto's generic path
        assert rel_err(y, layer.float()(x.float())) < ERROR_BOUND["quanto_int4"]
        empty = a.create_quantized_linear(256, 30, True, device="meta", dtype=torch.bfloat16)
        loaded = a.load_layer_state(empty, a.layer_state_dict(q))
        assert torch.equal(loaded(x), y)


@pytest.mark.parametrize("in_features", [16, 64, 100, 128, 129, 160, 192, 200, 224, 256, 384, 1000, 4128])
@pytest.mark.parametrize("method", ["quanto_int2", "quanto_int4"])
def test_group_size_is_what_quanto_uses(method, in_features):
    a = adapter(method)
    fitted, reason = a.fit_group_size(in_features, 32, a.config)
    q = a.quantize_linear(linear(in_features, 32))
    truth = q.weight_group_size if q.weight_group_size is not None else in_features
    assert fitted.group_size == truth == (quanto_group_size(in_features, method) or in_features)
    assert (reason is None) == (truth == 128)
    if q.weight_group_size is None:  # per row: one group of in_features (128 is the same as 128)
        assert in_features == 128 or "per output row" in reason
        assert q.weight._scale.numel() == 32
    else:
        assert q.weight._scale.numel() == 32 * in_features // truth


def test_group_size_requests_quanto_cannot_honour_are_reported():
    a = adapter("quanto_int4", group_size=64)
    fitted, reason = a.fit_group_size(512, 64, a.config)
    assert fitted.group_size == 128 and "group_size=64 cannot be honoured" in reason
    a8 = adapter("quanto_int8", group_size=128)
    fitted, reason = a8.fit_group_size(512, 64, a8.config)
    assert fitted.group_size is None and "one scale per output row" in reason
    assert adapter("quanto_fp8").fit_group_size(100, 48, adapter("quanto_fp8").config) == (
        adapter("quanto_fp8").config, None)


def test_compute_dtype_casts_first():
    layer = linear(256, 64)
    q = adapter("quanto_int4", compute_dtype="bfloat16").quantize_linear(layer)
    assert layer.weight.dtype == torch.float32
    ref = quanto_reference(copy.deepcopy(layer).to(torch.bfloat16), "quanto_int4")
    assert q.weight.dtype == q.bias.dtype == torch.bfloat16 and q.weight.equal(ref.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_deepcopy_keeps_quantized_weights(method, dtype):
    """quanto's own tensors cannot be deep-copied (clone() dequantizes); QuantoLinear copies them."""
    a = adapter(method)
    q = a.quantize_linear(linear(256, 64, dtype=dtype))
    c = copy.deepcopy(nn.Sequential(q))[0]
    assert type(c) is type(q) and type(c.weight) is type(q.weight) and a.module_nbytes(c) == a.module_nbytes(q)
    assert all(x.data_ptr() != y.data_ptr() for x, y in zip(leaves(c.weight), leaves(q.weight)))
    x = torch.randn(3, 256, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(c(x), q(x))


# ---------------------------------------------------------------------- storage
def theory_bits(method: str, dtype: torch.dtype, in_features: int) -> float:
    """Stored bits per weight: packed data + scale (+ shift) in the compute dtype."""
    s = torch.finfo(dtype).bits
    if method in ("quanto_int2", "quanto_int4"):
        return {"quanto_int2": 2, "quanto_int4": 4}[method] + 2 * s / 128
    return 8 + s / in_features


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))
@pytest.mark.parametrize("method", METHODS)
def test_measured_bytes_match_theory(method, dtype):
    n = 1024
    a = adapter(method)
    q = a.quantize_linear(linear(n, n, bias=False, dtype=dtype))
    measured = a.module_nbytes(q)
    inner = [t for t in leaves(q.weight)]
    assert measured == sum(t.untyped_storage().nbytes() for t in inner) + 2 * dtype.itemsize  # + in/out scales
    bits = 8 * measured / (n * n)
    assert bits == pytest.approx(theory_bits(method, dtype, n), rel=0.01)
    if dtype != torch.float32:  # recommend.bits_per_weight assumes 16-bit scales
        assert bits == pytest.approx(bits_per_weight(a.config, in_features=n), rel=0.01)
    assert 8 * tensor_bytes(a.layer_state_dict(q)) / (n * n) == pytest.approx(bits, rel=0.01)


def tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ---------------------------------------------------------------------- dequantize
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))
@pytest.mark.parametrize("method", METHODS)
def test_dequantize_module_reproduces_output(method, dtype):
    a = adapter(method)
    layer = linear(256, 256, dtype=dtype)
    q = a.quantize_linear(layer)
    deq = a.dequantize_module(q)
    assert type(deq) is nn.Linear and deq.weight.dtype == dtype
    assert torch.equal(deq.bias, layer.bias)
    x = torch.randn(8, 256, dtype=dtype)
    with torch.no_grad():
        assert rel_err(deq(x), q(x)) <= ROUNDING[dtype]


# ---------------------------------------------------------------------- empty layers and state
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES.values(), ids=list(SHAPES))
@pytest.mark.parametrize("method", METHODS)
def test_meta_layer_plus_state_is_bit_identical(method, shape, dtype):
    in_features, out_features = shape
    a = adapter(method)
    q = a.quantize_linear(linear(in_features, out_features, dtype=dtype))
    state = a.layer_state_dict(q)
    assert all(type(t) is torch.Tensor and t.is_contiguous() for t in state.values())

    empty = a.create_quantized_linear(in_features, out_features, True, device="meta", dtype=dtype)
    tensors = [leaf for t in list(empty.parameters()) + list(empty.buffers()) for leaf in leaves(t)]
    assert all(t.device.type == "meta" for t in tensors)  # nothing allocated
    assert a.module_nbytes(empty) == a.module_nbytes(q)  # the plan of a meta skeleton is true
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in state.items()}

    loaded = a.load_layer_state(empty, state)
    assert type(loaded.weight) is type(q.weight) and not loaded.weight.requires_grad
    assert all(t.device.type == "cpu" for t in leaves(loaded.weight))
    x = torch.randn(8, in_features, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))
@pytest.mark.parametrize("method", METHODS)
def test_state_loads_with_quanto_requantize(method, dtype):
    """Interop: quanto's own requantize(model, state_dict, quantization_map) reads what we save."""
    a = adapter(method)
    q = a.quantize_linear(linear(256, 64, dtype=dtype))
    state = {f"0.{k}": v for k, v in a.layer_state_dict(q).items()}
    qmap = {"0": QuantoAdapter.quantization_map_entry(a.config)}
    assert qmap["0"] == QuantoAdapter.quantization_map_entry(q) == quanto.quantization_map(nn.Sequential(q))["0"]
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(256, 64)).to(dtype)
    quanto.requantize(model, state, qmap, device=torch.device("cpu"))
    x = torch.randn(8, 256, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(model(x), q(x))


def test_bf16_int4_tinygemm_state_reloads_exactly():
    """quanto converts its CPU bf16 int4 (tinygemm) weights back to the portable format lossily;
    the adapter saves shifts that rebuild the identical weights."""
    torch.manual_seed(0)
    layer = nn.Linear(1024, 256, bias=False).to(torch.bfloat16)
    with torch.no_grad():  # per-group offsets make bf16 rounding of the shift conversion bite
        offsets = torch.randn(256, 8, 1).mul(2).expand(256, 8, 128).reshape(256, 1024)
        layer.weight.add_(offsets.to(torch.bfloat16) * layer.weight.abs().max())
    a = adapter("quanto_int4")
    q = a.quantize_linear(layer)
    assert type(q.weight).__name__ == "TinyGemmWeightQBitsTensor"
    own = quanto.QLinear(1024, 256, False, device="meta", dtype=torch.bfloat16, weights="qint4")
    own.load_state_dict(q.state_dict(), assign=True)
    assert not torch.equal(own.weight._scale_shift, q.weight._scale_shift)  # quanto alone is lossy here

    loaded = a.load_layer_state(a.create_quantized_linear(1024, 256, False, device="meta",
                                                          dtype=torch.bfloat16), a.layer_state_dict(q))
    assert torch.equal(loaded.weight._scale_shift, q.weight._scale_shift)
    assert torch.equal(loaded.weight._data._data, q.weight._data._data)
    x = torch.randn(4, 1024, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_create_on_cpu_then_load():
    a = adapter("quanto_int4")
    q = a.quantize_linear(linear(256, 64))
    empty = a.create_quantized_linear(256, 64, True, device="cpu", dtype=torch.float32)
    assert all(t.device.type == "cpu" for t in leaves(empty.weight))
    assert a.module_nbytes(empty) == a.module_nbytes(q)
    loaded = a.load_layer_state(empty, a.layer_state_dict(q))
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_load_layer_state_rejects_bad_state():
    a = adapter("quanto_int4")
    state = a.layer_state_dict(a.quantize_linear(linear(256, 64)))
    missing = {k: v for k, v in state.items() if k != "weight._scale"}
    with pytest.raises(ValueError, match=r"missing \['weight._scale'\]"):
        a.load_layer_state(a.create_quantized_linear(256, 64, device="meta"), missing)
    with pytest.raises(ValueError, match="wrong shapes"):
        a.load_layer_state(a.create_quantized_linear(512, 64, device="meta"), state)
    with pytest.raises(ValueError, match="unexpected"):
        a.load_layer_state(a.create_quantized_linear(256, 64, bias=False, device="meta"), state)


# ---------------------------------------------------------------------- config
def test_backend_options_are_rejected():
    with pytest.raises(ValueError, match="activations.*calibration"):
        adapter("quanto_int4", backend_options={"activations": "qint8"})
    with pytest.raises(ValueError, match=r"layer_configs\['q_proj'\].*'foo': unknown option"):
        adapter("quanto_int4", layer_configs={"q_proj": {"backend_options": {"foo": 1}}})
    issues = validate_quantization_config(
        QuantizationConfig(method="quanto_int4", backend_options={"activations": "qint8"}), "cpu")
    assert [(i.severity.value, i.field) for i in issues if i.field == "backend_options"] == [
        ("error", "backend_options")]


def test_storage_dtype_is_reported():
    issues = QuantoAdapter.check_config(QuantizationConfig(method="quanto_int4", storage_dtype="bfloat16"), "cpu")
    assert len(issues) == 1 and issues[0].severity.value == "warning" and issues[0].field == "storage_dtype"
    assert "cannot be honoured" in issues[0].message and "ignored_params" in issues[0].suggestion
    assert QuantoAdapter.check_config(QuantizationConfig(method="quanto_int4", storage_dtype="uint8"), "cpu") == []
    assert QuantoAdapter.check_config(QuantizationConfig(method="quanto_int8", storage_dtype="int8"), "cpu") == []
    override = QuantizationConfig(method="quanto_int4", layer_configs={"mlp": {"storage_dtype": "float16"}})
    assert [i.field for i in QuantoAdapter.check_config(override, "cpu")] == ["layer_configs['mlp'].storage_dtype"]


@pytest.mark.parametrize("method", METHODS)
def test_quantization_map_entry(method):
    entry = QuantoAdapter.quantization_map_entry(QuantizationConfig(method=method))
    assert entry == {"weights": QTYPE[method], "activations": "none"}
    with pytest.raises(ValueError, match="optimum-quanto method"):
        QuantoAdapter.quantization_map_entry(QuantizationConfig(method="hqq"))


# ---------------------------------------------------------------------- a small Llama
def tiny_llama(device: str | None = None) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    with torch.device(device or "cpu"):
        return transformers.LlamaForCausalLM(config).eval()


def linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.fixture(scope="module")
def llama_int4():
    reference = tiny_llama()
    a = create_quantization_adapter("cpu", QuantizationConfig(method="quanto_int4"))
    model = a.quantize_model(copy.deepcopy(reference))
    return reference, model, a


def test_llama_int4_every_linear_but_lm_head(llama_int4):
    reference, model, a = llama_int4
    assert isinstance(a, QuantoAdapter) and model.is_quantized
    layers = linears(model)
    assert len(layers) == 15 and type(layers["lm_head"]) is nn.Linear
    for name, module in layers.items():
        if name != "lm_head":
            assert isinstance(module, quanto.QLinear) and module.weight_qtype.name == "qint4", name
    plan = model.quantization_plan
    assert len(plan.quantized) == 14 and [l.name for l in plan.skipped] == ["lm_head"]
    for layer in plan.quantized:  # plan bytes == bytes of the tensors the layer saves
        assert layer.bytes_after == tensor_bytes(a.layer_state_dict(layers[layer.name])), layer.name
        assert layer.group_size == 128 and layer.bits == 4
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = reference(ids).logits, model(ids).logits
    cos = nn.functional.cosine_similarity(ref.reshape(-1, 128), out.reshape(-1, 128))
    assert cos.min() > 0.95 and cos.mean() > 0.97  # measured min 0.968, mean 0.977


def test_llama_meta_skeleton_plan_equals_real(llama_int4):
    _, model, a = llama_int4
    skeleton = a.quantize_model(tiny_llama("meta"))
    real = {l.name: l.bytes_after for l in model.quantization_plan.layers}
    assert {l.name: l.bytes_after for l in skeleton.quantization_plan.layers} == real
    assert all(isinstance(m, quanto.QLinear) for n, m in linears(skeleton).items() if n != "lm_head")


def test_llama_layer_configs_skip_modules_and_filter():
    config = QuantizationConfig(method="quanto_int4", skip_modules=["lm_head", "mlp.down_proj"],
                                layer_configs={"model.layers.0": {"method": "quanto_int8"}})
    a = create_quantization_adapter("cpu", config)
    model = a.quantize_model(tiny_llama(), module_filter=ExcludeModuleByName(["k_proj"]))
    layers = linears(model)
    for name, module in layers.items():
        if name == "lm_head" or name.endswith(("down_proj", "k_proj")):
            assert type(module) is nn.Linear, name
        else:
            expected = "qint8" if name.startswith("model.layers.0.") else "qint4"
            assert module.weight_qtype.name == expected, name
    plan = model.quantization_plan
    assert plan["model.layers.0.self_attn.q_proj"].method == "quanto_int8"
    assert plan["model.layers.0.self_attn.q_proj"].group_size is None
    assert plan["model.layers.1.self_attn.q_proj"].method == "quanto_int4"
    assert plan["model.layers.1.mlp.down_proj"].reason == "skip_modules: 'mlp.down_proj'"
    assert plan["model.layers.1.self_attn.k_proj"].reason == "excluded by module_filter"
    assert len(plan.quantized) == 10 and len(plan.skipped) == 5


# ------------------------------------------------------------------ CPU int4 kernel layout
def test_int4pack_layout_is_identified_and_each_candidate_inverts():
    from quantization_wrapper.adapters.quanto import (INT4PACK_CANDIDATES, int4pack, int4unpack,
                                                      cpu_int4pack_layout)

    layout = cpu_int4pack_layout()
    assert layout in INT4PACK_CANDIDATES  # one of torch's three layouts on this CPU
    g = torch.Generator().manual_seed(0)
    for n in (48, 128, 176, 2048):
        w = torch.randint(0, 16, (n, 256), dtype=torch.uint8, generator=g)
        kernel = torch._convert_weight_to_int4pack_for_cpu(w.to(torch.int32), innerKTiles=2)
        assert torch.equal(int4pack(w, *layout), kernel), n
        for candidate in INT4PACK_CANDIDATES:
            assert torch.equal(int4unpack(int4pack(w, *candidate), n, 256, *candidate), w), (n, candidate)


@pytest.mark.parametrize("block", [32, 64])
def test_regroup_from_standard_bytes_equals_the_generic_pack_for_each_halves_layout(block):
    """The fast regroup (load, freeze) gives the generic nibble pack's bytes for both of torch's
    halves layouts, not only the one this CPU uses; quanto's standard packing pairs row n with
    row n + N/2."""
    from optimum.quanto.tensor.packed import PackedTensor

    from quantization_wrapper.adapters.quanto import int4pack, regroup_halves

    g = torch.Generator().manual_seed(block)
    for n, k in ((2 * block, 128), (6 * block, 256), (2048, 512)):
        nibbles = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        standard = PackedTensor.pack(nibbles, 4)._data
        assert standard.shape == (n // 2, k)
        assert torch.equal(regroup_halves(standard, n, k, block), int4pack(nibbles, block, True)), (n, k)


@pytest.mark.parametrize("out_features", [128, 176, 384, 2048])
def test_int4_state_and_restore_equal_quanto_own_conversions(out_features):
    """The one-pass regroup (freeze, load) and the direct unpack (save) give bit for bit what
    quanto's own int32 repack and identity-matmul unpack give; 176 rows take the general path,
    multiples of 128 the one-pass one."""
    torch.manual_seed(out_features)
    a = adapter("quanto_int4")
    layer = nn.Linear(512, out_features, bias=True).to(torch.bfloat16)
    q = a.quantize_linear(layer)
    assert type(q.weight).__name__ == "TinyGemmWeightQBitsTensor"
    own_freeze = quanto.QLinear.from_module(layer, weights=quanto.qint4)
    own_freeze.freeze()  # quanto's int32 route to the kernel layout
    assert torch.equal(q.weight._data._data, own_freeze.weight._data._data)
    assert torch.equal(q.weight._scale_shift, own_freeze.weight._scale_shift)
    fast, own = a.layer_state_dict(q), q.state_dict()
    assert fast.keys() == own.keys()
    for key in fast:
        if key != "weight._shift":  # the adapter's shifts are chosen to reload exactly (see above)
            assert torch.equal(fast[key], own[key]), key
    restored = a.load_layer_state(a.create_quantized_linear(512, out_features, True, device="meta",
                                                            dtype=torch.bfloat16), dict(fast))
    reference = quanto.QLinear(512, out_features, True, device="meta", dtype=torch.bfloat16, weights="qint4")
    reference.load_state_dict(dict(fast), assign=True)  # quanto's loader: optimize() -> int32 -> kernel
    assert torch.equal(restored.weight._data._data, reference.weight._data._data)
    assert torch.equal(restored.weight._scale_shift, reference.weight._scale_shift)
    assert torch.equal(restored.weight._data._data, q.weight._data._data)
    x = torch.randn(5, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(restored(x), q(x))
