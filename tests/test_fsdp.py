"""FSDP + QLoRA: two processes (torchrun, gloo on CPU) train LoRA over a sharded quantized model.

The worker (tests/_fsdp_worker.py) runs HQQ, bitsandbytes NF4 and INT8, MLX and optimum-quanto
int4 under FSDP2 (and quanto int4 on a small Mixtral, experts quantized one by one), and bitsandbytes
NF4 and quanto int4 under FSDP1; this file checks what it wrote against a single-process run of
the same training (same global batch), that each rank holds about half of the packed bytes where
the method shards, and reloads the adapters it saved. Single-process tests cover the
compatibility checks, the bitsandbytes quant_state restoration, plain ``fully_shard`` on quanto and
INT8 layers (their packed data shards as integer parameters, never dequantized) and docs/fsdp.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from qlora_common import TARGETS, build_model, case_config, case_model, rank_batches, split_case

pytest.importorskip("peft")
pytest.importorskip("transformers")
for _lib in ("bitsandbytes", "hqq"):
    if importlib.util.find_spec(_lib) is None:
        pytest.skip(f"{_lib} is not installed", allow_module_level=True)

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from quantization_wrapper import (  # noqa: E402
    QuantizationConfig,
    QuantizationMethod,
    create_quantization_adapter,
    load_quantized_model,
)
from quantization_wrapper.fsdp import (  # noqa: E402
    FSDP_SUPPORT,
    apply_fsdp,
    check_fsdp_compatibility,
    fsdp_ignored_params,
    fsdp_quantized_bytes,
    render_fsdp_markdown,
)

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")
CASES = ["hqq:2:float32", "bnb_nf4:2", "bnb_nf4:1:float32", "mlx_int4:2:uint8", "quanto_int4:2", "bnb_int8:2",
         "quanto_int4:1", "mixtral/quanto_int4:2", "llama_bf16/quanto_int4:2"]
STEPS = 4


def _torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    _torchrun("tests/_fsdp_worker.py", "--out", str(out), "--cases", ",".join(CASES), "--steps", str(STEPS))
    return out


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.replace(":", "-").replace("/", "-"))
def case(request, fsdp_run):
    folder = fsdp_run / request.param.replace(":", "_").replace("/", "_")
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
    return request.param, folder, ranks, torch.load(folder / "result.pt")


def _reference(case: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same training in one process on the concatenated global batch."""
    config, _ = case_config(split_case(case)[1])
    build, targets = case_model(case)
    adapter = create_quantization_adapter("cpu", config)
    model = adapter.prepare_model_for_training(adapter.quantize_model(build()))
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.cat(rank_batches())
    losses = []
    for _ in range(STEPS):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in peft_model.named_parameters() if p.requires_grad}


def test_fsdp_training_lowers_the_loss_like_one_process(case):
    name, _, ranks, result = case
    losses = ranks[0]["losses"]
    assert ranks[1]["losses"] == losses
    assert losses[-1] < losses[0] - 0.3, losses
    ref_losses, ref_lora = _reference(name)
    family = split_case(name)[0]
    assert sorted(result["lora"]) == sorted(ref_lora)
    diffs = torch.cat([(result["lora"][k] - ref_lora[k]).abs().reshape(-1) for k in sorted(ref_lora)])
    if family == "llama_bf16":
        # bfloat16 compute: the first loss is the same bits; AdamW's first steps move each LoRA weight
        # by ~lr times the sign of its gradient, so a near-zero gradient that rounds to the other sign
        # moves it by up to 2e-2 (measured: losses within 1e-4, weights 1.5e-2 at most)
        assert losses[0] == ref_losses[0] and losses == pytest.approx(ref_losses, abs=3e-4)
        assert diffs.max() < 0.03 and diffs.mean() < 2e-3, (diffs.max(), diffs.mean())
        return
    assert losses == pytest.approx(ref_losses, abs=1e-4)
    # AdamW (lr 1e-2) turns float-rounding differences of near-zero gradients into up to ~1e-4 here;
    # the MoE model sums each expert's tokens in another order on half the batch (measured 1.05e-4 on one
    # element of an expert's LoRA A, 0.15 in magnitude; losses equal within 1e-6)
    worst = diffs.max().item()
    assert worst < (3e-4 if family == "mixtral" else 1e-4), worst


def test_lora_weights_are_identical_on_both_ranks(case):
    _, _, ranks, _ = case
    assert ranks[0]["lora_sha256"] == ranks[1]["lora_sha256"]


