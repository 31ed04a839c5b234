"""The command line never destroys the user's files, fails in one line with the right exit code,
and prints only valid JSON. Run in-process through ``main()`` (a subprocess costs seconds each)."""

import errno
import json
import warnings

import pytest
import torch

from quantization_wrapper.cli import main
from reliability.common import CFG, leftovers, tree

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    monkeypatch.setenv("QUANTIZATION_WRAPPER_BACKEND", "cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).to(torch.bfloat16).save_pretrained(path)
    return path


def run(capsys, *argv):
    """(exit code, stdout, stderr); argparse's exit counts as its code."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def user_dir(path):
    path.mkdir()
    (path / "notes.txt").write_text("my notes")
    (path / "config.json").write_text('{"mine": true}')  # a name the checkpoint also writes
    (path / "data").mkdir()
    (path / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
    return path


QUANTIZE = ("quantize", "{model}", "--method", "hqq", "--bits", "4", "--group-size", "32")


def quantize_args(model_dir, *extra):
    return [a.replace("{model}", str(model_dir)) for a in QUANTIZE] + [str(e) for e in extra]


# ------------------------------------------------------------------------------ demo --out
def test_demo_refuses_a_directory_of_other_files_before_running(capsys, tmp_path):
    out = user_dir(tmp_path / "work")
    before = tree(out)
    code, stdout, err = run(capsys, "demo", "--out", out, "--json")
    assert code == 1
    assert "--overwrite" in err and "not a quantization-wrapper checkpoint" in err
    assert error_lines(err) == err.strip().splitlines() and len(error_lines(err)) == 1
    assert json.loads(stdout) == {"error": error_lines(err)[0].removeprefix("error: "),
                                  "type": "FileExistsError", "exit_code": 1}
    assert tree(out) == before


def test_demo_out_dot_never_empties_the_working_directory(capsys, tmp_path, monkeypatch):
    work = user_dir(tmp_path / "work")
    before = tree(work)
    monkeypatch.chdir(work)
    code, stdout, err = run(capsys, "demo", "--out", ".", "--overwrite")
    assert code == 2 and "current working directory" in err and "== 1." not in stdout
    assert tree(work) == before


def test_run_demo_refuses_before_loading_anything(tmp_path):
    from quantization_wrapper.demo import run_demo

    out = user_dir(tmp_path / "work")
    before = tree(out)
    with pytest.raises(FileExistsError, match="overwrite"):
        run_demo(out_dir=out, steps=1, json_output=True)
    with pytest.raises(ValueError, match="steps=0 must be a whole number >= 1"):
        run_demo(out_dir=tmp_path / "new", steps=0)
    assert tree(out) == before and not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- demo --steps
@pytest.mark.parametrize("steps", ["0", "-1", "two"], ids=["zero", "negative", "not-a-number"])
def test_demo_steps_must_be_positive(capsys, tmp_path, steps):
    code, stdout, err = run(capsys, "demo", "--out", tmp_path / "d", f"--steps={steps}", "--json")
    assert code == 2
    assert f"argument --steps: '{steps}' is not allowed: give a whole number >= 1" in err
    assert json.loads(stdout)["exit_code"] == 2 and not (tmp_path / "d").exists()


def test_one_lora_step_is_measured_before_and_after(capsys):
    """`demo --steps 1` reported a failed check: it compared the loss of step 1 with itself.
    The demo's training loop, on a tiny BERT (the full demo takes ~50 s): one step lowers the loss
    measured on the same batch before and after it."""
    peft = pytest.importorskip("peft")
    from quantization_wrapper.demo import train_lora_steps

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    model = peft.get_peft_model(transformers.BertModel(config),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    a = {"input_ids": torch.randint(0, 64, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long)}
    b = {"input_ids": torch.randint(0, 64, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long)}
    before, after = train_lora_steps(model, a, b, steps=1)
    assert 0 < after < before
    with pytest.raises(ValueError, match="steps=0"):
        train_lora_steps(model, a, b, steps=0)


# --------------------------------------------------------------------------- quantize --out
@pytest.mark.parametrize("target", ["dir", "file"], ids=["model-dir", "file-in-model-dir"])
def test_quantize_refuses_to_write_over_its_source(capsys, model_dir, target):
    out = model_dir if target == "dir" else model_dir / "model.safetensors"
    before = tree(model_dir)
    code, _, err = run(capsys, *quantize_args(model_dir, "--out", out))
    assert code == 2 and f"--out {out} is MODEL_DIR" in err and "source weights" in err
    assert "quantizing" not in err  # refused before loading: no progress bar
    assert tree(model_dir) == before


def test_quantize_into_a_directory_of_other_files(capsys, model_dir, tmp_path):
    out = user_dir(tmp_path / "out")
    before = tree(out)
    code, stdout, err = run(capsys, *quantize_args(model_dir, "--out", out, "--json"))
    assert code == 1 and "Traceback" not in err and len(error_lines(err)) == 1
    assert "--overwrite" in err and "quantizing" not in err  # refused before the quantization
    assert json.loads(stdout)["type"] == "FileExistsError"
    assert tree(out) == before

    code, stdout, err = run(capsys, *quantize_args(model_dir, "--out", out, "--json", "--overwrite"))
    assert code == 0, err
    assert json.loads(stdout)["quantized"] == 14
    after = tree(out)
    kept = {k: v for k, v in before.items() if k != "config.json"}  # config.json: a name we write
    assert kept.items() <= after.items()
    assert {"model.safetensors", "quantization_config.json"} <= after.keys()


def test_full_disk_is_one_line_and_leaves_nothing(capsys, model_dir, tmp_path, monkeypatch):
    from quantization_wrapper.checkpoint import safetensors_io

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_io, "pwrite_all", no_space)  # where every tensor byte is written
    out = tmp_path / "parent" / "q"
    code, stdout, err = run(capsys, *quantize_args(model_dir, "--out", out, "--json"))
    assert code == 1
    assert "Traceback" not in err and len(error_lines(err)) == 1 and "no space left" in err.lower()
    assert json.loads(stdout)["type"] == "OSError"
    assert not out.exists() and leftovers(out.parent) == []  # no staging directory left behind


def test_everything_skipped_prints_valid_json(capsys, model_dir, tmp_path):
    code, stdout, err = run(capsys, *quantize_args(model_dir, "--out", tmp_path / "q", "--skip", "re:.*", "--json"))
    assert code == 0, err
    data = json.loads(stdout)  # bits per weight of zero layers is undefined: null, not NaN
    assert data["quantized"] == 0 and data["bits_per_weight"] is None
    code, stdout, err = run(capsys, "inspect", tmp_path / "q", "--json")
    assert code == 0, err
    assert json.loads(stdout)["summary"]["bits_per_weight"] is None


# ------------------------------------------------------------------------------- --backend
def test_quantize_checks_the_backend_as_doctor_does(capsys, model_dir, tmp_path):
    from backend_manager import Backend, available_backends

    if Backend.MLX in available_backends():
        pytest.skip("MLX is present on this machine")
    code, _, doctor_err = run(capsys, "doctor", "--backend", "mlx")
    assert code == 2
    code, stdout, err = run(capsys, *quantize_args(model_dir, "--out", tmp_path / "q", "--backend", "mlx", "--json"))
    assert code == 2 and doctor_err.removeprefix("error: ").strip() in err
    assert json.loads(stdout) == {"error": err.strip().removeprefix("error: "), "type": "ValueError", "exit_code": 2}
    assert not (tmp_path / "q").exists()


def test_recommend_for_an_absent_backend_needs_memory(capsys):
    from backend_manager import Backend, available_backends

    if Backend.MLX in available_backends():
        pytest.skip("MLX is present on this machine")
    code, _, err = run(capsys, "recommend", "--model-size", "7", "--backend", "mlx")
    assert code == 2 and "--memory is required" in err and "'mlx' was requested but is not available" in err
    code, stdout, _ = run(capsys, "recommend", "--model-size", "7", "--backend", "mlx", "--memory", "16", "--json")
    assert code == 0 and json.loads(stdout)["config"]["method"] == "mlx_int4"


# ------------------------------------------------------------------------------ recommend
BAD_NUMBERS = [("--model-size", v) for v in ("nan", "inf", "0", "-7")] + [("--memory", v) for v in ("nan", "-1", "0")]


@pytest.mark.parametrize("flag,value", BAD_NUMBERS, ids=[f"{f.strip('-')}={v}" for f, v in BAD_NUMBERS])
def test_recommend_rejects_numbers_that_are_not_sizes(capsys, flag, value):
    other = {"--model-size": ["--memory", "16"], "--memory": ["--model-size", "7"]}[flag]
    code, stdout, err = run(capsys, "recommend", f"{flag}={value}", *other, "--json")
    assert code == 2
    assert f"argument {flag}: '{value}' is not allowed: give a finite number > 0" in err
    assert json.loads(stdout)["type"] == "ArgumentError"  # valid JSON: no NaN anywhere


def test_recommend_never_prints_infinity(capsys):
    code, stdout, err = run(capsys, "recommend", "--model-size", "1e300", "--memory", "16", "--json")
    assert code == 2 and "--model-size 1e+300" in err and "overflows" in err
    json.loads(stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


# ----------------------------------------------------------------------- exit codes, -v
class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc,code,line", [
    (lambda: __import__("quantization_wrapper.errors").errors.CheckpointError("bad shard"), 1, "error: bad shard"),
    (lambda: ValueError("size must be positive"), 2, "error: size must be positive"),
    (lambda: RuntimeError("kernel failed"), 1, "error: RuntimeError: kernel failed"),
    (lambda: KeyError("model.norm"), 1, "error: KeyError: 'model.norm'"),
    (lambda: _Boom("multi\nline"), 1, "error: _Boom: multi line"),
], ids=["checkpoint-error", "value-error", "runtime-error", "key-error", "other"])
def test_every_error_is_one_line_with_its_exit_code(capsys, monkeypatch, exc, code, line):
    import quantization_wrapper.recommend as recommend

    def fail(*args, **kwargs):
        raise exc()

    monkeypatch.setattr(recommend, "get_recommended_config", fail)
    got, stdout, err = run(capsys, "recommend", "--model-size", "7", "--memory", "16", "--json")
    assert got == code and err.strip() == line
    assert json.loads(stdout)["exit_code"] == code
    got, _, err = run(capsys, "-v", "recommend", "--model-size", "7", "--memory", "16")
    assert got == code and "Traceback" in err and err.strip().splitlines()[-1] == line


def test_interrupt_exits_130(capsys, monkeypatch):
    import quantization_wrapper.recommend as recommend

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recommend, "get_recommended_config", interrupt)
    assert run(capsys, "recommend", "--model-size", "7", "--memory", "16")[0] == 130


# ------------------------------------------------------------ skip_modules vs layer_configs
def test_skipped_module_with_layer_config_is_reported_as_skipped(model_dir, tmp_path, capsys):
    layers = tmp_path / "layers.json"
    layers.write_text(json.dumps({"model.layers.0.self_attn.q_proj": {"bits": 8}}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run(capsys, *quantize_args(model_dir, "--out", tmp_path / "q", "--skip", "lm_head",
                                                  "model.layers.0", "--layer-config", layers))
    assert code == 0, err
    messages = [str(w.message) for w in caught if "layer_configs" in str(w.message)]
    assert messages and not any("matched no linear layer" in m for m in messages)
    assert any("model.layers.0.self_attn.q_proj" in m and "'model.layers.0'" in m and "skip" in m
               for m in messages)


@pytest.mark.parametrize("size", ["-5MB", "0", "lots"])
def test_bad_max_shard_size_is_refused_before_quantizing(capsys, model_dir, tmp_path, monkeypatch, size):
    import quantization_wrapper.loading as loading

    monkeypatch.setattr(loading, "load_and_quantize", lambda *a, **k: pytest.fail("quantized before checking"))
    code, _, err = run(capsys, *quantize_args(model_dir, "--out", tmp_path / "out", f"--max-shard-size={size}"))
    assert code == 2 and error_lines(err) and "max_shard_size" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
