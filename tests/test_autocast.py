"""Quantized layers under ``torch.autocast`` (TRL's ``SFTConfig(bf16=True)`` trains this way).

Under CPU autocast every quantized layer computes in, and returns, the autocast dtype, as
``nn.Linear`` does; its backward runs in that dtype too, and peft's LoRA layers on top train. Outside
autocast the layers compute bit for bit what they computed before autocast was supported: the
digests below were recorded from the code before that change.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings

import pytest
import torch
from torch import nn

from qlora_common import build_model, rank_batches
from quantization_wrapper import QuantizationConfig, create_quantization_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


def _requires(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


def _cpu_autocast_runs_linear_in(dtype: torch.dtype) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # older torch warns and disables autocast for dtypes it lacks
        with torch.autocast("cpu", dtype=dtype):
            return nn.Linear(2, 2)(torch.ones(1, 2)).dtype == dtype


#: case id -> (library it needs, QuantizationConfig fields)
CASES = {
    "bnb_nf4": ("bitsandbytes", {"method": "bnb_nf4"}),
    "bnb_fp4": ("bitsandbytes", {"method": "bnb_fp4"}),
    "bnb_int8": ("bitsandbytes", {"method": "bnb_int8"}),
    "hqq_4bit": ("hqq", {"method": "hqq", "bits": 4}),
    "hqq_8bit": ("hqq", {"method": "hqq", "bits": 8}),
    "quanto_int2": ("optimum.quanto", {"method": "quanto_int2"}),
    "quanto_int4": ("optimum.quanto", {"method": "quanto_int4"}),
    "quanto_int8": ("optimum.quanto", {"method": "quanto_int8"}),
    "quanto_fp8": ("optimum.quanto", {"method": "quanto_fp8"}),
    "mlx_int4": ("torch", {"method": "mlx_int4"}),  # the torch path needs no mlx
    "mlx_int8": ("torch", {"method": "mlx_int8"}),
    "none": ("torch", {"method": "none"}),
}
METHODS = [pytest.param(case, marks=_requires(lib), id=case) for case, (lib, _) in CASES.items()]
MODEL_DTYPES = [pytest.param(torch.float32, id="fp32_model"), pytest.param(torch.bfloat16, id="bf16_model")]
AUTOCAST_DTYPES = [
    pytest.param(torch.bfloat16, id="autocast_bf16"),
    pytest.param(torch.float16, id="autocast_fp16", marks=pytest.mark.skipif(
        not _cpu_autocast_runs_linear_in(torch.float16), reason="this torch has no float16 CPU autocast")),
]


def _adapter(case: str, **fields):
    return create_quantization_adapter("cpu", QuantizationConfig(**CASES[case][1], **fields))


def _quantize(adapter, linear: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return adapter.quantize_linear(linear)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


# ---------------------------------------------------------------------- one layer
@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("model_dtype", MODEL_DTYPES)
@pytest.mark.parametrize("case", METHODS)
def test_layer_under_autocast_computes_like_nn_linear(case, model_dtype, autocast_dtype):
    adapter = _adapter(case)
    layer = _quantize(adapter, nn.Linear(64, 128).to(model_dtype))
    dense = adapter.dequantize_module(layer)  # nn.Linear holding the weight the layer multiplies by
    probe = torch.randn(3, 64, dtype=model_dtype)
    before = layer(probe).detach().clone()

    # inputs in the model's dtype, and in the autocast dtype (what a preceding autocast op hands over)
    for input_dtype in dict.fromkeys((model_dtype, autocast_dtype)):
        x = torch.randn(2, 5, 64, dtype=input_dtype, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=autocast_dtype):
            y = layer(x)
            expected = dense(x_ref)
        assert y.dtype == expected.dtype == autocast_dtype
        assert y.shape == expected.shape
        error = (y.float() - expected.float()).abs().max() / expected.float().abs().max()
        assert error < 0.015, error  # measured <= 0.0071: rounding to the autocast dtype
        grad = torch.randn_like(y)
        y.backward(grad)
        expected.backward(grad)
        assert x.grad.dtype == input_dtype and torch.isfinite(x.grad).all()
        grad_error = (x.grad.float() - x_ref.grad.float()).abs().max() / x_ref.grad.float().abs().max()
        assert grad_error < 0.015, grad_error

    layer.eval()  # inference (e.g. evaluation inside a trainer): the other kernels
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype):
        assert layer(torch.randn(2, 3, 64, dtype=model_dtype)).dtype == autocast_dtype
        assert layer(torch.randn(2, 3, 64, dtype=autocast_dtype)).dtype == autocast_dtype
    layer.train()
    # autocast changed nothing in the layer (bitsandbytes' INT8 forward would round its bias for good)
    assert torch.equal(layer(probe), before)


# ---------------------------------------------------------------------- outside autocast: unchanged
#: sha256 (first 16 hex digits) of what :func:`_outputs_outside_autocast` returned before autocast
#: support, per case and model dtype.
DIGESTS_BEFORE = {
    "bnb_nf4": {torch.float32: "e1465b0e21e5d78e", torch.bfloat16: "b97eedae8078c9e0"},
    "bnb_fp4": {torch.float32: "d05131ea1bdf6928", torch.bfloat16: "4b9036a9c0de7268"},
    "bnb_int8": {torch.float32: "f48fbe2ee8cc655b", torch.bfloat16: "afd5df96ce86859e"},
    "hqq_4bit": {torch.float32: "a638da9a460e45f2", torch.bfloat16: "8875f6d80cc71667"},
    "hqq_8bit": {torch.float32: "efc7274bee730fc4", torch.bfloat16: "55fe085876431cab"},
    "quanto_int2": {torch.float32: "8e095b907f538e21", torch.bfloat16: "9823c7d1eb8bc2c8"},
    "quanto_int4": {torch.float32: "3f63ce2ff439bf9a", torch.bfloat16: "25af68d944320107"},
    "quanto_int8": {torch.float32: "db9b897bed1d9799", torch.bfloat16: "0cb2110cc2892c6e"},
    "quanto_fp8": {torch.float32: "592e0af68da5fb99", torch.bfloat16: "5186e7f8a3b4829f"},
    "mlx_int4": {torch.float32: "4ee66038cb84749f", torch.bfloat16: "ba952d746e5b0151"},
    "mlx_int8": {torch.float32: "5889e910d17c9cfe", torch.bfloat16: "1a5632cf0b6492b5"},
    "none": {torch.float32: "c81bae4b2a3d2bcc", torch.bfloat16: "cf9a077604b8d418"},
}


def _exact_linear(dtype: torch.dtype) -> nn.Linear:
    """A 64 -> 128 layer whose weights and bias are multiples of 1/32 (exact in every float dtype),
    so the digests depend on no random generator."""
    out_idx, in_idx = torch.arange(128)[:, None], torch.arange(64)[None, :]
    linear = nn.Linear(64, 128, device="meta")
    linear.weight = nn.Parameter((((out_idx * 7 + in_idx * 13) % 31 - 15) / 16).to(dtype))
    linear.bias = nn.Parameter((((torch.arange(128) * 5) % 17 - 8) / 32).to(dtype))
    return linear


def _outputs_outside_autocast(layer: nn.Module, dtype: torch.dtype) -> list[torch.Tensor]:
    """Eval outputs for 4 and 64 rows (MLX's kernel and PyTorch paths), a train-mode output and the
    input gradient. The inputs and output gradients are one-hot rows, so every value is one
    dequantized weight plus the bias: no summation order, hence no CPU's kernel choice, enters."""
    eye = torch.eye(64, dtype=dtype)
    layer.eval()
    with torch.no_grad():
        outputs = [layer(eye[:4]), layer(eye)]
    layer.train()
    x = eye.clone().requires_grad_(True)
    y = layer(x)
    y.backward(torch.eye(128, dtype=dtype)[(torch.arange(64) * 3) % 128])
    return outputs + [y.detach(), x.grad]


@pytest.mark.parametrize("model_dtype", MODEL_DTYPES)
@pytest.mark.parametrize("case", METHODS)
def test_outputs_outside_autocast_are_bit_identical_to_before(case, model_dtype):
    # hqq's solver (optimize=True) sums in an order that may depend on the CPU; plain rounding not
    fields = {"backend_options": {"optimize": False}} if CASES[case][1]["method"] == "hqq" else {}
    layer = _quantize(_adapter(case, **fields), _exact_linear(model_dtype))
    digest = hashlib.sha256()
    for t in _outputs_outside_autocast(layer, model_dtype):
        digest.update(str(t.dtype).encode())
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    assert digest.hexdigest()[:16] == DIGESTS_BEFORE[case][model_dtype], (
        "outputs outside autocast changed (or the library's quantization did)")


# ---------------------------------------------------------------------- QLoRA on a tiny Llama
STEPS = 5


def _base_snapshot(model: nn.Module, adapter) -> dict[str, torch.Tensor]:
    """Every tensor of every converted layer as the adapter serializes it, as bytes."""
    out = {}
    for planned in model.quantization_plan.converted:
        module = model.get_submodule(planned.name)
        while hasattr(module, "base_layer"):
            module = module.base_layer
        for key, value in adapter.for_method(planned.method).layer_state_dict(module).items():
            out[f"{planned.name}.{key}"] = _bytes(value)
    return out


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("model_dtype", MODEL_DTYPES)
@pytest.mark.parametrize("case", METHODS)
def test_qlora_trains_under_autocast(case, model_dtype, autocast_dtype):
    from peft import LoraConfig, get_peft_model

    adapter = _adapter(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback adapter says it does not quantize
        model = adapter.quantize_model(build_model(model_dtype))
    before = _base_snapshot(model, adapter)
    model = adapter.prepare_model_for_training(model)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))

    # output dtypes of every LoRA layer, of the quantized layer inside it, and of lm_head (a plain
    # nn.Linear: the reference)
    dtypes: dict[str, set[torch.dtype]] = {}
    hooked = {name: m for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    hooked.update({f"{name}.base_layer": m.base_layer for name, m in list(hooked.items())})
    hooked["lm_head"] = peft_model.get_base_model().lm_head
    assert type(hooked["lm_head"]) is nn.Linear
    for name, module in hooked.items():
        module.register_forward_hook(lambda m, args, out, name=name: dtypes.setdefault(name, set()).add(out.dtype))

    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids = torch.cat(rank_batches())
    losses = []
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=autocast_dtype):
            loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in trainable.items()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    assert len(hooked) == 2 * 14 + 1  # 7 projections x 2 decoder layers, wrapped and inside
    assert dtypes == {name: {autocast_dtype} for name in hooked}
    # the last step's gradients (the first step's lora_A ones are zero: lora_B starts at zero)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if not g.abs().sum()]
    assert losses[-1] < losses[0] - 0.3, losses
    after = _base_snapshot(peft_model.get_base_model(), adapter)
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
