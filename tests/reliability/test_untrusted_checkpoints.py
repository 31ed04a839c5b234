"""A checkpoint is untrusted input: damaged or crafted ones are refused with the file and field named.

Every case builds a small valid checkpoint, damages or crafts one thing, and checks the specific
error (type and message), and that a program reading it (the CLI's ``inspect``) prints one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantization_wrapper as qw
from quantization_wrapper.cli import main as cli
from quantization_wrapper.errors import CheckpointError, ChecksumError, UnsafePathError
from reliability.common import CFG, logits, quantized_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def model():
    return quantized_model()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return qw.save_quantized_model(model, tmp_path_factory.mktemp("ck") / "ckpt")


@pytest.fixture
def copy(saved, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(saved, dst)
    return dst


def edit_description(path: Path, change) -> None:
    desc = path / "quantization_config.json"
    info = json.loads(desc.read_text())
    desc.write_text(json.dumps(change(info)))


def assert_cli_one_line(path: Path, capsys) -> str:
    code = cli(["inspect", str(path)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and err.startswith("error:"), err
    return err


# ---------------------------------------------------------------------------- integrity
def test_single_file_flipped_byte_is_caught(model, tmp_path):
    path = qw.save_quantized_model(model, tmp_path / "m.safetensors", single_file=True)
    assert qw.verify_checkpoint(path) == {"m.safetensors": "ok (CRC-32 of every tensor)"}
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"m\.safetensors: CRC-32 mismatch in tensor"):
        qw.load_quantized_model(path)


def test_truncated_shard_and_flipped_byte(copy):
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    with pytest.raises(ChecksumError, match="model.safetensors: size"):
        qw.load_quantized_model(copy)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ChecksumError, match="model.safetensors: sha256 mismatch"):
        qw.load_quantized_model(copy)


def test_huge_header_length_is_refused_without_reading(copy):
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header length"):
        qw.load_quantized_model(copy, verify=False)


# ------------------------------------------------------------------------ the description
DAMAGES = {
    "a list": lambda info: [info],
    "no plan": lambda info: {k: v for k, v in info.items() if k != "plan"},
    "no size": lambda info: {**info, "files": {n: {k: v for k, v in r.items() if k != "size"}
                                               for n, r in info["files"].items()}},
    "files null": lambda info: {**info, "files": None},
    "files empty": lambda info: {**info, "files": {}},
    "layers not a list": lambda info: {**info, "plan": {**info["plan"], "layers": "x"}},
    "layer shape a string": lambda info: {**info, "plan": {**info["plan"], "layers": [
        {**info["plan"]["layers"][0], "in_features": "64"}] + info["plan"]["layers"][1:]}},
    "bad sha": lambda info: {**info, "files": {n: {**r, "sha256": "00"} for n, r in info["files"].items()}},
    "tied not a dict": lambda info: {**info, "tied": ["a"]},
    "bad method": lambda info: {**info, "quantization_config": {**info["quantization_config"], "method": "zip"}},
}
FIELDS = {"a list": "<top level>", "no plan": "plan", "no size": "size", "files null": "files",
          "files empty": "files", "layers not a list": "plan.layers", "layer shape a string": "in_features",
          "bad sha": "sha256", "tied not a dict": "tied", "bad method": "quantization_config"}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_description_names_the_field(copy, damage, capsys):
    edit_description(copy, DAMAGES[damage])
    with pytest.raises(CheckpointError, match=rf"quantization_config\.json: field \S*{re.escape(FIELDS[damage])}"):
        qw.load_quantized_model(copy)
    assert FIELDS[damage] in assert_cli_one_line(copy, capsys)


def test_non_utf8_and_directory_description(copy, capsys):
    desc = copy / "quantization_config.json"
    desc.write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        qw.load_quantized_model(copy)
    assert_cli_one_line(copy, capsys)
    desc.unlink()
    desc.mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        qw.load_quantized_model(copy)
    assert_cli_one_line(copy, capsys)


def test_only_the_listed_weights_are_read(copy, model):
    """A stray index or shard in the directory (not in the description) is not ours to read."""
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../elsewhere.safetensors"}}))
    assert torch.equal(logits(qw.load_quantized_model(copy)), logits(model))


# ------------------------------------------------------------------------------ confinement
@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.safetensors", "sub/../../x", ""])
def test_description_file_names_are_confined(copy, name, tmp_path):
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    edit_description(copy, lambda info: {**info, "files": {**info["files"], name: {
        "size": 6, "sha256": "0" * 64}}})
    with pytest.raises(CheckpointError):
        qw.verify_checkpoint(copy)
    with pytest.raises(CheckpointError):
        qw.load_quantized_model(copy)


def test_description_path_error_is_unsafe_path(copy):
    edit_description(copy, lambda info: {**info, "files": {**info["files"], "../x": {"size": 1, "sha256": "0" * 64}}})
    with pytest.raises(UnsafePathError, match="not a plain file name"):
        qw.verify_checkpoint(copy)


def test_symlink_out_of_the_checkpoint_is_refused(copy, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    (copy / "model.safetensors").rename(outside)
    (copy / "model.safetensors").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="symlink .* outside the checkpoint"):
        qw.load_quantized_model(copy)


def hf_checkpoint(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CFG)).save_pretrained(path, max_shard_size="100KB")
    return path


def test_index_shard_names_are_confined_for_streaming(tmp_path):
    src = hf_checkpoint(tmp_path / "hf")
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../../etc/hostname"
    index.write_text(json.dumps(data))
    with pytest.raises(UnsafePathError, match="weight_map"):
        qw.load_and_quantize(src, qw.QuantizationConfig(method="hqq", bits=4, group_size=32), backend="cpu",
                             progress=False)


def test_hugging_face_cache_snapshot_symlinks_are_allowed(tmp_path):
    """huggingface_hub stores snapshots/<rev>/<file> -> ../../blobs/<sha>: that stays inside the repo."""
    src = hf_checkpoint(tmp_path / "hf")
    repo = tmp_path / "models--me--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    config = qw.QuantizationConfig(method="hqq", bits=4, group_size=32)
    a = qw.load_and_quantize(snap, config, backend="cpu", progress=False)
    b = qw.load_and_quantize(src, config, backend="cpu", progress=False)
    assert torch.equal(logits(a), logits(b))


# ------------------------------------------------------------------ tensors against the plan
def rewrite(path: Path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_unknown_buffer_tensor_is_refused(copy):
    rewrite(copy, lambda t: t.__setitem__("__buffer__.model.evil", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="__buffer__.model.evil.*buffer the architecture does not have"):
        qw.load_quantized_model(copy, verify=False)


def test_buffer_with_wrong_shape_or_dtype_is_refused(copy):
    """Older checkpoints store buffers as ``__buffer__.*`` entries; they are still read, and checked."""
    key = "__buffer__.model.rotary_emb.inv_freq"
    rewrite(copy, lambda t: t.__setitem__(key, torch.zeros(3)))
    with pytest.raises(CheckpointError, match="inv_freq.*shape"):
        qw.load_quantized_model(copy, verify=False)
    rewrite(copy, lambda t: t.__setitem__(key, torch.zeros(8, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match="inv_freq.*int32"):
        qw.load_quantized_model(copy, verify=False)


def test_unexpected_and_mistyped_plain_tensors(copy):
    rewrite(copy, lambda t: t.__setitem__("model.norm.extra", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="model.norm.extra"):
        qw.load_quantized_model(copy, verify=False)
    rewrite(copy, lambda t: (t.pop("model.norm.extra"), t.__setitem__("model.norm.weight",
                                                                        torch.ones(64, dtype=torch.int64))))
    with pytest.raises(CheckpointError, match="model.norm.weight.*int64.*float"):
        qw.load_quantized_model(copy, verify=False)


# ----------------------------------------------------------------- architectures[0] is data
def test_architecture_must_be_a_model_class(copy, monkeypatch):
    import transformers

    calls = []
    monkeypatch.setattr(transformers, "set_seed", lambda *a, **k: calls.append(a))
    config = json.loads((copy / "config.json").read_text())
    config["architectures"] = ["set_seed"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"architectures\[0\].*set_seed"):
        qw.load_quantized_model(copy, verify=False)  # (verification would stop at the edited file first)
    assert calls == []
