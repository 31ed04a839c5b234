import json

import pytest
import torch

from quantization_wrapper import (
    QuantizationConfig,
    QuantizationMethod,
    get_config,
    list_configs,
    register_config,
    unregister_config,
)


def test_method_values_are_lower_case_names():
    for m in QuantizationMethod:
        assert m.value == m.name.lower()
    for name in ["BNB_NF4", "BNB_FP4", "BNB_INT8", "HQQ", "MLX_INT4", "MLX_INT8", "QUANTO_INT2",
                 "QUANTO_INT4", "QUANTO_INT8", "NONE"]:
        assert QuantizationMethod[name].value == name.lower()
    assert QuantizationMethod.parse("bnb_nf4") is QuantizationMethod.BNB_NF4
    assert QuantizationMethod.parse("HQQ") is QuantizationMethod.HQQ
    assert QuantizationMethod.HQQ == "hqq"  # str enum


def test_design_document_config_example():
    config = QuantizationConfig(method=QuantizationMethod.BNB_NF4, bits=4, compute_dtype=torch.bfloat16)
    assert (config.bits, config.group_size, config.quant_type, config.double_quant) == (4, 64, "nf4", True)
    assert config.skip_modules == ["lm_head"]


@pytest.mark.parametrize("method,bits,group", [
    ("bnb_nf4", 4, 64), ("bnb_fp4", 4, 64), ("bnb_int8", 8, None), ("hqq", 4, 64),
    ("mlx_int4", 4, 64), ("mlx_int8", 8, 64), ("quanto_int2", 2, 128), ("quanto_int4", 4, 128),
    ("quanto_int8", 8, None), ("none", 16, None),
])
def test_bits_and_group_derived_from_method(method, bits, group):
    config = QuantizationConfig(method=method)
    assert config.method.value == method
    assert (config.bits, config.group_size) == (bits, group)


