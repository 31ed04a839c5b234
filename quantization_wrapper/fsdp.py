"""FSDP for quantized + LoRA models: which backend shards how, and the wrapping that works.

Measured on CPU with gloo, torch 2.13, 2 ranks, a small Llama with LoRA on every projection
(``tests/test_fsdp.py`` runs FSDP2 for HQQ, bitsandbytes NF4 and INT8, MLX and optimum-quanto int4
(and a small Mixtral with quanto int4 experts) and FSDP1 for bitsandbytes NF4; the other rows were
run by hand the same way; :data:`FSDP_SUPPORT` says which):

* ``bnb_nf4``/``bnb_fp4``: FSDP2 shards the packed weights; FSDP1 too, with a float
  ``storage_dtype`` (``quant_storage``, see below).
* ``hqq``: FSDP2 shards ``W_q``; FSDP1 too, with a float ``storage_dtype`` (``view_as_float``).
* ``mlx_*``: FSDP2 shards weight, scales and biases with ``storage_dtype`` ``uint8`` or a float dtype
  (not the default ``uint32``); FSDP1 with a float ``storage_dtype``.
* ``quanto_*``, ``bnb_int8``: FSDP2 shards the packed data (plain integer parameters); FSDP1
  leaves it out of its units (``ignored_states``: it cannot flatten integer tensors, and these
  methods have no float storage): replicated and quantized on every rank; the rest shards.
* ``none``: plain float weights, sharded by both.

The table is :data:`FSDP_SUPPORT`; ``docs/fsdp.md`` renders it (:func:`render_fsdp_markdown`), and
``benchmarks/fsdp_bytes.py`` writes its table of the bytes each rank holds, per method.
Why the rows are what they are:

* FSDP2 all-gathers parameters of different dtypes through a ``uint8`` view and never casts
  integer parameters (``MixedPrecisionPolicy.param_dtype`` only applies to float ones), so packed
  ``uint8`` data shards as it is. A *float* ``storage_dtype`` must equal ``param_dtype`` when one
  is set: FSDP2 would convert the packed bytes' values. :func:`apply_fsdp` checks this.
* FSDP1 flattens each wrapped unit into one tensor: it refuses integer tensors ("Cannot flatten
  integer dtype tensors") and needs one dtype per unit, so ``storage_dtype`` (bitsandbytes
  ``quant_storage``, HQQ ``view_as_float``) must be the dtype of every other parameter: float32
  for a float32 model, and also for a half-precision one once ``prepare_model_for_training`` has
  upcast its norms and peft its LoRA weights. It needs ``use_orig_params=True`` (frozen and
  trainable parameters mixed).
* bitsandbytes 4-bit: FSDP hands the layer a plain tensor in place of its ``Params4bit``; the
  layer's ``forward`` then rebuilds a ``Params4bit`` from ``module.quant_state``
  (``bitsandbytes.nn.modules.fix_4bit_weight_quant_state_from_module``). A layer whose
  ``quant_state`` lives only on the weight (bitsandbytes' own ``Params4bit(..., module=None)``)
  loses it; :func:`apply_fsdp` copies it to the module first. The ``QuantState`` (absmax, code)
  is not a parameter: every rank keeps all of it.
* HQQ: only ``W_q`` is a parameter; the scales and zero points in ``HQQLinear.meta`` stay whole on
  every rank.
* optimum-quanto: quanto's weights are tensor subclasses without FSDP hooks (``fully_shard``
  would turn them into *dequantized* full-precision shards), so our ``QuantoLinear`` never holds
  one: the packed data is a plain integer parameter (``weight_data``: ``uint8`` for int2/int4,
  ``int8``, qfloat8's bytes as ``uint8``), the scales and shifts are buffers (whole on every
  rank), and the forward rebuilds quanto's tensor from the gathered data (views, no copy).
  :func:`check_fsdp_compatibility` refuses any other tensor-subclass parameter.
* bitsandbytes INT8: the ``Int8Params`` weight (the int8 rows) shards like any int8 parameter; the
  row scales live in ``module.state.SCB`` (sharding drops the ``Int8Params`` attributes ``CB`` and
  ``SCB``), whole on every rank, and each forward multiplies with the weight FSDP gathered.

``fsdp_quantized_bytes`` measures what each rank holds.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .config import QuantizationMethod, dtype_to_str
from .methods import METHOD_SPECS, FSDPSupport, method_spec
from .registry import adapter_class_for_module
from .surgery import get_quantization_plan

__all__ = [
    "FSDPSupport",
    "FSDP_SUPPORT",
    "render_fsdp_markdown",
    "decoder_layer_classes",
    "fsdp_ignored_params",
    "check_fsdp_compatibility",
    "apply_fsdp",
    "fsdp_auto_wrap_policy",
    "restore_bnb_quant_state",
    "prepare_layers_for_fsdp",
    "full_lora_state_dict",
    "save_lora_adapter",
    "fsdp_quantized_bytes",
]

logger = logging.getLogger(__name__)
M = QuantizationMethod


_UNSHARDABLE = (torch.uint16, torch.uint32, torch.uint64)
class _FSDPTable(Mapping):
    """``{method: FSDPSupport}``: each registered method's declared FSDP row."""

    def __getitem__(self, method: QuantizationMethod) -> FSDPSupport:
        row = method_spec(method).fsdp
        if row is None:
            return FSDPSupport("replicated", "replicated", "unknown",
                               "its backend declares no FSDP behaviour: kept whole on every rank", "not verified")
        return row

    def __iter__(self) -> Iterator[QuantizationMethod]:
        return iter(list(METHOD_SPECS))

    def __len__(self) -> int:
        return len(METHOD_SPECS)


