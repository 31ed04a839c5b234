"""A backend added from one file under tests/ (tests/toy_backend.py) gets everything the built-in
ones get, with no file of the package touched: validation, a compatibility row, sizing, a
recommendation, save/load, an FSDP table row and peft LoRA. Afterwards no trace of it is left."""

from __future__ import annotations

import pytest
import torch

import toy_backend
from qlora_common import TARGETS, build_model, rank_batches
from quantization_wrapper import (
    QuantizationConfig,
    create_quantization_adapter,
    estimate_model_size,
    get_config,
    get_recommended_config,
    load_quantized_model,
    save_quantized_model,
    validate_quantization_config,
)
from quantization_wrapper.compatibility import COMPATIBILITY_MATRIX, render_compatibility_markdown
from quantization_wrapper.fsdp import FSDP_SUPPORT, render_fsdp_markdown
from quantization_wrapper.methods import METHOD_SPECS, QuantizationMethod


@pytest.fixture
def toy():
    method = toy_backend.install()
    try:
        yield method
    finally:
        toy_backend.uninstall()
    assert "toy_int8" not in {m.value for m in METHOD_SPECS}
    with pytest.raises(ValueError, match="not a quantization method"):
        QuantizationMethod.parse("toy_int8")


def test_validation_and_tables(toy):
    config = QuantizationConfig(method="toy_int8")
    assert config.method is toy and config.bits == 8 and get_config("toy8").method is toy
    assert validate_quantization_config(config, "cpu") == []
    errors = validate_quantization_config(config, "mlx")
    assert [e.field for e in errors if e.severity == "error"] == ["method"]
    with pytest.raises(ValueError, match="bits=4 is not valid for method='toy_int8'"):
        QuantizationConfig(method="toy_int8", bits=4)
    assert COMPATIBILITY_MATRIX["cpu"][toy].supported and not COMPATIBILITY_MATRIX["mlx"][toy].supported
    assert "TOY_INT8" in render_compatibility_markdown()
    assert FSDP_SUPPORT[toy].fsdp2 == "replicated" and "toy_int8" in render_fsdp_markdown()
    # the fallback chain declared by the toy: on MLX the factory substitutes "none"
    with pytest.warns(UserWarning, match="toy_int8"):
        assert create_quantization_adapter("mlx", config).config.method is QuantizationMethod.NONE


def test_sizing_and_recommendation(toy):
    model = build_model()
    size = estimate_model_size(model, QuantizationConfig(method="toy_int8"))
    linear = [layer for layer in size.layers if layer.status == "quantized"]
    assert {layer.name.rsplit(".", 1)[-1] for layer in linear} == set(TARGETS)
    for layer in linear:  # the declared size model: int8 weights + one fp32 scale per row (no bias)
        assert layer.bytes_after == layer.out_features * (layer.in_features + 4)
    # 1B parameters in 2 GB: bf16 (no quantization) does not fit, 8-bit does: the toy's rank 25 is
    # between "none" (10) and HQQ 4-bit (30), so it is the recommendation
    chosen = get_recommended_config("cpu", 1.0, 2.3, check_libraries=False)
    assert chosen.method is toy


def test_quantize_save_load_and_lora(toy, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = build_model()
    tokens = rank_batches(1)[0]
    with torch.no_grad():
        reference = model(tokens).logits
    adapter = create_quantization_adapter("cpu", QuantizationConfig(method="toy_int8"), strict=True)
    adapter.quantize_model(model)
    plan = model.quantization_plan
    assert plan.quantized_share > 0.5
    with torch.no_grad():
        quantized = model(tokens).logits
    assert (quantized - reference).abs().max() < 0.05 * reference.abs().max()

    save_quantized_model(model, tmp_path / "ckpt")
    reloaded = load_quantized_model(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, quantized)

    base = {k: v.clone() for k, v in reloaded.state_dict().items()}
    peft_model = get_peft_model(adapter.prepare_model_for_training(reloaded),
                                LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    wrapped = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == set(TARGETS)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = peft_model(tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]  # measured: 4.79 -> 4.01 in 6 steps
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in peft_model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in base.items())
