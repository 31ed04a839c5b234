"""Loading from several threads at once: exact results, and no process-wide state left changed.

Skeletons used to be built under accelerate's ``init_empty_weights`` (a process-wide patch of
``nn.Module.register_parameter``), with ``torch.set_default_dtype`` and transformers'
``no_init_weights`` (a process-wide patch of ``torch.nn.init``): threads saved each other's patches
as the "original" and left every later ``nn.Linear`` on meta.
"""

import json
import re
import threading
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, LlamaConfig, LlamaForCausalLM, MistralConfig  # noqa: E402

import quantization_wrapper as qw  # noqa: E402
from quantization_wrapper.loading import build_empty_model, build_skeleton, model_from_config  # noqa: E402

CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=128)
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
THREADS, ROUNDS = 4, 3
INIT_NAMES = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")


def global_state() -> dict:
    """What a skeleton build may not change for the rest of the process."""
    return {
        "register_parameter": nn.Module.register_parameter,
        "register_buffer": nn.Module.register_buffer,
        "default_dtype": torch.get_default_dtype(),
        "default_device": torch.get_default_device(),
        "new_linear_device": nn.Linear(4, 4).weight.device.type,
        "init": {name: getattr(torch.nn.init, name) for name in INIT_NAMES},
        "linear_module_init": torch.nn.modules.linear.init.kaiming_uniform_,
        "init_weights": transformers.PreTrainedModel.init_weights,
        "tie_weights": transformers.PreTrainedModel.tie_weights,
        "linspace": torch.linspace,
        "new_thread_torch_threads": _new_thread_torch_threads(),
    }


def _new_thread_torch_threads() -> int:
    """Intra-op threads a thread created now starts with (a worker's set_num_threads changes it)."""
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


ORIGINAL = global_state()