def test_each_rank_holds_only_its_shard_of_the_quantized_weights(case):
    name, _, ranks, _ = case
    held = [r["bytes"] for r in ranks]
    config, version = case_config(split_case(name)[1])
    row = FSDP_SUPPORT[config.method]
    if (row.fsdp2 if version == 2 else row.fsdp1) == "replicated":  # FSDP1 + quanto/INT8: whole on each rank
        assert all(h["local_shards"] == 0 and h["per_rank"] == h["total"] > 0 for h in held)
        return
    full = held[0]["full_sharded"]
    assert full > 0 and all(h["full_sharded"] == full and h["total"] == held[0]["total"] for h in held)
    assert sum(h["local_shards"] for h in held) == full  # the shards partition the weights
    for h in held:
        assert h["local_shards"] <= 0.6 * full  # FSDP1 splits the whole flat unit, so not exactly 1/2
        assert h["per_rank"] < 0.85 * h["total"]
        if version == 2:  # FSDP2 splits every tensor along dim 0: each rank holds half of the packed bytes
            assert abs(h["local_shards"] - full / 2) <= 0.02 * full, (h, full)


def test_quantized_weights_stay_bit_identical(case):
    _, _, ranks, _ = case
    assert all(r["quantized_identical"] for r in ranks)


def test_saved_adapter_reloads_on_a_fresh_quantized_base(case):
    _, folder, _, result = case
    base = load_quantized_model(folder / "base")
    # prepared as for training (a half-precision model's norms, embeddings and lm_head become float32)
    base = create_quantization_adapter("cpu", base.quantization_config).prepare_model_for_training(base)
    model = PeftModel.from_pretrained(base, folder / "adapter")
    with torch.no_grad():
        logits = model(input_ids=result["probe"]).logits
    assert torch.equal(logits, result["logits"])


# ---------------------------------------------------------------------- single process
def _prepared(method: str, **kwargs):
    adapter = create_quantization_adapter("cpu", QuantizationConfig(method=method, **kwargs))
    model = adapter.prepare_model_for_training(adapter.quantize_model(build_model()))
    return get_peft_model(model, LoraConfig(r=8, target_modules=TARGETS))


@pytest.mark.parametrize("method, kwargs, version, param_dtype, fragment", [
    ("bnb_nf4", {}, 1, None, "FSDP1 cannot flatten integer tensors"),
    ("hqq", {}, 1, None, "FSDP1 cannot flatten integer tensors"),
    ("hqq", {"storage_dtype": "float32"}, 2, torch.bfloat16, "would convert the packed bytes"),
    ("mlx_int4", {}, 2, None, "torch cannot all-gather"),
], ids=["bnb-fsdp1-uint8", "hqq-fsdp1-uint8", "hqq-float32-vs-bf16", "mlx-uint32"])
def test_incompatible_storage_is_reported(method, kwargs, version, param_dtype, fragment):
    problems = check_fsdp_compatibility(_prepared(method, **kwargs), version=version, param_dtype=param_dtype)
    per_layer = [p for p in problems if fragment in p]
    assert len(per_layer) == 2 * len(TARGETS)  # one per quantized layer, each naming it
    assert any(p.startswith(("model.layers.0.self_attn.q_proj.W_q ", "model.layers.0.self_attn.q_proj.weight "))
               for p in per_layer)
    if version == 1:  # and FSDP1's one-dtype-per-unit rule: uint8 next to float32
        assert [p for p in problems if p not in per_layer] == [
            "FSDP1 flattens each unit into one tensor of one dtype; the parameters have ['float32', 'uint8']. "
            "Fix: quantize with storage_dtype=float32, the dtype of every other parameter "
            "(prepare_model_for_training makes norms float32 and peft makes LoRA float32); or use FSDP2"]
    else:
        assert len(problems) == len(per_layer)


@pytest.mark.parametrize("method, kwargs, version", [
    ("bnb_nf4", {}, 2), ("bnb_nf4", {"storage_dtype": "float32"}, 1), ("hqq", {}, 2),
    ("hqq", {"storage_dtype": "float32"}, 1), ("mlx_int4", {"storage_dtype": "uint8"}, 2),
    ("quanto_int4", {}, 2), ("quanto_fp8", {}, 2), ("quanto_int4", {}, 1), ("bnb_int8", {}, 2), ("bnb_int8", {}, 1),
], ids=["bnb-fsdp2", "bnb-fsdp1-float32", "hqq-fsdp2", "hqq-fsdp1-float32", "mlx-fsdp2-uint8", "quanto-fsdp2",
        "quanto-fp8-fsdp2", "quanto-fsdp1", "int8-fsdp2", "int8-fsdp1"])
def test_supported_storage_passes(method, kwargs, version):
    model = _prepared(method, **kwargs)
    assert check_fsdp_compatibility(model, version=version) == []
    ignored = fsdp_ignored_params(model, version)
    if method.startswith(("quanto", "bnb_int8")):  # FSDP1 cannot flatten their integer data; FSDP2 shards it
        assert len(ignored) == (2 * len(TARGETS) if version == 1 else 0)
        assert all(not p.dtype.is_floating_point for p in ignored)