#: How FSDP treats each method's quantized weights, built from the registry (``docs/fsdp.md``).
FSDP_SUPPORT: Mapping[QuantizationMethod, FSDPSupport] = _FSDPTable()


def render_fsdp_markdown() -> str:
    """:data:`FSDP_SUPPORT` as a markdown table (the one in ``docs/fsdp.md``)."""
    lines = ["| method | FSDP2 `fully_shard` | FSDP1 `FullyShardedDataParallel` | storage_dtype | why | checked |",
             "|---|---|---|---|---|---|"]
    for method, s in FSDP_SUPPORT.items():
        lines.append(f"| `{method.value}` | {s.fsdp2} | {s.fsdp1} | {s.storage} | {s.note} | {s.verified} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- the model's layers
def _base_model(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)  # FSDP1 / DDP wrappers
    if isinstance(inner, nn.Module) and type(model).__name__ in ("FullyShardedDataParallel", "DistributedDataParallel"):
        model = inner
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _layer_methods(model: nn.Module) -> dict[int, tuple[str, QuantizationMethod, nn.Module]]:
    """``{id(layer): (name, method, layer)}`` for every converted layer, from the model's plan
    (the layer inside a LoRA wrapper when there is one)."""
    base = _base_model(model)
    plan = get_quantization_plan(base)
    if plan is None:
        raise ValueError("the model has no quantization plan: quantize it (or load it with "
                         "load_quantized_model) before wrapping it with FSDP")
    out = {}
    for layer in plan.converted:
        module = base.get_submodule(layer.name)
        while hasattr(module, "base_layer"):
            module = module.base_layer
        out[id(module)] = (layer.name, QuantizationMethod.parse(layer.method), module)
    return out


def decoder_layer_classes(model: nn.Module) -> tuple[type, ...]:
    """The block classes to shard one by one: transformers' ``_no_split_modules`` when the model
    names them, else the class of the items of its largest ``nn.ModuleList``."""
    base = _base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    found = {type(m) for m in base.modules() if type(m).__name__ in names}
    if found:
        return tuple(sorted(found, key=lambda c: c.__name__))
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(base).__name__} has no _no_split_modules and no nn.ModuleList of blocks; "
                         f"pass layer_classes explicitly")
    biggest = max(lists, key=lambda l: sum(p.numel() for p in l.parameters()))
    return tuple(sorted({type(m) for m in biggest}, key=lambda c: c.__name__))


