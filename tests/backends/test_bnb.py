"""BitsAndBytesAdapter against the real bitsandbytes on CPU.

Bounds (relative Frobenius error of the output vs. the fp32 layer, random N(0,1) inputs, default
``nn.Linear`` init; measured max over the parametrized shapes/dtypes in brackets):
NF4 < 0.12 [0.096], FP4 < 0.14 [0.116], INT8 < 0.02 [0.006 train mode, 0.008 eval mode].
Tiny Llama logits, cosine to fp32: NF4 > 0.98, NF4+INT8 mix > 0.98 (measured over 3 seeds:
NF4 0.995, mix 0.997-0.998; FP4 0.989, INT8 1.000).
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from quantization_wrapper import (  # noqa: E402
    QuantizationConfig,
    bits_per_weight,
    create_quantization_adapter,
    validate_quantization_config,
)
from quantization_wrapper.adapters.bnb import BitsAndBytesAdapter  # noqa: E402

METHODS = ["bnb_nf4", "bnb_fp4", "bnb_int8"]
REL_ERROR_BOUND = {"bnb_nf4": 0.12, "bnb_fp4": 0.14, "bnb_int8": 0.02}
SHAPES = [(64, 128), (100, 48), (256, 256)]  # (in_features, out_features); 100 is not a multiple of 64
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LOGITS_COSINE_BOUND = 0.98
INT8_EVAL_VS_TRAIN_BOUND = 0.012


def adapter_for(method: str, **fields) -> BitsAndBytesAdapter:
    return BitsAndBytesAdapter(QuantizationConfig(method=method, **fields), "cpu")


def make_linear(in_features: int, out_features: int, bias: bool = True, dtype=torch.float32) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def reference_layer(linear: nn.Linear, method: str, *, compute_dtype=None, blocksize=64, double_quant=True,
                    quant_storage=torch.uint8, threshold=6.0) -> nn.Module:
    """bitsandbytes' own layer, built the way its docstrings show (load weights, then `.to(device)`)."""
    bias = linear.bias is not None
    if method == "bnb_int8":
        ref = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False,
                                  threshold=threshold)
    else:
        ref = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias,
                                compute_dtype=compute_dtype or linear.weight.dtype,
                                compress_statistics=double_quant, quant_type=method.removeprefix("bnb_"),
                                quant_storage=quant_storage)
        ref.weight.blocksize = blocksize
        ref.support_avx512bf16_for_cpu = False  # same CPU path as the adapter's layers (see bnb.py)
    ref.load_state_dict(linear.state_dict())
    return ref.to(linear.weight.device)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def quant_state_tensors(layer) -> list[torch.Tensor]:
    qs = layer.weight.quant_state
    tensors = [qs.absmax, qs.code]
    if qs.nested:
        tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
    return tensors


