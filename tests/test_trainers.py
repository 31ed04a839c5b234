"""transformers' ``Trainer`` and TRL's ``SFTTrainer`` on models this package quantized (QLoRA).

Every model we produce carries an ``hf_quantizer`` (trainable, and serializable through
``save_pretrained``), which both trainers read. Each test trains a tiny Llama (built from a config,
with a word-level tokenizer built in code: nothing is downloaded) for a few steps and checks that
the loss falls, that no base tensor changed (byte for byte), and that the adapter the trainer saves
reloads on a freshly loaded quantized base with identical logits. SFTTrainer runs each method
with TRL's default precision (bf16 mixed precision: CPU autocast), bf16 set explicitly, and fp32.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from quantization_wrapper import (  # noqa: E402
    QuantizationConfig,
    create_quantization_adapter,
    load_quantized_model,
    save_quantized_model,
)
from quantization_wrapper.adapters.base import leaf_tensors  # noqa: E402
from quantization_wrapper.training import quantized_layers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8
LR = 2e-2
SEQ = 16
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a small model learns a short sentence by heart",
    "quantized weights stay frozen while the adapter trains",
]


def _requires(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


#: method -> (library needed, config options)
METHODS = {
    "bnb_nf4": ("bitsandbytes", {}),
    "hqq": ("hqq", {"bits": 4, "group_size": 32}),
    "quanto_int4": ("optimum.quanto", {}),
    "mlx_int4": ("torch", {}),  # the torch path needs no mlx
}
PARAMS = [pytest.param(m, marks=_requires(lib), id=m) for m, (lib, _) in METHODS.items()]


def _config(method: str) -> QuantizationConfig:
    return QuantizationConfig(method=method, **METHODS[method][1])


# ---------------------------------------------------------------------- model, tokenizer, data
@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def word_tokenizer():
    """A word-level tokenizer over :data:`SENTENCES` (with pad/bos/eos/unk), built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _llama(vocab: int) -> LlamaForCausalLM:
    """Hidden 64, 2 layers, 4 heads (2 KV heads), the tokenizer's vocabulary."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def _batch(tokenizer) -> torch.Tensor:
    """``(2, SEQ)`` token ids: the sentences, one after the other."""
    ids = tokenizer(" ".join(SENTENCES * 2)).input_ids[: 2 * SEQ]
    return torch.tensor(ids).reshape(2, SEQ)


class RepeatedBatch(torch.utils.data.Dataset):
    """The rows of one batch, over and over (a few steps lower the loss clearly)."""

    def __init__(self, batch: torch.Tensor, length: int = 32):
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.batch[i % len(self.batch)]
        return {"input_ids": row, "labels": row}


def _lora() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _quantize(method: str, vocab: int, base_dir: Path):
    """A quantized tiny Llama, saved to ``base_dir`` (for the reload) and prepared for training."""
    adapter = create_quantization_adapter("cpu", _config(method))
    model = adapter.quantize_model(_llama(vocab))
    save_quantized_model(model, base_dir)
    return adapter.prepare_model_for_training(model), adapter


# ---------------------------------------------------------------------- checks
def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (packed data viewed as float may hold NaN patterns: compare bytes)."""
    return t.detach().as_subclass(torch.Tensor).reshape(-1).contiguous().view(torch.uint8).clone()


def _base_snapshot(model: nn.Module, adapter) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor of ``model`` (a ``PeftModel``'s base model or not), as bytes: the
    leaves of every parameter and buffer (bitsandbytes' packed data, quanto's QTensor parts), and
    every tensor of every quantized layer as the adapter serializes it (HQQ's scales, bitsandbytes'
    quant state)."""
    out = {}
    for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if ".lora_" in name:
                continue
            for i, leaf in enumerate(leaf_tensors(tensor)):
                out[f"{kind}:{name.replace('.base_layer', '')}:{i}"] = _bytes(leaf)
    for name, module in quantized_layers(model).items():
        for key, value in adapter.layer_state_dict(module).items():
            out[f"layer:{name.replace('.base_layer', '')}.{key}"] = _bytes(value)
    return out


def _assert_unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert any(k.startswith("layer:") for k in before)  # the quantized layers were seen
    assert sorted(before) == sorted(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:10]


def _logged_losses(trainer) -> list[float]:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS, trainer.state.log_history
    return losses


def _assert_reloads_exactly(trainer, base_dir: Path, adapter_dir: Path, probe: torch.Tensor) -> None:
    """``trainer.save_model`` wrote the adapter; a fresh quantized base plus the adapter computes
    the trained model's logits exactly."""
    assert (adapter_dir / "adapter_model.safetensors").is_file(), sorted(p.name for p in adapter_dir.iterdir())
    # accelerate wraps forward in autocast under bf16 mixed precision: compare the model itself
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    reloaded = PeftModel.from_pretrained(load_quantized_model(base_dir), adapter_dir).eval()
    lora = {n: p for n, p in trained.named_parameters() if ".lora_" in n}
    reloaded_lora = {n: p for n, p in reloaded.named_parameters() if ".lora_" in n}
    assert lora and sorted(lora) == sorted(reloaded_lora)
    for name, param in reloaded_lora.items():
        # SFTTrainer keeps the LoRA weights of a 4-bit model (is_loaded_in_4bit) in bfloat16; peft
        # reloads them in float32, holding the same values
        assert torch.equal(param.to(lora[name].dtype), lora[name]), name
        param.data = param.data.to(lora[name].dtype)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=probe).logits, trained(input_ids=probe).logits)