def fsdp_ignored_params(model: nn.Module, version: int = 2) -> set[nn.Parameter]:
    """Quantized weights FSDP ``version`` must leave alone: those of methods whose
    :data:`FSDP_SUPPORT` row says ``replicated`` for it (FSDP1: optimum-quanto and bitsandbytes
    INT8, whose integer data it cannot flatten). They stay quantized and whole on every rank.

    Of such a layer, its ``weight`` parameter and every integer parameter are left out (float
    ones, such as the bias, shard)."""
    ignored = set()
    for _, method, module in _layer_methods(model).values():
        row = FSDP_SUPPORT[method]
        if (row.fsdp2 if version == 2 else row.fsdp1) != "replicated":
            continue
        weight = module._parameters.get("weight")
        if isinstance(weight, nn.Parameter):
            ignored.add(weight)
        ignored.update(p for p in module.parameters(recurse=False) if not p.dtype.is_floating_point)
    return ignored


def prepare_layers_for_fsdp(model: nn.Module) -> int:
    """Let each quantized layer's adapter prepare it for sharding (``prepare_for_fsdp``: bitsandbytes
    4-bit layers keep their ``module.quant_state`` for the forward to rebuild the weight from once
    FSDP has replaced ``Params4bit`` by a plain tensor, INT8 layers their row scales in
    ``module.state.SCB``). Returns how many layers needed it."""
    fixed = 0
    for _, _, module in _layer_methods(model).values():
        cls = adapter_class_for_module(module)
        if cls is not None and cls.prepare_for_fsdp(module):
            fixed += 1
    return fixed


#: The name this had when only bitsandbytes needed it.
restore_bnb_quant_state = prepare_layers_for_fsdp


# ---------------------------------------------------------------------- checks
def check_fsdp_compatibility(model: nn.Module, *, version: int = 2,
                             param_dtype: torch.dtype | None = None) -> list[str]:
    """Problems that would make FSDP corrupt or refuse the quantized weights; empty when fine.

    Args:
        model: a quantized (and LoRA-wrapped) model.
        version: 2 (``fully_shard``) or 1 (``FullyShardedDataParallel``).
        param_dtype: FSDP2 ``MixedPrecisionPolicy.param_dtype`` (FSDP1 ``MixedPrecision`` too).
    """
    if version not in (1, 2):
        raise ValueError(f"version={version!r} is not an FSDP version; allowed: 1, 2")
    problems = []
    layers = _layer_methods(model)
    ignored = {id(p) for p in fsdp_ignored_params(model, version)}
    sharded = [(name, method, pname, p) for name, method, module in layers.values()
               for pname, p in module.named_parameters(recurse=False) if id(p) not in ignored]
    for name, method, pname, p in sharded:
        if _is_wrapper_subclass(p):
            problems.append(f"{name}.{pname} is a {type(p).__name__} (a tensor subclass without FSDP hooks): FSDP "
                            f"would shard it as a plain tensor, e.g. into dequantized full-precision shards. "
                            f"Quantize (or load) the model with this package, whose layers hold plain tensors")
            continue
        if p.dtype.is_floating_point and param_dtype is not None and p.dtype != param_dtype \
                and pname not in ("bias",) and method is not M.NONE:
            problems.append(f"{name}.{pname} stores packed {method.value} data as {dtype_to_str(p.dtype)}, but "
                            f"param_dtype={dtype_to_str(param_dtype)}: FSDP would convert the packed bytes. "
                            f"Quantize with storage_dtype={dtype_to_str(param_dtype)} (or an integer storage "
                            f"for FSDP2)")
        if p.dtype in _UNSHARDABLE:
            problems.append(f"{name}.{pname} is {dtype_to_str(p.dtype)}, which torch cannot all-gather or pad. "
                            f"Quantize with storage_dtype=torch.uint8 (FSDP2) or the model's float dtype")
        elif version == 1 and not p.dtype.is_floating_point:
            problems.append(f"{name}.{pname} is {dtype_to_str(p.dtype)}: FSDP1 cannot flatten integer tensors. "
                            f"Quantize with storage_dtype set to the model's float dtype, or use FSDP2")
    if version == 1:
        dtypes = {p.dtype for p in model.parameters() if id(p) not in ignored}
        in_layers = {id(p) for _, _, module in layers.values() for p in module.parameters(recurse=False)}
        rest = {p.dtype for p in model.parameters() if id(p) not in ignored and id(p) not in in_layers}
        if len(dtypes) > 1:
            fix = (f"quantize with storage_dtype={dtype_to_str(next(iter(rest)))}, the dtype of every other "
                   f"parameter (prepare_model_for_training makes norms float32 and peft makes LoRA float32)"
                   if len(rest) == 1 else
                   "give every parameter one dtype (LoRA weights: get_peft_model(..., autocast_adapter_dtype="
                   "False)) and quantize with that storage_dtype")
            problems.append(f"FSDP1 flattens each unit into one tensor of one dtype; the parameters have "
                            f"{sorted(dtype_to_str(d) for d in dtypes)}. Fix: {fix}; or use FSDP2")
    return problems


