"""Save/load: bit-identical round trips per method, sharding, single file, and every corruption case."""

import json
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import quantization_wrapper as qw  # noqa: E402
from quantization_wrapper.serialization import (  # noqa: E402
    CheckpointError,
    ChecksumError,
    load_quantized_model,
    read_checkpoint_info,
    save_quantized_model,
    verify_checkpoint,
)

CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=128)

CONFIGS = {
    "bnb_nf4": dict(method="bnb_nf4"),
    "bnb_fp4_nodq": dict(method="bnb_fp4", double_quant=False),
    "bnb_int8": dict(method="bnb_int8"),
    "hqq4": dict(method="hqq", bits=4, group_size=32),
    "hqq_mixed_bits": dict(method="hqq", bits=4, group_size=32,
                           layer_configs={"model.layers.0": {"bits": 8}, "model.layers.1.mlp": {"bits": 2, "group_size": 16}}),
    "hqq_bf16_storage": dict(method="hqq", bits=4, group_size=32, storage_dtype="bfloat16"),
    "quanto_int4": dict(method="quanto_int4"),
    "quanto_int8": dict(method="quanto_int8"),
    "mlx4": dict(method="mlx_int4", group_size=32),
    "mlx_mixed": dict(method="mlx_int4", group_size=32, layer_configs={"model.layers.0": {"bits": 8}, "mlp": {"bits": 3}}),
    "mixed_libraries": dict(method="hqq", bits=4, group_size=32,
                            layer_configs={"model.layers.0.mlp": {"method": "bnb_nf4"},
                                           "model.layers.1.self_attn": {"method": "quanto_int8"}}),
    "none_bf16": dict(method="none", compute_dtype="bfloat16"),
}


def make_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CFG)).eval()


