"""load_and_quantize: streaming equals full-load-then-quantize, with specific errors for bad checkpoints."""

import json
import shutil
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import quantization_wrapper as qw  # noqa: E402
from quantization_wrapper.loading import (  # noqa: E402
    SafetensorsReader,
    load_and_quantize,
)
from quantization_wrapper.sizing import checkpoint_parameter_count as count_checkpoint_parameters  # noqa: E402

CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=128)
METHODS = {
    "bnb_nf4": dict(method="bnb_nf4"),
    "bnb_int8": dict(method="bnb_int8"),
    "hqq_mixed": dict(method="hqq", bits=4, group_size=32, layer_configs={"model.layers.0": {"bits": 8}}),
    "quanto_int4": dict(method="quanto_int4"),
    "quanto_int8": dict(method="quanto_int8"),
    "mlx4": dict(method="mlx_int4", group_size=32),
    "none": dict(method="none"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(LlamaConfig(**CFG)).to(torch.bfloat16).save_pretrained(path, max_shard_size="40KB")
    assert len(list(path.glob("model-*.safetensors"))) > 2
    return path


def reference(checkpoint, config):
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw.create_quantization_adapter("cpu", config).quantize_model(model)
    return model


@pytest.mark.parametrize("name", list(METHODS))
def test_equals_full_load_then_quantize(checkpoint, name):
    config = qw.QuantizationConfig(**METHODS[name])
    ref = reference(checkpoint, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = load_and_quantize(checkpoint, config, dtype="bfloat16", progress=False)
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert got.quantization_plan.layers == ref.quantization_plan.layers
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)
    assert not got.training


def test_stored_dtype_kept_when_dtype_is_none(checkpoint):
    model = load_and_quantize(checkpoint, qw.QuantizationConfig(method="hqq", group_size=32), progress=False)
    assert model.model.embed_tokens.weight.dtype is torch.bfloat16
    assert model.quantization_plan["model.layers.0.mlp.up_proj"].bytes_before == 64 * 128 * 2


def test_default_config_is_recommended(checkpoint, fresh_detection, monkeypatch):
    monkeypatch.setenv("QUANTIZATION_WRAPPER_BACKEND", "cpu")
    model = load_and_quantize(checkpoint, progress=False)
    assert model.quantization_config.method is not None
    assert count_checkpoint_parameters(checkpoint) == sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**CFG)).parameters())


def test_progress_bar_and_workers(checkpoint, capsys):
    load_and_quantize(checkpoint, qw.QuantizationConfig(method="hqq", group_size=32), workers=2, progress=True)
    assert "loading+quantizing (hqq)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="workers=0"):
        load_and_quantize(checkpoint, qw.QuantizationConfig(method="hqq"), workers=0)


