import pytest
import torch
from torch import nn

from doubles import FailingAdapter, RowInt8Adapter, RowInt8Linear
from quantization_wrapper import (
    QuantizationConfig,
    QuantizationError,
    get_quantization_plan,
    register_adapter,
    replace_linear_with_quantized,
)
from quantization_wrapper.adapters.base import tensor_nbytes


@pytest.fixture
def make(registry):
    register_adapter("hqq")(RowInt8Adapter)

    def make(cls=RowInt8Adapter, **kwargs):
        kwargs.setdefault("method", "hqq")
        return cls(QuantizationConfig(**kwargs), "cpu")

    return make


def qnames(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, RowInt8Linear))


def test_replaces_all_linears_except_skipped_and_keeps_outputs_close(tiny_model, make):
    x = torch.randint(0, 50, (2, 7))
    reference = tiny_model(x)
    replace_linear_with_quantized(tiny_model, make())
    assert len(qnames(tiny_model)) == 8 and isinstance(tiny_model.lm_head, nn.Linear)
    out = tiny_model(x)
    rel = ((out - reference).norm() / reference.norm()).item()
    assert rel < 0.02  # per-row int8


def test_bias_dtype_and_device_kept(tiny_model, make):
    tiny_model.to(torch.bfloat16)
    q_bias = tiny_model.layers[0].attn["q_proj"].bias.detach().clone()
    replace_linear_with_quantized(tiny_model, make())
    q = tiny_model.layers[0].attn["q_proj"]
    assert torch.equal(q.bias, q_bias) and q.scale.dtype is torch.bfloat16 and q.qweight.device.type == "cpu"
    assert tiny_model.layers[0].attn["v_proj"].bias is None


def test_skip_modules_argument_replaces_config_list(tiny_model, make):
    replace_linear_with_quantized(tiny_model, make(), skip_modules=["re:.*down_proj", "layers.0.attn"])
    assert qnames(tiny_model) == ["layers.0.mlp.up_proj", "layers.1.attn.q_proj", "layers.1.attn.v_proj",
                                  "layers.1.mlp.up_proj", "lm_head"]
    plan = tiny_model.quantization_plan
    assert plan["layers.1.mlp.down_proj"].reason == "skip_modules: 're:.*down_proj'"


def test_layer_configs_override_bits_group_and_method(registry, tiny_model, make):
    class Other(RowInt8Adapter):
        pass

    register_adapter("quanto_int8")(Other)
    adapter = make(bits=4, group_size=32, layer_configs={
        "layers.0": {"bits": 8, "group_size": 64},
        "layers.1.mlp": {"method": "quanto_int8"},
        "layers.1.attn.v_proj": {"method": "none"},
    })
    replace_linear_with_quantized(tiny_model, adapter)
    plan = tiny_model.quantization_plan
    assert (plan["layers.0.attn.q_proj"].bits, plan["layers.0.attn.q_proj"].group_size) == (8, 64)
    assert (plan["layers.1.attn.q_proj"].bits, plan["layers.1.attn.q_proj"].group_size) == (4, 32)
    assert plan["layers.1.mlp.up_proj"].method == "quanto_int8"
    assert plan["layers.1.attn.v_proj"].status == "skipped" and "method 'none'" in plan["layers.1.attn.v_proj"].reason
    sibling = adapter.for_method("quanto_int8")
    assert isinstance(sibling, Other) and sorted(sibling.calls) == ["layers.1.mlp.down_proj", "layers.1.mlp.up_proj"]
    assert "layers.1.mlp.up_proj" not in adapter.calls


def test_group_size_fitted_or_layer_skipped(registry, make):
    model = nn.Sequential()
    model.add_module("a", nn.Linear(96, 8))  # 64 does not divide 96 -> 32
    model.add_module("b", nn.Linear(100, 8))  # no multiple of 8 divides 100 -> skipped
    model.add_module("c", nn.Linear(128, 8))
    replace_linear_with_quantized(model, make(group_size=64))
    plan = model.quantization_plan
    assert plan["a"].group_size == 32 and "using group_size=32" in plan["a"].reason
    assert plan["b"].status == "skipped" and "in_features=100" in plan["b"].reason
    assert plan["c"].group_size == 64 and plan["c"].reason is None
    assert isinstance(model.b, nn.Linear) and isinstance(model.a, RowInt8Linear)


