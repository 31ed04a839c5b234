"""Command line: ``quantization-wrapper`` (or ``qwrap``, or ``python -m quantization_wrapper``).

Subcommands: ``doctor``, ``recommend``, ``quantize``, ``inspect``, ``demo``. Exit codes: 0 success,
1 the operation failed (bad checkpoint, failed check), 2 bad arguments. ``--json`` prints one JSON
document for programs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


# ------------------------------------------------------------------------------------- doctor
def cmd_doctor(args: argparse.Namespace) -> int:
    from backend_manager import BackendManager, get_import_status

    from .recommend import get_recommended_config

    bm = BackendManager(args.backend)
    caps = bm.capabilities
    statuses = get_import_status(bm.backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = get_recommended_config(bm.backend)
    data = {
        "backend": bm.backend.value,
        "device": str(bm.device),
        "capabilities": caps.to_dict(),
        "memory": bm.get_memory_info(),
        "libraries": {name: {"installed": s.installed, "version": s.version, "usable": s.usable,
                             "reason": s.reason, "install": s.install_hint} for name, s in statuses.items()},
        "usable_methods": caps.quantization_methods,
        "recommended_default": default.to_dict(),
    }
    mem = data["memory"]
    lines = [
        f"backend:  {bm.backend.value} (device {bm.device}, {caps.device_name})",
        f"memory:   {mem['available_gb']:.1f} GB available of {mem['total_gb']:.1f} GB ({mem['source']})",
        f"dtypes:   bf16 {'yes' if caps.supports_bf16 else 'no'}, fp16 {'yes' if caps.supports_fp16 else 'no'}; "
        f"distributed: {caps.distributed_backend}; FSDP: {'yes' if caps.supports_fsdp else 'no'}",
        "libraries:",
        *(f"  {s}" for s in statuses.values()),
        f"methods usable here: {', '.join(caps.quantization_methods)}",
        f"recommended default: {default.method.value} {default.bits}-bit"
        + (f", group {default.group_size}" if default.group_size else ""),
    ]
    _print(args, data, "\n".join(lines))
    return 0


# ---------------------------------------------------------------------------------- recommend
def cmd_recommend(args: argparse.Namespace) -> int:
    from backend_manager import Backend, BackendManager, detect_backend

    from .recommend import MemoryWarning, estimate_footprint_gb, get_recommended_config

    backend = Backend.parse(args.backend) if args.backend else detect_backend()
    if args.model:
        model_dir = Path(args.model)
        if not model_dir.is_dir():
            raise CLIError(f"--model {model_dir}: not a directory", 2)
        from .sizing import checkpoint_parameter_count

        try:
            size = checkpoint_parameter_count(model_dir) / 1e9
        except ValueError as e:
            raise CLIError(f"--model {model_dir}: {e}", 2) from e
    elif args.model_size is not None:
        size = args.model_size
    else:
        raise CLIError("give --model-size (billions of parameters) or --model DIR", 2)
    memory = args.memory
    if memory is None:
        if backend is not detect_backend():
            raise CLIError(f"--memory is required when recommending for {backend.value} on a "
                           f"{detect_backend().value} machine", 2)
        memory = BackendManager(backend).get_memory_info()["available_gb"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MemoryWarning)
        config = get_recommended_config(backend, size, memory, training=not args.inference)
    need = estimate_footprint_gb(config, size, training=not args.inference)
    notes = [str(w.message) for w in caught if issubclass(w.category, MemoryWarning)]
    data = {"backend": backend.value, "model_size_b": size, "available_memory_gb": memory,
            "training": not args.inference, "estimated_footprint_gb": round(need, 2),
            "fits": need <= memory, "config": config.to_dict(), "warnings": notes}
    text = (f"{backend.value}, {size:.3g}B parameters, {memory:.1f} GB, "
            f"{'training' if not args.inference else 'inference'}: {config.method.value} {config.bits}-bit"
            + (f" group {config.group_size}" if config.group_size else "")
            + f" (compute {str(config.compute_dtype).removeprefix('torch.')}), "
            f"estimated {need:.1f} GB" + "".join(f"\nwarning: {n}" for n in notes))
    _print(args, data, text)
    return 0


# ------------------------------------------------------------------------------------ inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    from .serialization import CheckpointError, read_checkpoint_info, verify_checkpoint
    from .surgery import QuantizationPlan

    path = Path(args.path)
    try:
        info = read_checkpoint_info(path)
        checks = verify_checkpoint(path, full=True) if not args.no_verify else {}
    except CheckpointError as e:
        raise CLIError(str(e), 1) from e
    plan = QuantizationPlan.from_dict(info["plan"])
    data = {"path": str(path), "format_version": info["format_version"],
            "quantization_config": info["quantization_config"], "libraries": info.get("libraries", {}),
            "files": info.get("files", {}), "checksums": checks,
            "summary": {"layers": len(plan.layers), "quantized": len(plan.quantized),
                        "skipped": len(plan.skipped), "bytes_before": plan.bytes_before,
                        "bytes_after": plan.bytes_after, "bits_per_weight": plan.bits_per_weight},
            "plan": info["plan"]["layers"]}
    files = "\n".join(f"  {n}: {r['size']} bytes, sha256 {r['sha256'][:16]}... {checks.get(n, '')}"
                      for n, r in info.get("files", {}).items())
    text = (f"{path}: format {info['format_version']}, method {plan.method}\n"
            f"libraries: {', '.join(f'{k} {v}' for k, v in info.get('libraries', {}).items())}\n"
            f"files:\n{files}\n{plan.table(max_rows=args.max_rows)}")
    _print(args, data, text)
    return 0


# ----------------------------------------------------------------------------------- quantize
def cmd_quantize(args: argparse.Namespace) -> int:
    from .config import QuantizationConfig
    from .loading import load_and_quantize
    from .serialization import save_quantized_model

    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise CLIError(f"MODEL_DIR {model_dir}: not a directory", 2)
    layer_configs = {}
    if args.layer_config:
        try:
            layer_configs = json.loads(Path(args.layer_config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CLIError(f"--layer-config {args.layer_config}: {e}", 2) from e
    fields = dict(method=args.method, bits=args.bits, group_size=args.group_size,
                  compute_dtype=args.compute_dtype, layer_configs=layer_configs)
    if args.skip is not None:
        fields["skip_modules"] = args.skip
    try:
        config = QuantizationConfig(**fields)
    except ValueError as e:
        raise CLIError(str(e), 2) from e
    import time

    start = time.perf_counter()
    model = load_and_quantize(model_dir, config, backend=args.backend, progress=not args.json)
    save_quantized_model(model, args.out, max_shard_size=args.max_shard_size)
    seconds = time.perf_counter() - start
    plan = model.quantization_plan
    data = {"out": str(args.out), "seconds": round(seconds, 2), "method": plan.method,
            "bytes_before": plan.bytes_before, "bytes_after": plan.bytes_after,
            "bits_per_weight": plan.bits_per_weight, "quantized": len(plan.quantized),
            "skipped": len(plan.skipped)}
    _print(args, data, f"{plan.table(max_rows=args.max_rows)}\nsaved to {args.out} in {seconds:.1f} s")
    return 0


# --------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out_dir=args.out, steps=args.steps, json_output=args.json)


# ------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .config import QuantizationMethod

    parser = argparse.ArgumentParser(prog="quantization-wrapper",
                                     description="One API over PyTorch weight-quantization libraries.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    backends = ["cuda", "mps", "mlx", "cpu"]

    p = sub.add_parser("doctor", help="show the backend, memory, libraries and usable methods")
    p.add_argument("--backend", choices=backends, help="check this backend instead of detecting")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("recommend", help="recommend a quantization config for a model and a memory budget")
    p.add_argument("--model-size", type=float, metavar="B", help="parameters in billions (e.g. 7)")
    p.add_argument("--model", metavar="DIR", help="a checkpoint directory to count parameters from")
    p.add_argument("--memory", type=float, metavar="GB", help="memory available (default: this machine's)")
    p.add_argument("--backend", choices=backends, help="recommend for this backend (default: detect)")
    p.add_argument("--inference", action="store_true", help="inference only (default: LoRA training)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("quantize", help="quantize a transformers checkpoint with low memory and save it")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="directory with config.json and *.safetensors")
    p.add_argument("--method", required=True, choices=[m.value for m in QuantizationMethod])
    p.add_argument("--bits", type=int)
    p.add_argument("--group-size", type=int)
    p.add_argument("--compute-dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--skip", nargs="*", metavar="PATTERN", help="modules to keep in full precision")
    p.add_argument("--layer-config", metavar="FILE", help="JSON file of per-layer overrides")
    p.add_argument("--backend", choices=backends)
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--max-rows", type=int, default=20, help="plan rows to print")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("inspect", help="describe a saved checkpoint and verify its checksums")
    p.add_argument("path", metavar="DIR", help="checkpoint directory or single .safetensors file")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 verification")
    p.add_argument("--max-rows", type=int, default=None, help="plan rows to print")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="end-to-end demo on the bundled MiniLM checkpoint (no network)")
    p.add_argument("--out", default="demo_out", help="where to save the quantized checkpoint")
    p.add_argument("--steps", type=int, default=8, help="LoRA training steps")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except ValueError as e:  # invalid values reach us as ValueError with a complete sentence
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, ImportError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
