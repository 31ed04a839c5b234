"""LoRA on MoE experts that this package quantized per expert, in peft's own terms.

peft trains LoRA on the fused 3-D expert parameters of transformers 5 with ``target_parameters``
(``LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])``): its
``ParamWrapper`` holds, per targeted parameter, ``lora_A`` ``[experts x r, in]`` and ``lora_B``
``[out, r x experts]``, i.e. one rank-``r`` update per expert (expert ``e`` uses rows
``e*r .. e*r+r-1`` of ``lora_A`` and the columns ``e, e+E, ...`` of ``lora_B``). A quantized model
has no such parameter: :func:`~quantization_wrapper.experts.unfuse_experts` made each expert's
projection a layer of its own (``mlp.experts.3.gate_up_proj``), quantized by the method.

This module makes both spellings of the same adapter work on both kinds of model:

* :func:`translate_target_parameters` (called by ``prepare_lora_config``, so by every peft
  injection while the peft integration is active): the ``target_parameters`` that name the
  parameters of unfused experts become the per-expert layers in ``target_modules``; each expert gets
  its own rank-``r`` LoRA layer, which is what ``ParamWrapper`` computes. Targets that also (or only)
  match parameters still fused in the model (a block left in float) stay, for peft's ``ParamWrapper``.
* :func:`experts_state_dict_to_fused` / :func:`experts_state_dict_to_unfused` convert an adapter's
  state dict between the per-expert keys and peft's ``ParamWrapper`` keys, exactly (the same
  numbers, rearranged); :func:`fused_experts_config` rewrites the config to ``target_parameters``.
  ``save_lora_adapter`` and ``load_lora_adapter`` in :mod:`~quantization_wrapper.peft_integration`
  use them, so that an adapter trained on a quantized MoE model loads with plain
  ``PeftModel.from_pretrained`` onto transformers' float model, and the reverse.
"""

from __future__ import annotations

import copy
import itertools
import logging
import re
import warnings
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from .experts import UnfusedExperts, fused_shell

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig

__all__ = [
    "iter_unfused_experts",
    "expert_parameter_name",
    "translate_target_parameters",
    "fused_experts_config",
    "experts_state_dict_to_fused",
    "experts_state_dict_to_unfused",
    "unfused_containers",
    "expert_layer_key",
    "lora_weight_key",
]

logger = logging.getLogger(__name__)

#: peft's prefix of every key of a saved adapter
_PREFIX = "base_model.model."
#: a LoRA layer's weight key: its module and which of the two
_LORA_WEIGHT = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")


def iter_unfused_experts(model: nn.Module) -> Iterator[tuple[str, UnfusedExperts, tuple[str, ...]]]:
    """``(name, container, projections)`` of every unfused experts container of ``model`` (names as
    peft sees them: without the ``base_layer`` of a LoRA wrapper)."""
    for name, module in model.named_modules():
        if isinstance(module, UnfusedExperts):
            projections = tuple(k for k in module._modules["0"]._modules if not k.startswith("lora_"))
            yield _strip_base_layer(name), module, projections


def _strip_base_layer(name: str) -> str:
    """A module's name as peft and a saved adapter spell it: without LoRA's ``base_layer`` and the
    wrappers of FSDP1 and activation checkpointing."""
    name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
    return re.sub(r"\.base_layer(?=\.|$)", "", name)


def expert_parameter_name(container: str) -> str:
    """The short ``target_parameters`` spelling for a container's parameters: the part of the name
    after its last numeric component (``model.layers.3.mlp.experts`` -> ``mlp.experts``), as users
    write it; the whole name when it has none."""
    parts = container.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[-1] + 1:]) if digits else container


def _matches(key: str, target: str) -> bool:
    """peft's rule for ``target_parameters``: the full name, or a suffix at a dot."""
    return key == target or key.endswith(f".{target}")