def held_tensors(layer) -> list[torch.Tensor]:
    """Every tensor the layer holds, listed by hand (independent of module_nbytes)."""
    tensors = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    if isinstance(layer, bnb.nn.Linear4bit):
        tensors += quant_state_tensors(layer)
    else:
        tensors.append(layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB)
    return tensors


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (packed 4-bit data stored as a float dtype may hold NaN patterns)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def raw_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------- layers vs. bitsandbytes
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{i}to{o}" for i, o in SHAPES])
@pytest.mark.parametrize("method", METHODS)
def test_layer_matches_bitsandbytes_and_error_bound(method, shape, bias, dtype):
    in_features, out_features = shape
    linear32 = make_linear(in_features, out_features, bias)
    linear = make_linear(in_features, out_features, bias, dtype)
    linear.load_state_dict(linear32.state_dict())
    before = {k: v.clone() for k, v in linear.state_dict().items()}

    layer = adapter_for(method).quantize_linear(linear)
    ref = reference_layer(linear, method)

    # the input linear is untouched
    assert type(linear) is nn.Linear and linear.weight.dtype == dtype
    assert all(torch.equal(before[k], v) for k, v in linear.state_dict().items())
    # real low-bit storage, not float weights
    n = in_features * out_features
    if method == "bnb_int8":
        assert isinstance(layer, bnb.nn.Linear8bitLt) and isinstance(layer.weight, bnb.nn.Int8Params)
        assert layer.weight.dtype == torch.int8 and tuple(layer.weight.shape) == (out_features, in_features)
        assert layer.weight.SCB.dtype == torch.float32 and tuple(layer.weight.SCB.shape) == (out_features,)
        assert torch.equal(layer.weight.data, ref.weight.data) and torch.equal(layer.weight.SCB, ref.weight.SCB)
    else:
        assert isinstance(layer, bnb.nn.Linear4bit) and isinstance(layer.weight, bnb.nn.Params4bit)
        assert layer.weight.bnb_quantized and layer.weight.dtype == torch.uint8
        assert layer.weight.numel() == (n + 1) // 2
        qs = layer.weight.quant_state
        assert qs.quant_type == method.removeprefix("bnb_") and qs.blocksize == 64 and qs.nested
        assert tuple(qs.shape) == (out_features, in_features) and qs.dtype == dtype
        assert layer.compute_dtype == dtype
        assert torch.equal(layer.weight.data, ref.weight.data)
        assert torch.equal(qs.absmax, ref.weight.quant_state.absmax)
        if bias:  # kept, in the compute dtype
            assert layer.bias.dtype == dtype and torch.equal(layer.bias, linear.bias)

    x = torch.randn(16, in_features)
    with torch.no_grad():
        y = layer(x.to(dtype))
        assert y.dtype == dtype
        assert torch.equal(y, ref(x.to(dtype))), "differs from bitsandbytes' own layer"
        err = rel_error(y, linear32(x))
    assert err < REL_ERROR_BOUND[method], f"{method} relative error {err:.4f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_in_row_slices_equals_bitsandbytes_whole_layer(dtype):
    """On the CPU the int8 quantizer runs on slices of ~1M weights: 1500 rows of 1536 make two
    slices of 682 rows and a tail of 136, and the bytes and row scales are bitsandbytes' own."""
    from quantization_wrapper.adapters.bnb import _INT8_CPU_SLICE

    linear = make_linear(1536, 1500, True, dtype)
    assert 1500 * 1536 > 2 * _INT8_CPU_SLICE and 1500 % (_INT8_CPU_SLICE // 1536)
    layer = adapter_for("bnb_int8").quantize_linear(linear)
    ref = reference_layer(linear, "bnb_int8")
    assert torch.equal(layer.weight.data, ref.weight.data) and torch.equal(layer.weight.SCB, ref.weight.SCB)
    assert layer.weight.SCB.dtype == torch.float32 and layer.weight.dtype == torch.int8


@pytest.mark.parametrize("method,double_quant,storage,shape", [
    ("bnb_nf4", True, torch.uint8, (2048, 640)),  # 5 slices of 256K weights, the last one partial
    ("bnb_nf4", False, torch.bfloat16, (1001, 300)),  # a block straddles rows; the last block is partial
    ("bnb_fp4", True, torch.float32, (1000, 301)),
])
def test_4bit_in_slices_equals_bitsandbytes_whole_layer(method, double_quant, storage, shape):
    """On the CPU the 4-bit quantizer runs on slices of 256K weights; the packed bytes and the
    quantization state (compressed statistics included) are those of bitsandbytes' own
    quantize_4bit over the whole bfloat16 weight."""
    from quantization_wrapper.adapters.bnb import _4BIT_CPU_SLICE

    in_features, out_features = shape
    assert in_features * out_features > _4BIT_CPU_SLICE
    linear = make_linear(in_features, out_features, True, torch.bfloat16)
    layer = adapter_for(method, double_quant=double_quant, storage_dtype=storage).quantize_linear(linear)
    packed, state = bnb.functional.quantize_4bit(linear.weight.detach(), blocksize=64,
                                                 compress_statistics=double_quant,
                                                 quant_type=method.removeprefix("bnb_"), quant_storage=storage)
    assert layer.weight.dtype == storage and layer.weight.bnb_quantized
    assert torch.equal(layer.weight.data.view(torch.uint8), packed.view(torch.uint8))
    ours, theirs = layer.weight.quant_state.as_dict(packed=True), state.as_dict(packed=True)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert (torch.equal(ours[key], theirs[key]) if isinstance(ours[key], torch.Tensor)
                else ours[key] == theirs[key]), key
    assert layer.quant_state is layer.weight.quant_state
    # and the layer computes as bitsandbytes' own layer holding those tensors
    own = bnb.nn.Linear4bit(in_features, out_features, True, compute_dtype=torch.bfloat16, device="meta")
    own.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=64,
                                   quant_type=method.removeprefix("bnb_"), quant_storage=storage,
                                   bnb_quantized=True, module=own)
    own.bias = nn.Parameter(linear.bias.detach().clone())
    own.support_avx512bf16_for_cpu = False
    x = torch.randn(3, in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), own(x))


