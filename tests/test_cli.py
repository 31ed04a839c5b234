"""The command line, run as a subprocess: exit codes, --json, one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

ENV = dict(os.environ, QUANTIZATION_WRAPPER_BACKEND="cpu", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")


def run(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "quantization_wrapper", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def test_help_for_every_subcommand():
    code, out, _ = run("--help")
    assert code == 0
    commands = ["doctor", "recommend", "quantize", "inspect", "demo"]
    assert all(c in out for c in commands)
    # one process for the rest: argparse's --help exits 0 after printing
    script = ("import sys; from quantization_wrapper.cli import main\n"
              "for c in %r:\n"
              "    try: main([c, '--help'])\n"
              "    except SystemExit as e: print('EXIT', c, e.code)\n" % commands)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
    for c in commands:
        assert f"usage: quantization-wrapper {c}" in proc.stdout and f"EXIT {c} 0" in proc.stdout


def test_doctor_json():
    code, out, _ = run("doctor", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["backend"] == "cpu" and data["memory"]["total_gb"] > 0
    assert data["libraries"]["hqq"]["usable"] is True and data["libraries"]["hqq"]["version"]
    assert "hqq" in data["usable_methods"] and data["recommended_default"]["method"] == "hqq"


def test_recommend():
    code, out, _ = run("recommend", "--model-size", "7", "--memory", "16", "--backend", "mps", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["config"]["method"] == "mlx_int4" and data["fits"] and data["estimated_footprint_gb"] <= 16
    code, out, _ = run("recommend", "--model-size", "7", "--memory", "16", "--backend", "cuda")
    assert code == 0 and "bnb_nf4 4-bit" in out


def test_recommend_from_checkpoint(checkpoint):
    code, out, _ = run("recommend", "--model", str(checkpoint), "--memory", "1", "--json")
    data = json.loads(out)
    assert code == 0 and 0 < data["model_size_b"] < 0.001


def test_quantize_then_inspect(checkpoint, tmp_path):
    out_dir = tmp_path / "q"
    code, out, err = run("quantize", str(checkpoint), "--method", "hqq", "--bits", "4", "--group-size", "32",
                         "--out", str(out_dir), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["quantized"] == 14 and data["skipped"] == 1 and 4 < data["bits_per_weight"] < 6.1
    code, out, err = run("inspect", str(out_dir), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["checksums"] == {"config.json": "ok", "model.safetensors": "ok"}
    assert info["summary"]["quantized"] == 14 and info["quantization_config"]["bits"] == 4
    code, text, _ = run("inspect", str(out_dir))
    assert code == 0 and "model.layers.0.self_attn.q_proj" in text and "14 quantized, 1 skipped" in text
    # tamper: inspect reports the file and fails with exit code 1
    weights = out_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, out, err = run("inspect", str(out_dir))
    assert code == 1 and "model.safetensors: sha256 mismatch" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_quantize_with_layer_config_and_skip(checkpoint, tmp_path):
    layer_file = tmp_path / "layers.json"
    layer_file.write_text(json.dumps({"model.layers.0": {"bits": 8}}))
    code, out, err = run("quantize", str(checkpoint), "--method", "hqq", "--group-size", "32", "--skip", "lm_head",
                         "mlp", "--layer-config", str(layer_file), "--out", str(tmp_path / "q"), "--json")
    assert code == 0, err
    assert json.loads(out)["quantized"] == 8


@pytest.mark.parametrize("args,needle", [
    (["quantize", "{ckpt}", "--method", "gptq", "--out", "x"], "invalid choice: 'gptq'"),
    (["quantize", "{ckpt}", "--method", "hqq", "--bits", "5", "--out", "x"], "bits=5 is not valid for method='hqq'"),
    (["quantize", "/no/such/dir", "--method", "hqq", "--out", "x"], "not a directory"),
    (["quantize", "{ckpt}", "--method", "hqq", "--out", "{ckpt}"], "is MODEL_DIR"),
    (["inspect", "/no/such/dir"], "checkpoint not found"),
    (["recommend"], "give --model-size"),
    (["recommend", "--model-size", "7", "--backend", "cuda"], "--memory is required"),
])
def test_bad_arguments_are_one_clear_line(checkpoint, args, needle):
    args = [a.replace("{ckpt}", str(checkpoint)) for a in args]
    code, out, err = run(*args)
    assert code in (1, 2) and needle in err
    assert "Traceback" not in err
    assert code == (1 if args[0] == "inspect" else 2)
    if "invalid choice" not in needle:
        assert len(err.strip().splitlines()) == 1