def test_all_or_nothing_on_failure(registry, tiny_model):
    register_adapter("hqq")(FailingAdapter)
    before = {n: m for n, m in tiny_model.named_modules()}
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(QuantizationError, match="layers.1.mlp.up_proj.*simulated kernel failure.*unchanged"):
        replace_linear_with_quantized(tiny_model, FailingAdapter(QuantizationConfig(method="hqq"), "cpu"))
    after = dict(tiny_model.named_modules())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in state.items())
    assert get_quantization_plan(tiny_model) is None


def test_meta_model_converts_without_allocating(make):
    with torch.device("meta"):
        from conftest import TinyModel
        model = TinyModel(dim=4096, hidden=11008)  # ~0.5 GB of fp32 if it were allocated
    replace_linear_with_quantized(model, make())
    q = model.layers[0].mlp["up_proj"]
    assert isinstance(q, RowInt8Linear) and q.qweight.device.type == "meta"
    assert all(t.device.type == "meta" for t in model.state_dict().values())


def test_plan_records_bytes_equal_to_held_tensors(tiny_model, make):
    replace_linear_with_quantized(tiny_model, make())
    plan = tiny_model.quantization_plan
    for layer in plan.quantized:
        module = tiny_model.get_submodule(layer.name)
        assert layer.bytes_after == tensor_nbytes(list(module.parameters()) + list(module.buffers()))
        expected_before = 4 * layer.numel + (4 * layer.out_features if layer.bias else 0)
        assert layer.bytes_before == expected_before
        # int8 weight + fp32 row scale (+ fp32 bias)
        assert layer.bytes_after == layer.numel + 4 * layer.out_features + (4 * layer.out_features if layer.bias else 0)
    assert plan.bytes_after < plan.bytes_before / 3
    text = str(plan)
    assert "layers.0.attn.q_proj" in text and "64x64" in text and "8 quantized, 1 skipped" in text
    assert plan.to_dict()["layers"][0]["name"] == plan.layers[0].name
    assert type(plan).from_dict(plan.to_dict()).layers == plan.layers


def test_warns_when_nothing_replaced(make):
    model = nn.Sequential(nn.ReLU())
    with pytest.warns(UserWarning, match="no linear layer was quantized"):
        replace_linear_with_quantized(model, make())


def test_warns_on_typos_in_skip_and_layer_configs(tiny_model, make):
    with pytest.warns(UserWarning) as caught:
        replace_linear_with_quantized(tiny_model, make(skip_modules=["lm_haed"], layer_configs={"layer.0": {"bits": 8}}))
    messages = " ".join(str(w.message) for w in caught)
    assert "lm_haed" in messages and "layer.0" in messages


def test_second_pass_does_not_requantize(tiny_model, make):
    adapter = make()
    replace_linear_with_quantized(tiny_model, adapter)
    n = len(adapter.calls)
    replace_linear_with_quantized(tiny_model, adapter, skip_modules=[])
    assert adapter.calls[n:] == ["lm_head"]
    assert len(tiny_model.quantization_plan.quantized) == 9


def test_quantize_model_refuses_an_already_quantized_model(tiny_model, make):
    adapter = make()
    adapter.quantize_model(tiny_model)
    with pytest.raises(ValueError, match=r"already quantized: it holds 8 quantized layers \(8 RowInt8Linear\) and "
                                         r"a quantization_plan of method 'hqq' \(8 layers converted\)"):
        adapter.quantize_model(tiny_model, skip_modules=[])
    assert len(adapter.calls) == 8


def test_non_finite_weights_are_refused_before_any_layer_is_converted(tiny_model, make):
    adapter = make()
    with torch.no_grad():
        tiny_model.layers[1].mlp["down_proj"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layers.1.mlp.down_proj: 1 of 8192 weight values are non-finite "
                                         r"\(0 inf, 1 nan\)"):
        replace_linear_with_quantized(tiny_model, adapter)
    assert adapter.calls == [] and get_quantization_plan(tiny_model) is None
    replace_linear_with_quantized(tiny_model, adapter, skip_modules=["lm_head", "layers.1.mlp.down_proj"])
    assert len(adapter.calls) == 7 and "layers.1.mlp.down_proj" not in adapter.calls


def test_rejects_single_linear_and_non_modules(make):
    with pytest.raises(ValueError, match="quantize_linear"):
        replace_linear_with_quantized(nn.Linear(4, 4), make())
    with pytest.raises(ValueError, match="nn.Module"):
        replace_linear_with_quantized("model", make())


