"""Mixture-of-experts weights as linear layers, so that every method quantizes them.

In transformers 5 the experts of an MoE block (Mixtral, Qwen3-MoE, GPT-OSS, ... every class
decorated with ``use_experts_implementation``) are one module holding 3-D parameters:
``gate_up_proj`` ``[experts, 2 x intermediate, hidden]`` (or ``up_proj`` without a gate) and
``down_proj`` ``[experts, hidden, intermediate]``, transposed in some families, with optional
per-expert biases. No quantization library quantizes such a tensor.

:func:`unfuse_experts` turns one such module into a container with one child per expert, each holding
its projections as ``nn.Linear`` layers that *view* the expert's matrix (nothing is copied):
``mlp.experts.3.gate_up_proj``, ``mlp.experts.3.down_proj``. The model walker then plans, skips,
overrides and quantizes them like any linear layer, per expert, in each method's own format (groups
along the input dimension). ``skip_modules``/``layer_configs`` address all experts of a block
(``mlp.experts``), one expert (``mlp.experts.3``) or one projection (``*.down_proj``).

The container's forward is the eager experts loop of transformers: the router's ``top_k_index`` and
``top_k_weights`` pick the same tokens for the same experts with the same weights; each active expert
runs its two projections (the library's matmul, once per active expert), the family's gate
(``_apply_gate``: concatenated or interleaved), its activation, an optional post-expert norm, and the
weighted sum is accumulated per token as transformers does. The router stays a float ``nn.Linear``
(``mlp.gate``), quantized only when a pattern asks for it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn

__all__ = [
    "is_fused_experts",
    "iter_fused_experts",
    "unfuse_experts",
    "fuse_experts",
    "fused_shell",
    "ExpertLayers",
    "UnfusedExperts",
    "unfuse_experts_for",
    "expert_layer_shapes",
    "experts_unfused",
    "realign_fused_experts",
]

#: The 3-D parameters of a fused experts module, and the per-expert layer each becomes.
_PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """True for an experts module that holds its experts as 3-D parameters (``down_proj`` and
    ``gate_up_proj`` or ``up_proj``, first dimension the number of experts)."""
    if isinstance(module, UnfusedExperts):
        return False
    params = module._parameters
    down = params.get("down_proj")
    first = params.get("gate_up_proj", params.get("up_proj"))
    return (isinstance(down, torch.Tensor) and isinstance(first, torch.Tensor) and down.ndim == 3
            and first.ndim == 3 and down.shape[0] == first.shape[0] and callable(getattr(module, "forward", None)))


def iter_fused_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every fused experts module of ``model``."""
    for name, module in model.named_modules():
        if is_fused_experts(module):
            yield name, module


class ExpertLayers(nn.Module):
    """One expert's projections: ``gate_up_proj`` (or ``up_proj``) and ``down_proj``."""

    def __init__(self, layers: dict[str, nn.Module]):
        super().__init__()
        for key, layer in layers.items():
            self.add_module(key, layer)


class UnfusedExperts(nn.Module):
    """Mixin of the container :func:`unfuse_experts` builds: children ``"0"`` .. ``"E-1"`` are the
    experts (:class:`ExpertLayers`). The container is an instance of a subclass of the original
    experts class (so the family's ``_apply_gate``, ``act_fn`` and norms are its own), with this
    forward."""

    #: whether the original stored its matrices as ``[experts, in, out]``
    experts_transposed: bool = False

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        num_experts = self.num_experts
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        has_gate = "gate_up_proj" in self._modules["0"]._modules
        for row in hit:
            e = int(row[0])
            if e >= num_experts:  # expert-parallel sentinel
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            expert = self._modules[str(e)]
            if has_gate:
                h = self._apply_gate(expert.gate_up_proj(hidden_states[token_idx]))
            else:
                h = self.act_fn(expert.up_proj(hidden_states[token_idx]))
            h = expert.down_proj(h)
            if getattr(self, "has_post_expert_norm", False):
                h = self.post_expert_norm(h)
            h = h * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, h.to(final.dtype))
        return final

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"


