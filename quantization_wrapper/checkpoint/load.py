"""Load a checkpoint written by :func:`~quantization_wrapper.checkpoint.save.save_quantized_model`.

Loading builds the model skeleton on the meta device, replaces each planned layer with an empty
quantized layer (``create_quantized_linear(device="meta")``) and fills everything with
``assign=True`` from views of the memory-mapped files (copy-on-write, as safetensors maps them:
nothing is copied, pages come in from the OS cache on first use), or with ``mmap=False`` from
copies read into process memory: the full-precision weights never exist. A path that is not ours
but a peer's own format is handed to :mod:`~quantization_wrapper.checkpoint.native`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..experts import realign_fused_experts, unfuse_experts_for
from ..config import QuantizationConfig, QuantizationMethod
from ..errors import CheckpointError
from ..registry import Adapter
from ..surgery import QuantizationPlan
from ..tensors import leaf_tensors
from .checksums import verify_checkpoint
from .description import (
    BUFFER_PREFIX,
    QUANT_CONFIG_NAME,
    layer_adapter,
    layer_config,
    read_checkpoint_info,
    read_description_file,
)
from .files import confined_file
from .native import detect_native_format, load_native_checkpoint
from .safetensors_io import SafetensorsReader
from .skeleton import check_loaded_tensor, checkpoint_skeleton
from .streaming import tensor_worker_pool

__all__ = ["load_quantized_model"]


def load_quantized_model(path: str | os.PathLike, model_config: Any = None, *, device: str | torch.device = "cpu",
                         backend=None, verify: bool = True, mmap: bool = True,
                         expected_methods: Iterable[QuantizationMethod] | None = None) -> nn.Module:
    """Load a checkpoint written by :func:`~quantization_wrapper.checkpoint.save.save_quantized_model`;
    the method is read from it.

    The peers' own formats load too (mlx-lm directories, MLX ``.npz``/``.safetensors`` files, hqq's
    ``save_quantized`` directories and ``.pt`` layer states): see
    :mod:`quantization_wrapper.checkpoint.native`.

    Args:
        path: the checkpoint directory or single ``.safetensors`` file.
        model_config: how to build the architecture: ``None`` (the saved ``config.json``), a
            transformers config or dict, a callable returning the model, or an ``nn.Module`` on meta.
        device: where to place the tensors.
        backend: backend for the adapters (``None``: detect).
        verify: check every file's sha256 and size (in a second thread, while loading; nothing is
            returned before it passes).
        mmap: keep the tensors as views of the memory-mapped files (copy-on-write: writes stay in
            this process), as ``safetensors`` and ``from_pretrained`` do: loading copies nothing and
            pages are read from the OS cache when first used. ``False`` copies every tensor into
            process memory, so the model no longer depends on the files (do that before
            overwriting a checkpoint in place, e.g. with ``cp``; our own saves replace files
            atomically, which mapped models survive). Tensors moved to another ``device`` are
            copies either way.
        expected_methods: raise if the checkpoint's method is not one of these.

    Returns:
        The quantized model, in eval mode, with its ``quantization_plan``.

    Raises:
        CheckpointError / ChecksumError: naming the file or key that is wrong.
    """
    path = Path(path)
    if path.exists() and not (path / QUANT_CONFIG_NAME).exists():  # not ours: maybe mlx-lm's or hqq's own
        if detect_native_format(path) is not None:
            model = load_native_checkpoint(path, model_config, device=device, backend=backend,
                                           expected_methods=expected_methods)
            model._qw_source_dir = str(path.resolve() if path.is_dir() else path.resolve().parent)
            return model
    info = read_checkpoint_info(path)
    if path.is_file() and verify:
        verify_checkpoint(path)
    if path.is_dir() and verify:
        # Hash the files on other threads (hashlib releases the GIL) while this one builds the
        # skeleton and the empty layers, which is Python work; the layers are filled, which is
        # tensor work, once the hashes have passed. Nothing is filled from, or returned for, a
        # corrupt checkpoint.
        with ThreadPoolExecutor(max_workers=1) as pool:
            verification = pool.submit(verify_checkpoint, path)
            try:
                model = _load_checkpoint(path, info, model_config, device=device, backend=backend,
                                         expected_methods=expected_methods, mmap=mmap,
                                         before_filling=verification.result)
            except CheckpointError:
                verification.result()  # a checksum failure explains a read failure better
                raise
            verification.result()
        return model
    return _load_checkpoint(path, info, model_config, device=device, backend=backend,
                            expected_methods=expected_methods, mmap=mmap)


def _load_checkpoint(path: Path, info: dict[str, Any], model_config: Any, *, device, backend,
                     expected_methods, mmap: bool = True, before_filling: Callable[[], Any] | None = None) -> nn.Module:
    config = QuantizationConfig.from_dict(info["quantization_config"])
    if expected_methods is not None and config.method not in tuple(expected_methods):
        raise CheckpointError(f"{path} was saved with method {config.method.value!r}; this adapter serves "
                              f"{', '.join(m.value for m in expected_methods)} (use the module-level "
                              f"load_quantized_model to load any method)")
    plan = QuantizationPlan.from_dict(info["plan"])
    device = torch.device(device)

    if path.is_file():
        files = [path]
    else:  # the description lists the weights: other files in the directory are not ours to read
        files = [confined_file(path, n, f"{QUANT_CONFIG_NAME} 'files'")
                 for n in sorted(info["files"]) if n.endswith(".safetensors")]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: weights file listed in {QUANT_CONFIG_NAME} is missing")

    model = _build_skeleton(path, info, model_config)
    # MoE blocks saved per expert: the skeleton's fused experts become per-expert layers first
    unfuse_experts_for(model, [layer.name for layer in plan.layers if layer.status != "skipped"])
    # The tensors the checkpoint must provide besides the planned layers, read off the skeleton
    # once: a state_dict() of the filled model would serialize every quantized layer again
    # (quanto repacks CPU int4 weights to do so, seconds per layer).
    planned = tuple(layer.name + "." for layer in plan.layers if layer.status != "skipped")
    skeleton = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(planned)}
    adapters: dict = {}
    with ExitStack() as stack:
        handles = {}
        for f in files:
            try:
                reader = stack.enter_context(SafetensorsReader(f, mmap=mmap))
            except ValueError as e:
                raise CheckpointError(str(e)) from e
            for key in reader.keys():
                handles[key] = reader

        def take(key: str) -> torch.Tensor:
            try:
                reader = handles.pop(key)
                tensor = reader.view(key) if mmap else reader.read(key)
            except KeyError:
                raise CheckpointError(f"{path}: tensor {key!r} is missing from the checkpoint") from None
            except Exception as e:
                raise CheckpointError(f"{path}: tensor {key!r} could not be read ({e})") from e
            return tensor if device.type == "cpu" else tensor.to(device)

        def restore(name: str, adapter: Adapter, layer: Any, layer_config: QuantizationConfig,
                    dtype: torch.dtype, state: dict[str, torch.Tensor]) -> nn.Module:
            try:
                return adapter.restore_linear(layer.in_features, layer.out_features, layer.bias, state,
                                              config=layer_config, dtype=dtype)
            except CheckpointError as e:
                raise type(e)(f"{path}: layer {name!r}: {e}") from e
            except Exception as e:
                raise CheckpointError(f"{path}: layer {name!r} could not be restored from "
                                      f"{sorted(state)}: {type(e).__name__}: {e}") from e

        def fill(name: str, adapter: Adapter, layer: Any, layer_config: QuantizationConfig,
                 dtype: torch.dtype, state: dict[str, torch.Tensor], owners: dict[str, SafetensorsReader],
                 filled: nn.Module) -> None:
            model.set_submodule(name, filled)
            if mmap:  # hand back the pages of tensors the layer converted instead of keeping
                kept = [(leaf.data_ptr(), leaf.data_ptr() + leaf.numel() * leaf.element_size())
                        for t in list(filled.parameters()) + list(filled.buffers()) for leaf in leaf_tensors(t)]
                for key, t in state.items():
                    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
                    if not any(a < hi and lo < b for a, b in kept):
                        owners[key].release([name + "." + key])

        # Layers whose filling is multi-threaded tensor work wait for the checksums (it runs faster
        # after the hashing threads than beside them); the others are filled as they are read.
        deferred = []
        for layer in plan.layers:
            if layer.status == "skipped":
                continue
            try:
                current = model.get_submodule(layer.name)
            except AttributeError:
                raise CheckpointError(f"{path}: the plan's layer {layer.name!r} does not exist in the model "
                                      f"architecture") from None
            if getattr(current, "in_features", layer.in_features) != layer.in_features or \
                    getattr(current, "out_features", layer.out_features) != layer.out_features:
                raise CheckpointError(
                    f"{path}: layer {layer.name!r} is {current.out_features}x{current.in_features} in the "
                    f"architecture but {layer.out_features}x{layer.in_features} in the checkpoint")
            adapter = layer_adapter(config, layer.method, backend, adapters)
            prefix = layer.name + "."
            keys = [k for k in handles if k.startswith(prefix)]
            owners = {k[len(prefix):]: handles[k] for k in keys}
            item = (layer.name, adapter, layer, layer_config(config, layer.__dict__),
                    getattr(current, "weight", torch.empty(0)).dtype, {k[len(prefix):]: take(k) for k in keys}, owners)
            if adapter.fill_after_verification and before_filling is not None:
                deferred.append(item)
            else:
                fill(*item, filled=restore(*item[:6]))

        rest: dict[str, torch.Tensor] = {}
        buffers: dict[str, torch.Tensor] = {}
        known_buffers = dict(model.named_buffers(remove_duplicate=False))
        for key in list(handles):
            if key.startswith(BUFFER_PREFIX):
                name = key[len(BUFFER_PREFIX):]
                if name not in known_buffers:
                    raise CheckpointError(f"{path}: tensor {key!r} names a buffer the architecture does not have")
                buffers[name] = take(key)
                check_loaded_tensor(path, repr(key), buffers[name], known_buffers[name], dtype="exact")
            else:
                rest[key] = take(key)

        if deferred:
            before_filling()
            # Their tensor work is a chain of memory-bound ops: two layers side by side on one
            # core each beat one layer on two cores (as when streaming).
            # The first layer is restored here: a library's first use compiles code lazily, and
            # CPython 3.11 compiling in two threads at once fails ("AST constructor recursion depth
            # mismatch", seen with quanto); the others then run side by side.
            first = deferred.pop(0)
            fill(*first, filled=restore(*first[:6]))
            workers = min(len(deferred), 2 if (os.cpu_count() or 1) >= 2 else 1)
            with tensor_worker_pool(workers, "restore") as pool:
                futures = [pool.submit(restore, *item[:6]) for item in deferred]
                for item, future in zip(deferred, futures):
                    fill(*item, filled=future.result())
        del deferred
    # Tied tensors are saved once (this version keeps the name save_pretrained keeps; earlier ones
    # kept the alphabetically first, e.g. lm_head.weight); the description names the other copies.
    tied = info.get("tied", {})
    for alias, source in tied.items():
        value = buffers.get(source[len(BUFFER_PREFIX):]) if source.startswith(BUFFER_PREFIX) else rest.get(source)
        if value is None:
            continue  # the checks below name what the architecture lacks
        if alias.startswith(BUFFER_PREFIX):
            name = alias[len(BUFFER_PREFIX):]
            if name not in known_buffers:
                raise CheckpointError(f"{path}: tied entry {alias!r} names a buffer the architecture does not have")
            check_loaded_tensor(path, repr(alias), value, known_buffers[name], dtype="exact")
            buffers[name] = value
        else:
            rest[alias] = value

    expected = {k for k, v in skeleton.items() if v.device.type == "meta"}
    missing = sorted(expected - set(rest))
    unexpected = sorted(set(rest) - set(skeleton))
    if unexpected:
        raise CheckpointError(f"{path}: the checkpoint has tensors the architecture does not: "
                              f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks tensors the architecture needs: "
                              f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    for key, value in rest.items():
        check_loaded_tensor(path, repr(key), value, skeleton[key],
                            dtype="exact" if skeleton[key].device.type != "meta" else "kind")
    model.load_state_dict(rest, strict=False, assign=True)
    for name, value in buffers.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        persistent = attr not in getattr(module, "_non_persistent_buffers_set", set())
        module.register_buffer(attr, value, persistent=persistent)
    for alias, source in tied.items():  # one parameter again, not two sharing memory
        module_name, _, attr = alias.rpartition(".")
        try:
            param = model.get_parameter(source)
            module = model.get_submodule(module_name) if module_name else model
        except AttributeError:
            continue
        if attr in module._parameters:
            module._parameters[attr] = param
    if hasattr(model, "tie_weights") and tied:
        model.tie_weights()
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftovers:
        raise CheckpointError(f"{path}: after loading, these tensors have no data: {leftovers[:10]}")
    realign_fused_experts(model)
    if device.type != "cpu":
        model.to(device)
    model.quantization_plan = plan
    model.quantization_config = config
    main = layer_adapter(config, config.method.value, backend, adapters)
    main.mark_model(model)
    model.eval()
    return model


def _build_skeleton(path: Path, info: dict, model_config: Any) -> nn.Module:
    """The architecture with parameters on meta, from ``model_config`` or the saved config."""
    saved = info.get("config")
    if saved is None and path.is_dir() and (path / "config.json").exists():
        saved = read_description_file(confined_file(path, "config.json", "the checkpoint"))
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path / 'config.json'}: must hold a JSON object, got {type(saved).__name__}")
    return checkpoint_skeleton(path, saved, model_config, missing="no config.json; pass model_config (a transformers "
                               "config, a dict, a callable that builds the model, or an nn.Module on meta)")