@pytest.mark.parametrize("method", METHODS)
def test_eval_mode_matches_bitsandbytes_and_keeps_the_layer_unchanged(method):
    """Eval-mode forward (no grad) gives bitsandbytes' result, and a 4-bit layer is not repacked:
    out_features=48 is not a multiple of 32, which bitsandbytes' AVX512-BF16 repacking needs."""
    linear = make_linear(100, 48)
    adapter = adapter_for(method)
    layer = adapter.quantize_linear(linear).eval()
    ref = reference_layer(linear, method).eval()
    nbytes = adapter.module_nbytes(layer)
    x = torch.randn(8, 100)
    with torch.no_grad():
        y = layer(x)
        assert torch.equal(y, ref(x))
        assert torch.equal(layer(x), y)
        y_train = layer.train()(x)
        assert torch.equal(y_train, ref.train()(x))
    if method == "bnb_int8":
        # int8 eval also quantizes x; train mode keeps it in 16 bits: the two differ only by that
        # rounding (measured 0.0056-0.0072 over 5 seeds)
        assert 0 < rel_error(y_train, y) < INT8_EVAL_VS_TRAIN_BOUND
    else:
        assert torch.equal(y_train, y)
    assert adapter.module_nbytes(layer) == nbytes
    if method != "bnb_int8":
        assert layer.weight.quant_state.nested
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.parametrize("method", METHODS)
def test_layers_keep_bitsandbytes_names_and_pickle(method, tmp_path):
    """The layers subclass bitsandbytes' (for their autocast forward, see tests/test_autocast.py):
    same class names, the same isinstance checks, and ``torch.save`` of a layer still loads."""
    layer = adapter_for(method).quantize_linear(make_linear(64, 128))
    own = bnb.nn.Linear8bitLt if method == "bnb_int8" else bnb.nn.Linear4bit
    assert isinstance(layer, own) and type(layer).__name__ == own.__name__
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert type(loaded) is type(layer)
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), layer(x))


def test_llm_int8_threshold_is_used():
    """The outlier threshold routes large input columns through fp16: with outliers in x the error
    drops versus threshold 0 (all int8)."""
    linear = make_linear(256, 64)
    x = torch.randn(32, 256)
    x[:, :4] *= 40  # outlier columns, well above 6.0
    with torch.no_grad():
        exact = linear(x)
        errors = {}
        for threshold in (0.0, 6.0):
            layer = adapter_for("bnb_int8", backend_options={"llm_int8_threshold": threshold})
            layer = layer.quantize_linear(linear).eval()
            assert layer.state.threshold == threshold
            y = layer(x)
            assert torch.equal(y, reference_layer(linear, "bnb_int8", threshold=threshold).eval()(x))
            errors[threshold] = rel_error(y, exact)
    assert errors[6.0] < 0.6 * errors[0.0], errors


