"""Checkpoint -> quantized model -> saved checkpoint (what `quantize MODEL --out DIR` does): peak RSS of
`load_and_quantize` + `save_quantized_model` against the budget (process baseline + quantized size +
0.5 GB), with the streaming save and with the save as it was before (every tensor collected, then
`safetensors.torch.save_file` per shard; copied below), and whether both wrote the same bytes.

Each measurement runs in a fresh process (peak RSS is the kernel's high-water mark, ru_maxrss).
Writes the table to docs/benchmarks.md.

    python benchmarks/save_quantized.py [--methods quanto_int4,bnb_nf4] [--small]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, generated_llama, machine_line, run_child, write_section  # noqa: E402
from load_quantize import MODEL_BYTES, OURS, prelude  # noqa: E402

# save_quantized_model before streaming (commit 15f793c), without the staging directory and the
# JSON description (neither changes the memory): every layer's state collected, then save_file.
OLD_SAVE = """
def save_before_streaming(model, path, max_bytes=2 * 10**9):
    import re
    from pathlib import Path
    from safetensors.torch import save_file
    from quantization_wrapper.checkpoint import checksums, description, interop, save as s
    plan, config = model.quantization_plan, model.quantization_config
    saved_config = interop.hf_config_dict(model)
    tensors, owned, adapters = {}, set(), {}
    for layer in plan.layers:
        if layer.status == "skipped":
            continue
        adapter = description.layer_adapter(config, layer.method, cache=adapters)
        for key, value in adapter.layer_state_dict(model.get_submodule(layer.name)).items():
            tensors[f"{layer.name}.{key}"] = value
        owned.add(layer.name)
    tensors.update(s._state_outside(model, owned))
    rebuilt = s._rebuilt_buffers(saved_config)
    for name, buf in model.named_buffers(remove_duplicate=False):
        if name in tensors or any(name.startswith(o + ".") for o in owned):
            continue
        ref = rebuilt.get(name)
        if ref is None or ref.dtype != buf.dtype or ref.shape != buf.shape or not torch.equal(ref, buf.detach().cpu()):
            tensors[description.BUFFER_PREFIX + name] = buf
    copies = s._tied_copy_patterns(model)
    groups = {}
    for name in sorted(tensors):
        t = tensors[name]
        if t.numel():
            groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype), []).append(name)
    for names in groups.values():
        if len(names) > 1:
            kept = min(names, key=lambda n: (any(re.search(p, n) for p in copies), n))
            for n in names:
                if n != kept:
                    del tensors[n]
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    path = Path(path)
    path.mkdir(parents=True)
    buffers = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(description.BUFFER_PREFIX)]}
    if buffers:
        save_file(buffers, path / description.BUFFERS_NAME, metadata={"format": "pt"})
    shards, size = [{}], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    for i, shard in enumerate(shards, 1):
        name = description.WEIGHTS_NAME if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
    for f in sorted(path.iterdir()):
        checksums.file_record(f)
"""


def quantize_and_save(ckpt: Path, method: str, out: Path, streaming: bool) -> dict:
    save = f"save_quantized_model(model, {str(out)!r})" if streaming else f"save_before_streaming(model, {str(out)!r})"
    return run_child(prelude(method) + MODEL_BYTES + OLD_SAVE + f"""
from quantization_wrapper import QuantizationConfig, save_quantized_model
from quantization_wrapper.loading import load_and_quantize
start = time.perf_counter()
model = load_and_quantize({str(ckpt)!r}, QuantizationConfig(**{OURS[method]}), dtype=torch.bfloat16, progress=False)
loaded, load_peak, load_rss = time.perf_counter(), peak(), rss()
{save}
saved = time.perf_counter()
report(load_seconds=loaded - start, save_seconds=saved - loaded, load_peak=load_peak, load_rss=load_rss,
       peak_rss=peak(), baseline_rss=baseline, size_gb=model_bytes(model))
