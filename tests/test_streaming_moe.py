"""load_and_quantize on mixture-of-experts checkpoints: the experts are unfused on the meta skeleton,
planned per expert as quantize_model plans them (skip_modules, layer_configs and module filters
addressing a block, an expert or a projection), and each expert is assembled from the checkpoint's
per-expert tensors, as transformers' conversion assembles it, and quantized at once: the fused
[experts, 2 x intermediate, hidden] tensor is never built. Fused layouts on disk (3-D tensors,
transposed with biases in GPT-OSS) go expert by expert too. Every result equals from_pretrained +
quantize_model bit for bit."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors.torch import save_file  # noqa: E402
from transformers.core_model_loading import MergeModulelist  # noqa: E402

import quantization_wrapper as qw  # noqa: E402
from quantization_wrapper.experts import UnfusedExperts, is_fused_experts  # noqa: E402
from quantization_wrapper.loading import load_and_quantize  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=96)
FAMILIES = {
    "mixtral": lambda: transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    head_dim=16)),
}
HQQ4 = dict(method="hqq", bits=4, group_size=32)
IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))


def save(family, path, **kwargs):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    model.save_pretrained(path, **kwargs)
    return type(model)


def reference(cls, path, fields, dtype=None, module_filter=None):
    model = cls.from_pretrained(path, **({} if dtype is None else {"dtype": dtype})).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qw.create_quantization_adapter("cpu", qw.QuantizationConfig(**fields)).quantize_model(
            model, module_filter=module_filter)


def stream(path, fields, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_and_quantize(path, qw.QuantizationConfig(**fields), backend="cpu", progress=False, **kwargs)


def assert_same(ref, got):
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert got.quantization_plan.layers == ref.quantization_plan.layers
    assert got.quantization_plan.float_parameters == ref.quantization_plan.float_parameters
    for name, module in ref.named_modules():  # the same blocks unfused, the same kept fused
        if isinstance(module, UnfusedExperts) or is_fused_experts(module):
            assert type(got.get_submodule(name)) is type(module), name
    with torch.no_grad():
        assert torch.equal(ref(IDS).logits, got(IDS).logits)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {family: (save(family, root / family, max_shard_size="60KB"), root / family) for family in FAMILIES}


# --------------------------------------------------------------------------- plans addressing experts
PLANS = {
    "every-expert-skipped": dict(skip_modules=["lm_head", "mlp.experts"]),
    "one-block-skipped": dict(skip_modules=["lm_head", "layers.1.mlp.experts"]),
    "one-expert-skipped": dict(skip_modules=["lm_head", "layers.0.mlp.experts.3"]),
    "one-projection-skipped": dict(skip_modules=["lm_head", "*.down_proj"]),
    "expert-overrides": dict(layer_configs={"mlp.experts": dict(bits=2, group_size=16),
                                            "layers.0.mlp.experts.3": dict(method="bnb_nf4"),
                                            "layers.1.mlp.experts.2.gate_up_proj": dict(method="none")}),
}


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_skip_and_layer_configs_address_experts_as_in_quantize_model(checkpoints, family, plan):
    cls, path = checkpoints[family]
    fields = dict(HQQ4, **PLANS[plan])
    ref, got = reference(cls, path, fields), stream(path, fields)
    assert_same(ref, got)
    layers = got.quantization_plan
    if plan == "every-expert-skipped":  # transformers' fused module, filled by the fused tensor
        assert all(is_fused_experts(layer.mlp.experts) for layer in got.model.layers)
        assert layers["model.layers.0.mlp.experts.3.down_proj"].status == "skipped"
    if plan == "one-expert-skipped":
        assert type(got.model.layers[0].mlp.experts._modules["3"].down_proj) is torch.nn.Linear
        assert layers["model.layers.0.mlp.experts.2.down_proj"].status == "quantized"
    if plan == "expert-overrides":
        assert layers["model.layers.0.mlp.experts.3.down_proj"].method == "bnb_nf4"
        assert layers["model.layers.1.mlp.experts.0.down_proj"].bits == 2
        assert layers["model.layers.1.mlp.experts.2.gate_up_proj"].status == "skipped"


def test_a_module_filter_sees_each_expert(checkpoints):
    cls, path = checkpoints["qwen3_moe"]
    keep = lambda module, name: not name.endswith("experts.1.gate_up_proj")  # noqa: E731
    ref, got = reference(cls, path, HQQ4, module_filter=keep), stream(path, HQQ4, module_filter=keep)
    assert_same(ref, got)
    assert got.quantization_plan["model.layers.0.mlp.experts.1.gate_up_proj"].reason == "excluded by module_filter"


@pytest.mark.parametrize("skip", [["lm_head", "mlp.experts"],
                                  ["lm_head", "layers.1.mlp.experts", "layers.0.mlp.experts.2"]],
                         ids=["every-expert-skipped", "one-block-one-expert-skipped"])
def test_a_bfloat16_checkpoint_loaded_as_stored(tmp_path, skip):
    """No dtype: from_pretrained loads the bf16 checkpoint in bf16, so the experts kept in float (in a
    fused block, or skipped in an unfused one) are measured in bf16 by both plans."""
    torch.manual_seed(0)
    model = FAMILIES["mixtral"]().to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(tmp_path / "bf16")
    fields = dict(HQQ4, skip_modules=skip)
    ref, got = reference(type(model), tmp_path / "bf16", fields), stream(tmp_path / "bf16", fields)
    assert next(ref.parameters()).dtype is torch.bfloat16
    assert_same(ref, got)
    assert got.quantization_plan["model.layers.1.mlp.experts.0.down_proj"].bytes_before == 64 * 128 * 2


# --------------------------------------------------------------------------- expert by expert
@pytest.fixture
def stacked(monkeypatch):
    """The number of tensors each of transformers' MergeModulelist conversions stacks."""
    sizes = []
    original = MergeModulelist.convert

    def convert(self, input_dict, *args, **kwargs):
        sizes.extend(len(v) for v in input_dict.values() if isinstance(v, list))
        return original(self, input_dict, *args, **kwargs)

    monkeypatch.setattr(MergeModulelist, "convert", convert)
    return sizes


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_expert_is_assembled_alone(checkpoints, stacked, family):
    """Quantized experts: transformers' conversion runs once per expert (one tensor per source
    pattern), never over the whole block; a block kept fused gets the whole conversion."""
    cls, path = checkpoints[family]
    stream(path, HQQ4)
    assert stacked and set(stacked) == {1}
    stacked.clear()
    stream(path, dict(HQQ4, skip_modules=["lm_head", "layers.1.mlp.experts"]))
    assert stacked.count(4) == 3 and set(stacked) == {1, 4}  # layer 1: gate + up, down over 4 experts