def test_quantize_model_rejects_unknown_kwargs(tiny_model, make):
    with pytest.raises(TypeError):
        make().quantize_model(tiny_model, skip_modulez=["x"])


def test_progress_bar(tiny_model, make, capsys):
    replace_linear_with_quantized(tiny_model, make(), progress=True)
    assert "quantizing (hqq)" in capsys.readouterr().err


def test_override_to_another_library_does_not_inherit_its_backend_options(tiny_model):
    """HQQ options must not reach the MLX layers a layer_configs entry switches to."""
    pytest.importorskip("hqq")
    from quantization_wrapper import create_quantization_adapter

    config = QuantizationConfig(method="hqq", group_size=32, backend_options={"optimize": False},
                                layer_configs={"layers.1.mlp": {"method": "mlx_int4", "group_size": 32}})
    adapter = create_quantization_adapter("cpu", config, strict=True)
    replace_linear_with_quantized(tiny_model, adapter)
    plan = tiny_model.quantization_plan
    assert plan["layers.1.mlp.up_proj"].method == "mlx_int4" and plan["layers.0.mlp.up_proj"].method == "hqq"
    assert adapter.for_method("mlx_int4").config.backend_options == {}


def test_tensor_nbytes_counts_views_once_and_not_their_whole_storage():
    storage = torch.zeros(1000, dtype=torch.float32)  # e.g. one memory-mapped file
    a, b = storage[:100], storage[100:300].view(20, 10)
    assert tensor_nbytes([a, b]) == 300 * 4  # not 2 x 4000
    assert tensor_nbytes([a, a.view(10, 10), b]) == 300 * 4  # a tied alias counts once
    assert tensor_nbytes([torch.empty(7, 3, dtype=torch.bfloat16, device="meta"), None]) == 42


def test_quantizing_a_tied_lm_head_says_it_unties():
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    from quantization_wrapper import QuantizationConfig, create_quantization_adapter

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    adapter = create_quantization_adapter("cpu", QuantizationConfig(method="hqq", bits=4, group_size=32,
                                                                    skip_modules=[]))
    with pytest.warns(UserWarning, match=r"lm_head.weight is tied to model.embed_tokens.weight; quantizing lm_head unties"):
        adapter.quantize_model(model)
    kept = create_quantization_adapter("cpu", QuantizationConfig(method="hqq", bits=4, group_size=32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        kept.quantize_model(LlamaForCausalLM(model.config))  # lm_head skipped by default: no warning


def test_weights_left_in_float_are_reported_and_warned_about():
    """Fused MoE experts kept in float (here by skip_modules): the plan names every parameter over
    1M elements kept in float and why, the share quantized, and quantize_model warns."""
    import warnings

    from transformers import MixtralConfig, MixtralForCausalLM

    from quantization_wrapper import QuantizationConfig, create_quantization_adapter

    model = MixtralForCausalLM(MixtralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                             num_local_experts=8))
    total = sum(p.numel() for p in model.parameters())
    adapter = create_quantization_adapter("cpu", QuantizationConfig(method="hqq", bits=4, group_size=64,
                                                                    skip_modules=["lm_head", "mlp.experts"]))
    with pytest.warns(UserWarning, match=r"only 5% of the model's .* parameters are quantized.*fused experts, "
                                         r"every expert skipped: skip_modules: 'mlp.experts'"):
        adapter.quantize_model(model)
    plan = model.quantization_plan
    assert plan.total_parameters == total
    assert plan.quantized_parameters == sum(l.numel for l in plan.quantized)
    assert abs(plan.quantized_share - plan.quantized_parameters / total) < 1e-12 and plan.quantized_share < 0.06
    names = {p["name"]: p for p in plan.float_parameters}
    assert {f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("gate_up_proj", "down_proj")} <= set(names)
    assert all(p["numel"] > 1_000_000 for p in plan.float_parameters)
    assert "fused expert" in names["model.layers.0.mlp.experts.down_proj"]["reason"]
    assert "5.5% of the model's" in plan.table()
    back = type(plan).from_dict(plan.to_dict())
    assert back.float_parameters == plan.float_parameters and back.total_parameters == total
    with warnings.catch_warnings():  # a dense model quantizes most of its weights: no warning
        warnings.simplefilter("error", UserWarning)
        from transformers import LlamaConfig, LlamaForCausalLM

        dense = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
        create_quantization_adapter("cpu", QuantizationConfig(method="hqq", bits=4, group_size=64)).quantize_model(dense)
    assert dense.quantization_plan.quantized_share > 0.5
