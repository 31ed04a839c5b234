"""The design document's custom adapter ("Custom Adapters"): a subclass that implements only
``create_quantized_linear`` and ``quantize_model``, and relies on the base class for the rest.

``MyCustomAdapter`` below is the document's example verbatim. It names two things the document does
not define: ``MyQuantizedLinear`` (written here: symmetric per-group integer weights whose ``weight``
property dequantizes and whose setter quantizes) and a method to serve -- ``QuantizationMethod`` is
closed, so the tests register the class for ``hqq`` (the ``registry`` fixture restores the
registry). ``_validate_backend_support`` is not a hook of ours (``validate_environment`` and
``check_config`` are); the example's method is simply never called.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantization_wrapper import QuantizationConfig, QuantizationError, register_adapter
from quantization_wrapper.adapters.base import QuantizationAdapter
from quantization_wrapper.serialization import load_quantized_model
from quantization_wrapper.surgery import replace_linear_with_quantized

from conftest import TinyModel


class MyQuantizedLinear(nn.Module):
    """Symmetric integer weights, one scale per ``group_size`` inputs of a row."""

    def __init__(self, in_features, out_features, bias, config):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group = config.bits, config.group_size or in_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, in_features // self.group))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def weight(self):
        q = self.qweight.view(self.out_features, -1, self.group).float()
        return (q * self.scale.unsqueeze(-1)).view(self.out_features, self.in_features)

    @weight.setter
    def weight(self, w):
        g = w.detach().float().view(self.out_features, -1, self.group)
        qmax = 2 ** (self.bits - 1) - 1
        scale = g.abs().amax(-1).clamp(min=1e-8) / qmax
        self.qweight = torch.round(g / scale.unsqueeze(-1)).clamp(-qmax, qmax).to(torch.int8).view_as(self.qweight)
        self.scale = scale

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


# ---------------------------------------------------------------- the design document's example, verbatim
class MyCustomAdapter(QuantizationAdapter):
    def _validate_backend_support(self):
        # Check if your method is supported
        pass
    
    def create_quantized_linear(self, in_features, out_features, bias=True):
        # Return your custom quantized layer
        return MyQuantizedLinear(in_features, out_features, bias, self.config)
    
    def quantize_model(self, model, **kwargs):
        # Implement model quantization
        return replace_linear_with_quantized(model, self)
# ---------------------------------------------------------------- end of the example


@pytest.fixture
def custom(registry):
    register_adapter("hqq")(MyCustomAdapter)

    def make(**kwargs):
        kwargs.setdefault("skip_modules", [])  # the default keeps lm_head in full precision
        return MyCustomAdapter(QuantizationConfig(method="hqq", **kwargs), "cpu")

    return make


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_unregistered_example_says_to_register():
    with pytest.raises(TypeError, match="MyCustomAdapter is not registered; decorate it with @register_adapter"):
        MyCustomAdapter(QuantizationConfig(method="hqq"), "cpu")


@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
def test_example_quantizes_every_linear_within_its_precision(custom, tiny_model, bits):
    adapter = custom(bits=bits, group_size=64)
    floats = linears(tiny_model)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        ref = tiny_model(ids)
        x = torch.randn(5, 64)
        layer_ref = {n: m(x if m.in_features == 64 else torch.randn(5, m.in_features)) for n, m in floats.items()}
    out_model = adapter.quantize_model(tiny_model)
    assert out_model is tiny_model and not linears(tiny_model)
    assert sorted(n for n, m in tiny_model.named_modules() if isinstance(m, MyQuantizedLinear)) == sorted(floats)

    qmax = 2 ** (bits - 1) - 1
    for name, linear in floats.items():
        q = tiny_model.get_submodule(name)
        w = linear.weight.detach()
        # rounding to the nearest level: every weight within half its group's step
        step = w.view(w.shape[0], -1, 64).abs().amax(-1) / qmax
        err = (q.weight - w).view(w.shape[0], -1, 64).abs().amax(-1)
        assert torch.all(err <= step / 2 + 1e-6), name
        if linear.bias is not None:
            assert torch.equal(q.bias, linear.bias)
    with torch.no_grad():
        out = tiny_model(ids)
    rel = ((out - ref).norm() / ref.norm()).item()
    # measured on this model (seed 0): 4-bit 0.093, 8-bit 0.0053 -- the ratio of the step sizes, 127/7
    assert rel < {4: 0.15, 8: 0.01}[bits]


def test_plan_reports_every_layer_and_its_bytes(custom, tiny_model):
    adapter = custom(bits=4, group_size=64)
    adapter.quantize_model(tiny_model)
    plan = tiny_model.quantization_plan
    assert len(plan.converted) == 9 and {l.method for l in plan.converted} == {"hqq"}
    for layer in plan.converted:
        groups = layer.in_features // 64
        # int8 storage (the example layer does not pack) + one fp32 scale per group + fp32 bias
        expected = layer.out_features * (layer.in_features + 4 * groups + (4 if layer.bias else 0))
        assert layer.bytes_after == expected and layer.bytes_after < layer.bytes_before


def test_save_load_round_trip(custom, tiny_model, tmp_path):
    adapter = custom(bits=4, group_size=64)
    adapter.quantize_model(tiny_model)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        before = tiny_model(ids)
    adapter.save_quantized_model(tiny_model, tmp_path / "ckpt")
    loaded = load_quantized_model(tmp_path / "ckpt", model_config=TinyModel())
    assert all(isinstance(loaded.get_submodule(n), MyQuantizedLinear) for n in linears(TinyModel()))
    with torch.no_grad():
        assert torch.equal(loaded(ids), before)
    assert torch.equal(adapter.load_quantized_model(tmp_path / "ckpt", TinyModel())(ids), before)


def test_meta_model_builds_empty_layers_through_the_short_signature(custom):
    adapter = custom(bits=4, group_size=64)
    with torch.device("meta"):
        model = TinyModel()
    adapter.quantize_model(model)
    layer = model.get_submodule("layers.0.mlp.up_proj")
    assert isinstance(layer, MyQuantizedLinear) and layer.qweight.device.type == "meta"


def test_layer_override_the_short_signature_cannot_honour_raises(custom, tiny_model):
    adapter = custom(bits=4, group_size=64, layer_configs={"lm_head": {"bits": 8}})
    with pytest.raises(QuantizationError, match="lm_head.*takes no config.*add a `config` keyword"):
        adapter.quantize_model(tiny_model)
    assert len(linears(tiny_model)) == 9  # left unchanged


def test_dequantize_module_uses_the_float_weight(custom):
    adapter = custom(bits=8, group_size=64)
    linear = nn.Linear(64, 32)
    q = adapter.quantize_linear(linear)
    back = adapter.dequantize_module(q)
    assert type(back) is nn.Linear and (back.in_features, back.out_features) == (64, 32)
    assert torch.equal(back.weight, q.weight) and torch.equal(back.bias, linear.bias)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(back(x), q(x), atol=1e-6)


# ---------------------------------------------------------------- the default hooks, one layer kind each
class LoadsFloats(nn.Module):
    """Takes float weights through ``load_float_weight`` (rounds them to multiples of 1/16)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.register_buffer("q", torch.zeros(out_features, in_features))
        self.register_buffer("b", torch.zeros(out_features) if bias else None)

    def load_float_weight(self, weight, bias):
        self.q.copy_(torch.round(weight * 16) / 16)
        if bias is not None:
            self.b.copy_(bias)

    def dequantize(self):
        return self.q


