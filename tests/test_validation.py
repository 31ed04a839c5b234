import pytest
import torch

from backend_manager import Backend
from doubles import RowInt8Adapter
from quantization_wrapper import QuantizationConfig, Severity, register_adapter, validate_quantization_config
from quantization_wrapper.validation import ValidationIssue


def fields(issues):
    return {(i.severity.value, i.field) for i in issues}


def test_valid_config_has_no_issues():
    assert validate_quantization_config(QuantizationConfig(method="hqq"), "cpu") == []
    assert validate_quantization_config(QuantizationConfig(method="none"), Backend.MPS) == []


def test_design_document_validation_example():
    config = QuantizationConfig(method="bnb_nf4", bits=4, compute_dtype=torch.bfloat16)
    issues = validate_quantization_config(config, Backend.MPS)
    assert fields(issues) == {("error", "method"), ("error", "compute_dtype")}
    text = [str(i) for i in issues]
    assert any("bnb_nf4 is not supported on the mps backend" in t and "Fix: use method='quanto_int4'" in t
               for t in text)
    assert any("Fix: use compute_dtype=torch.float16" in t for t in text)
    for issue in issues:
        assert isinstance(issue, ValidationIssue) and issue.severity is Severity.ERROR and issue.suggestion


def test_library_not_installed(monkeypatch):
    from backend_manager import imports

    monkeypatch.setitem(imports.KNOWN_LIBRARIES, "hqq",
                        imports.LibrarySpec(module="hqq_not_here_xyz", dist="hqq-not-here-xyz", pip="hqq"))
    imports._import_probe.cache_clear() if hasattr(imports._import_probe, "cache_clear") else None
    from backend_manager import clear_caches

    clear_caches()
    try:
        issues = validate_quantization_config(QuantizationConfig(method="hqq"), "cpu")
        assert fields(issues) == {("error", "method")}
        assert "not installed" in issues[0].message and "pip install hqq" in issues[0].suggestion
    finally:
        monkeypatch.undo()
        clear_caches()


def test_no_adapter_registered(registry):
    registry.pop(next(m for m in registry if m.value == "quanto_int8"), None)
    issues = validate_quantization_config(QuantizationConfig(method="quanto_int8"), "cpu")
    assert [i.field for i in issues] == ["method"] and "no adapter" in issues[0].message


@pytest.mark.parametrize("kwargs,field", [
    (dict(method="hqq", double_quant=True), "double_quant"),
    (dict(method="bnb_int8", group_size=64), "group_size"),
    (dict(method="quanto_int4", group_size=64), "group_size"),
    (dict(method="quanto_int8", group_size=128), "group_size"),
    (dict(method="hqq", storage_dtype=torch.uint8), "storage_dtype"),
    (dict(method="none", storage_dtype=torch.bfloat16), "storage_dtype"),
    (dict(method="none", bits=4), "bits"),
])
def test_ignored_or_unshardable_options_warn(kwargs, field):
    issues = validate_quantization_config(QuantizationConfig(**kwargs), "cpu")
    assert ("warning", field) in fields(issues)
    assert all(not i.is_error for i in issues)


def test_layer_override_problems_are_reported_with_their_pattern():
    config = QuantizationConfig(method="hqq", compute_dtype=torch.float16,
                                layer_configs={"layers.0": {"method": "bnb_nf4"},
                                               "layers.1": {"compute_dtype": torch.bfloat16}})
    issues = validate_quantization_config(config, "mps")
    assert ("error", "layer_configs['layers.0'].method") in fields(issues)
    assert ("error", "layer_configs['layers.1'].compute_dtype") in fields(issues)


def test_inherited_problems_reported_once():
    config = QuantizationConfig(method="hqq", compute_dtype=torch.bfloat16, layer_configs={"layers.0": {"bits": 8}})
    issues = validate_quantization_config(config, "mps")
    assert [i.field for i in issues] == ["compute_dtype"]


def test_errors_sort_before_warnings():
    config = QuantizationConfig(method="hqq", double_quant=True, compute_dtype=torch.bfloat16)
    issues = validate_quantization_config(config, "mps")
    assert [i.severity for i in issues] == [Severity.ERROR, Severity.WARNING]


def test_adapter_check_config_hook_contributes(registry):
    class Picky(RowInt8Adapter):
        @classmethod
        def check_config(cls, config, backend):
            return [ValidationIssue(Severity.WARNING, "backend_options", "picky says no.", "do not.")]

    register_adapter("hqq")(Picky)
    issues = validate_quantization_config(QuantizationConfig(method="hqq"), "cpu")
    assert [i.message for i in issues] == ["picky says no."]
