"""Command line: ``quantization-wrapper`` (or ``qwrap``, or ``python -m quantization_wrapper``).

Subcommands: ``doctor``, ``recommend``, ``quantize``, ``inspect``, ``demo``. Exit codes: 0 success,
1 the operation failed (bad checkpoint, failed check, full disk), 2 bad arguments, 130 interrupted.
An error is one line on stderr (``-v`` adds the traceback). ``--json`` prints one JSON document for
programs; when the command fails that document is ``{"error": ..., "type": ..., "exit_code": ...}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class _UsageExit(SystemExit):
    """argparse's exit on bad arguments, keeping the message for ``--json``."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # same output and exit code as argparse's; the message is kept
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise _UsageExit(2, message)


def _to_json(data: Any) -> str:
    try:
        return json.dumps(data, indent=2, default=str, allow_nan=False)
    except ValueError as e:  # NaN/Infinity is not JSON; a reader would choke on it
        raise CLIError(f"the result holds a non-finite number, which JSON cannot carry ({e}); "
                       f"please report this", 1) from e


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(_to_json(data))
    else:
        print(text)


def _finite_or_none(x: float) -> float | None:
    """A measured number for JSON: ``None`` where it is undefined (bits/weight of zero layers)."""
    return x if math.isfinite(x) else None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: give a whole number >= 1")
    return value