class FakeQuant(nn.Module):
    """A float ``weight`` parameter, rounded in ``forward``."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None


class Opaque(nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))


def _adapter_for(layer_cls):
    class A(QuantizationAdapter):
        def create_quantized_linear(self, in_features, out_features, bias=True, *, config=None, device=None,
                                    dtype=None):
            with torch.device(device or "cpu"):
                return layer_cls(in_features, out_features, bias)

    return register_adapter("hqq")(A)(QuantizationConfig(method="hqq"), "cpu")


def test_load_float_weight_hook(registry):
    adapter = _adapter_for(LoadsFloats)
    linear = nn.Linear(16, 8)
    q = adapter.quantize_linear(linear)
    assert torch.equal(q.q, torch.round(linear.weight.detach() * 16) / 16) and torch.equal(q.b, linear.bias)
    back = adapter.dequantize_module(q)
    assert torch.equal(back.weight, q.q) and back.bias is None  # ``b`` is not named ``bias``


def test_weight_parameter_is_copied(registry):
    adapter = _adapter_for(FakeQuant)
    linear = nn.Linear(16, 8)
    q = adapter.quantize_linear(linear)
    assert torch.equal(q.weight, linear.weight) and q.weight.data_ptr() != linear.weight.data_ptr()
    back = adapter.dequantize_module(q)
    assert torch.equal(back.weight, linear.weight) and torch.equal(back.bias, linear.bias)
    assert back.weight.data_ptr() != q.weight.data_ptr()


def test_layer_without_a_way_in_or_out_names_what_to_implement(registry):
    adapter = _adapter_for(Opaque)
    with pytest.raises(TypeError, match=r"Opaque takes no float weight: give it a load_float_weight\(weight, bias\) "
                                        r"method.*or implement quantize_linear on A"):
        adapter.quantize_linear(nn.Linear(16, 8))
    with pytest.raises(TypeError, match=r"Opaque has neither a dequantize\(\) method.*implement dequantize_module on A"):
        adapter.dequantize_module(Opaque(16, 8))