def copy_of(checkpoint, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(checkpoint, out)
    return out


def test_missing_shard(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ValueError, match=f"names shards that are missing: \\['{victim.name}'\\]"):
        load_and_quantize(path, qw.QuantizationConfig(method="hqq"), progress=False)


def test_index_that_does_not_match_the_shards(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{key!r} is listed in '{shards[1]}' but stored in '{shards[0]}'"):
        load_and_quantize(path, qw.QuantizationConfig(method="hqq"), progress=False)
    index_path.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid safetensors index"):
        load_and_quantize(path, qw.QuantizationConfig(method="hqq"), progress=False)


def test_config_that_does_not_match_the_tensors(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp.down_proj.weight' has shape \(64, 128\) in the checkpoint, \(64, 96\)"):
        load_and_quantize(path, qw.QuantizationConfig(method="hqq"), progress=False)
    config["intermediate_size"], config["num_hidden_layers"] = 128, 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="architecture needs.*model.layers.2"):
        load_and_quantize(path, qw.QuantizationConfig(method="hqq"), progress=False)
    # Tensors the architecture has no place for: skipped with a warning naming them, as from_pretrained
    # skips them (it logs them); the model equals from_pretrained's.
    config["num_hidden_layers"] = 1
    (path / "config.json").write_text(json.dumps(config))
    hqq = qw.QuantizationConfig(method="hqq", group_size=32)
    with pytest.warns(UserWarning, match=r"no place for.*'model.layers.1.input_layernorm.weight'"):
        got = load_and_quantize(path, hqq, dtype="bfloat16", progress=False)
    ref = reference(path, hqq)
    assert len(ref.model.layers) == len(got.model.layers) == 1
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)


def test_weight_and_bias_in_different_shards(tmp_path):
    """A layer is quantized when both its tensors have arrived, each read from its own shard (here
    every bias lies in a later shard than its weight)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CFG, attention_bias=True)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if not k.endswith(".bias")},
              "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if k.endswith(".bias")}}
    for name, part in shards.items():
        save_file(part, tmp_path / name, metadata={"format": "pt"})
    weight_map = {k: name for name, part in shards.items() for k in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hqq = qw.QuantizationConfig(method="hqq", group_size=32)
    got = load_and_quantize(tmp_path, hqq, dtype="bfloat16", progress=False)
    ref = reference(tmp_path, hqq)
    assert got.quantization_plan["model.layers.0.self_attn.q_proj"].status == "quantized"
    assert got.model.layers[0].self_attn.q_proj.bias is not None
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)


def test_truncated_shard_named(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=f"{shard.name}.*(truncated|outside the file)"):
        load_and_quantize(path, qw.QuantizationConfig(method="hqq"), progress=False)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_and_quantize(tmp_path / "nope", qw.QuantizationConfig(method="hqq"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .safetensors weights"):
        load_and_quantize(tmp_path / "empty", qw.QuantizationConfig(method="hqq"))


def test_reader_matches_safetensors(checkpoint):
    from safetensors.torch import load_file

    for shard in sorted(checkpoint.glob("model-*.safetensors")):
        expected = load_file(shard)
        with SafetensorsReader(shard) as reader:
            assert sorted(reader.keys()) == sorted(expected)
            for key, value in expected.items():
                assert torch.equal(reader.read(key), value)
                assert reader.read(key, torch.float32).dtype is torch.float32


# ------------------------------------------------------------------ memory-mapped reading
def test_views_are_zero_copy_and_survive_close(checkpoint):
    shard = sorted(checkpoint.glob("model-*.safetensors"))[0]
    reader = SafetensorsReader(shard)
    key = max(reader.keys(), key=lambda k: torch.Size(reader.shape(k)).numel())
    view, copy = reader.view(key), reader.read(key)
    base = reader._bytes.data_ptr()
    assert base <= view.data_ptr() < base + reader._bytes.numel()  # inside the mapping
    assert not base <= copy.data_ptr() < base + reader._bytes.numel()
    assert torch.equal(view, copy)
    view.add_(1)  # copy-on-write: private to this process, never written to the file
    reader.close()
    assert torch.equal(view, copy + 1)  # the mapping lives as long as a view of it
    with SafetensorsReader(shard) as again:
        assert torch.equal(again.view(key), copy)
    with SafetensorsReader(shard, mmap=False) as unmapped:
        assert unmapped._bytes is None and torch.equal(unmapped.view(key), copy)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def test_release_hands_the_pages_back(tmp_path):
    from safetensors.torch import save_file

    save_file({"big": torch.ones(64 * 2**20 // 4), "small": torch.arange(10.0)}, tmp_path / "t.safetensors")
    with SafetensorsReader(tmp_path / "t.safetensors") as reader:
        before = _rss()
        assert reader.view("big").sum().item() == 16 * 2**20  # touches every page
        touched = _rss()
        reader.release(["big"])
        released = _rss()
        assert touched - before > 48 * 2**20
        assert touched - released > 48 * 2**20
        assert reader.view("big").sum().item() == 16 * 2**20  # read again from the file
        assert torch.equal(reader.view("small"), torch.arange(10.0))


def test_result_owns_its_memory(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    model = load_and_quantize(path, qw.QuantizationConfig(method="hqq", group_size=32), progress=False)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
    shutil.rmtree(path)  # nothing of the model may point into the files
    for t in list(model.parameters()) + list(model.buffers()):
        assert t.untyped_storage().nbytes() <= t.numel() * t.element_size() + 64
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_one_and_two_workers_give_the_same_model(checkpoint):
    config = qw.QuantizationConfig(method="bnb_nf4")
    one = load_and_quantize(checkpoint, config, progress=False, workers=1).state_dict()
    two = load_and_quantize(checkpoint, config, progress=False, workers=2).state_dict()
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one if isinstance(one[k], torch.Tensor))
    assert torch.get_num_threads() >= 1  # the workers' thread count is their own
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match=f"workers={bad!r} must be a positive int"):
            load_and_quantize(checkpoint, config, workers=bad)


def test_an_adapter_that_keeps_its_input_gets_a_copy(checkpoint, registry):
    from torch import nn

    from doubles import RowInt8Adapter
    from quantization_wrapper.adapters.base import register_adapter

    class Kept(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.weight = linear.weight  # the checkpoint's view, as is

        def forward(self, x):
            return x @ self.weight.t()

    class KeepingAdapter(RowInt8Adapter):
        @classmethod
        def quantized_module_types(cls):
            return (Kept,)

        def quantize_linear(self, linear, name=None, *, config=None):
            return Kept(linear)

        def module_nbytes(self, module):
            return module.weight.numel() * module.weight.element_size()

    register_adapter("hqq")(KeepingAdapter)
    model = load_and_quantize(checkpoint, qw.QuantizationConfig(method="hqq"), progress=False, workers=1)
    kept = model.model.layers[0].mlp.up_proj
    assert isinstance(kept, Kept)
    assert kept.weight.untyped_storage().nbytes() == kept.weight.numel() * kept.weight.element_size()
    reference = LlamaForCausalLM.from_pretrained(checkpoint).model.layers[0].mlp.up_proj.weight
    assert torch.equal(kept.weight, reference)


def test_default_workers_follow_the_quantization_workspace():
    from types import SimpleNamespace

    from quantization_wrapper.checkpoint.streaming import default_workers

    def layers(method, out_features, in_features=2048):
        return [SimpleNamespace(linear=SimpleNamespace(in_features=in_features, out_features=out_features),
                                config=qw.QuantizationConfig(method=method)),
                SimpleNamespace(linear=SimpleNamespace(in_features=8, out_features=8), config=None)]

    assert default_workers(2, layers("bnb_nf4", 5632)) == 2  # 11.5M weights x 16 B: 184 MB
    assert default_workers(2, layers("hqq", 5632)) == 1  # x 112 B: 1.3 GB for a second layer
    assert default_workers(2, layers("hqq", 2816, 1024)) == 1  # 323 MB: over 256 MiB
    assert default_workers(2, layers("hqq", 1024, 1024)) == 2
    assert default_workers(16, layers("bnb_nf4", 11008, 4096)) == 1  # a 7B MLP: 720 MB each
    assert default_workers(1, layers("bnb_nf4", 64)) == 1
