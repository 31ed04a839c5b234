"""QLoRA on every adapter: prepare_model_for_training, peft's get_peft_model, training, adapter
save/reload on a freshly loaded quantized base, and merge_lora.

One small Llama (tests/qlora_common.py) per method is quantized, saved, prepared and wrapped by
peft, then trained for a few steps (module-scoped fixture, once per method and target mode); the
tests read what that run recorded.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from qlora_common import SEQ, TARGETS, build_model, rank_batches

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from quantization_wrapper import (  # noqa: E402
    QuantizationConfig,
    create_quantization_adapter,
    load_quantized_model,
    merge_lora,
    save_quantized_model,
)
from quantization_wrapper.peft_integration import (  # noqa: E402
    all_linear_names,
    install_peft_integration,
    is_peft_integration_installed,
    load_lora_adapter,
    peft_integration,
    uninstall_peft_integration,
)
from quantization_wrapper.training import quantized_layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 8
N_LAYERS = 2 * len(TARGETS)


def _requires(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


#: method -> (library needed, the LoRA layer class peft must pick, by name)
METHODS = {
    "bnb_nf4": ("bitsandbytes", "Linear4bit"),
    "bnb_int8": ("bitsandbytes", "Linear8bitLt"),
    "hqq": ("hqq", "HqqLoraLinear"),
    "quanto_int4": ("optimum.quanto", "QuantizedLoraLinear"),
    "mlx_int4": ("torch", "QuantizedLoraLinear"),  # the torch path needs no mlx
    "none": ("torch", "Linear"),
}
PARAMS = [pytest.param(m, marks=_requires(lib), id=m) for m, (lib, _) in METHODS.items()]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (packed data viewed as float may hold NaN patterns: compare bytes)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


def _base_snapshot(model: nn.Module, adapter) -> dict[str, torch.Tensor]:
    """Every tensor of every converted layer, as the adapter serializes it (packed data, scales,
    quant state), as bytes."""
    out = {}
    for layer in model.quantization_plan.converted:
        module = model.get_submodule(layer.name)
        while hasattr(module, "base_layer"):
            module = module.base_layer
        for key, value in adapter.for_method(layer.method).layer_state_dict(module).items():
            out[f"{layer.name}.{key}"] = _bytes(value)
    return out


def _probe() -> torch.Tensor:
    return torch.arange(2 * SEQ).remainder(101).reshape(2, SEQ)


class Run:
    """What one training run recorded."""


def _train(method: str, targets, tmp: Path) -> Run:
    run = Run()
    config = QuantizationConfig(method=method)
    adapter = create_quantization_adapter("cpu", config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback adapter says it does not quantize
        model = adapter.quantize_model(build_model())
    run.base_dir = tmp / "base"
    save_quantized_model(model, run.base_dir)
    run.before = _base_snapshot(model, adapter)
    model = adapter.prepare_model_for_training(model)
    with peft_integration():
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    run.wrapped = {name: type(m).__name__ for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.cat(rank_batches())
    run.losses = []
    peft_model.train()
    for _ in range(STEPS):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        run.losses.append(loss.item())
    peft_model(input_ids=ids, labels=ids).loss.backward()
    run.grads = {name: p.grad.abs().sum().item() for name, p in peft_model.named_parameters() if p.grad is not None}
    run.trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    optimizer.zero_grad()
    run.after = _base_snapshot(peft_model.get_base_model(), adapter)
    peft_model.eval()
    with torch.no_grad():
        run.logits = peft_model(input_ids=_probe()).logits
        run.short_logits = peft_model(input_ids=_probe()[:1, :4]).logits  # MLX kernel path for mlx_*
    run.adapter_dir = tmp / "adapter"
    peft_model.save_pretrained(run.adapter_dir)
    run.model = peft_model
    return run


@pytest.fixture(scope="module", params=PARAMS)
def method(request):
    return request.param


@pytest.fixture(scope="module", params=["explicit", "all-linear"])
def run(request, method, tmp_path_factory):
    targets = TARGETS if request.param == "explicit" else "all-linear"
    return _train(method, targets, tmp_path_factory.mktemp(f"{method}-{request.param}"))


# ---------------------------------------------------------------------- training
def test_peft_wraps_every_projection_with_the_right_layer(run, method):
    assert len(run.wrapped) == N_LAYERS, sorted(run.wrapped)
    assert set(run.wrapped.values()) == {METHODS[method][1]}
    assert not any("lm_head" in name for name in run.wrapped)


def test_training_lowers_the_loss(run):
    first, last = run.losses[0], run.losses[-1]
    assert first == pytest.approx(4.86, abs=0.1)  # ~ln(128): LoRA starts as a no-op
    assert last < first - 0.5, run.losses


def test_only_lora_parameters_train(run):
    assert run.trainable and all(".lora_" in name for name in run.trainable)
    assert set(run.grads) == run.trainable
    assert all(g > 0 for g in run.grads.values()), [n for n, g in run.grads.items() if g == 0]


def test_quantized_base_is_bit_identical_after_training(run):
    assert run.before and sorted(run.before) == sorted(run.after)
    changed = [k for k in run.before if not torch.equal(run.before[k], run.after[k])]
    assert not changed


def test_adapter_reloads_on_a_freshly_loaded_base_exactly(run):
    base = load_quantized_model(run.base_dir)
    with peft_integration():
        reloaded = PeftModel.from_pretrained(base, run.adapter_dir)
    with torch.no_grad():
        logits = reloaded(input_ids=_probe()).logits
        short = reloaded(input_ids=_probe()[:1, :4]).logits
    assert torch.equal(logits, run.logits)
    assert torch.equal(short, run.short_logits)


# ---------------------------------------------------------------------- merge
def _float_logits() -> torch.Tensor:
    with torch.no_grad():
        return build_model()(input_ids=_probe()).logits


@pytest.mark.parametrize("requantize", [False, True], ids=["dense", "requantized"])
def test_merge_lora(run, method, requantize):
    base = load_quantized_model(run.base_dir)
    quantized_before = len(base.quantization_plan.quantized)
    with torch.no_grad():
        quantization_error = (base(input_ids=_probe()).logits - _float_logits()).abs().mean().item()
    merged = merge_lora(load_lora_adapter(base, run.adapter_dir), requantize=requantize)
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    with torch.no_grad():
        error = (merged(input_ids=_probe()).logits - run.logits).abs()
    if not requantize:
        assert not hasattr(merged, "quantization_plan") and not getattr(merged, "is_quantized", False)
        assert all(type(m) is not nn.Linear or m.weight.dtype.is_floating_point for m in merged.modules())
        assert not quantized_layers(merged)
        # bnb_int8 multiplies int8 activations in eval mode; the others compute x @ dequantized W
        assert error.max() < (0.05 if method == "bnb_int8" else 1e-4), error.max()
    else:
        assert len(merged.quantization_plan.quantized) == quantized_before
        # re-quantizing the merged weights costs about what quantizing the original did
        assert error.mean() < 3 * quantization_error + 1e-6, (error.mean(), quantization_error)


# ---------------------------------------------------------------------- preparation details
@pytest.mark.parametrize("method", PARAMS)
def test_prepare_in_bfloat16_upcasts_only_the_small_parameters(method):
    kwargs = {} if method == "bnb_int8" else {"compute_dtype": torch.bfloat16}
    adapter = create_quantization_adapter("cpu", QuantizationConfig(method=method, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = adapter.quantize_model(build_model(torch.bfloat16))
    before = _base_snapshot(model, adapter)
    layers = quantized_layers(model)
    dtypes = {n: {p.dtype for p in m.parameters()} for n, m in layers.items()}
    model = adapter.prepare_model_for_training(model)
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32  # skipped by default: a float layer
    assert {n: {p.dtype for p in m.parameters()} for n, m in quantized_layers(model).items()} == dtypes
    assert all(not p.requires_grad for p in model.parameters())
    with peft_integration():
        peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.cat(rank_batches())
    losses = []
    for _ in range(4):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    after = _base_snapshot(peft_model.get_base_model(), adapter)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", [p for p in PARAMS if p.id in ("hqq", "mlx_int4")])
def test_all_linear_reaches_quantized_layers_that_are_not_nn_linear(method):
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers as resolver

    _maybe_include_all_linear_layers = getattr(resolver, "__wrapped__", resolver)  # peft's own
    adapter = create_quantization_adapter("cpu", QuantizationConfig(method=method, skip_modules=[]))
    model = adapter.prepare_model_for_training(adapter.quantize_model(build_model()))
    peft_own = _maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear"), model)
    assert not peft_own.target_modules  # peft alone finds none of them
    names = all_linear_names(model)
    assert len(names) == N_LAYERS and "lm_head" not in names  # quantized here, but the output head
    assert all(name.rsplit(".", 1)[-1] in TARGETS for name in names)


@pytest.mark.parametrize("method", [p for p in PARAMS if p.id in ("quanto_int4", "mlx_int4")])
def test_peft_merge_and_unload_requantizes_correctly(method):
    adapter = create_quantization_adapter("cpu", QuantizationConfig(method=method))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    model = adapter.prepare_model_for_training(adapter.quantize_model(model))
    with peft_integration():
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = peft_model(x)
        with peft_model.disable_adapter():
            without = peft_model(x)
        merged = peft_model.merge_and_unload()
        error = (merged(x) - expected).abs().mean().item()
    lora_effect = (expected - without).abs().mean().item()
    assert type(merged[0]).__name__ in ("QuantoLinear", "MLXQuantizedLinear")
    # The merged layer is re-quantized, so it rounds to the int4 grid (measured: error 0.06 for a
    # LoRA effect of 0.37); peft's plain lora.Linear wrote the delta into quanto's packed data
    # and was off by up to 0.86.
    assert lora_effect > 0.2
    assert error < 0.25 * lora_effect, (error, lora_effect)


def test_install_peft_integration_is_idempotent_and_reversible():
    from peft.tuners import tuners_utils

    uninstall_peft_integration()  # (our models install it: mark_model)
    original = tuners_utils._maybe_include_all_linear_layers
    assert getattr(original, "__wrapped__", None) is None
    assert not install_peft_integration()  # without process_wide=True: nothing changes
    assert tuners_utils._maybe_include_all_linear_layers is original
    try:
        assert install_peft_integration(process_wide=True) and install_peft_integration(process_wide=True)
        assert is_peft_integration_installed()
        wrapper = tuners_utils._maybe_include_all_linear_layers
        assert wrapper.__wrapped__ is original  # wrapped once, not twice
        with peft_integration():  # a block inside the process-wide install leaves it in place
            assert tuners_utils._maybe_include_all_linear_layers is wrapper
        assert tuners_utils._maybe_include_all_linear_layers is wrapper
    finally:
        uninstall_peft_integration()
    assert tuners_utils._maybe_include_all_linear_layers is original
    assert not is_peft_integration_installed()


def test_peft_integration_block_restores_peft_also_on_error():
    from peft.tuners import tuners_utils

    original = tuners_utils._maybe_include_all_linear_layers
    with pytest.raises(RuntimeError, match="boom"):
        with peft_integration() as active:
            assert active and is_peft_integration_installed()
            with peft_integration():  # nested
                pass
            assert is_peft_integration_installed()
            raise RuntimeError("boom")
    assert tuners_utils._maybe_include_all_linear_layers is original


def test_fresh_process_reloads_an_mlx_adapter_with_plain_peft(tmp_path):
    """A new process that imports peft, loads the quantized base and calls plain
    ``PeftModel.from_pretrained`` inside ``peft_integration()``: the MLX LoRA layer is registered
    again on load."""
    run = _train("mlx_int4", TARGETS, tmp_path)
    script = (
        "import sys, torch; sys.path.insert(0, 'tests')\n"
        "from peft import PeftModel\n"
        "from quantization_wrapper import load_quantized_model\n"
        "from quantization_wrapper.peft_integration import peft_integration\n"
        f"base = load_quantized_model({str(run.base_dir)!r})\n"
        "with peft_integration():\n"
        f"    m = PeftModel.from_pretrained(base, {str(run.adapter_dir)!r})\n"
        "ids = torch.arange(2 * 16).remainder(101).reshape(2, 16)\n"
        f"torch.save(m(input_ids=ids).logits.detach(), {str(tmp_path / 'logits.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True, timeout=120,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert torch.equal(torch.load(tmp_path / "logits.pt"), run.logits)