def test_quanto_layers_of_quanto_itself_are_refused():
    """A ``QLinear`` built by optimum-quanto holds a tensor subclass that fully_shard would turn into
    dequantized float shards: the check names it (ours hold plain tensors)."""
    from optimum.quanto import QLinear, freeze, qint4

    model = _prepared("quanto_int4")
    name = "model.layers.0.self_attn.q_proj"
    ours = model.base_model.model.get_submodule(name).base_layer
    theirs = QLinear.from_module(torch.nn.Linear(ours.in_features, ours.out_features, bias=False), weights=qint4)
    freeze(theirs)
    model.base_model.model.get_submodule(name).base_layer = theirs
    problems = check_fsdp_compatibility(model)
    assert len(problems) == 1 and problems[0].startswith(f"{name}.weight is a WeightQBitsTensor")
    assert "dequantized full-precision shards" in problems[0]


@pytest.fixture
def one_rank_group():
    store = tempfile.mktemp(prefix="qw-fsdp-")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    if os.path.exists(store):
        os.remove(store)


def test_apply_fsdp_restores_the_bnb_quant_state_fsdp_drops(one_rank_group):
    """FSDP2 hands Linear4bit a plain tensor for its Params4bit; bitsandbytes rebuilds it from
    ``module.quant_state``. Without it (a layer quantized with ``Params4bit(module=None)``)
    plain ``fully_shard`` fails; ``apply_fsdp`` restores it from the weight first."""
    from torch.distributed.fsdp import fully_shard

    ids = torch.cat(rank_batches())[:2]
    expected = _prepared("bnb_nf4")(input_ids=ids, labels=ids).loss.item()
    results = {}
    for how in ("fully_shard", "apply_fsdp"):
        model = _prepared("bnb_nf4")
        for module in model.modules():
            if type(module).__name__ == "Linear4bit":
                module.quant_state = None
        if how == "fully_shard":
            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        else:
            apply_fsdp(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                results[how] = model(input_ids=ids, labels=ids).loss.item()
            except ValueError as e:
                results[how] = str(e)
    assert results["fully_shard"] == "quant_state is required"
    assert results["apply_fsdp"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("method", ["quanto_int2", "quanto_int4", "quanto_int8", "quanto_fp8", "bnb_int8"])
def test_plain_fully_shard_shards_packed_data_and_computes_the_same(method, one_rank_group):
    """``fully_shard`` called directly (no apply_fsdp) on quanto and INT8 layers: every parameter of
    a quantized layer becomes a DTensor of integer data (nothing dequantized into float shards),
    and the loss, its LoRA gradients and the eval logits are bit-identical to the unsharded model's.
    The INT8 model runs a forward first (bitsandbytes would keep an alias of the weight then)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    ids = torch.cat(rank_batches())[:2]
    results = []
    for shard in (False, True):
        model = _prepared(method)
        if method == "bnb_int8":
            with torch.no_grad():
                model(input_ids=ids)
        if shard:
            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            layers = [m for m in model.modules()
                      if type(m).__name__ in ("QuantoLinear", "Linear8bitLt") and not hasattr(m, "base_layer")]
            assert len(layers) == 2 * len(TARGETS)
            for layer in layers:
                params = dict(layer.named_parameters(recurse=False))
                assert params and all(isinstance(p, DTensor) and not p.requires_grad for p in params.values())
                packed = [p for p in params.values() if p.dtype in (torch.uint8, torch.int8)]
                assert [n for n, p in params.items() if p.dtype.is_floating_point] == [], params.keys()
                assert len(packed) == 1
            held = fsdp_quantized_bytes(model)  # one rank: its shards are everything but the scales
            assert held["local_shards"] == held["full_sharded"] > 0.6 * held["total"]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                 for n, p in model.named_parameters() if p.requires_grad}
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        results.append((loss.detach(), grads, logits))
    (loss, grads, logits), (loss_s, grads_s, logits_s) = results
    assert torch.equal(loss, loss_s) and torch.equal(logits, logits_s)
    assert sorted(grads) == sorted(grads_s) and all(torch.equal(grads[k], grads_s[k]) for k in grads)


def test_docs_render_the_support_table():
    doc = (ROOT / "docs" / "fsdp.md").read_text()
    assert render_fsdp_markdown() in doc, "docs/fsdp.md is out of date: paste render_fsdp_markdown() into it"
    assert set(FSDP_SUPPORT) == set(QuantizationMethod)


# ---------------------------------------------------------------------- the example script
def test_example_trains_under_torchrun_and_alone(tmp_path):
    script = "examples/fsdp_qlora_train.py"
    _torchrun(script, "--method", "hqq", "--steps", "6", "--output-dir", str(tmp_path / "fsdp"))
    metrics = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["fsdp"] == "fsdp2"
    assert metrics["losses"][-1] < metrics["losses"][0] - 0.3
    assert metrics["quantized_bytes"]["local_shards"] < 0.6 * metrics["quantized_bytes"]["full_sharded"]
    single = subprocess.run([sys.executable, script, "--method", "bnb_nf4", "--steps", "3", "--output-dir",
                             str(tmp_path / "single")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert single.returncode == 0, single.stderr[-3000:]
    metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and metrics["fsdp"] is None
    assert (tmp_path / "single" / "adapter" / "adapter_model.safetensors").exists()
