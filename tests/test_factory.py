import warnings

import pytest
import torch

from backend_manager import Backend
from doubles import RowInt8Adapter
from quantization_wrapper import (
    FallbackAdapter,
    QuantizationConfig,
    QuantizationFallbackWarning,
    QuantizationMethod,
    create_quantization_adapter,
    get_adapter_class,
    register_adapter,
)
from quantization_wrapper import factory


@pytest.fixture(autouse=True)
def _reset_warned():
    factory._warned.clear()
    yield
    factory._warned.clear()


def test_registry_decorator_and_lookup(registry):
    register_adapter("hqq", QuantizationMethod.MLX_INT4)(RowInt8Adapter)
    assert get_adapter_class("hqq") is RowInt8Adapter and get_adapter_class("mlx_int4") is RowInt8Adapter
    assert RowInt8Adapter.methods == (QuantizationMethod.HQQ, QuantizationMethod.MLX_INT4)
    with pytest.raises(TypeError):
        register_adapter("hqq")(dict)


def test_unregistered_method_error_lists_registered(registry):
    registry.clear()
    register_adapter("none")(FallbackAdapter)
    with pytest.raises(ValueError, match="registered: none"):
        get_adapter_class("hqq")


def test_creates_registered_adapter(registry):
    register_adapter("hqq")(RowInt8Adapter)
    adapter = create_quantization_adapter("cpu", QuantizationConfig(method="hqq", bits=8))
    assert type(adapter) is RowInt8Adapter and adapter.backend is Backend.CPU and adapter.config.bits == 8


def test_strict_raises_listing_every_error():
    config = QuantizationConfig(method="bnb_nf4", compute_dtype=torch.bfloat16)
    with pytest.raises(ValueError) as info:
        create_quantization_adapter("mps", config, strict=True)
    text = str(info.value)
    assert "2 problems" in text and "bnb_nf4 is not supported on the mps backend" in text and "bfloat16" in text


def test_fallback_substitutes_along_chain_and_warns_once(registry):
    register_adapter("quanto_int4")(RowInt8Adapter)
    config = QuantizationConfig(method="bnb_nf4", compute_dtype=torch.float16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = create_quantization_adapter("mps", config)
        create_quantization_adapter("mps", config)
    assert type(adapter) is RowInt8Adapter
    assert adapter.config.method is QuantizationMethod.QUANTO_INT4 and adapter.config.bits == 4
    assert adapter.config.compute_dtype is torch.float16  # the rest of the config carries over
    ours = [w for w in caught if issubclass(w.category, QuantizationFallbackWarning)]
    assert len(ours) == 1
    assert "bnb_nf4" in str(ours[0].message) and "quanto_int4" in str(ours[0].message)


def test_missing_library_moves_to_next_usable(registry, monkeypatch):
    # MLX_INT4 on CUDA -> HQQ 4-bit keeping the group size (the design's example)
    register_adapter("hqq")(RowInt8Adapter)
    monkeypatch.setattr(factory, "validate_quantization_config", _matrix_only_validation)
    with pytest.warns(QuantizationFallbackWarning, match="mlx_int4 .4-bit. cannot run on cuda.*Using hqq .4-bit."):
        adapter = create_quantization_adapter("cuda", QuantizationConfig(method="mlx_int4", group_size=32))
    assert (adapter.config.method, adapter.config.bits, adapter.config.group_size) == (QuantizationMethod.HQQ, 4, 32)


def _matrix_only_validation(config, backend):
    """Validation against the matrix and the registry only (the CUDA libraries are not on this machine)."""
    from quantization_wrapper.validation import validate_quantization_config
    from backend_manager import imports

    real = imports.get_library_status

    def usable_everywhere(name, backend=None):
        s = real(name, "cpu")
        return type(s)(**{**s.__dict__, "usable": s.installed, "reason": None})

    import quantization_wrapper.validation as v
    saved = v.get_library_status
    v.get_library_status = usable_everywhere
    try:
        return validate_quantization_config(config, backend)
    finally:
        v.get_library_status = saved


def test_chain_ends_at_fallback_adapter(registry):
    for m in list(registry):
        if m is not QuantizationMethod.NONE:
            registry.pop(m)
    with pytest.warns(QuantizationFallbackWarning, match="no quantization"):
        adapter = create_quantization_adapter("cpu", QuantizationConfig(method="hqq", compute_dtype=torch.bfloat16))
    assert type(adapter) is FallbackAdapter
    assert adapter.config.method is QuantizationMethod.NONE and adapter.config.compute_dtype is torch.bfloat16


def test_unusable_layer_override_replaced(registry):
    register_adapter("hqq")(RowInt8Adapter)
    config = QuantizationConfig(method="hqq", compute_dtype=torch.float16,
                                layer_configs={"layers.0": {"method": "bnb_int8"}})
    with pytest.warns(QuantizationFallbackWarning, match="layer_configs"):
        adapter = create_quantization_adapter("mps", config)
    assert adapter.config.for_layer("layers.0.q").method is not QuantizationMethod.BNB_INT8


def test_design_examples_run_as_written(registry):
    register_adapter("hqq")(RowInt8Adapter)
    config = QuantizationConfig(method=QuantizationMethod.HQQ, bits=8, group_size=128, compute_dtype=torch.float32)
    adapter = create_quantization_adapter(Backend.CPU, config)
    assert adapter.config.bits == 8


def test_adapter_rejects_config_of_other_method(registry):
    register_adapter("hqq")(RowInt8Adapter)
    with pytest.raises(ValueError, match="serves hqq"):
        RowInt8Adapter(QuantizationConfig(method="bnb_int8"), "cpu")


def test_default_backend_is_detected(registry, fresh_detection, monkeypatch):
    monkeypatch.setenv("QUANTIZATION_WRAPPER_BACKEND", "cpu")
    adapter = create_quantization_adapter(None, QuantizationConfig(method="none"))
    assert adapter.backend is Backend.CPU


def test_fallback_adapter_casts_and_says_so(tiny_model):
    adapter = create_quantization_adapter("cpu", QuantizationConfig(method="none", compute_dtype="bfloat16"))
    with pytest.warns(UserWarning, match="does not quantize"):
        adapter.quantize_model(tiny_model)
    plan = tiny_model.quantization_plan
    assert all(l.status == "float" and l.bits == 16 for l in plan.converted)
    assert plan.skipped[0].name == "lm_head"
    assert plan.bytes_after < 0.55 * plan.bytes_before + 4 * 64 * 50  # halved, lm_head kept
    assert tiny_model.layers[0].attn["q_proj"].weight.dtype is torch.bfloat16
    assert tiny_model.is_quantized is False and tiny_model.quantization_method == "none"
