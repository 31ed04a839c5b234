import warnings

import pytest
import torch

from backend_manager import Backend
from quantization_wrapper import (
    MemoryWarning,
    QuantizationConfig,
    QuantizationMethod,
    bits_per_weight,
    estimate_footprint_gb,
    get_recommended_config,
    is_supported,
)
from quantization_wrapper.recommend import recommendation_candidates


def test_design_document_examples():
    assert get_recommended_config(Backend.MPS, model_size_b=7.0, available_memory_gb=16.0).method is QuantizationMethod.MLX_INT4
    config = get_recommended_config(Backend.CUDA, model_size_b=7.0, available_memory_gb=16.0)
    assert config.method is QuantizationMethod.BNB_NF4 and config.compute_dtype is torch.bfloat16
    assert get_recommended_config("mps", 7.0, 16.0).compute_dtype is torch.float16


@pytest.mark.parametrize("config,expected", [
    (QuantizationConfig(method="bnb_nf4"), 4 + 8 / 64 + 32 / (64 * 256)),
    (QuantizationConfig(method="bnb_nf4", double_quant=False), 4.5),
    (QuantizationConfig(method="hqq", bits=4, group_size=64), 4.5),
    (QuantizationConfig(method="mlx_int4", group_size=64), 4.5),
    (QuantizationConfig(method="quanto_int4"), 4.25),
])
def test_bits_per_weight_theory(config, expected):
    assert bits_per_weight(config) == pytest.approx(expected)
    assert bits_per_weight(QuantizationConfig(method="bnb_nf4")) == pytest.approx(4.127, abs=1e-3)


@pytest.mark.parametrize("backend", list(Backend))
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_more_memory_never_fewer_bits_and_always_fits(backend, training):
    previous_bits = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryWarning)
        for memory in [2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80, 128, 256]:
            config = get_recommended_config(backend, 13.0, memory, training=training)
            assert is_supported(backend, config.method)
            bits = config.bits if config.method is not QuantizationMethod.NONE else torch.finfo(config.compute_dtype).bits
            assert bits >= previous_bits, (memory, config)
            previous_bits = bits
            need = estimate_footprint_gb(config, 13.0, training=training)
            smallest = recommendation_candidates(backend, training=training)[-1]
            assert need <= memory or config == smallest


def test_does_not_fit_warns_with_lowest_memory_option():
    with pytest.warns(MemoryWarning, match="will likely not fit"):
        config = get_recommended_config("cuda", 70.0, 8.0)
    assert (config.method, config.bits) == (QuantizationMethod.HQQ, 2)


def test_footprint_model_counts_training_state():
    nf4 = QuantizationConfig(method="bnb_nf4")
    train, infer = estimate_footprint_gb(nf4, 7.0), estimate_footprint_gb(nf4, 7.0, training=False)
    assert 3.5 < infer < train < 8
    assert estimate_footprint_gb(QuantizationConfig(method="none", compute_dtype=torch.bfloat16), 7.0) > 14


def test_overrides_and_unknown_kwargs():
    config = get_recommended_config("cuda", 7.0, 16.0, skip_modules=["lm_head", "embed"], compute_dtype=torch.float16)
    assert config.skip_modules == ["lm_head", "embed"] and config.compute_dtype is torch.float16
    with pytest.raises(ValueError, match="unknown arguments.*'memory'"):
        get_recommended_config("cuda", 7.0, 16.0, memory=3)
    with pytest.raises(ValueError, match="model_size_b"):
        get_recommended_config("cuda", -1, 16.0)
    with pytest.raises(ValueError, match="available_memory_gb"):
        get_recommended_config("cuda", 7.0, 0)


def test_default_without_size_is_the_backends_4bit_method():
    assert get_recommended_config("cuda", check_libraries=False).method is QuantizationMethod.BNB_NF4
    assert get_recommended_config("mps").method is QuantizationMethod.MLX_INT4
    cpu = get_recommended_config("cpu")
    assert cpu.method is QuantizationMethod.HQQ and cpu.bits == 4


def test_memory_read_from_this_machine_when_not_given(fresh_detection, monkeypatch):
    monkeypatch.setenv("QUANTIZATION_WRAPPER_BACKEND", "cpu")
    config = get_recommended_config(None, model_size_b=0.1)
    assert is_supported("cpu", config.method)
    with pytest.raises(ValueError, match="available_memory_gb is required"):
        get_recommended_config("cuda", model_size_b=7.0)