@pytest.mark.parametrize("options", [
    dict(group_size=128, double_quant=False),
    dict(group_size=32, storage_dtype=torch.bfloat16),
    dict(compute_dtype=torch.bfloat16, storage_dtype=torch.float32),
], ids=["block128-nodq", "block32-bf16storage", "bf16compute-fp32storage"])
def test_4bit_options_reach_bitsandbytes(options):
    linear = make_linear(128, 64)
    layer = adapter_for("bnb_nf4", **options).quantize_linear(linear)
    storage = options.get("storage_dtype", torch.uint8)
    compute = options.get("compute_dtype", torch.float32)
    blocksize = options.get("group_size", 64)
    qs = layer.weight.quant_state
    assert qs.blocksize == blocksize == layer.weight.blocksize
    assert qs.nested == options.get("double_quant", True)
    assert layer.weight.dtype == storage and layer.weight.numel() * storage.itemsize == 128 * 64 // 2
    assert layer.compute_dtype == compute and layer.bias.dtype == compute
    ref = reference_layer(linear, "bnb_nf4", compute_dtype=compute, blocksize=blocksize,
                          double_quant=options.get("double_quant", True), quant_storage=storage)
    x = torch.randn(4, 128)
    with torch.no_grad():
        y = layer(x)
        assert torch.equal(y, ref(x))
        assert y.dtype == torch.float32 and rel_error(y, linear(x)) < REL_ERROR_BOUND["bnb_nf4"]
    assert layer.bias.dtype == compute  # the forward did not have to cast it


# ---------------------------------------------------------------------- storage
@pytest.mark.parametrize("method,fields", [
    ("bnb_nf4", dict(double_quant=True)),
    ("bnb_nf4", dict(double_quant=False)),
    ("bnb_fp4", dict(double_quant=True)),
    ("bnb_nf4", dict(double_quant=True, group_size=128, storage_dtype=torch.bfloat16)),
    ("bnb_int8", dict()),
], ids=["nf4-dq-64", "nf4-64", "fp4-dq-64", "nf4-dq-128-bf16storage", "int8"])
def test_measured_bytes_match_theory(method, fields):
    in_features = out_features = 1024
    adapter = adapter_for(method, **fields)
    config = adapter.config
    layer = adapter.quantize_linear(make_linear(in_features, out_features))
    nbytes = adapter.module_nbytes(layer)
    assert nbytes == raw_bytes(held_tensors(layer))

    n = in_features * out_features
    weight_bytes = nbytes - out_features * 4  # the fp32 bias is not a weight
    if method == "bnb_int8":
        exact = n + 4 * out_features  # int8 rows + fp32 SCB
    else:
        blocks = n // config.group_size
        exact = n // 2 + 16 * 4  # packed nibbles + 16-entry fp32 quant map
        if config.double_quant:  # uint8 absmax, fp32 offset, fp32 absmax per 256 blocks, 256-entry map
            exact += blocks + 4 + 4 * math.ceil(blocks / 256) + 256 * 4
        else:
            exact += 4 * blocks
    assert weight_bytes == exact
    measured = 8 * weight_bytes / n
    theory = bits_per_weight(config, in_features=in_features)
    assert measured == pytest.approx(theory, rel=0.01), (measured, theory)
    expected = {"nf4-dq": 4.127, "nf4": 4.5, "int8": 8 + 32 / in_features}
    key = "int8" if method == "bnb_int8" else ("nf4-dq" if config.double_quant else "nf4")
    if config.group_size in (None, 64):
        assert measured == pytest.approx(expected[key], rel=0.01)


# ---------------------------------------------------------------------- dequantize
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_dequantize_module_reproduces_the_layer(method, dtype):
    linear = make_linear(100, 48, dtype=dtype)
    adapter = adapter_for(method)
    layer = adapter.quantize_linear(linear)  # train mode: bnb multiplies by the dequantized weight
    deq = adapter.dequantize_module(layer)
    assert type(deq) is nn.Linear and deq.weight.dtype == dtype and deq.bias.dtype == dtype
    assert deq.weight.shape == linear.weight.shape
    x = torch.randn(8, 100, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        y_deq = F.linear(x, deq.weight, deq.bias)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y_deq, y, rtol=tol, atol=tol)
    if method == "bnb_int8":  # CB * SCB / 127; after a forward bitsandbytes keeps SCB in layer.state
        expected = layer.weight.data.float() * layer.state.SCB.view(-1, 1) / 127
        torch.testing.assert_close(deq.weight.float(), expected.to(dtype).float(), rtol=3e-7, atol=0)