def translate_target_parameters(lora_config: "LoraConfig", model: nn.Module) -> list[str]:
    """Point ``lora_config.target_parameters`` that name parameters of unfused experts at the
    per-expert layers instead (added to ``target_modules``; in place). Returns the per-expert layer
    names added (empty when nothing matched)."""
    targets = list(getattr(lora_config, "target_parameters", None) or [])
    if not targets:
        return []
    added: list[str] = []
    patterns: list[str] = []
    consumed: set[str] = set()
    for name, container, projections in iter_unfused_experts(model):
        hit = [p for p in projections if any(_matches(f"{name}.{p}", t) for t in targets)]
        consumed.update(t for t in targets for p in projections if _matches(f"{name}.{p}", t))
        if not hit:
            continue
        added.extend(f"{name}.{e}.{p}" for e in range(container.num_experts) for p in hit)
        patterns.append(re.escape(name) + r"\.\d+\.(?:" + "|".join(map(re.escape, hit)) + ")")
    if not added:
        return []
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(lora_config, key, None) or {}
        clash = [k for k in pattern if any(_matches(f"{n.rsplit('.', 2)[0]}.{n.rsplit('.', 1)[1]}", k)
                                           or _matches(n, k) for n in added)]
        if clash:
            raise ValueError(f"LoraConfig.{key} names expert parameters {clash}, which this model holds per "
                             f"expert (quantized): address them as per-expert layers in {key} "
                             f"(e.g. {added[0]!r}) and list them in target_modules instead of target_parameters")
    # a target that also matches a parameter peft can wrap (an experts block left fused, in float)
    # stays for peft's ParamWrapper; the others are answered by the per-expert layers alone
    present = [n for n, _ in model.named_parameters()]
    kept = [t for t in targets if t not in consumed
            or any(_matches(_strip_base_layer(n), t) for n in present)]
    lora_config.target_parameters = kept or None
    current = lora_config.target_modules
    if current is None:
        lora_config.target_modules = set(added)
    elif isinstance(current, str):  # a regex (peft fullmatches it): add the experts as alternatives
        combined = f"(?:{current})|(?:{'|'.join(patterns)})"
        _REGEX_ORIGINALS[combined] = current
        lora_config.target_modules = combined
    else:
        lora_config.target_modules = set(current) | set(added)
    logger.info("target_parameters %s: this model holds those experts per expert (quantized); LoRA goes on "
                "the %d per-expert layers, rank %s each, as peft's ParamWrapper gives every expert its own "
                "rank-r update (save_lora_adapter writes peft's target_parameters layout back)",
                sorted(set(targets) - set(kept)) or sorted(consumed), len(added), lora_config.r)
    return added


#: combined target_modules regex -> the user's own, restored when an adapter is saved
_REGEX_ORIGINALS: dict[str, str] = {}


def lora_weight_key(key: str) -> tuple[str, str] | None:
    """``(module, "lora_A" | "lora_B")`` of a LoRA weight's key (``...<module>.lora_A.weight``)."""
    m = _LORA_WEIGHT.match(key)
    return (m["module"], m["kind"]) if m else None


def unfused_containers(model: nn.Module) -> dict[str, tuple[UnfusedExperts, tuple[str, ...]]]:
    """``{name: (container, projections)}`` of :func:`iter_unfused_experts`."""
    return {n: (c, p) for n, c, p in iter_unfused_experts(model)}


