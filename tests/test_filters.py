import pytest

from doubles import RowInt8Adapter, RowInt8Linear
from quantization_wrapper import (
    ExcludeModuleByName,
    ExcludeSubmodules,
    IncludeModuleByName,
    QuantizationConfig,
    QuantizeModuleFilter,
    register_adapter,
    replace_linear_with_quantized,
)


@pytest.fixture
def adapter(registry):
    register_adapter("hqq")(RowInt8Adapter)
    return RowInt8Adapter(QuantizationConfig(method="hqq", skip_modules=[]), "cpu")


def quantized_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, RowInt8Linear))


def test_exclude_by_name(tiny_model, adapter):
    f = ExcludeModuleByName(["layers.0.attn.q_proj", "lm_head"])
    replace_linear_with_quantized(tiny_model, adapter, module_filter=f)
    names = quantized_names(tiny_model)
    assert "layers.0.attn.q_proj" not in names and "lm_head" not in names
    assert "layers.1.attn.q_proj" in names and len(names) == 7
    f.validate()


def test_exclude_submodules_covers_subtree(tiny_model, adapter):
    f = ExcludeSubmodules(["layers.0", "lm_head"])
    replace_linear_with_quantized(tiny_model, adapter, module_filter=f)
    assert quantized_names(tiny_model) == ["layers.1.attn.q_proj", "layers.1.attn.v_proj",
                                           "layers.1.mlp.down_proj", "layers.1.mlp.up_proj"]
    assert len(f.matched["layers.0"]) > 4  # the block and everything under it


def test_exclude_module_by_name_does_not_exclude_children(tiny_model, adapter):
    f = ExcludeModuleByName(["layers.0.mlp"])  # a container: its linears are not it
    replace_linear_with_quantized(tiny_model, adapter, module_filter=f)
    assert "layers.0.mlp.up_proj" in quantized_names(tiny_model)


def test_combined_filters_require_all(tiny_model, adapter):
    combined = ExcludeModuleByName(["lm_head"]) + ExcludeSubmodules(["layers.1"])
    replace_linear_with_quantized(tiny_model, adapter, module_filter=combined)
    assert quantized_names(tiny_model) == ["layers.0.attn.q_proj", "layers.0.attn.v_proj",
                                           "layers.0.mlp.down_proj", "layers.0.mlp.up_proj"]
    combined.validate()


def test_validate_raises_for_unmatched_names_and_model_is_untouched(tiny_model, adapter):
    f = ExcludeModuleByName(["lm_haed"]) + ExcludeSubmodules(["layers.0"])
    with pytest.raises(ValueError, match="lm_haed"):
        replace_linear_with_quantized(tiny_model, adapter, module_filter=f)
    assert quantized_names(tiny_model) == []  # validation runs before any conversion


def test_plain_callable_and_custom_subclass(tiny_model, adapter):
    class OnlyMLP(QuantizeModuleFilter):
        def __call__(self, module, name):
            return ".mlp." in f".{name}."

    replace_linear_with_quantized(tiny_model, adapter, module_filter=OnlyMLP() + (lambda m, n: "down" not in n))
    assert quantized_names(tiny_model) == ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]


def test_include_by_name_glob(tiny_model, adapter):
    replace_linear_with_quantized(tiny_model, adapter, module_filter=IncludeModuleByName(["*.v_proj"]))
    assert quantized_names(tiny_model) == ["layers.0.attn.v_proj", "layers.1.attn.v_proj"]


def test_filter_via_adapter_quantize_model(tiny_model, adapter):
    adapter.quantize_model(tiny_model, module_filter=ExcludeSubmodules(["layers"]))
    assert quantized_names(tiny_model) == ["lm_head"]


def test_empty_filter_rejected():
    with pytest.raises(ValueError, match="at least one"):
        ExcludeModuleByName([])