# ---------------------------------------------------------------------- empty layers and state
TRANSFORMERS_4BIT_KEYS = {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                          "weight.nested_quant_map"}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("method,fields", [
    ("bnb_nf4", {}),
    ("bnb_fp4", {}),
    ("bnb_nf4", dict(double_quant=False, storage_dtype=torch.bfloat16, compute_dtype=torch.bfloat16)),
    ("bnb_int8", {}),
], ids=["nf4", "fp4", "nf4-nodq-bf16", "int8"])
def test_meta_layer_and_state_round_trip(method, fields, bias):
    adapter = adapter_for(method, **fields)
    linear = make_linear(100, 48, bias)
    layer = adapter.quantize_linear(linear)
    state = adapter.layer_state_dict(layer)

    empty = adapter.create_quantized_linear(100, 48, bias, config=adapter.config, device="meta",
                                            dtype=torch.float32)
    assert type(empty) is type(layer)
    meta_tensors = held_tensors(empty)
    # all on meta, except the nested 4-bit offset: a 0-dim scalar bitsandbytes reads with .item()
    offset = empty.weight.quant_state.offset if method != "bnb_int8" else None
    assert all(t.device.type == "meta" for t in meta_tensors if t is not offset)
    assert offset is None or offset.numel() == 1
    assert set(empty.state_dict()) == set(layer.state_dict())  # bitsandbytes can list a skeleton's keys
    assert [(t.shape, t.dtype) for t in meta_tensors] == [(t.shape, t.dtype) for t in held_tensors(layer)]
    assert adapter.module_nbytes(empty) == adapter.module_nbytes(layer)

    # plain tensors with bitsandbytes'/transformers' key names
    assert all(type(v) is torch.Tensor for v in state.values())
    assert set(state) == set(layer.state_dict())
    if method == "bnb_int8":
        assert set(state) == {"weight", "SCB", "weight_format"} | ({"bias"} if bias else set())
    else:
        quant_type = method.removeprefix("bnb_")
        expected = {"weight", "weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{quant_type}"}
        if adapter.config.double_quant:
            expected |= {"weight.nested_absmax", "weight.nested_quant_map"}
        assert set(state) == expected | ({"bias"} if bias else set())

    loaded = adapter.load_layer_state(empty, state)
    assert all(t.device.type == "cpu" for t in held_tensors(loaded))
    assert adapter.module_nbytes(loaded) == adapter.module_nbytes(layer)
    x = torch.randn(8, 100)
    with torch.no_grad():
        assert torch.equal(loaded(x), layer(x))
        assert torch.equal(loaded.eval()(x), layer.eval()(x))
    assert all(same_bits(v, state[k]) for k, v in adapter.layer_state_dict(loaded).items())


def test_state_is_readable_after_forward():
    """INT8 moves CB/SCB into ``module.state`` on its first forward; saving and sizing still work."""
    adapter = adapter_for("bnb_int8")
    layer = adapter.quantize_linear(make_linear(64, 32))
    before = adapter.layer_state_dict(layer)
    nbytes = adapter.module_nbytes(layer)
    with torch.no_grad():
        y = layer(torch.randn(2, 64))
    assert layer.weight.SCB is None and layer.state.SCB is not None
    after = adapter.layer_state_dict(layer)
    assert set(after) == set(before) and all(same_bits(after[k], before[k]) for k in before)
    assert adapter.module_nbytes(layer) == nbytes
    assert y.shape == (2, 32)