def _number(text: str, *, minimum: float, inclusive: bool, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: give a finite number {bound} ({what})")
    return value


def _model_size(text: str) -> float:
    return _number(text, minimum=0, inclusive=False, what="billions of parameters")


def _memory(text: str) -> float:
    return _number(text, minimum=0, inclusive=False, what="gigabytes")


def _check_backend(name: str | None) -> None:
    """Refuse a ``--backend`` that is not present here, with doctor's message (exit 2)."""
    if name is None:
        return
    from backend_manager import BackendManager

    try:
        BackendManager(name)
    except ValueError as e:
        raise CLIError(f"--backend {name}: {e}", 2) from e


def _check_out_dir(out: Path, *, overwrite: bool, model_dir: Path | None = None) -> None:
    """Refuse, before any long work, an ``--out`` the save would refuse or that would destroy data:
    MODEL_DIR itself or a file in it (exit 2), a non-empty directory that is not one of our
    checkpoints without ``--overwrite`` (exit 1), the working directory or a file (exit 2)."""
    from .checkpoint_dir import check_save_target

    resolved = out.resolve()
    if model_dir is not None:
        source = model_dir.resolve()
        if resolved == source or (source in resolved.parents and resolved.is_file()):
            raise CLIError(f"--out {out} is MODEL_DIR {model_dir}"
                           + (" itself" if resolved == source else " or a file in it")
                           + "; saving there would replace the source weights. Choose another directory", 2)
    try:
        check_save_target(out, overwrite=overwrite)
    except FileExistsError as e:
        raise CLIError(f"--out: {e}", 1) from e
    except ValueError as e:
        raise CLIError(f"--out: {e}", 2) from e


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
    if memory is None:  # this machine's memory: the backend must be present here, as doctor checks
        try:
            manager = BackendManager(backend)
        except ValueError as e:
            raise CLIError(f"--memory is required when recommending for {backend.value} on this "
                           f"machine: {e}", 2) from e
        memory = manager.get_memory_info()["available_gb"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MemoryWarning)
        config = get_recommended_config(backend, size, memory, training=not args.inference)
    need = estimate_footprint_gb(config, size, training=not args.inference)
    if not math.isfinite(need):
        given = f"--model {args.model}" if args.model else f"--model-size {size:g}"
        raise CLIError(f"{given}: the memory estimate for {size:g}B parameters overflows ({need} GB); "
                       f"give a realistic model size", 2)
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
    from .errors import CheckpointError
    from .serialization import read_checkpoint_info, verify_checkpoint
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
                        "bytes_after": plan.bytes_after, "bits_per_weight": _finite_or_none(plan.bits_per_weight)},
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
    from .serialization import parse_size, save_quantized_model

    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise CLIError(f"MODEL_DIR {model_dir}: not a directory", 2)
    _check_backend(args.backend)
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
    _check_out_dir(Path(args.out), overwrite=args.overwrite, model_dir=model_dir)  # before the long part
    try:
        parse_size(args.max_shard_size)
    except ValueError as e:
        raise CLIError(f"--max-shard-size: {e}", 2) from e
    import time

    start = time.perf_counter()
    model = load_and_quantize(model_dir, config, backend=args.backend, progress=not args.json)
    save_quantized_model(model, args.out, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    plan = model.quantization_plan
    data = {"out": str(args.out), "seconds": round(seconds, 2), "method": plan.method,
            "bytes_before": plan.bytes_before, "bytes_after": plan.bytes_after,
            "bits_per_weight": _finite_or_none(plan.bits_per_weight), "quantized": len(plan.quantized),
            "skipped": len(plan.skipped)}
    _print(args, data, f"{plan.table(max_rows=args.max_rows)}\nsaved to {args.out} in {seconds:.1f} s")
    return 0


# --------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _check_out_dir(Path(args.out), overwrite=args.overwrite)  # before the minute-long run
    return run_demo(out_dir=args.out, steps=args.steps, json_output=args.json, overwrite=args.overwrite)


# ------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .config import QuantizationMethod

    parser = _ArgumentParser(prog="quantization-wrapper",
                             description="One API over PyTorch weight-quantization libraries.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    backends = ["cuda", "mps", "mlx", "cpu"]

    p = sub.add_parser("doctor", help="show the backend, memory, libraries and usable methods")
    p.add_argument("--backend", choices=backends, help="check this backend instead of detecting")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("recommend", help="recommend a quantization config for a model and a memory budget")
    p.add_argument("--model-size", type=_model_size, metavar="B", help="parameters in billions (e.g. 7)")
    p.add_argument("--model", metavar="DIR", help="a checkpoint directory to count parameters from")
    p.add_argument("--memory", type=_memory, metavar="GB", help="memory available (default: this machine's)")
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
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty directory that is not a checkpoint (its other files are kept)")
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
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty directory that is not a checkpoint (its other files are kept)")
    p.add_argument("--steps", type=_positive_int, default=8, help="LoRA training steps (>= 1)")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse's own errors exit with 2)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageExit as e:
        if "--json" in argv:  # argparse stops before it knows; the flag may also be a value here
            print(_to_json({"error": e.message, "type": "ArgumentError", "exit_code": e.code}))
        raise
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:
            raise
        except Exception as e:
            code, kind, text = _describe(e)
            if args.verbose and not isinstance(e, CLIError):
                traceback.print_exc()
            line = text if isinstance(e, (CLIError, ValueError)) else f"{kind}: {text}"
            print(f"error: {line}", file=sys.stderr)
            if getattr(args, "json", False):
                print(json.dumps({"error": text, "type": kind, "exit_code": code}))
            return code
    except BrokenPipeError:  # the reader left (``... --json | head``): say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit does not fail again
        return 1


def _describe(e: Exception) -> tuple[int, str, str]:
    """Exit code, exception type name and one-line message of an error escaping a command."""
    from .errors import CheckpointError

    text = " ".join(str(e).splitlines())
    if isinstance(e, CLIError):
        cause = e.__cause__
        return e.code, type(cause).__name__ if cause is not None else "CLIError", text
    # Invalid values reach us as ValueError with a complete sentence; a CheckpointError is one too,
    # but it means the operation failed, not that the arguments were bad.
    bad_arguments = isinstance(e, ValueError) and not isinstance(e, CheckpointError)
    return (2 if bad_arguments else 1), type(e).__name__, text


if __name__ == "__main__":
    sys.exit(main())
