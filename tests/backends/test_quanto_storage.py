"""QuantoLinear's storage (quanto's weight as plain tensors FSDP can shard) and its training path,
and the INT8 layer that keeps its int8 rows only in its weight parameter: what FSDP relies on,
checked without FSDP (tests/test_fsdp.py runs the sharded training)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

quanto = pytest.importorskip("optimum.quanto")

from quantization_wrapper import QuantizationConfig, create_quantization_adapter  # noqa: E402
from quantization_wrapper.adapters.quanto.qtensors import dequantized  # noqa: E402

METHODS = ["quanto_int2", "quanto_int4", "quanto_int8", "quanto_fp8"]
QTYPE = {"quanto_int2": "qint2", "quanto_int4": "qint4", "quanto_int8": "qint8", "quanto_fp8": "qfloat8_e4m3fn"}
DATA_DTYPE = {"quanto_int2": torch.uint8, "quanto_int4": torch.uint8, "quanto_int8": torch.int8,
              "quanto_fp8": torch.uint8}


def quantized(method: str, in_features: int = 256, out_features: int = 64, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    adapter = create_quantization_adapter("cpu", QuantizationConfig(method=method), strict=True)
    return adapter, linear, adapter.quantize_linear(linear)


def reference(linear: nn.Linear, method: str) -> nn.Module:
    """quanto's own route: quantize + freeze."""
    model = nn.Sequential(copy.deepcopy(linear))
    quanto.quantize(model, weights=QTYPE[method])
    quanto.freeze(model)
    return model[0]