@pytest.mark.parametrize("case", ["wrong-shape", "missing-scb", "nf4-into-fp4", "extra-key", "bias-mismatch"])
def test_load_layer_state_rejects_bad_state(case):
    nf4, int8 = adapter_for("bnb_nf4"), adapter_for("bnb_int8")
    if case == "wrong-shape":
        state = nf4.layer_state_dict(nf4.quantize_linear(make_linear(64, 32)))
        target, empty = nf4, nf4.create_quantized_linear(64, 64, device="meta")
    elif case == "missing-scb":
        state = int8.layer_state_dict(int8.quantize_linear(make_linear(64, 32)))
        del state["SCB"]
        target, empty = int8, int8.create_quantized_linear(64, 32, device="meta")
    elif case == "nf4-into-fp4":
        fp4 = adapter_for("bnb_fp4")
        state = nf4.layer_state_dict(nf4.quantize_linear(make_linear(64, 32)))
        target, empty = fp4, fp4.create_quantized_linear(64, 32, device="meta")
    elif case == "extra-key":
        state = int8.layer_state_dict(int8.quantize_linear(make_linear(64, 32)))
        state["weight.absmax"] = torch.zeros(3)
        target, empty = int8, int8.create_quantized_linear(64, 32, device="meta")
    else:
        state = nf4.layer_state_dict(nf4.quantize_linear(make_linear(64, 32, bias=False)))
        target, empty = nf4, nf4.create_quantized_linear(64, 32, bias=True, device="meta")
    with pytest.raises(ValueError):
        target.load_layer_state(empty, state)


