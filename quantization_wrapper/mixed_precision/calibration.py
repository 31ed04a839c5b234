"""Calibration batches: running them through the model, the output the end-to-end error
compares, and each linear layer's per-input-channel second moment ``E[x^2]``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["run_batch", "default_output", "CalibrationStats", "inputs_digest", "calibration_batches",
           "collect_calibration_stats", "model_device"]


def _batch_tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [v for v in batch.values() if isinstance(v, torch.Tensor)]
    if isinstance(batch, (list, tuple)):
        return [v for v in batch if isinstance(v, torch.Tensor)]
    return []


def run_batch(model: nn.Module, batch: Any, device: torch.device, params: dict | None = None) -> Any:
    def move(v):
        return v.to(device) if isinstance(v, torch.Tensor) else v

    if isinstance(batch, Mapping):
        args, kwargs = (), {k: move(v) for k, v in batch.items()}
    elif isinstance(batch, (list, tuple)):
        args, kwargs = tuple(move(v) for v in batch), {}
    else:
        args, kwargs = (move(batch),), {}
    if params:
        return torch.func.functional_call(model, params, args, kwargs)
    return model(*args, **kwargs)


def default_output(output: Any, batch: Any) -> torch.Tensor:
    """The tensor the end-to-end error compares: ``last_hidden_state``, else ``logits``, else the
    first tensor of the output; positions the batch's ``attention_mask`` masks out are zeroed."""
    tensor = None
    for key in ("last_hidden_state", "logits"):
        value = getattr(output, key, None)
        if value is None and isinstance(output, Mapping):
            value = output.get(key)
        if isinstance(value, torch.Tensor):
            tensor = value
            break
    if tensor is None:
        if isinstance(output, torch.Tensor):
            tensor = output
        elif isinstance(output, (tuple, list)) or hasattr(output, "to_tuple"):
            items = output.to_tuple() if hasattr(output, "to_tuple") else output
            tensor = next((v for v in items if isinstance(v, torch.Tensor)), None)
    if tensor is None:
        raise ValueError(f"cannot find a tensor in the model output ({type(output).__name__}); pass "
                         f"output_fn=lambda output, batch: <tensor> to plan_mixed_precision")
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tensor.dim() == 3 and tensor.shape[:2] == mask.shape:
        tensor = tensor * mask.to(tensor.device, tensor.dtype).unsqueeze(-1)
    return tensor


@dataclass
class CalibrationStats:
    """What the calibration batches tell about each planned layer.

    Attributes:
        second_moments: layer name -> per-input-channel ``E[x^2]`` (float32, on the CPU).
        tokens: rows (tokens) seen per layer.
        batches: the calibration batches (kept for the end-to-end passes).
        fingerprint: a digest of the statistics; part of every cache key.
    """

    second_moments: dict[str, torch.Tensor]
    tokens: dict[str, int]
    batches: list[Any]
    fingerprint: str


def inputs_digest(batches: Sequence[Any]) -> str:
    h = hashlib.sha1()
    for batch in batches:
        items = sorted(batch.items()) if isinstance(batch, Mapping) else [("", t) for t in _batch_tensors(batch)]
        for key, t in items:
            if isinstance(t, torch.Tensor):
                h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def calibration_batches(calibration: Any) -> list:
    """``calibration`` as a non-empty list of batches (one tensor or dict is one batch)."""
    if isinstance(calibration, (torch.Tensor, Mapping)):
        calibration = [calibration]
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise ValueError(f"calibration must be an iterable of model inputs (tensors or dicts of tensors), "
                         f"got {type(calibration).__name__}")
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty; give at least one batch of model inputs")
    return batches


def collect_calibration_stats(model: nn.Module, calibration: Iterable[Any], *,
                              layers: Iterable[str] | None = None) -> CalibrationStats:
    """Run ``calibration`` through ``model`` with forward hooks on its linear layers and collect
    each layer's per-input-channel second moment ``E[x^2]`` (over the tokens a batch's
    ``attention_mask`` marks as real, when it has one).

    Args:
        model: the float model.
        calibration: model inputs: tensors (``model(t)``), dicts of keyword tensors as a tokenizer
            returns them (``model(**d)``), or tuples (``model(*t)``).
        layers: names of the linear layers to watch (default: all).

    Raises:
        ValueError: when ``calibration`` is empty or holds something that is not a model input.
    """
    batches = calibration_batches(calibration)
    for i, batch in enumerate(batches):
        if not _batch_tensors(batch):
            raise ValueError(f"calibration batch {i} is a {type(batch).__name__} without tensors; each batch "
                             f"must be a tensor, a dict of tensors (e.g. a tokenizer's output) or a tuple")
    wanted = set(layers) if layers is not None else None
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    padding: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0].detach()
            mask = padding["mask"]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(x.device).bool()]  # padded positions are not real inputs
            x = x.reshape(-1, x.shape[-1]).float()
            s = (x * x).sum(0).cpu()
            sums[name] = sums[name] + s if name in sums else s
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and (wanted is None or n in wanted)]
    device = model_device(model)
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                padding["mask"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                run_batch(model, batch, device)
    finally:
        for h in handles:
            h.remove()
    moments = {n: sums[n] / max(counts[n], 1) for n in sums}
    h = hashlib.sha1(inputs_digest(batches).encode())
    for name in sorted(moments):
        h.update(name.encode())
        h.update(moments[name].numpy().tobytes())
    return CalibrationStats(moments, counts, batches, h.hexdigest())


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
