"""Side effects belong to the call: quantizing, loading, preparing for training, wrapping with
peft and the demo's quieting leave peft's functions, bitsandbytes' loggers, the warning filters
and the preset table as they were -- and the features still work.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import warnings

import pytest
import torch

from qlora_common import SEQ, TARGETS, build_model

pytest.importorskip("peft")
pytest.importorskip("transformers")

import peft.mapping_func  # noqa: E402
import peft.tuners.lora.model  # noqa: E402
import peft.tuners.tuners_utils  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

_resolver = peft.tuners.tuners_utils._maybe_include_all_linear_layers
ORIGINAL_RESOLVER = getattr(_resolver, "__wrapped__", _resolver)  # peft's own (our wrapper may be in place)

from quantization_wrapper import (  # noqa: E402
    QuantizationConfig,
    create_quantization_adapter,
    load_quantized_model,
    save_quantized_model,
)
from quantization_wrapper import config as config_module  # noqa: E402
from quantization_wrapper import presets  # noqa: E402
from quantization_wrapper.demo import quiet_libraries  # noqa: E402
from quantization_wrapper.peft_integration import is_peft_integration_installed, peft_integration  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS = 2 * len(TARGETS)
BNB_LOGGERS = ("bitsandbytes", "bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")
#: method -> (library, LoRA layer class peft must pick)
METHODS = {
    "hqq": ("hqq", "HqqLoraLinear"),
    "mlx_int4": ("torch", "QuantizedLoraLinear"),
    "quanto_int4": ("optimum.quanto", "QuantizedLoraLinear"),
    "bnb_int8": ("bitsandbytes", "Linear8bitLt"),
}
PARAMS = [pytest.param(m, marks=pytest.mark.skipif(importlib.util.find_spec(lib) is None,
                                                    reason=f"{lib} is not installed"), id=m)
          for m, (lib, _) in METHODS.items()]


def _functions(module) -> dict[str, object]:
    return {name: value for name, value in vars(module).items() if callable(value)}


def _state() -> dict[str, object]:
    """What the calls under test must not change, by identity or by value."""
    return {
        "tuners_utils": _functions(peft.tuners.tuners_utils),
        "lora_model": _functions(peft.tuners.lora.model),
        "LoraModel": dict(vars(peft.tuners.lora.model.LoraModel)),
        "mapping_func": _functions(peft.mapping_func),
        "loggers": {name: (list(logging.getLogger(name).filters), logging.getLogger(name).level)
                    for name in BNB_LOGGERS + ("transformers", "")},
        "warnings": list(warnings.filters),
        "presets": copy.deepcopy(config_module._PRESETS),
    }


def _assert_unchanged(before: dict[str, object]) -> None:
    after = _state()
    for key in ("tuners_utils", "lora_model", "LoraModel", "mapping_func"):
        changed = sorted(n for n in before[key].keys() | after[key].keys()
                         if before[key].get(n) is not after[key].get(n) and n != "_maybe_include_all_linear_layers")
        assert not changed, (key, changed)
    # peft's "all-linear" resolver: at most our one wrapper (installed by mark_model), never stacked
    resolver = after["tuners_utils"].get("_maybe_include_all_linear_layers")
    assert resolver is before["tuners_utils"].get("_maybe_include_all_linear_layers") or \
        (is_peft_integration_installed() and getattr(resolver, "__wrapped__", None) is ORIGINAL_RESOLVER)
    assert after["loggers"] == before["loggers"]
    assert after["warnings"] == before["warnings"]
    assert after["presets"] == before["presets"]


def _quantize(method: str):
    adapter = create_quantization_adapter("cpu", QuantizationConfig(method=method, skip_modules=["lm_head"]))
    return adapter, adapter.quantize_model(build_model())


@pytest.mark.parametrize("method", PARAMS)
def test_quantize_load_prepare_and_lora_leave_the_process_as_it_was(method, tmp_path):
    warnings.simplefilter("default")  # a known filter state; pytest restores its own afterwards
    before = _state()
    with warnings.catch_warnings(record=True):  # the calls may warn; recording must not count
        adapter, model = _quantize(method)
    _assert_unchanged(before)
    save_quantized_model(model, tmp_path / "base")
    base = load_quantized_model(tmp_path / "base")
    _assert_unchanged(before)
    base = adapter.prepare_model_for_training(base)
    _assert_unchanged(before)

    with peft_integration():
        assert is_peft_integration_installed()
        peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0,
                                                     init_lora_weights=False))
    _assert_unchanged(before)
    wrapped = {n: type(m).__name__ for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert len(wrapped) == N_LAYERS and set(wrapped.values()) == {METHODS[method][1]}, wrapped
    assert not any("lm_head" in n for n in wrapped)

    ids = torch.arange(2 * SEQ).remainder(101).reshape(2, SEQ)
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
    _assert_unchanged(before)  # forward passes too (bitsandbytes int8 filters its message only inside)
    assert torch.isfinite(logits).all() and (logits - plain).abs().mean() > 1e-4  # LoRA is in the path

    peft_model.save_pretrained(tmp_path / "adapter")
    with peft_integration():
        reloaded = PeftModel.from_pretrained(load_quantized_model(tmp_path / "base"), tmp_path / "adapter")
    _assert_unchanged(before)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)


@pytest.mark.parametrize("method", [p for p in PARAMS if p.id in ("hqq", "mlx_int4")])
def test_plain_peft_works_and_the_wrapper_can_be_removed(method):
    """Plain ``get_peft_model`` (what TRL calls) wraps our layers: the one wrapper mark_model
    installs; ``uninstall_peft_integration`` gives peft its own function back."""
    from quantization_wrapper.peft_integration import uninstall_peft_integration

    _, model = _quantize(method)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert len([m for m in peft_model.modules() if hasattr(m, "lora_A")]) == N_LAYERS
    import peft.peft_model
    import peft.utils.transformers_weight_conversion as conversion

    # the same wrapper answers peft's transformers-5 MoE config conversion, and adapter states load
    # through ours (per-expert and fused expert layouts): all three go back on uninstall
    assert getattr(conversion._maybe_include_all_linear_layers, "_quantization_wrapper", False)
    assert getattr(peft.peft_model.set_peft_model_state_dict, "_quantization_wrapper", False)
    uninstall_peft_integration()
    assert not is_peft_integration_installed()
    assert peft.tuners.tuners_utils._maybe_include_all_linear_layers is ORIGINAL_RESOLVER
    assert conversion._maybe_include_all_linear_layers is ORIGINAL_RESOLVER
    assert peft.peft_model.set_peft_model_state_dict is peft.utils.save_and_load.set_peft_model_state_dict
    _, again = _quantize(method)  # the next model puts it back
    assert is_peft_integration_installed()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_bnb_int8_cast_message_is_filtered_only_during_our_forward(caplog):
    adapter, model = _quantize("bnb_int8")
    log = logging.getLogger("bitsandbytes.autograd._functions")
    filters = list(log.filters)
    ids = torch.arange(SEQ).reshape(1, SEQ)
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.autograd._functions"):
        model.train()  # training mode: LLM.int8() casts float32 inputs and logs it
        for _ in range(3):
            model(input_ids=ids)
        ours = [r for r in caplog.records if "inputs will be cast" in r.getMessage()]
        assert len(ours) <= 1  # once per process at most, not once per layer and step
        log.warning("MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization")
    assert log.filters == filters
    # the same message logged outside our layers' forward reaches the user's handlers
    assert [r for r in caplog.records if "inputs will be cast" in r.getMessage()][-1].name == log.name
    assert len([r for r in caplog.records if "inputs will be cast" in r.getMessage()]) == len(ours) + 1


def test_demo_quiet_libraries_restores_warning_filters_and_log_level():
    transformers_logger = logging.getLogger("transformers")
    level = transformers_logger.level
    warnings.simplefilter("default")
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outer = list(warnings.filters)
        with quiet_libraries():
            warnings.warn("silenced", UserWarning)
            warnings.warn("silenced too", FutureWarning)
            assert transformers_logger.level == logging.ERROR
        assert list(warnings.filters) == outer
        warnings.warn("heard", UserWarning)
    assert [str(w.message) for w in caught] == ["heard"]
    assert list(warnings.filters) == filters and transformers_logger.level == level
    with pytest.raises(RuntimeError):
        with quiet_libraries():
            raise RuntimeError("inside the demo")
    assert list(warnings.filters) == filters and transformers_logger.level == level


def test_presets_registration_keeps_the_table_and_the_users_presets():
    before = copy.deepcopy(config_module._PRESETS)
    presets._register_presets()  # what importing (or re-importing) presets.py does
    assert config_module._PRESETS == before
    mine = QuantizationConfig(method="hqq", bits=2, group_size=16, skip_modules=[])
    original = copy.deepcopy(config_module._PRESETS["component_hqq"])
    config_module.register_config("component_hqq", mine, overwrite=True)
    try:
        presets._register_presets()
        assert config_module.get_config("component_hqq").bits == 2  # the user's stays
    finally:
        config_module._PRESETS["component_hqq"] = original
    assert config_module._PRESETS == before
    # the built-in table is built fresh: mutating one build does not reach the next
    built = presets._builtin_presets()
    built["component_hqq"].layer_configs.clear()
    assert presets._builtin_presets()["component_hqq"].layer_configs