def _is_wrapper_subclass(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return getattr(type(p), "__tensor_flatten__", None) is not None and not isinstance(p, DTensor)


# ---------------------------------------------------------------------- wrapping
def fsdp_auto_wrap_policy(model: nn.Module, layer_classes: Iterable[type] | None = None):
    """FSDP1 auto-wrap policy: one FSDP unit per decoder layer (:func:`decoder_layer_classes`)."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy(set(layer_classes or decoder_layer_classes(model)))


def apply_fsdp(model: nn.Module, *, mesh: Any = None, reshard_after_forward: bool = True, mp_policy: Any = None,
               version: int = 2, layer_classes: Iterable[type] | None = None, **fsdp1_kwargs: Any) -> nn.Module:
    """Shard a quantized + LoRA model with FSDP (``torch.distributed`` must be initialized).

    FSDP2 (default): ``fully_shard`` on each decoder layer, then on the whole model, in place.
    FSDP1: ``FullyShardedDataParallel`` with :func:`fsdp_auto_wrap_policy` and
    ``use_orig_params=True``. Either way the weights of methods that cannot shard under that
    version (FSDP1: quanto, bitsandbytes INT8; see :data:`FSDP_SUPPORT`) are left out (replicated,
    still quantized), each layer's adapter prepares it (:func:`prepare_layers_for_fsdp`:
    bitsandbytes 4-bit ``module.quant_state``, INT8 ``module.state.SCB``), and
    :func:`check_fsdp_compatibility` runs first.

    Args:
        model: the model (a ``PeftModel`` or the quantized model); on its final device.
        mesh: FSDP2 ``DeviceMesh`` (FSDP1: passed as ``device_mesh``); ``None``: the default group.
        reshard_after_forward: FSDP2 ``reshard_after_forward`` for the decoder layers.
        mp_policy: FSDP2 ``MixedPrecisionPolicy`` (FSDP1: pass ``mixed_precision=`` instead).
        version: 2 or 1.
        layer_classes: the classes to wrap one by one (default :func:`decoder_layer_classes`).
        **fsdp1_kwargs: more ``FullyShardedDataParallel`` arguments (FSDP1 only).

    Returns:
        FSDP2: the same model. FSDP1: the ``FullyShardedDataParallel`` wrapper.

    Raises:
        ValueError: for the problems :func:`check_fsdp_compatibility` finds, or an unknown version.
        RuntimeError: when ``torch.distributed`` is not initialized.
    """
    if version not in (1, 2):
        raise ValueError(f"version={version!r} is not an FSDP version; allowed: 1, 2")
    if version == 2 and fsdp1_kwargs:
        raise ValueError(f"{sorted(fsdp1_kwargs)} are FullyShardedDataParallel (FSDP1) arguments; "
                         f"apply_fsdp(version=2) takes mesh, reshard_after_forward and mp_policy")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("apply_fsdp needs torch.distributed initialized (launch with torchrun and call "
                           "torch.distributed.init_process_group, backend 'gloo' on CPU, 'nccl' on CUDA)")
    param_dtype = getattr(mp_policy, "param_dtype", None)
    mixed = fsdp1_kwargs.get("mixed_precision")
    if mixed is not None:
        param_dtype = getattr(mixed, "param_dtype", None)
    problems = check_fsdp_compatibility(model, version=version, param_dtype=param_dtype)
    if problems:
        raise ValueError("this model cannot be sharded as configured:\n  - " + "\n  - ".join(problems))
    prepare_layers_for_fsdp(model)
    ignored = fsdp_ignored_params(model, version)
    classes = tuple(layer_classes or decoder_layer_classes(model))

    if version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        kwargs = dict(auto_wrap_policy=fsdp_auto_wrap_policy(model, classes), use_orig_params=True)
        if ignored:
            kwargs["ignored_states"] = list(ignored)
        if mesh is not None:
            kwargs["device_mesh"] = mesh
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type == "cpu":
            kwargs["device_id"] = device  # FSDP1 otherwise insists on an accelerator
        kwargs.update(fsdp1_kwargs)
        return FullyShardedDataParallel(model, **kwargs)

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    blocks = [m for m in model.modules() if isinstance(m, classes)]
    if not blocks:
        raise ValueError(f"no module of {[c.__name__ for c in classes]} in the model; pass layer_classes")
    for block in blocks:
        own = {p for p in block.parameters() if p in ignored}
        fully_shard(block, reshard_after_forward=reshard_after_forward, ignored_params=own or None, **kwargs)
    rest = {p for p in model.parameters() if p in ignored}
    fully_shard(model, ignored_params=rest or None, **kwargs)
    return model


# ---------------------------------------------------------------------- saving and measuring
def _is_fsdp1(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def full_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters as full CPU tensors, names as in the unsharded model.

    Collective under FSDP: every rank must call it; every rank gets the full tensors.
    """
    from torch.distributed.tensor import DTensor

    def collect() -> dict[str, torch.Tensor]:
        out = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            t = p.full_tensor() if isinstance(p, DTensor) else p
            out[_clean(name)] = t.detach().to("cpu", copy=True)
        return out

    if dist.is_available() and dist.is_initialized() and _is_fsdp1(model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=True):
            return collect()
    return collect()