@pytest.mark.parametrize("kwargs,field,allowed", [
    (dict(method="bnb_nf4", bits=8), "bits=8", "allowed: 4"),
    (dict(method="bnb_int8", bits=4), "bits=4", "allowed: 8"),
    (dict(method="hqq", bits=5), "bits=5", "1, 2, 3, 4, 8"),
    (dict(method="mlx_int4", bits=7), "bits=7", "2, 3, 4, 5, 6, 8"),
    (dict(method="mlx_int4", group_size=48), "group_size=48", "32, 64, 128"),
    (dict(method="quanto_int4", bits=8), "bits=8", "allowed: 4"),
    (dict(method="hqq", group_size=0), "group_size=0", "positive"),
    (dict(method="hqq", group_size=-64), "group_size=-64", "positive"),
    (dict(method="hqq", group_size=60), "group_size=60", "multiple of 8"),
    (dict(method="bnb_nf4", quant_type="int4"), "quant_type='int4'", "nf4, fp4"),
    (dict(method="bnb_nf4", quant_type="fp4"), "quant_type='fp4'", "bnb_fp4"),
    (dict(method="gptq"), "method='gptq'", "bnb_nf4"),
    (dict(method="hqq", compute_dtype="float64"), "compute_dtype='float64'", "bfloat16"),
    (dict(method="hqq", compute_dtype=torch.int32), "compute_dtype=torch.int32", "bfloat16"),
    (dict(method="hqq", skip_modules="lm_head"), "skip_modules='lm_head'", "list"),
    (dict(method="hqq", layer_configs={"layers.0": {"bitz": 8}}), "bitz", "allowed: method, bits"),
    (dict(method="hqq", layer_configs={"layers.0": {"bits": 5}}), "layer_configs['layers.0']: bits=5", "1, 2"),
    (dict(method="hqq", layer_configs={"re:([": {"bits": 8}}), "re:([", "regular expression"),
    (dict(method="hqq", bits=True), "bits=True", "int"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_values_name_field_value_and_allowed(kwargs, field, allowed):
    with pytest.raises(ValueError) as info:
        QuantizationConfig(**kwargs)
    assert field in str(info.value)
    assert allowed in str(info.value)


def test_strings_accepted_for_method_and_dtypes():
    config = QuantizationConfig(method="hqq", compute_dtype="bfloat16", storage_dtype="torch.float16")
    assert config.method is QuantizationMethod.HQQ
    assert config.compute_dtype is torch.bfloat16 and config.storage_dtype is torch.float16


def test_fp4_method_implies_quant_type():
    assert QuantizationConfig(method="bnb_fp4").quant_type == "fp4"
    assert QuantizationConfig(method="hqq").quant_type is None
    assert QuantizationConfig(method="hqq").double_quant is None


def test_json_round_trip():
    config = QuantizationConfig(
        method="hqq", bits=4, group_size=32, compute_dtype=torch.bfloat16, storage_dtype=torch.bfloat16,
        skip_modules=["lm_head", "re:.*embed.*"],
        layer_configs={"model.layers.0": {"bits": 8, "compute_dtype": torch.float16},
                       "model.layers.1": {"method": "quanto_int4"}},
        backend_options={"axis": 1},
    )
    text = json.dumps(config.to_dict())
    back = QuantizationConfig.from_dict(json.loads(text))
    assert back == config
    assert back.to_dict() == config.to_dict()
    assert json.loads(text)["compute_dtype"] == "bfloat16"
    assert QuantizationConfig.from_json(config.to_json()) == config


def test_from_dict_rejects_unknown_keys_listing_known():
    with pytest.raises(ValueError) as info:
        QuantizationConfig.from_dict({"method": "hqq", "nbits": 4})
    assert "nbits" in str(info.value) and "group_size" in str(info.value)


def test_from_dict_rejects_future_format():
    with pytest.raises(ValueError, match="newer"):
        QuantizationConfig.from_dict({"method": "hqq", "format_version": 99})


def test_layer_override_resolution():
    config = QuantizationConfig(method="hqq", bits=4, group_size=64, layer_configs={
        "transformer.layers.0": {"bits": 8},
        "transformer.layers.23": {"bits": 2},
        "transformer.layers.0.mlp": {"bits": 3, "group_size": 32},
        "lm_head": {"method": "none"},
    })
    assert config.for_layer("transformer.layers.0.attn.q").bits == 8
    assert config.for_layer("transformer.layers.23.mlp.up").bits == 2
    layer = config.for_layer("transformer.layers.0.mlp.up")
    assert (layer.bits, layer.group_size) == (3, 32)  # more specific prefix wins
    assert config.for_layer("transformer.layers.5.attn.q").bits == 4
    assert config.for_layer("lm_head").method is QuantizationMethod.NONE


def test_method_override_takes_that_methods_defaults():
    config = QuantizationConfig(method="hqq", bits=2, group_size=16,
                                layer_configs={"layers.0": {"method": "bnb_int8"}})
    layer = config.for_layer("layers.0.q")
    assert (layer.method, layer.bits, layer.group_size) == (QuantizationMethod.BNB_INT8, 8, None)


def test_presets():
    assert {"nf4", "fp4", "int8", "hqq4", "mlx4", "quanto4", "none"} <= set(list_configs())
    nf4 = get_config("nf4")
    assert (nf4.method, nf4.double_quant, nf4.compute_dtype) == (QuantizationMethod.BNB_NF4, True, torch.bfloat16)
    assert get_config("NF4", compute_dtype=torch.float16).compute_dtype is torch.float16
    assert get_config("int8").method is QuantizationMethod.BNB_INT8
    mixed = get_config("mixed_attn8_ffn4")
    assert mixed.for_layer("model.layers.0.self_attn.q_proj").bits == 8
    assert mixed.for_layer("model.layers.0.mlp.up_proj").bits == 4
    # a preset is a fresh copy each time
    get_config("hqq4").skip_modules.append("x")
    assert get_config("hqq4").skip_modules == ["lm_head"]
    with pytest.raises(ValueError, match="known presets"):
        get_config("nf5")


def test_register_custom_preset():
    register_config("my_int8", QuantizationConfig(method="quanto_int8", skip_modules=["head"]))
    try:
        assert get_config("my_int8").skip_modules == ["head"]
        with pytest.raises(ValueError, match="exists already"):
            register_config("my_int8", {"method": "hqq"})
        register_config("my_int8", {"method": "hqq"}, overwrite=True)
        assert get_config("my_int8").method is QuantizationMethod.HQQ
        with pytest.raises(ValueError):
            register_config("broken", {"method": "hqq", "bits": 7})
        assert "broken" not in list_configs()
    finally:
        unregister_config("my_int8")