def _train_with_trainer(model: nn.Module, adapter, tokenizer, tmp_path: Path) -> None:
    """QLoRA with ``transformers.Trainer`` on a prepared quantized model; every check of test 1."""
    model = get_peft_model(model, _lora())
    before = _base_snapshot(model.get_base_model(), adapter)
    batch = _batch(tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=STEPS, learning_rate=LR,
                             per_device_train_batch_size=2, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=RepeatedBatch(batch))
    trainer.train()

    losses = _logged_losses(trainer)
    assert losses[-1] < losses[0] - 0.5, losses
    _assert_unchanged(before, _base_snapshot(model.get_base_model(), adapter))
    trainer.save_model(str(tmp_path / "adapter"))
    _assert_reloads_exactly(trainer, tmp_path / "base", tmp_path / "adapter", batch)


# ---------------------------------------------------------------------- transformers.Trainer
@pytest.mark.parametrize("method", PARAMS)
def test_trainer_qlora_trains_saves_and_reloads(method, tokenizer, tmp_path):
    model, adapter = _quantize(method, len(tokenizer), tmp_path / "base")
    assert model.hf_quantizer.is_trainable and model.hf_quantizer.is_serializable()
    _train_with_trainer(model, adapter, tokenizer, tmp_path)


@pytest.mark.parametrize("method", [p for p in PARAMS if p.id == "hqq"])
def test_trainer_qlora_on_a_model_quantized_by_from_pretrained(method, tokenizer, tmp_path):
    import quantization_wrapper  # noqa: F401 - registers our quantizer with transformers
    from transformers import AutoModelForCausalLM

    _llama(len(tokenizer)).save_pretrained(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=_config(method))
    assert model.is_quantized and model.hf_quantizer.is_trainable
    assert len(quantized_layers(model)) == 14  # every projection; lm_head is skipped by default
    save_quantized_model(model, tmp_path / "base")
    adapter = create_quantization_adapter("cpu", _config(method))
    _train_with_trainer(adapter.prepare_model_for_training(model), adapter, tokenizer, tmp_path)


# ---------------------------------------------------------------------- TRL SFTTrainer
def _sft_params() -> list:
    return [pytest.param(p.id, precision, marks=p.marks, id=f"{p.id}-{precision}")
            for p in PARAMS for precision in ("default", "bf16", "fp32")]


@pytest.mark.parametrize(("method", "precision"), _sft_params())
def test_sft_trainer_qlora_trains_saves_and_reloads(method, precision, tokenizer, tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, adapter = _quantize(method, len(tokenizer), tmp_path / "base")
    before = _base_snapshot(model, adapter)
    precision_args = {"default": {}, "bf16": {"bf16": True}, "fp32": {"bf16": False}}[precision]
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=STEPS, learning_rate=LR, logging_steps=1,
                     report_to=[], save_strategy="no", use_cpu=True, **precision_args)
    if precision == "default":
        # TRL's default is bf16=True (unless fp16) on any machine, this CPU one included: SFTTrainer
        # trains our quantized layers under bf16 autocast unless told otherwise
        assert args.bf16 is True and not args.fp16
    assert args.bf16 is (precision != "fp32")
    dataset = Dataset.from_dict({"text": SENTENCES * 8})
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=_lora())
    assert trainer.accelerator.mixed_precision == ("bf16" if args.bf16 else "no")
    trainer.train()

    losses = _logged_losses(trainer)
    assert losses[-1] < losses[0] - 0.5, losses
    _assert_unchanged(before, _base_snapshot(trainer.model.get_base_model(), adapter))
    trainer.save_model(str(tmp_path / "adapter"))
    _assert_reloads_exactly(trainer, tmp_path / "base", tmp_path / "adapter", _batch(tokenizer))


# ---------------------------------------------------------------------- save_pretrained
@pytest.mark.parametrize("method", PARAMS)
def test_save_pretrained_base_reloads_with_from_pretrained(method, tokenizer, tmp_path):
    """The quantized base saved the transformers way comes back the transformers way, unchanged."""
    from transformers import AutoModelForCausalLM

    model = create_quantization_adapter("cpu", _config(method)).quantize_model(_llama(len(tokenizer))).eval()
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert [type(m).__name__ for m in reloaded.modules()] == [type(m).__name__ for m in model.modules()]