def expert_layer_key(containers: dict[str, tuple[UnfusedExperts, tuple[str, ...]]],
                     module_name: str) -> tuple[str, int, str] | None:
    """``(container, expert, projection)`` when ``module_name`` names a per-expert layer of one of
    ``containers`` (:func:`unfused_containers`), else None."""
    parts = module_name.rsplit(".", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[0] in containers and parts[2] in containers[parts[0]][1]:
        return parts[0], int(parts[1]), parts[2]
    return None


def fused_experts_config(lora_config: "LoraConfig", model: nn.Module) -> "LoraConfig":
    """A copy of ``lora_config`` for the adapter written in peft's fused layout: per-expert layers
    leave ``target_modules`` and their parameters join ``target_parameters``
    (``mlp.experts.gate_up_proj``)."""
    containers = unfused_containers(model)
    config = copy.deepcopy(lora_config)
    adapted = _adapted_expert_layers(model, containers)
    params = sorted({f"{expert_parameter_name(c)}.{p}" for c, _, p in adapted})
    target = config.target_modules
    if isinstance(target, str):
        config.target_modules = _REGEX_ORIGINALS.get(target, target)
    elif target is not None:
        rest = {t for t in target if expert_layer_key(containers, t) is None}
        config.target_modules = rest or None
    if params:
        config.target_parameters = sorted(set(config.target_parameters or []) | set(params))
        if config.lora_dropout:
            warnings.warn(f"the adapter's config says lora_dropout={config.lora_dropout}; peft's ParamWrapper "
                          "(LoRA on fused expert parameters) refuses dropout, so the config written says 0 "
                          "(the weights do not depend on it)", UserWarning, stacklevel=3)
            config.lora_dropout = 0.0
        for key in ("use_dora", "lora_bias", "fan_in_fan_out"):
            if getattr(config, key, False):
                raise ValueError(f"LoraConfig.{key}=True: peft's ParamWrapper (LoRA on fused expert parameters) "
                                 f"does not support it, so this adapter cannot be written in the fused layout; "
                                 "save it with experts_layout='per_expert'")
    if config.target_modules is None and not config.target_parameters:
        raise ValueError("the adapter has no LoRA layer to write")
    return config


def _adapted_expert_layers(model: nn.Module, containers: dict) -> set[tuple[str, int, str]]:
    found = set()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):
            key = expert_layer_key(containers, _strip_base_layer(name))
            if key is not None:
                found.add(key)
    return found