def save_lora_adapter(model: nn.Module, path: str | os.PathLike, peft_model: nn.Module | None = None, *,
                      experts_layout: str = "fused", overwrite: bool = False) -> None:
    """Save the LoRA adapters of a PEFT model over a quantized model, sharded by FSDP or not, where
    plain peft reads them (``PeftModel.from_pretrained``).

    Under FSDP every rank must call it: the shards are gathered, rank 0 writes, all ranks wait.
    LoRA on MoE experts that this package quantized per expert is written as peft's
    ``target_parameters`` adapter of transformers' fused expert parameters (``experts_layout``; see
    :func:`~quantization_wrapper.peft_integration.write_lora_adapter`).

    Args:
        model: the model being trained (the FSDP1 wrapper, or the PEFT model sharded by FSDP2, or
            a plain ``PeftModel``).
        path: the adapter directory.
        peft_model: the ``PeftModel`` inside an FSDP1 wrapper (default: ``model`` or ``model.module``).
        experts_layout: ``"fused"`` (default: what transformers' float MoE model reads) or
            ``"per_expert"`` (one LoRA per expert layer, as ``save_pretrained`` writes it).
        overwrite: replace an adapter already in ``path`` (other files there are always kept).
    """
    from .peft_integration import write_lora_adapter

    fsdp1 = _is_fsdp1(model)
    peft_model = peft_model or (model.module if fsdp1 and hasattr(model, "module") else model)
    if not hasattr(peft_model, "save_pretrained") or not hasattr(peft_model, "peft_config"):
        raise ValueError(f"{type(peft_model).__name__} is not a PEFT model (no save_pretrained/peft_config)")
    distributed = dist.is_available() and dist.is_initialized()
    adapters = None
    if distributed or fsdp1:
        state = full_lora_state_dict(model)  # collective
        adapters = {name: _adapter_tensors(peft_model, state, name, fsdp1) for name in peft_model.peft_config}
    if not distributed or dist.get_rank() == 0:
        write_lora_adapter(peft_model, path, adapters, experts_layout=experts_layout, overwrite=overwrite)
    if distributed:
        dist.barrier()