# --------------------------------------------------------------------------- fused layouts on disk
@pytest.fixture(scope="module")
def fused_mixtral(tmp_path_factory, checkpoints):
    """The tiny Mixtral with its experts stored as transformers holds them: 3-D tensors."""
    cls, source = checkpoints["mixtral"]
    path = tmp_path_factory.mktemp("fused") / "mixtral"
    path.mkdir()
    (path / "config.json").write_text((source / "config.json").read_text())
    state = cls.from_pretrained(source).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors", metadata={"format": "pt"})
    return cls, path


@pytest.mark.parametrize("method", ["hqq", "bnb_nf4", "bnb_int8", "mlx_int4", "quanto_int4"])
def test_fused_experts_on_disk(fused_mixtral, method):
    cls, path = fused_mixtral
    fields = dict(HQQ4) if method == "hqq" else dict(method=method, **({"group_size": 32} if "mlx" in method else {}))
    fields["skip_modules"] = ["lm_head", "layers.0.mlp.experts.2"]
    ref, got = reference(cls, path, fields), stream(path, fields)
    assert_same(ref, got)
    assert isinstance(got.model.layers[1].mlp.experts, UnfusedExperts)


def test_fused_experts_on_disk_in_bfloat16(fused_mixtral):
    cls, path = fused_mixtral
    fields = dict(HQQ4, skip_modules=["lm_head", "layers.0.mlp.experts.2"])
    ref, got = reference(cls, path, fields, dtype=torch.bfloat16), stream(path, fields, dtype="bfloat16")
    assert_same(ref, got)
    assert got.model.layers[0].mlp.experts._modules["2"].down_proj.weight.dtype is torch.bfloat16