def quantized(config_kwargs, seed=0):
    model = make_model(seed)
    adapter = qw.create_quantization_adapter("cpu", qw.QuantizationConfig(**config_kwargs), strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter.quantize_model(model)
    return model, adapter


IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def tensor_bytes(model):
    return {k: (v.dtype, tuple(v.shape), v.contiguous().view(torch.uint8).sum().item() if v.numel() else 0)
            for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_bit_identical(name, tmp_path):
    model, adapter = quantized(CONFIGS[name])
    before = logits(model)
    adapter.save_quantized_model(model, tmp_path / "ckpt")
    loaded = qw.load_quantized_model(tmp_path / "ckpt")  # method read from the checkpoint
    assert type(loaded) is LlamaForCausalLM
    assert torch.equal(logits(loaded), before)
    assert loaded.quantization_plan.layers == model.quantization_plan.layers
    assert loaded.quantization_config == model.quantization_config
    for layer in loaded.quantization_plan.converted:  # bytes held equal the recorded plan
        module = loaded.get_submodule(layer.name)
        assert adapter.for_method(layer.method).module_nbytes(module) == layer.bytes_after
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values() if isinstance(t, torch.Tensor))


def test_adapter_load_checks_method(tmp_path):
    model, adapter = quantized(CONFIGS["hqq4"])
    adapter.save_quantized_model(model, tmp_path / "ckpt")
    again = adapter.load_quantized_model(tmp_path / "ckpt")
    assert torch.equal(logits(again), logits(model))
    other = qw.create_quantization_adapter("cpu", qw.QuantizationConfig(method="bnb_nf4"))
    with pytest.raises(CheckpointError, match="saved with method 'hqq'"):
        other.load_quantized_model(tmp_path / "ckpt")


def test_files_and_description(tmp_path):
    model, _ = quantized(CONFIGS["hqq4"])
    path = save_quantized_model(model, tmp_path / "ckpt")
    names = sorted(p.name for p in path.iterdir())
    assert names == ["config.json", "model.safetensors", "quantization_config.json"]
    info = read_checkpoint_info(path)
    assert info["format_version"] == 1 and info["quantization_config"]["method"] == "hqq"
    assert info["libraries"]["hqq"] and info["libraries"]["torch"]
    assert set(info["files"]) == {"config.json", "model.safetensors"}
    assert all(len(r["sha256"]) == 64 for r in info["files"].values())
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert verify_checkpoint(path) == {"config.json": "ok", "model.safetensors": "ok"}
    assert not list(tmp_path.glob(".*tmp"))  # no staging directory left behind


def test_sharded_save(tmp_path):
    model, _ = quantized(CONFIGS["hqq4"])
    path = save_quantized_model(model, tmp_path / "ckpt", max_shard_size="20KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 3 and (path / "model.safetensors.index.json").exists()
    assert all(s.stat().st_size < 20_000 + 40_000 for s in shards)  # one tensor may exceed the limit
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert torch.equal(logits(load_quantized_model(path)), logits(model))


def test_single_file(tmp_path):
    model, _ = quantized(CONFIGS["bnb_nf4"])
    path = save_quantized_model(model, tmp_path / "model.safetensors", single_file=True)
    assert path.is_file() and list(tmp_path.iterdir()) == [path]
    assert torch.equal(logits(load_quantized_model(path)), logits(model))
    with pytest.raises(ValueError, match="ending in .safetensors"):
        save_quantized_model(model, tmp_path / "x.bin", single_file=True)


@pytest.mark.parametrize("kind", ["config_object", "dict", "callable", "meta_module"])
def test_model_config_forms(kind, tmp_path):
    model, _ = quantized(CONFIGS["hqq4"])
    save_quantized_model(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()  # force the caller's model_config
    info = json.loads((tmp_path / "ckpt" / "quantization_config.json").read_text())
    del info["files"]["config.json"]
    (tmp_path / "ckpt" / "quantization_config.json").write_text(json.dumps(info))
    config = LlamaConfig(**CFG)
    given = {
        "config_object": LlamaConfig(**CFG, architectures=["LlamaForCausalLM"]),
        "dict": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **CFG},
        "callable": lambda: LlamaForCausalLM(config),
        "meta_module": None,
    }[kind]
    if kind == "meta_module":
        with torch.device("meta"):
            given = LlamaForCausalLM(config)
    loaded = load_quantized_model(tmp_path / "ckpt", given)
    assert torch.equal(logits(loaded), logits(model))


def test_no_config_json_and_no_model_config_is_a_clear_error(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    adapter = qw.create_quantization_adapter("cpu", qw.QuantizationConfig(method="hqq", group_size=32))
    adapter.quantize_model(model)
    save_quantized_model(model, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="no config.json; pass model_config"):
        load_quantized_model(tmp_path / "ckpt")
    loaded = load_quantized_model(tmp_path / "ckpt", lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_loading_never_materializes_full_precision(tmp_path, monkeypatch):
    """Every tensor the skeleton creates is on meta: the fp32 linear weights never exist."""
    model, _ = quantized(CONFIGS["hqq4"])
    save_quantized_model(model, tmp_path / "ckpt")
    created = []
    real_init = nn.Linear.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        created.append(self.weight.device.type)

    monkeypatch.setattr(nn.Linear, "__init__", spy)
    load_quantized_model(tmp_path / "ckpt")
    assert created and set(created) == {"meta"}


# ------------------------------------------------------------------------------ corruption cases
@pytest.fixture
def saved(tmp_path):
    model, _ = quantized(CONFIGS["hqq4"])
    return model, save_quantized_model(model, tmp_path / "ckpt")


def test_truncated_file_rejected_with_name(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ChecksumError, match="model.safetensors.*truncated"):
        load_quantized_model(path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_quantized_model(path, verify=False)


def test_modified_byte_rejected(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="model.safetensors: sha256 mismatch"):
        load_quantized_model(path)


def test_missing_shard(tmp_path):
    model, _ = quantized(CONFIGS["hqq4"])
    path = save_quantized_model(model, tmp_path / "ckpt", max_shard_size="20KB")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ChecksumError, match=f"{victim.name}.*missing"):
        load_quantized_model(path)
    with pytest.raises(CheckpointError, match=f"{victim.name}.*missing"):
        load_quantized_model(path, verify=False)


def test_future_format_version(saved):
    _, path = saved
    info = json.loads((path / "quantization_config.json").read_text())
    info["format_version"] = 99
    (path / "quantization_config.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="format_version 99 is newer"):
        load_quantized_model(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_quantized_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no quantization_config.json"):
        load_quantized_model(tmp_path / "empty")


def test_plan_does_not_match_architecture(saved):
    _, path = saved
    wrong = dict(CFG, hidden_size=96)
    with torch.device("meta"):
        other = LlamaForCausalLM(LlamaConfig(**wrong))
    with pytest.raises(CheckpointError, match="'model.layers.0.self_attn.q_proj' is 96x96 in the architecture but 64x64"):
        load_quantized_model(path, other)
    with torch.device("meta"):
        deeper = LlamaForCausalLM(LlamaConfig(**dict(CFG, num_hidden_layers=3)))
    with pytest.raises(CheckpointError, match="lacks tensors.*model.layers.2"):
        load_quantized_model(path, deeper)
    with torch.device("meta"):
        shallower = LlamaForCausalLM(LlamaConfig(**dict(CFG, num_hidden_layers=1)))
    with pytest.raises(CheckpointError, match="model.layers.1.* does not exist"):
        load_quantized_model(path, shallower)


def test_wrong_shape_of_unquantized_tensor(saved):
    _, path = saved
    with torch.device("meta"):
        other = LlamaForCausalLM(LlamaConfig(**dict(CFG, vocab_size=130)))
    with pytest.raises(CheckpointError, match=r"tensor '(lm_head|model.embed_tokens).weight' has shape \(128, 64\) in the checkpoint, \(130, 64\)"):
        load_quantized_model(path, other)


def test_interrupted_save_keeps_previous_checkpoint(saved):
    model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def crash(staging):
        raise KeyboardInterrupt("power cut")

    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # the new save would differ
    with pytest.raises(KeyboardInterrupt):
        save_quantized_model(model, path, _before_commit=crash)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # staging cleaned
    verify_checkpoint(path)


def test_crash_while_writing_tensors_keeps_previous(saved, monkeypatch):
    model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    from quantization_wrapper.checkpoint import safetensors_io

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "pwrite_all", boom)  # where every tensor byte is written
    with pytest.raises(OSError, match="disk full"):
        save_quantized_model(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_overwrite_replaces_atomically(saved):
    model, path = saved
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    save_quantized_model(model, path)
    assert torch.equal(logits(load_quantized_model(path)), logits(model))


def test_save_requires_a_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="no quantization plan"):
        save_quantized_model(make_model(), tmp_path / "x")


def test_no_pickle_in_checkpoint(saved):
    _, path = saved
    for f in path.iterdir():
        assert b"\x80\x04\x95" not in f.read_bytes()[:4096]  # no pickle protocol-4 header


# ------------------------------------------------------------------------------ memory maps, hashes
@pytest.mark.parametrize("name", ["bnb_nf4", "bnb_int8", "hqq4", "quanto_int4", "mlx4"])
def test_mapped_and_copied_loads_agree_and_survive_a_resave(name, tmp_path):
    model, _ = quantized(CONFIGS[name])
    path = save_quantized_model(model, tmp_path / "ckpt")
    before = logits(model)
    mapped, copied = load_quantized_model(path), load_quantized_model(path, mmap=False)
    assert torch.equal(logits(mapped), before) and torch.equal(logits(copied), before)
    emb_m, emb_c = mapped.model.embed_tokens.weight, copied.model.embed_tokens.weight
    nbytes = emb_m.numel() * emb_m.element_size()
    assert emb_m.untyped_storage().nbytes() > nbytes  # a view of the mapped file
    assert emb_c.untyped_storage().nbytes() == nbytes  # its own memory
    other, _ = quantized(CONFIGS[name], seed=1)
    save_quantized_model(other, path)  # atomic replace: the mapped model keeps the old file's pages
    assert torch.equal(logits(mapped), before)
    assert not torch.equal(logits(load_quantized_model(path)), before)


def test_block_checksums_are_verified_and_locate_the_damage(tmp_path, monkeypatch):
    import hashlib
    import zlib

    from quantization_wrapper.checkpoint import checksums

    monkeypatch.setattr(checksums, "HASH_BLOCK", 4096)
    model, _ = quantized(CONFIGS["hqq4"])
    path = save_quantized_model(model, tmp_path / "ckpt")
    f = path / "model.safetensors"
    data = f.read_bytes()
    rec = read_checkpoint_info(path)["files"]["model.safetensors"]
    assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["size"] == len(data)
    assert rec["block_size"] == 4096 and len(rec["block_crc32"]) == -(-len(data) // 4096) > 2
    assert rec["block_crc32"][1] == zlib.crc32(data[4096:8192])
    assert verify_checkpoint(path, full=True)["model.safetensors"] == "ok"
    damaged = bytearray(data)
    damaged[5000] ^= 0xFF
    f.write_bytes(bytes(damaged))
    with pytest.raises(ChecksumError, match=r"model.safetensors: CRC-32 mismatch in bytes 4096-8192"):
        load_quantized_model(path)
    # a description without block sums (as older saves wrote it) is verified by the file's sha256
    desc = path / "quantization_config.json"
    info = json.loads(desc.read_text())
    del info["files"]["model.safetensors"]["block_size"], info["files"]["model.safetensors"]["block_crc32"]
    desc.write_text(json.dumps(info))
    with pytest.raises(ChecksumError, match=r"model.safetensors: sha256 mismatch \(the file"):
        verify_checkpoint(path)
    f.write_bytes(data)
    assert verify_checkpoint(path)["model.safetensors"] == "ok"


def test_full_verification_checks_the_sha256_too(saved):
    import zlib

    _, path = saved
    desc = path / "quantization_config.json"
    info = json.loads(desc.read_text())
    rec = info["files"]["model.safetensors"]
    rec["block_size"], rec["block_crc32"] = rec["size"], [zlib.crc32((path / "model.safetensors").read_bytes())]
    rec["sha256"] = "0" * 64  # the block sum right, the file's hash wrong
    desc.write_text(json.dumps(info))
    assert verify_checkpoint(path)["model.safetensors"] == "ok"
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        verify_checkpoint(path, full=True)


# ------------------------------------------------------------------- tied weights and buffers
def tied_quantized(config_kwargs, seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CFG, tie_word_embeddings=True)).eval()
    adapter = qw.create_quantization_adapter("cpu", qw.QuantizationConfig(**config_kwargs), strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter.quantize_model(model)
    return model


def stored(path):
    """Every tensor name in the checkpoint's safetensors files."""
    from safetensors import safe_open

    names = set()
    for file in [path] if path.is_file() else path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


@pytest.mark.parametrize("name", ["mlx4", "hqq4", "bnb_nf4", "quanto_int8"])
@pytest.mark.parametrize("single_file", [False, True], ids=["directory", "single-file"])
def test_tied_embeddings_saved_as_transformers_saves_them(name, single_file, tmp_path):
    model = tied_quantized(CONFIGS[name])
    assert model.quantization_plan["lm_head"].status == "skipped"  # skip_modules' default keeps the tie
    path = save_quantized_model(model, tmp_path / ("model.safetensors" if single_file else "ckpt"),
                                single_file=single_file)
    names = stored(path)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert read_checkpoint_info(path)["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = load_quantized_model(path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(logits(loaded), logits(model))


def test_quantized_output_embedding_is_saved_untied(tmp_path):
    """Quantizing lm_head of a tied model (skip_modules=[]) gives it its own weights: the config.json
    says tie_word_embeddings=False, so no loader ties the float embedding over it."""
    model = tied_quantized(dict(method="mlx_int4", group_size=32, skip_modules=[]))
    assert model.quantization_plan["lm_head"].status == "quantized"
    assert model.config.tie_word_embeddings is True  # the model is not changed by saving
    path = save_quantized_model(model, tmp_path / "ckpt")
    assert model.config.tie_word_embeddings is True
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is False
    assert read_checkpoint_info(path)["tied"] == {}
    assert {"model.embed_tokens.weight", "lm_head.scales"} <= stored(path)
    loaded = load_quantized_model(path)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(logits(loaded), logits(model))


def test_buffers_the_model_computes_are_not_saved(tmp_path):
    model, _ = quantized(CONFIGS["mlx4"])
    path = save_quantized_model(model, tmp_path / "ckpt")
    assert not any(n.startswith("__buffer__.") for n in stored(path))
    assert not (path / "non_persistent_buffers.safetensors").exists()
    loaded = load_quantized_model(path)
    for name, buffer in model.named_buffers():
        if "rotary" in name:
            assert torch.equal(loaded.get_buffer(name), buffer), name


def test_buffers_that_differ_from_the_computed_ones_are_saved_apart(tmp_path):
    """A model cast to bfloat16 holds bfloat16 rotary tables, which its config would rebuild in
    float32: they are saved, in a file of their own that the peers' loaders do not read."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG)).eval().to(torch.bfloat16)
    qw.create_quantization_adapter("cpu", qw.QuantizationConfig(method="mlx_int4", group_size=32)).quantize_model(model)
    path = save_quantized_model(model, tmp_path / "ckpt")
    extra = load_file(path / "non_persistent_buffers.safetensors")
    assert sorted(extra) == ["__buffer__.model.rotary_emb.inv_freq", "__buffer__.model.rotary_emb.original_inv_freq"]
    assert extra["__buffer__.model.rotary_emb.inv_freq"].dtype == torch.bfloat16
    assert not any(n.startswith("__buffer__.") for n in load_file(path / "model.safetensors"))
    assert "non_persistent_buffers.safetensors" in read_checkpoint_info(path)["files"]
    loaded = load_quantized_model(path)
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    assert torch.equal(logits(loaded), logits(model))


class _Scaled(nn.Module):
    """Not a transformers model: nothing rebuilds its non-persistent buffers, which share memory."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        table = torch.linspace(0.5, 1.5, 64)
        self.register_buffer("scale", table, persistent=False)
        self.register_buffer("same_scale", table, persistent=False)

    def forward(self, x):
        return self.fc(x) * self.scale + self.same_scale


def test_buffers_of_other_models_are_saved_and_restored(tmp_path):
    torch.manual_seed(0)
    model = _Scaled()
    qw.create_quantization_adapter("cpu", qw.QuantizationConfig(method="hqq", group_size=32,
                                                                skip_modules=[])).quantize_model(model)
    path = save_quantized_model(model, tmp_path / "ckpt")
    assert read_checkpoint_info(path)["tied"] == {"__buffer__.scale": "__buffer__.same_scale"}
    assert "__buffer__.same_scale" in stored(path) and "__buffer__.scale" not in stored(path)
    loaded = load_quantized_model(path, _Scaled)  # built under meta: its buffers come from the file
    x = torch.randn(3, 64)
    assert torch.equal(loaded.scale, model.scale) and torch.equal(loaded.same_scale, model.scale)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _rewrite_in_old_layout(path, model):
    """Rewrite a checkpoint as versions up to e4b0e21 wrote it (compared against one that version
    wrote): every non-persistent buffer inline in model.safetensors as ``__buffer__.<name>``, and of
    tied tensors the alphabetically first name kept (``lm_head.weight``), the others as aliases."""
    import hashlib

    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    info = json.loads((path / "quantization_config.json").read_text())
    for name, buffer in model.named_buffers():
        module_name, _, attr = name.rpartition(".")
        if attr in model.get_submodule(module_name)._non_persistent_buffers_set:
            tensors["__buffer__." + name] = buffer.clone()
    tied = {}
    for alias, source in info["tied"].items():
        kept = min(alias, source)
        tensors[kept] = tensors.pop(source)
        tied[max(alias, source)] = kept
    info["tied"] = tied
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    data = (path / "model.safetensors").read_bytes()
    info["files"]["model.safetensors"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (path / "quantization_config.json").write_text(json.dumps(info))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_checkpoints_in_the_old_layout_still_load(tied, tmp_path):
    model = tied_quantized(CONFIGS["mlx4"]) if tied else quantized(CONFIGS["mlx4"])[0]
    path = save_quantized_model(model, tmp_path / "ckpt")
    _rewrite_in_old_layout(path, model)
    names = stored(path)
    assert "__buffer__.model.rotary_emb.inv_freq" in names
    assert ("model.embed_tokens.weight" in names) is not tied and "lm_head.weight" in names
    loaded = load_quantized_model(path)  # checksums verified
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tied
    assert torch.equal(logits(loaded), logits(model))
    again = save_quantized_model(loaded, tmp_path / "again")  # saved anew in the current layout
    assert not any(n.startswith("__buffer__.") for n in stored(again))
    assert ("lm_head.weight" in stored(again)) is not tied


def test_old_layout_buffers_are_checked(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = quantized(CONFIGS["mlx4"])
    path = save_quantized_model(model, tmp_path / "ckpt")
    _rewrite_in_old_layout(path, model)
    tensors = load_file(path / "model.safetensors")
    for key, value, error in [("__buffer__.model.rotary_emb.inv_freq", torch.zeros(3), "inv_freq.*shape"),
                              ("__buffer__.model.rotary_emb.inv_freq", torch.zeros(8, dtype=torch.int32), "inv_freq.*int32"),
                              ("__buffer__.model.evil", torch.zeros(3), "evil.*buffer the architecture does not have")]:
        save_file({**tensors, key: value}, path / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=error):
            load_quantized_model(path, verify=False)


# --------------------------------------------------------------------------- streaming the save
STREAMED = ["bnb_nf4", "bnb_int8", "hqq4", "quanto_int4", "quanto_int8", "mlx4", "mixed_libraries"]


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _bf16_model(config_kwargs):
    """A bfloat16 model, whose rotary tables go to non_persistent_buffers.safetensors."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG)).eval().to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw.create_quantization_adapter("cpu", qw.QuantizationConfig(**config_kwargs)).quantize_model(model)
    return model


@pytest.mark.parametrize("layout", ["one-file", "shards", "single-file"])
@pytest.mark.parametrize("name", STREAMED)
def test_streamed_files_are_what_save_file_writes(name, layout, tmp_path):
    """Every file the streaming writer makes has the bytes safetensors' save_file writes for the same
    tensors (what saves wrote before streaming) and loads tensor for tensor with load_file."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from quantization_wrapper.checkpoint.save import collect_tensors

    model = _bf16_model(CONFIGS[name])
    single = layout == "single-file"
    path = save_quantized_model(model, tmp_path / ("m.safetensors" if single else "ckpt"), single_file=single,
                                max_shard_size="10KB" if layout == "shards" else "2GB")
    expected, tied = collect_tensors(model, model.quantization_plan, model.quantization_config,
                                     read_checkpoint_info(path).get("config") or json.loads((path / "config.json").read_text()))
    files = [path] if single else sorted(path.glob("*.safetensors"))
    assert len(files) > 3 if layout == "shards" else len(files) == (1 if single else 2)  # + the buffers' file
    seen = set()
    for file in files:
        loaded = load_file(file)
        seen |= set(loaded)
        for key, value in loaded.items():
            assert same_bits(value, expected[key]), key
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata()
        again = tmp_path / "save_file.safetensors"
        save_file({k: expected[k] for k in loaded}, again, metadata=metadata)
        assert file.read_bytes() == again.read_bytes(), file.name
    assert seen == set(expected) and not seen & set(tied)
    # mapped (the default) and copied: quanto's CPU int8 kernel needs aligned weights (a mapped view
    # at an unaligned offset of a small shard crashed the process before the adapter copied it)
    assert torch.equal(logits(load_quantized_model(path)), logits(model))
    assert torch.equal(logits(load_quantized_model(path, mmap=False)), logits(model))


def test_header_matches_save_file_for_every_dtype(tmp_path):
    """Every dtype safetensors stores, 0-d, empty and non-contiguous tensors, names out of order."""
    from types import SimpleNamespace

    from safetensors.torch import save_file
    from quantization_wrapper.checkpoint.safetensors_io import SAFETENSORS_DTYPES, write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dtype in enumerate(SAFETENSORS_DTYPES):
        raw = torch.randint(0, 2 if dtype == torch.bool else 256, (3, 8 * (1 + i % 3)), dtype=torch.uint8, generator=g)
        base = raw.view(dtype)
        tensors[f"{chr(122 - i)}.w{i}"] = base.t() if base.shape[1] > 1 else base
        tensors[f"s{i}"] = base.reshape(-1)[0].clone()  # 0-d
        tensors[f"e{i}"] = base[:0]
    tensors["ünïcode \"name\"\n"] = torch.arange(3.0)
    saved = SimpleNamespace(specs={k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, crc32=None,
                            tensors=lambda: iter(tensors.items()),
                            nbytes=lambda k: tensors[k].numel() * tensors[k].element_size())
    for meta in ({"format": "pt"}, {"quantization_wrapper": json.dumps({"ä": "\"q\"\n", "n": [1, 2]})}):
        write_safetensors(saved, {tmp_path / "ours.safetensors": (list(tensors), meta)})
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp_path / "theirs.safetensors", metadata=meta)
        assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


@pytest.mark.parametrize("single_file", [False, True], ids=["directory", "single-file"])
@pytest.mark.parametrize("name", ["quanto_int4", "bnb_nf4", "hqq4", "mlx4"])
def test_save_holds_one_layers_tensors_at_a_time(name, single_file, tmp_path, monkeypatch):
    """The adapter's layer_state_dict output (for quanto CPU int4, a new copy of the layer's weights)
    is released before the next layer's is made, both in the survey and in the writing: the save
    holds the model plus one layer. Counted by weak references to every tensor produced."""
    import weakref

    from quantization_wrapper.adapters.base import get_adapter_class
    from quantization_wrapper.config import QuantizationMethod

    model, _ = quantized(CONFIGS[name])
    cls = get_adapter_class(QuantizationMethod.parse(model.quantization_config.method))
    original = cls.layer_state_dict
    produced: list[list[weakref.ref]] = []
    alive_at_call: list[int] = []

    def tracked(self, module):
        alive_at_call.append(sum(r() is not None for refs in produced for r in refs))
        state = original(self, module)
        produced.append([weakref.ref(t) for t in state.values()])
        return state

    monkeypatch.setattr(cls, "layer_state_dict", tracked)
    path = save_quantized_model(model, tmp_path / ("m.safetensors" if single_file else "ckpt"), single_file=single_file)
    layers = len(model.quantization_plan.converted)
    assert layers > 5 and len(produced) == 2 * layers  # converted twice: survey, then writing
    assert alive_at_call == [0] * (2 * layers)  # no earlier layer's tensors alive when the next is made
    assert sum(r() is not None for refs in produced for r in refs) == 0
    monkeypatch.undo()
    assert torch.equal(logits(load_quantized_model(path)), logits(model))


def test_a_layer_that_changes_between_survey_and_writing_is_refused(saved, monkeypatch):
    """The header is written from the survey; a layer whose state differs when written again would
    make a wrong file, so the save fails and the previous checkpoint stays."""
    from quantization_wrapper.adapters.hqq import HQQAdapter

    model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    original = HQQAdapter.layer_state_dict
    calls = []

    def drifting(self, module):
        state = original(self, module)
        calls.append(1)
        if len(calls) > len(model.quantization_plan.converted):  # the writing pass
            state["W_q"] = state["W_q"][:-1]
        return state

    monkeypatch.setattr(HQQAdapter, "layer_state_dict", drifting)
    with pytest.raises(CheckpointError, match="W_q.*not deterministic"):
        save_quantized_model(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