def _wrapper_suffixes(container: UnfusedExperts, projections: list[str]) -> dict[str, str]:
    """``{key suffix: parameter}`` of peft's nested ``ParamWrapper``s when ``projections`` of the
    fused original of ``container`` are targeted (``""`` for the outermost, ``".base_layer"`` for
    the next, ...). Asked of peft itself, on a meta-device copy of the fused module."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import ParamWrapper

    probe = fused_shell(container)
    expert = container._modules["0"]
    for key, layer in expert._modules.items():
        out_f, in_f = layer.out_features, layer.in_features
        shape = (container.num_experts, in_f, out_f) if container.experts_transposed else \
            (container.num_experts, out_f, in_f)
        probe.register_parameter(key, nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False))
    root = nn.Module()
    root.add_module("experts", probe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_adapter_in_model(LoraConfig(r=1, target_parameters=list(projections)), root, low_cpu_mem_usage=True)
    suffixes = {}
    for name, module in root.named_modules():
        if isinstance(module, ParamWrapper):
            suffixes[name[len("experts"):]] = module.parameter_name
    if sorted(suffixes.values()) != sorted(projections):
        raise RuntimeError(f"peft wrapped {sorted(suffixes.values())} of a probe targeting {sorted(projections)}; "
                           "this peft version is not supported for fused expert adapters")
    return suffixes


def experts_state_dict_to_fused(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """An adapter state dict (peft's saved keys, ``base_model.model.`` prefix, no adapter name) with
    per-expert LoRA layers rewritten as peft's ``ParamWrapper`` keys of the fused parameters.
    Experts without LoRA for an adapted projection get zeros (no update), exactly."""
    containers = unfused_containers(model)
    per: dict[tuple[str, str], dict[int, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        lora = lora_weight_key(key.removeprefix(_PREFIX))
        hit = lora and expert_layer_key(containers, lora[0])
        if not hit:
            module = key.removeprefix(_PREFIX).rsplit(".lora_", 1)[0]
            if "lora_" in key and expert_layer_key(containers, module) is not None:
                raise ValueError(f"{key}: only lora_A / lora_B weights can be written in the fused experts layout")
            out[key] = value
            continue
        container, expert, proj = hit
        per.setdefault((container, proj), {}).setdefault(expert, {})[lora[1]] = value
    suffix_of: dict[str, dict[str, str]] = {}  # container -> {projection: key suffix}, one probe each
    for container in {c for c, _ in per}:
        module, projections = containers[container]
        targeted = sorted({p for (c, p) in per if c == container}, key=projections.index)
        suffix_of[container] = {p: s for s, p in _wrapper_suffixes(module, targeted).items()}
    for (container, proj), experts in per.items():
        module = containers[container][0]
        suffix = suffix_of[container][proj]
        any_a = next(iter(experts.values()))["lora_A"]
        any_b = next(iter(experts.values()))["lora_B"]
        r, E = any_a.shape[0], module.num_experts
        a_rows, b_cols = [], []
        for e in range(E):
            pair = experts.get(e)
            if pair is None:
                a_rows.append(torch.zeros_like(any_a))
                b_cols.append(torch.zeros_like(any_b))
                continue
            if pair["lora_A"].shape != any_a.shape or pair["lora_B"].shape != any_b.shape:
                raise ValueError(f"{container}.{e}.{proj}: LoRA rank {pair['lora_A'].shape[0]} differs from the other "
                                 f"experts' {r}; the fused layout needs one rank per parameter")
            a_rows.append(pair["lora_A"])
            b_cols.append(pair["lora_B"])
        out[f"{_PREFIX}{container}{suffix}.lora_A.weight"] = torch.cat(a_rows, 0).contiguous()
        # lora_B [out, r, E] flattened: column j*E + e is expert e's j-th rank direction
        out[f"{_PREFIX}{container}{suffix}.lora_B.weight"] = torch.stack(b_cols, -1).reshape(any_b.shape[0], r * E).contiguous()
    return out


def experts_state_dict_to_unfused(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The reverse of :func:`experts_state_dict_to_fused`: peft ``ParamWrapper`` keys of fused
    parameters that ``model`` holds per expert become per-expert LoRA keys; other keys are kept.

    Which parameters a container's wrappers adapt is read from the keys: the nesting peft gives
    that many wrappers (asked of peft, :func:`_wrapper_suffixes`) whose shapes fit the saved
    ``lora_A`` / ``lora_B``; an adapter that fits no such choice is an error."""
    out = dict(state)
    for name, module, projections in iter_unfused_experts(model):
        present = [s for s in _SUFFIXES if f"{_PREFIX}{name}{s}.lora_A.weight" in out]
        if not present:
            continue
        chosen = None
        for subset in itertools.combinations(projections, len(present)):
            suffixes = _wrapper_suffixes(module, list(subset))
            if set(suffixes) == set(present) and all(
                    _fits(out, f"{_PREFIX}{name}{s}", module, p) for s, p in suffixes.items()):
                chosen = suffixes
                break
        if chosen is None:
            shapes = {s: tuple(out[f"{_PREFIX}{name}{s}.lora_A.weight"].shape) for s in present}
            raise ValueError(f"the adapter's LoRA of the fused experts {name} ({shapes}) fits none of its parameters "
                             f"{list(projections)} with {module.num_experts} experts: another model?")
        E = module.num_experts
        for suffix, proj in chosen.items():
            a = out.pop(f"{_PREFIX}{name}{suffix}.lora_A.weight")
            b = out.pop(f"{_PREFIX}{name}{suffix}.lora_B.weight")
            r = a.shape[0] // E
            b3 = b.reshape(b.shape[0], r, E)
            for e in range(E):
                out[f"{_PREFIX}{name}.{e}.{proj}.lora_A.weight"] = a[e * r:(e + 1) * r].contiguous()
                out[f"{_PREFIX}{name}.{e}.{proj}.lora_B.weight"] = b3[:, :, e].contiguous()
    return out


#: key suffixes of peft's nested ParamWrappers (one per adapted parameter of a module)
_SUFFIXES = ("", ".base_layer", ".base_layer.base_layer", ".base_layer.base_layer.base_layer")


def _fits(state: dict[str, torch.Tensor], prefix: str, module: UnfusedExperts, proj: str) -> bool:
    """Whether ``lora_A`` ``[E x r, in]`` / ``lora_B`` ``[out, r x E]`` at ``prefix`` fit ``proj``."""
    a, b = state.get(f"{prefix}.lora_A.weight"), state.get(f"{prefix}.lora_B.weight")
    layer = module._modules["0"]._modules[proj]
    E = module.num_experts
    return (a is not None and b is not None and a.ndim == 2 and b.ndim == 2 and a.shape[0] % E == 0
            and a.shape[0] == b.shape[1] and a.shape[1] == layer.in_features and b.shape[0] == layer.out_features)