def leaves(t: torch.Tensor) -> list[torch.Tensor]:
    if not hasattr(type(t), "__tensor_flatten__"):
        return [t]
    return [leaf for name in t.__tensor_flatten__()[0] for leaf in leaves(getattr(t, name))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_weight_is_stored_as_plain_tensors(method, dtype):
    _, linear, q = quantized(method, dtype=dtype)
    params = dict(q.named_parameters(recurse=False))
    assert sorted(params) == ["bias", "weight_data"]
    data = params["weight_data"]
    assert type(data) is nn.Parameter and data.dtype == DATA_DTYPE[method] and not data.requires_grad
    assert all(getattr(type(t), "__tensor_flatten__", None) is None
               for t in list(q.parameters()) + list(q.buffers()))  # no tensor subclass left for FSDP to flatten
    scales = {n for n, _ in q.named_buffers(recurse=False)} - {"input_scale", "output_scale"}
    assert scales <= {"weight_scale", "weight_shift", "weight_scale_shift"} and scales
    # module.weight is quanto's tensor, rebuilt over the stored tensors (views, nothing copied)
    w = q.weight
    assert isinstance(w, quanto.QTensor) and w.qtype.name == QTYPE[method] and q.frozen
    stored = {t.untyped_storage().data_ptr() for t in list(q.parameters()) + list(q.buffers())}
    assert all(leaf.untyped_storage().data_ptr() in stored for leaf in leaves(w))
    assert w.equal(reference(linear, method).weight)
    # and the state dict is quanto's
    assert {k for k in q.state_dict() if k.startswith("weight")} == \
        {k for k in reference(linear, method).state_dict() if k.startswith("weight")}


@pytest.mark.parametrize("method", METHODS)
def test_forward_uses_whatever_tensors_the_layer_holds_now(method):
    """FSDP swaps the layer's parameters (shards, then gathered copies): the forward reads the
    current ones, with no cache of the old."""
    _, _, q = quantized(method)
    x = torch.randn(3, 256)
    with torch.no_grad():
        before = q(x)
        q.weight_data = nn.Parameter(q.weight_data.detach().clone(), requires_grad=False)
        assert torch.equal(q(x), before)
        q.weight_data = nn.Parameter(torch.zeros_like(q.weight_data), requires_grad=False)
        assert not torch.equal(q(x), before)


def test_dtype_changes_are_refused_as_quanto_refuses_them():
    _, _, q = quantized("quanto_int4")
    state = {k: v.clone() for k, v in q.state_dict().items()}
    with pytest.raises(ValueError, match="dtype"):
        q.to(torch.bfloat16)
    assert all(torch.equal(v, state[k]) for k, v in q.state_dict().items())  # nothing changed
    moved = q.to("cpu")
    assert moved is q and q.weight_data.dtype == torch.uint8


@pytest.mark.parametrize("shape", [(256, 64), (384, 80), (1024, 208), (256, 16)], ids=str)
def test_fast_dequantize_of_kernel_layout_equals_quanto(shape):
    """CPU bfloat16 int4 weights are in torch's int4 kernel layout; ``dequantized`` reads them
    directly (partial kernel blocks included) and gives quanto's dequantize() bit for bit."""
    _, _, q = quantized("quanto_int4", *shape, dtype=torch.bfloat16)
    w = q.weight
    assert type(w).__name__ == "TinyGemmWeightQBitsTensor"
    assert torch.equal(dequantized(w), w.dequantize())


@pytest.mark.parametrize("bias", [True, False])
def test_kernel_layout_training_path_multiplies_by_quantos_dequantized_weight(bias):
    """With a gradient to compute, a CPU int4 kernel-layout layer multiplies by quanto's
    dequantized weight (matmul, then the bias, as quanto's linear function does): the output is
    exactly that, and the input and bias gradients are exactly quanto's own backward's."""
    _, linear, q = quantized("quanto_int4", 512, 96, dtype=torch.bfloat16, bias=bias)
    ref = reference(linear, "quanto_int4")
    x = torch.randn(2, 5, 512, dtype=torch.bfloat16)
    g = torch.randn(2, 5, 96, dtype=torch.bfloat16)
    w = ref.weight.dequantize()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = q(xa)
    expected = torch.matmul(x, w.t())
    if bias:
        expected = expected + ref.bias
    assert torch.equal(y.detach(), expected)
    y.backward(g)
    ref(xb).backward(g)
    assert torch.equal(xa.grad, xb.grad)
    if bias:
        assert torch.equal(q.bias.grad, ref.bias.grad)
    with torch.no_grad():  # inference keeps quanto's int4 kernel
        assert torch.equal(q(x), ref(x))


@pytest.mark.parametrize("method", METHODS)
def test_forward_from_several_threads(method):
    """Rebuilding quanto's tensor on each call never parses its metadata (ast.literal_eval, which
    CPython 3.11 cannot run in two threads at once)."""
    _, _, q = quantized(method, dtype=torch.bfloat16)
    xs = [torch.randn(4, 256, dtype=torch.bfloat16) for _ in range(4)]
    with torch.no_grad():
        expected = [q(x) for x in xs]
    got, errors = [None] * 4, []

    def run(i):
        try:
            with torch.no_grad():
                for _ in range(20):
                    got[i] = q(xs[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_through_load_state_dict(method):
    adapter, linear, q = quantized(method, dtype=torch.bfloat16)
    empty = adapter.create_quantized_linear(256, 64, True, device="cpu", dtype=torch.bfloat16)
    empty.load_state_dict(adapter.layer_state_dict(q))
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(empty(x), q(x))
    assert type(empty.weight) is type(q.weight)


# ---------------------------------------------------------------------- bitsandbytes INT8
def test_int8_rows_live_only_in_the_weight_parameter():
    """The forward never leaves ``module.state.CB`` (an alias of the whole weight FSDP cannot see);
    the row scales stay in ``module.state.SCB``, so a layer whose weight became a plain parameter
    (what FSDP2 hands it) computes the same."""
    pytest.importorskip("bitsandbytes")
    adapter, linear, q = quantized("bnb_int8", 128, 48)
    x = torch.randn(5, 128)
    with torch.no_grad():
        y = q(x)
    assert q.state.CB is None and q.state.SCB is not None
    plain = copy.deepcopy(q)
    plain.weight = nn.Parameter(q.weight.data.clone(), requires_grad=False)  # no CB/SCB attributes
    assert not hasattr(plain.weight, "SCB")
    with torch.no_grad():
        assert torch.equal(plain(x), y)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain.train()(xa).sum().backward()
    q.train()(xb).sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    assert plain.state.CB is None