@pytest.fixture(autouse=True)
def unchanged_global_state():
    assert global_state() == ORIGINAL
    yield
    assert global_state() == ORIGINAL
    assert ORIGINAL["default_dtype"] == torch.float32 and ORIGINAL["new_linear_device"] == "cpu"


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A quantized checkpoint (ours), a full-precision transformers checkpoint, and the quantized
    model's logits."""
    root = tmp_path_factory.mktemp("threads")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG)).eval()
    model.save_pretrained(root / "hf")
    adapter = qw.create_quantization_adapter("cpu", qw.QuantizationConfig(method="hqq", bits=4, group_size=32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter.quantize_model(model)
    qw.save_quantized_model(model, root / "quantized")
    return root / "quantized", root / "hf", logits(model)


def run_together(work, n=THREADS):
    """``work(i)`` on ``n`` threads released at once; the results, or the first error raised."""
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def target(i):
        try:
            barrier.wait(timeout=60)
            results[i] = work(i)
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    return results


def test_concurrent_loads_are_exact(checkpoints):
    path, _, expected = checkpoints
    for _ in range(ROUNDS):
        models = run_together(lambda i: qw.load_quantized_model(path))
        assert len(models) == THREADS and len({id(m) for m in models}) == THREADS
        for model in models:
            assert not [n for n, t in model.state_dict().items() if t.device.type == "meta"]
            assert torch.equal(logits(model), expected)


def test_worker_pools_leave_the_thread_count(checkpoints, tmp_path):
    """Two-worker streaming and quanto's threaded restore set torch threads per worker."""
    _, hf, _ = checkpoints
    config = qw.QuantizationConfig(method="quanto_int4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qw.load_and_quantize(hf, config, backend="cpu", progress=False, workers=2)
        qw.save_quantized_model(model, tmp_path / "q")
        qw.load_quantized_model(tmp_path / "q")
    # the autouse fixture compares new_thread_torch_threads with its value before the test


def test_concurrent_streaming_loads_are_exact(checkpoints):
    _, hf, _ = checkpoints
    config = qw.QuantizationConfig(method="hqq", bits=4, group_size=32)
    reference = logits(qw.load_and_quantize(hf, config, backend="cpu", progress=False, workers=1))
    models = run_together(lambda i: qw.load_and_quantize(hf, config, backend="cpu", progress=False, workers=1))
    for model in models:
        assert torch.equal(logits(model), reference)


def raised(fn):
    try:
        fn()
    except ValueError as e:
        return e
    raise AssertionError("the load did not fail")


def bad_config(directory, **change):
    data = json.loads((directory / "config.json").read_text())
    data.update(change)
    (directory / "config.json").write_text(json.dumps(data))


FAILURES = {
    "unknown_model_type": (dict(model_type="not_a_model"), "transformers cannot build model_type='not_a_model'"),
    "set_seed": (dict(architectures=["set_seed"]), r"architectures\[0\]='set_seed' is not a transformers model"),
}


@pytest.mark.parametrize("case", list(FAILURES))
@pytest.mark.parametrize("loader", ["load_quantized_model", "load_and_quantize", "build_empty_model"])
def test_failed_loads_leave_no_global_state(checkpoints, tmp_path, case, loader):
    quantized, hf, _ = checkpoints
    change, message = FAILURES[case]
    source = quantized if loader == "load_quantized_model" else hf
    target = tmp_path / "ckpt"
    target.mkdir()
    for f in source.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    bad_config(target, **change)
    load = {
        "load_quantized_model": lambda: qw.load_quantized_model(target, verify=False),
        "load_and_quantize": lambda: qw.load_and_quantize(target, qw.QuantizationConfig(method="hqq", bits=4),
                                                          backend="cpu", progress=False),
        "build_empty_model": lambda: build_empty_model(target),
    }[loader]
    errors = run_together(lambda i: raised(load))
    expected = "CheckpointError" if loader == "load_quantized_model" else "ValueError"
    assert [type(e).__name__ for e in errors] == [expected] * THREADS
    assert all(re.search(message, str(e)) for e in errors), errors
    # the autouse fixture checks the global state afterwards


def test_bfloat16_build_does_not_change_the_default_dtype_of_other_threads(checkpoints):
    _, hf, _ = checkpoints
    seen_default: set = set()

    def work(i):
        if i == 0:  # builds in bfloat16 (and loads once), while the others build in the default dtype
            dtypes = {p.dtype for _ in range(20) for p in build_empty_model(hf, dtype=torch.bfloat16).parameters()}
            loaded = qw.load_and_quantize(hf, qw.QuantizationConfig(method="hqq", bits=4, group_size=32),
                                          backend="cpu", dtype=torch.bfloat16, progress=False, workers=1)
            return dtypes, {p.dtype for n, p in loaded.named_parameters() if "norm" in n}
        dtypes = set()
        for _ in range(20):
            seen_default.add(torch.get_default_dtype())
            dtypes |= {p.dtype for p in build_empty_model(hf).parameters()}
            dtypes |= {p.dtype for p in model_from_config(LlamaConfig(**CFG)).parameters()}
            seen_default.add(torch.get_default_dtype())
        return dtypes, set()

    results = run_together(work)
    assert results[0] == ({torch.bfloat16}, {torch.bfloat16})
    assert [r[0] for r in results[1:]] == [{torch.float32}] * (THREADS - 1)
    assert seen_default == {torch.float32}


@pytest.mark.parametrize("architecture", ["set_seed", "AutoTokenizer", "LlamaConfig", "os", "__import__",
                                          "not a name", "LlamaForCausalLM.from_pretrained"])
def test_architectures_must_name_a_model_class(tmp_path, monkeypatch, architecture):
    calls = []

    def set_seed(*args, **kwargs):
        calls.append(("set_seed", args))

    class AutoTokenizer:
        def __init__(self, *args, **kwargs):
            calls.append(("AutoTokenizer", args))

    monkeypatch.setattr(transformers, "set_seed", set_seed)
    monkeypatch.setattr(transformers, "AutoTokenizer", AutoTokenizer)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": [architecture], **CFG}))
    with pytest.raises(ValueError) as raised:
        build_empty_model(tmp_path)
    message = str(raised.value)
    assert f"architectures[0]={architecture!r}" in message
    assert str(tmp_path / "config.json") in message and "LlamaForCausalLM" in message  # the file and the fix
    assert calls == []


@pytest.mark.parametrize("architectures", ["LlamaForCausalLM", [3], [None], {"a": 1}], ids=["str", "int", "none", "dict"])
def test_architectures_must_be_a_list_of_names(tmp_path, architectures):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": architectures, **CFG}))
    with pytest.raises(ValueError, match="'architectures' must be a list of class names"):
        build_empty_model(tmp_path)


@pytest.mark.parametrize("content", ["[1, 2]", '"llama"'], ids=["list", "string"])
def test_config_json_must_be_an_object(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match="must hold a JSON object"):
        build_empty_model(tmp_path)


@pytest.mark.parametrize("architectures, cls", [([], "LlamaModel"), (None, "LlamaModel"),
                                                (["LlamaForCausalLM"], "LlamaForCausalLM")],
                         ids=["empty", "absent", "named"])
def test_architectures_pick_the_class(tmp_path, architectures, cls):
    data = {"model_type": "llama", **CFG}
    if architectures is not None:
        data["architectures"] = architectures
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert type(build_empty_model(tmp_path)).__name__ == cls


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
MODELS = {
    "llama": (LlamaConfig(**CFG, architectures=["LlamaForCausalLM"]),
              ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]),
    "llama_tied": (LlamaConfig(**CFG, tie_word_embeddings=True, architectures=["LlamaForCausalLM"]),
                   ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]),
    "mistral": (MistralConfig(**CFG, architectures=["MistralForCausalLM"]),
                ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]),
    "bert": (BertConfig(**SMALL, architectures=["BertForMaskedLM"]),
             ["bert.embeddings.position_ids", "bert.embeddings.token_type_ids"]),
}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["default", "bf16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_buffers_equal_a_normal_construction(name, dtype):
    config, buffers = MODELS[name]
    skeleton = model_from_config(config, dtype=dtype)
    normal = type(skeleton)(config)
    assert [n for n, _ in skeleton.named_buffers()] == buffers == [n for n, _ in normal.named_buffers()]
    for n, b in normal.named_buffers():
        built = skeleton.get_buffer(n)
        assert built.device.type == "cpu" and built.dtype == b.dtype and torch.equal(built, b), n
    params = dict(skeleton.named_parameters())
    assert len(params) == len(dict(normal.named_parameters())) > 0
    assert {(p.device.type, p.dtype) for p in params.values()} == {("meta", dtype or torch.float32)}
    if config.tie_word_embeddings:
        assert skeleton.get_output_embeddings().weight is skeleton.get_input_embeddings().weight


def test_keep_in_fp32_modules_stay_float32():
    config = transformers.T5Config(d_model=64, d_ff=128, num_layers=1, num_heads=4, d_kv=16, vocab_size=128,
                                   architectures=["T5ForConditionalGeneration"])
    for dtype, fp32 in [(torch.float16, True), (torch.bfloat16, False)]:  # T5 keeps "wo" in fp32 for fp16 only
        model = model_from_config(config, dtype=dtype)
        wo = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
        assert wo == ({"encoder.block.0.layer.1.DenseReluDense.wo.weight",
                       "decoder.block.0.layer.2.DenseReluDense.wo.weight"} if fp32 else set())
        assert all(p.dtype == dtype for n, p in model.named_parameters() if n not in wo)


from transformers import initialization as hf_init  # noqa: E402


class Tables(transformers.PreTrainedModel):
    """A model whose ``_init_weights`` computes one of its buffers and not the other."""

    config_class = LlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(4, 4)
        self.register_buffer("computed", torch.arange(4.0), persistent=False)
        self.register_buffer("not_computed", torch.arange(4.0) * 3, persistent=False)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self:
            hf_init.copy_(module.computed, torch.arange(4.0))


def test_buffers_init_weights_does_not_compute_stay_on_meta():
    model = build_skeleton(lambda: Tables(LlamaConfig(**CFG)), None, where="test")
    assert torch.equal(model.computed, torch.arange(4.0)) and model.computed.device.type == "cpu"
    assert model.not_computed.device.type == "meta"  # for the checkpoint to provide, never garbage
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_build_skeleton_inputs():
    on_meta = build_skeleton(lambda: LlamaForCausalLM(LlamaConfig(**CFG)), None, where="test")
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    assert torch.equal(on_meta.model.rotary_emb.inv_freq, LlamaForCausalLM(LlamaConfig(**CFG)).model.rotary_emb.inv_freq)
    plain = build_skeleton(lambda: nn.Sequential(nn.Linear(4, 4)), None, where="test")
    assert plain[0].weight.device.type == "meta"
    module = nn.Linear(2, 2)
    assert build_skeleton(module, {"model_type": "llama"}, where="test") is module
    from_dict = build_skeleton(None, {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **CFG}, where="t")
    assert type(from_dict) is LlamaForCausalLM and from_dict.model.rotary_emb.inv_freq.device.type == "cpu"