@functools.lru_cache(maxsize=None)
def _unfused_class(cls: type) -> type:
    return type(f"Unfused{cls.__name__}", (UnfusedExperts, cls), {"__module__": __name__})


def _expert_linear(weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> nn.Linear:
    """An ``nn.Linear`` whose weight views ``weight`` (``[out, in]``; ``[in, out]`` when transposed)."""
    w = weight.t() if transposed else weight
    out_features, in_features = w.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=w.dtype)
    layer.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def unfuse_experts(module: nn.Module) -> nn.Module:
    """The experts of ``module`` (a fused experts module) as a container of per-expert ``nn.Linear``
    views; ``module`` itself is left as it is (install the result with ``set_submodule``).

    Raises:
        ValueError: ``module`` is not a fused experts module.
    """
    if not is_fused_experts(module):
        raise ValueError(f"{type(module).__name__} holds no fused 3-D expert weights")
    cls = _unfused_class(type(module))
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    skip = {"_parameters", "_buffers", "_modules"}
    for key, value in module.__dict__.items():
        if key not in skip and key not in new.__dict__:
            new.__dict__[key] = value
    for key in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
        new.__dict__[key] = type(module.__dict__[key])(module.__dict__[key])
    params = dict(module._parameters)
    transposed = bool(getattr(module, "is_transposed", False))
    new.experts_transposed = transposed
    num_experts = params["down_proj"].shape[0]
    if not hasattr(new, "num_experts"):
        new.num_experts = num_experts
    for e in range(num_experts):
        layers = {}
        for key in _PROJECTIONS:
            if params.get(key) is None:
                continue
            bias = params.get(f"{key}_bias")
            layers[key] = _expert_linear(params[key][e], None if bias is None else bias[e], transposed)
        new.add_module(str(e), ExpertLayers(layers))
    used = {k for k in _PROJECTIONS} | {f"{k}_bias" for k in _PROJECTIONS}
    for key, value in params.items():  # anything else (none in transformers' families) stays as it is
        if key not in used:
            new.register_parameter(key, value)
    for key, value in module._buffers.items():
        new.register_buffer(key, value, persistent=key not in module._non_persistent_buffers_set)
    for key, value in module._modules.items():
        new.add_module(key, value)
    new._fused_original = type(module)
    # transformers' _init_weights initializes an experts module's 3-D parameters, which the container
    # no longer has: its experts are initialized (or loaded) as the linear layers they are
    new._is_hf_initialized = True
    new.train(module.training)
    return new


def fuse_experts(container: nn.Module) -> nn.Module:
    """The original fused module back from a container whose experts are all still ``nn.Linear``
    (views or copies): the 3-D parameters are stacked again.

    Raises:
        ValueError: an expert is quantized (dequantize it first) or ``container`` is not one.
    """
    if not isinstance(container, UnfusedExperts):
        raise ValueError(f"{type(container).__name__} is not an unfused experts container")
    new = fused_shell(container)
    experts = [container._modules[str(e)] for e in range(container.num_experts)]
    transposed = container.experts_transposed
    for key in _PROJECTIONS:
        if key not in experts[0]._modules:
            continue
        layers = [ex._modules[key] for ex in experts]
        if not all(type(layer) is nn.Linear for layer in layers):
            raise ValueError(f"expert {key} layers are quantized; dequantize them before fusing")
        weights = [layer.weight.t() if transposed else layer.weight for layer in layers]
        new.register_parameter(key, nn.Parameter(torch.stack([w.detach() for w in weights]), requires_grad=False))
        if layers[0].bias is not None:
            new.register_parameter(f"{key}_bias", nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]),
                                                               requires_grad=False))
    for key, value in container._parameters.items():
        new.register_parameter(key, value)
    for key, value in container._buffers.items():
        new.register_buffer(key, value, persistent=key not in container._non_persistent_buffers_set)
    for key, value in container._modules.items():
        if not key.isdigit():
            new.add_module(key, value)
    new.train(container.training)
    return new