def _adapter_tensors(peft_model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str,
                     fsdp1: bool) -> dict[str, torch.Tensor]:
    """One adapter's tensors under the keys ``save_pretrained`` writes.

    peft 0.21 picks the adapter's keys by walking the model's LoRA layers, and strips only a
    leading ``_fsdp_wrapped_module.``; under FSDP1 with one unit per decoder layer the names carry
    it in the middle too, so it would select nothing: there the adapter name is taken out of the
    gathered (cleaned) names directly.
    """
    if not fsdp1:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(peft_model, state_dict=state, adapter_name=adapter_name)
    marker = f".{adapter_name}."
    return {k.replace(marker, ".", 1): v.contiguous() for k, v in state.items() if marker in k}


def fsdp_quantized_bytes(model: nn.Module) -> dict[str, int]:
    """What this rank holds of the quantized layers, in bytes.

    Returns:
        ``local_shards``: this rank's shards of the sharded parameters of the quantized layers
        (packed weights, scales stored as parameters, biases); ``full_sharded``: those parameters
        unsharded; ``replicated``: the rest of the quantized layers' bytes, whole on every rank
        (library-side state such as bitsandbytes' ``QuantState`` and HQQ's scales, and the weights
        FSDP leaves alone); ``per_rank``: ``local_shards + replicated``; ``total``: every byte of
        the quantized layers (the plan's ``bytes_after``).
    """
    from torch.distributed.tensor import DTensor

    base = _base_model(model)
    plan = get_quantization_plan(base)
    total = sum(layer.bytes_after for layer in plan.converted)
    flat = _fsdp1_shards(model)
    local = full = 0
    for _, _, module in _layer_methods(model).values():
        for p in module.parameters(recurse=False):
            if isinstance(p, DTensor):
                shard = p.to_local()
                local += shard.numel() * shard.element_size()
                full += p.numel() * p.element_size()
            elif id(p) in flat:
                local += flat[id(p)][0]
                full += flat[id(p)][1]
    replicated = total - full
    return {"local_shards": local, "full_sharded": full, "replicated": replicated,
            "per_rank": local + replicated, "total": total}


def _fsdp1_shards(model: nn.Module) -> dict[int, tuple[int, int]]:
    """``{id(original parameter): (bytes in this rank's shard, full bytes)}`` for FSDP1 units
    (``use_orig_params=True``), read from their flat parameters."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    out: dict[int, tuple[int, int]] = {}
    for unit in FullyShardedDataParallel.fsdp_modules(model):
        handle = getattr(unit, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        params = getattr(flat, "_params", None)
        if flat is None or params is None:
            continue
        size = flat.element_size()
        for p, numel, info in zip(params, flat._numels, flat._shard_param_infos):
            out[id(p)] = ((info.numel_in_shard or 0) * size, numel * size)
    return out