def test_the_model_does_not_view_the_files(fused_mixtral, tmp_path):
    """Experts sliced from a memory-mapped 3-D tensor, kept in float (skipped, or by the no-quantization
    method) or quantized, own their memory: zeroing the file afterwards changes nothing."""
    cls, source = fused_mixtral
    path = tmp_path / "copy"
    path.mkdir()
    for name in os.listdir(source):
        (path / name).write_bytes((source / name).read_bytes())
    fields = dict(HQQ4, skip_modules=["lm_head", "layers.0.mlp.experts.2"],
                  layer_configs={"layers.1.mlp.experts.1": dict(method="none")})
    ref, got = reference(cls, source, fields), stream(path, fields)  # from_pretrained's model views its file
    with open(path / "model.safetensors", "r+b") as f:  # same inode: a live mapping would see the zeros
        size = f.seek(0, os.SEEK_END)
        f.seek(4096)
        f.write(bytes(size - 4096))
    assert_same(ref, got)


def test_gpt_oss_transposed_experts_with_biases(tmp_path):
    """GPT-OSS stores its experts fused and transposed ([experts, in, out]) with per-expert biases."""
    if not hasattr(transformers, "GptOssForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no GptOssForCausalLM")
    torch.manual_seed(0)
    config = transformers.GptOssConfig(**{**SMALL, "intermediate_size": 64}, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2)
    transformers.GptOssForCausalLM(config).save_pretrained(tmp_path / "gpt-oss")
    for fields in (HQQ4, dict(method="quanto_int4", skip_modules=["lm_head", "layers.1.mlp.experts.0.down_proj"])):
        ref = reference(transformers.GptOssForCausalLM, tmp_path / "gpt-oss", fields)
        got = stream(tmp_path / "gpt-oss", fields)
        assert_same(ref, got)
        assert got.model.layers[0].mlp.experts.experts_transposed
        assert got.quantization_plan["model.layers.0.mlp.experts.1.gate_up_proj"].bias


@pytest.mark.parametrize("method", ["hqq", "quanto_int4"])
def test_a_streamed_moe_model_saves_and_reloads(checkpoints, tmp_path, method):
    cls, path = checkpoints["mixtral"]
    fields = dict(HQQ4) if method == "hqq" else dict(method=method)
    fields["skip_modules"] = ["lm_head", "layers.0.mlp.experts.3", "layers.1.mlp.experts"]
    got = stream(path, fields)
    assert is_fused_experts(got.model.layers[1].mlp.experts)
    qw.save_quantized_model(got, tmp_path / "saved")
    loaded = qw.load_quantized_model(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, got(IDS).logits)
    assert [l.name for l in loaded.quantization_plan.quantized] == [l.name for l in got.quantization_plan.quantized]


def test_layer_sized_temporaries_are_reused_not_faulted_in_again():
    """Within the streaming loader's block, glibc keeps freed layer-sized temporaries in its heap:
    HQQ's optimizer allocates ~400 MB of them per expert and frees them at the end of the layer;
    handed back to the OS (glibc trims the top of its heap past 64 MiB), the next layer faults every
    page in again (measured: 6.7-11.3M page faults on a 3-layer Mixtral, 0.5-2.3M within the block)."""
    import resource

    from quantization_wrapper.checkpoint import streaming

    if streaming._mallopt() is None:
        pytest.skip("not glibc: another allocator, other rules")
    block, count = 15 * 2**20, 28  # 420 MB of temporaries, one HQQ expert's worth

    def layer() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        temporaries = [torch.empty(block, dtype=torch.uint8).fill_(1) for _ in range(count)]  # every page touched
        del temporaries
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    with streaming.reuse_layer_sized_blocks():
        layer()  # the first layer faults its temporaries in
        faults = [layer() for _ in range(3)]
    pages = count * block // 4096
    assert max(faults) < 0.05 * pages, (faults, pages)