@pytest.fixture(scope="module")
def transformers_bnb_models(tmp_path_factory):
    """A tiny Llama saved to disk and loaded back by transformers with its bitsandbytes integration."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    loaded = {}
    for method, kwargs in {
        "bnb_nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.float32),
        "bnb_int8": dict(load_in_8bit=True),
    }.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded[method] = transformers.LlamaForCausalLM.from_pretrained(
                path, quantization_config=transformers.BitsAndBytesConfig(**kwargs), device_map="cpu",
                dtype=torch.float32)
    return model, loaded


@pytest.mark.parametrize("method", ["bnb_nf4", "bnb_int8"])
def test_state_dict_is_interchangeable_with_transformers(transformers_bnb_models, method):
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

    fp32_model, tf_models = transformers_bnb_models
    names = (Bnb8BitHfQuantizer if method == "bnb_int8" else Bnb4BitHfQuantizer).serialized_names["weight"]
    adapter = adapter_for(method)
    linear = fp32_model.model.layers[0].mlp.down_proj  # 128 -> 64
    tf_layer = tf_models[method].model.layers[0].mlp.down_proj
    ours = adapter.layer_state_dict(adapter.quantize_linear(linear))
    theirs = tf_layer.state_dict()
    assert set(ours) == set(theirs) and set(ours) <= set(names)
    for key in ours:  # same quantization, bit for bit
        assert same_bits(ours[key], theirs[key]), key

    # transformers' tensors load into our empty layer and compute the same thing
    empty = adapter.create_quantized_linear(128, 64, bias=False, device="meta", dtype=torch.float32)
    layer = adapter.load_layer_state(empty, {k: v.detach().as_subclass(torch.Tensor) for k, v in theirs.items()})
    x = torch.randn(4, 128)
    with torch.no_grad():
        assert torch.equal(layer(x), tf_layer.train()(x))


# ---------------------------------------------------------------------- whole models
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def logits_cosine(model_a, model_b, ids) -> float:
    with torch.no_grad():
        a, b = model_a(ids).logits.flatten(), model_b(ids).logits.flatten()
    return F.cosine_similarity(a, b, dim=0).item()


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def assert_plan_bytes_measured(model, adapter):
    plan = model.quantization_plan
    modules = dict(model.named_modules())
    for entry in plan.quantized:
        module = modules[entry.name]
        assert entry.bytes_after == adapter.module_nbytes(module) == raw_bytes(held_tensors(module)), entry.name


def test_quantize_model_nf4():
    import copy

    reference = tiny_llama()
    model = copy.deepcopy(reference)
    adapter = create_quantization_adapter("cpu", QuantizationConfig(method="bnb_nf4"), strict=True)
    assert isinstance(adapter, BitsAndBytesAdapter)
    model = adapter.quantize_model(model)

    names = linear_names(reference)
    assert len(names) == 2 * 7 + 1
    for name in names:
        module = model.get_submodule(name)
        if name == "lm_head":
            assert type(module) is nn.Linear
        else:
            assert isinstance(module, bnb.nn.Linear4bit), name
    plan = model.quantization_plan
    assert len(plan.quantized) == 14 and [l.name for l in plan.skipped] == ["lm_head"]
    assert_plan_bytes_measured(model, adapter)
    assert plan.bytes_after < plan.bytes_before / 3
    assert model.is_loaded_in_4bit is True and model.is_loaded_in_8bit is False
    assert model.quantization_method == "bitsandbytes" and model.is_quantized is True

    ids = torch.randint(0, 128, (2, 16))
    assert logits_cosine(model, reference, ids) > LOGITS_COSINE_BOUND


def test_quantize_model_mixes_nf4_and_int8():
    import copy

    reference = tiny_llama()
    model = copy.deepcopy(reference)
    config = QuantizationConfig(method="bnb_nf4", layer_configs={"model.layers.0": {"method": "bnb_int8"}})
    adapter = create_quantization_adapter("cpu", config, strict=True)
    model = adapter.quantize_model(model)
    for name in linear_names(reference):
        module = model.get_submodule(name)
        if name == "lm_head":
            assert type(module) is nn.Linear
        elif name.startswith("model.layers.0."):
            assert isinstance(module, bnb.nn.Linear8bitLt), name
            assert model.quantization_plan[name].method == "bnb_int8"
        else:
            assert isinstance(module, bnb.nn.Linear4bit), name
            assert model.quantization_plan[name].method == "bnb_nf4"
    assert model.is_loaded_in_4bit is True and model.is_loaded_in_8bit is True
    assert_plan_bytes_measured(model, adapter)
    ids = torch.randint(0, 128, (2, 16))
    assert logits_cosine(model, reference, ids) > LOGITS_COSINE_BOUND


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecation inside peft
def test_quantize_model_respects_skip_modules_and_peft_wraps_it():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    config = QuantizationConfig(method="bnb_nf4", skip_modules=["lm_head", "re:.*\\.mlp\\..*"],
                                layer_configs={"re:.*v_proj": {"method": "bnb_int8"}})
    adapter = create_quantization_adapter("cpu", config, strict=True)
    model = adapter.quantize_model(model)
    for name in linear_names(model):
        module = model.get_submodule(name)
        if ".mlp." in name or name == "lm_head":
            assert type(module) is nn.Linear, name
            assert model.quantization_plan[name].status == "skipped"
    assert isinstance(model.model.layers[1].self_attn.v_proj, bnb.nn.Linear8bitLt)

    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    attn = lora.base_model.model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, peft.tuners.lora.bnb.Linear4bit)
    assert isinstance(attn.v_proj, peft.tuners.lora.bnb.Linear8bitLt)


def test_meta_model_gets_empty_layers_with_the_same_plan():
    reference = tiny_llama()
    adapter = create_quantization_adapter("cpu", QuantizationConfig(method="bnb_nf4"), strict=True)
    real = adapter.quantize_model(reference)
    import transformers

    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(reference.config)
    skeleton = adapter.quantize_model(skeleton)
    for ours, theirs in zip(skeleton.quantization_plan.layers, real.quantization_plan.layers):
        assert (ours.name, ours.method, ours.bytes_after) == (theirs.name, theirs.method, theirs.bytes_after)
    q_proj = skeleton.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert all(t.device.type == "meta" for t in held_tensors(q_proj) if t.dim() > 0)


# ---------------------------------------------------------------------- config checks
def _fields(issues, severity):
    return sorted(i.field for i in issues if i.severity.value == severity)


@pytest.mark.parametrize("fields,errors,warnings_", [
    (dict(method="bnb_nf4"), [], []),
    (dict(method="bnb_nf4", backend_options={"blocksize": 64}), ["backend_options"], []),
    (dict(method="bnb_int8", backend_options={"llm_int8_threshold": -1.0}), ["backend_options"], []),
    (dict(method="bnb_nf4", storage_dtype=torch.int8), ["storage_dtype"], []),
    (dict(method="bnb_int8", storage_dtype=torch.bfloat16), [], ["storage_dtype"]),
    (dict(method="bnb_int8", compute_dtype=torch.bfloat16), [], ["compute_dtype"]),
    (dict(method="bnb_nf4", backend_options={"llm_int8_threshold": 4.0}), [], ["backend_options"]),
    (dict(method="bnb_nf4", backend_options={"llm_int8_threshold": 4.0},
          layer_configs={"model.layers.0": {"method": "bnb_int8"}}), [], []),
    (dict(method="bnb_nf4", layer_configs={"x": {"backend_options": {"nope": 1}}}),
     ["layer_configs['x'].backend_options"], []),
], ids=["ok", "unknown-option", "bad-threshold", "int8-storage-for-nf4", "storage-on-int8",
        "compute-on-int8", "threshold-without-int8", "threshold-with-int8-layers", "layer-unknown-option"])
def test_check_config(fields, errors, warnings_):
    issues = validate_quantization_config(QuantizationConfig(**fields), "cpu")
    own = BitsAndBytesAdapter.check_config(QuantizationConfig(**fields), "cpu")
    assert set(map(str, own)) <= set(map(str, issues))
    assert _fields(own, "error") == errors
    assert _fields(own, "warning") == warnings_
    for issue in own:
        if issue.field.endswith("backend_options") and issue.is_error and "know" in issue.message:
            assert "llm_int8_threshold" in issue.message  # names the allowed keys


def test_invalid_options_raise_at_construction():
    with pytest.raises(ValueError, match="llm_int8_threshold"):
        BitsAndBytesAdapter(QuantizationConfig(method="bnb_int8", backend_options={"threshold": 6}), "cpu")
    with pytest.raises(ValueError, match="storage_dtype"):
        adapter_for("bnb_nf4", storage_dtype=torch.int8)


def test_fit_group_size_accepts_any_shape():
    adapter = adapter_for("bnb_nf4")
    config = adapter.config
    assert adapter.fit_group_size(100, 48, config) == (config, None)
    assert adapter.fit_group_size(7, 3, config) == (config, None)
    bf16 = config.replace(storage_dtype=torch.bfloat16)
    fitted, reason = adapter.fit_group_size(3, 3, bf16)  # 5 packed bytes cannot be bfloat16
    assert fitted is None and "bfloat16" in reason
    layer = adapter.quantize_linear(make_linear(7, 3))  # 21 weights: one partial block, padded nibble
    assert layer.weight.numel() == 11 and layer.weight.quant_state.absmax.numel() == 1


def test_importing_and_constructing_do_not_import_bitsandbytes():
    code = ("import sys, quantization_wrapper; "
            "from quantization_wrapper.adapters.bnb import BitsAndBytesAdapter; "
            "BitsAndBytesAdapter(quantization_wrapper.QuantizationConfig(method='bnb_nf4'), 'cpu'); "
            "print('bitsandbytes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_trains_on_nf4_and_int8_layers_with_frozen_base():
    peft = pytest.importorskip("peft")
    config = QuantizationConfig(method="bnb_nf4", layer_configs={"model.layers.0": {"method": "bnb_int8"}})
    adapter = create_quantization_adapter("cpu", config, strict=True)
    model = adapter.quantize_model(tiny_llama())
    base = {name: adapter.layer_state_dict(m) for name, m in model.named_modules() if adapter.is_quantized_module(m)}
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                            "down_proj"]))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    ids = torch.randint(0, 128, (4, 16))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    modules = dict(model.base_model.model.named_modules())
    for name, state in base.items():
        layer = modules[name]
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        after = adapter.layer_state_dict(layer)
        assert all(same_bits(after[k], v) for k, v in state.items()), name