def fused_shell(container: UnfusedExperts) -> nn.Module:
    """An instance of the fused original class of ``container`` with its attributes (activation,
    gate layout, ``is_transposed``, ...) but no parameters, buffers or submodules yet."""
    cls = container._fused_original
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for key, value in container.__dict__.items():
        if key not in ("_parameters", "_buffers", "_modules", "_fused_original", "experts_transposed") \
                and key not in new.__dict__:
            new.__dict__[key] = value
    return new


def unfuse_experts_for(model: nn.Module, layer_names: set[str] | list[str]) -> list[str]:
    """Unfuse (in place) every fused experts module of ``model`` that ``layer_names`` (dotted layer
    names, e.g. a checkpoint plan's) name an expert of: ``x.mlp.experts`` when a name starts with
    ``x.mlp.experts.<digits>.``. Returns the names of the unfused modules. Used by loaders before they
    restore quantized expert layers into a skeleton built from the model's config."""
    wanted = set(layer_names)
    done = []
    for name, module in list(iter_fused_experts(model)):
        if not name:
            continue  # the model itself: nothing to install it into
        if any(n.startswith(f"{name}.") and n[len(name) + 1:].split(".", 1)[0].isdigit() for n in wanted):
            model.set_submodule(name, unfuse_experts(module))
            done.append(name)
    return done


def expert_layer_shapes(name: str, module: nn.Module) -> list[tuple[str, int, int, bool, torch.dtype]]:
    """``(layer name, in_features, out_features, bias, dtype)`` of each expert projection of a fused
    experts module, as :func:`unfuse_experts` would name them (works on the meta device)."""
    params = module._parameters
    transposed = bool(getattr(module, "is_transposed", False))
    out = []
    for e in range(params["down_proj"].shape[0]):
        for key in _PROJECTIONS:
            weight = params.get(key)
            if weight is None:
                continue
            rows, cols = weight.shape[1:]
            in_features, out_features = (rows, cols) if transposed else (cols, rows)
            out.append((f"{name}.{e}.{key}", in_features, out_features, params.get(f"{key}_bias") is not None,
                        weight.dtype))
    return out


@contextlib.contextmanager
def experts_unfused(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, every fused experts module of ``model`` is replaced by its unfused container
    (views: nothing copied), so analyses that hook or swap linear layers (sensitivity, calibration)
    see each expert projection; afterwards the original modules are put back, whatever happened.
    Yields the names of the unfused modules."""
    originals = [(name, module) for name, module in iter_fused_experts(model) if name] \
        if isinstance(model, nn.Module) else []
    try:
        for name, module in originals:
            model.set_submodule(name, unfuse_experts(module))
        yield [name for name, _ in originals]
    finally:
        for name, module in originals:
            model.set_submodule(name, module)


#: Alignment of fused expert weights in memory: torch's CPU ``grouped_mm`` (transformers' default
#: experts implementation) rounds differently for weights at other addresses, and a memory-mapped
#: checkpoint places tensors at 8-byte offsets.
EXPERTS_ALIGNMENT = 64


def realign_fused_experts(model: nn.Module) -> int:
    """Copy the 3-D parameters of fused experts modules that do not start on a
    :data:`EXPERTS_ALIGNMENT`-byte boundary (views of a memory-mapped file), so that the model
    computes exactly what it computed before it was saved. Returns how many were copied."""
    copied = 0
    for _, module in iter_fused_experts(model):
        for key, param in list(module._parameters.items()):
            if param is not None and param.ndim == 3 and param.device.type == "cpu" \
                    and param.data_ptr() % EXPERTS_ALIGNMENT:
                module._parameters[key] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                copied += 1
    return copied