""")


def weight_digests(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.glob("*.safetensors"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods (default: quanto_int4,bnb_nf4,bnb_int8,mlx_int4; "
                             "with --small also hqq)")
    parser.add_argument("--small", action="store_true",
                        help="a 4-layer 1024-wide Llama (for HQQ, whose optimizer takes minutes per GB on 2 cores)")
    args = parser.parse_args()
    methods = args.methods.split(",") if args.methods else \
        ["quanto_int4", "bnb_nf4", "bnb_int8", "mlx_int4"] + (["hqq"] if args.small else [])
    ckpt = generated_llama("llama-small", num_hidden_layers=4, hidden_size=1024, intermediate_size=2816,
                           num_attention_heads=16, num_key_value_heads=4) if args.small else generated_llama()
    rows = []
    for method in methods:
        result = {}
        for streaming in (False, True):
            out = CACHE / f"saved-{method}-{'streamed' if streaming else 'before'}"
            shutil.rmtree(out, ignore_errors=True)
            result[streaming] = quantize_and_save(ckpt, method, out, streaming)
            result[streaming]["digests"] = weight_digests(out)
        identical = result[False].pop("digests") == result[True].pop("digests")
        for streaming in (False, True):
            shutil.rmtree(CACHE / f"saved-{method}-{'streamed' if streaming else 'before'}", ignore_errors=True)
        rows.append((method, result[False], result[True], identical))
        before, after = result[False], result[True]
        budget = after["baseline_rss"] + after["size_gb"] + 0.5
        print(f"{method}: before {before['peak_rss']:.2f} GB (save {before['save_seconds']:.1f}s), streamed "
              f"{after['peak_rss']:.2f} GB (save {after['save_seconds']:.1f}s), budget {budget:.2f} GB, "
              f"same bytes: {identical}", flush=True)

    config = json.loads((ckpt / "config.json").read_text())
    lines = [
        "## Quantize and save (`quantize MODEL --out DIR`): the streaming save"
        + (" -- small model" if args.small else ""),
        "",
        machine_line("One run per cell, each in a fresh process"),
        f"Model: generated Llama, {json.dumps({k: v for k, v in config.items() if k in ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'vocab_size')})}, "
        "bf16 safetensors shards of 500 MB. `load_and_quantize` then `save_quantized_model` (one 2 GB shard "
        "limit, the default). *Before*: the save as it was, collecting every layer's tensors "
        "(`layer_state_dict`, for quanto CPU int4 a new copy of every packed weight) before "
        "`safetensors.torch.save_file` wrote them. *Streamed*: every tensor's dtype and shape from a first "
        "pass over the layers, the headers written, then each layer converted again and its tensors written "
        "at their offsets, so one layer's exist at a time. Budget = process baseline + quantized size + 0.5 GB. "
        "Peak RSS after loading = the high-water mark before the save began.",
        "",
        "| method | quantized size (GB) | budget (GB) | peak RSS after loading (GB) | peak RSS before (GB) | "
        "peak RSS streamed (GB) | within budget before / streamed | save time before (s) | save time streamed (s) | "
        "same bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, before, after, identical in rows:
        budget = after["baseline_rss"] + after["size_gb"] + 0.5
        lines.append(
            f"| {method} | {after['size_gb']:.2f} | {budget:.2f} | {after['load_peak']:.2f} | {before['peak_rss']:.2f} | "
            f"{after['peak_rss']:.2f} | {'yes' if before['peak_rss'] <= budget else 'NO'} / "
            f"{'yes' if after['peak_rss'] <= budget else 'NO'} | {before['save_seconds']:.1f} | "
            f"{after['save_seconds']:.1f} | {'yes' if identical else 'NO'} |")
    lines += [
        "",
        "Save time includes the checksums of every file (sha256 and 64 MiB CRC-32 blocks) and, streamed, "
        "converting every layer twice (quanto's CPU int4 unpacking is most of it); the other methods' "
        "`layer_state_dict` returns views of the layer's own tensors. What the streamed save adds to the "
        "loaded model is the checksum pass (`_file_record` maps 64 MiB per thread at a time, 2 threads here), "
        "about 0.1 GB. Same bytes: the safetensors files of both saves have equal sha256.",
    ]
    text = "\n".join(lines)
    print(text)
    write_section("save_quantized_small" if args.small else "save_quantized", text)


if __name__ == "__main__":
    main()
