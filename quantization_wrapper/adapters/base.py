"""The adapter contract and the registry that maps methods to adapters.

An adapter turns ``nn.Linear`` layers into one library's quantized layers and back. Adapters
register themselves with :func:`register_adapter`, keyed by the methods they serve; everything
else (the factory, the model walker, save/load, training glue) looks them up there, so adding a
backend is one new file and one decorator.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping

import torch
from torch import nn

from backend_manager import Backend, detect_backend, get_library_status

from ..config import METHOD_SPECS, QuantizationConfig, QuantizationMethod, dtype_to_str
from ..errors import CheckpointError
from ..registry import (
    ADAPTER_REGISTRY,
    build_adapter,
    get_adapter_class,
    is_quantized_module,
    register_adapter,
    registered_methods,
)
from ..tensors import (
    LayerStateSpec,
    autocast_dtype,
    check_state_spec,
    common_dtype,
    leaf_tensors,
    tensor_nbytes,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..validation import ValidationIssue

__all__ = [
    "QuantizationAdapter",
    "ADAPTER_REGISTRY",
    "register_adapter",
    "get_adapter_class",
    "registered_methods",
    "tensor_nbytes",
    "is_quantized_module",
    "LayerStateSpec",
    "check_state_spec",
    "common_dtype",
    "autocast_dtype",
]

logger = logging.getLogger(__name__)

class QuantizationAdapter(ABC):
    """Base class of the backend adapters.

    Subclasses set ``library`` (the name ``backend_manager`` knows it by), ``library_module`` (its
    import name, to check ``sys.modules`` cheaply; ``types_module`` when the quantized layer class
    lives elsewhere), and implement :meth:`create_quantized_linear`. :meth:`quantize_linear` and
    :meth:`dequantize_module` have defaults that work through the created layer (see each); backends
    override them. Model-level operations (:meth:`quantize_model`, training preparation, save/load)
    are shared. The contracts are in ``docs/architecture.md`` ("Custom adapters").

    A :meth:`create_quantized_linear` written as ``(in_features, out_features, bias=True)`` (the
    design document's example) is accepted: the keywords it lacks are applied around it (``device``
    as a ``torch.device`` context; ``dtype`` left to the layer), and a per-layer ``config`` that
    differs from the adapter's raises, since such a method cannot honour it.

    Args:
        config: the quantization config; ``None`` uses the default config of the adapter's first
            method.
        backend: a :class:`~backend_manager.Backend` or its string; ``None`` detects it.
        device: where quantized layers are built; ``None`` keeps each layer's device.
    """

    methods: ClassVar[tuple[QuantizationMethod, ...]] = ()
    library: ClassVar[str | None] = None
    library_module: ClassVar[str | None] = None
    # Where the quantized layer classes are defined, when not in the library itself (checked in
    # sys.modules before isinstance tests, so that asking never imports a library).
    types_module: ClassVar[str | None] = None
    #: Bytes of temporaries per weight while one layer is quantized (measured on CPU); the
    #: streaming loader quantizes two layers at once only when a second one's fit its budget.
    quantize_workspace_per_weight: ClassVar[float] = 16.0
    #: Whether :meth:`load_layer_state` does multi-threaded tensor work (a repack for a kernel):
    #: loading then fills such layers after the checksum threads are done, not beside them.
    fill_after_verification: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        create = cls.__dict__.get("create_quantized_linear")
        if create is not None and not getattr(create, "__isabstractmethod__", False):
            cls.create_quantized_linear = _accept_create_keywords(create)

    def __init__(self, config: QuantizationConfig | None = None, backend: Backend | str | None = None,
                 *, device: torch.device | str | None = None):
        if not self.methods:
            raise TypeError(f"{type(self).__name__} is not registered; decorate it with @register_adapter")
        self.config = config if config is not None else QuantizationConfig(method=self.methods[0])
        if not isinstance(self.config, QuantizationConfig):
            raise ValueError(f"config must be a QuantizationConfig, got {type(self.config).__name__}")
        if self.config.method not in self.methods:
            raise ValueError(
                f"{type(self).__name__} serves {', '.join(m.value for m in self.methods)}; "
                f"config.method={self.config.method.value!r} needs "
                f"{ADAPTER_REGISTRY[self.config.method].__name__ if self.config.method in ADAPTER_REGISTRY else 'another adapter'}"
            )
        self.backend = Backend.parse(backend) if backend is not None else detect_backend()
        self.device = torch.device(device) if device is not None else None
        self._siblings: dict[QuantizationMethod, QuantizationAdapter] = {}

    # ------------------------------------------------------------------ environment
    @classmethod
    def validate_environment(cls, backend: Backend | str | None = None) -> None:
        """Raise ``ImportError`` with the install command when the library cannot run here."""
        if cls.library is None:
            return
        status = get_library_status(cls.library, backend)
        if not status.usable:
            raise ImportError(
                f"{cls.__name__} needs {cls.library}, which is not usable on "
                f"{Backend.parse(backend or detect_backend()).value}: {status.reason}. "
                f"Fix: {status.install_hint}"
            )

    @classmethod
    def check_config(cls, config: QuantizationConfig, backend: Backend) -> list["ValidationIssue"]:
        """Adapter-specific validation (options the library ignores or cannot honour)."""
        return []

    @classmethod
    def quantized_module_types(cls) -> tuple[type, ...]:
        """The module classes this adapter produces (may import the library)."""
        return ()

    @classmethod
    def config_of_layer(cls, module: nn.Module) -> QuantizationConfig | None:
        """The config that re-creates ``module`` (same bits, group size, dtypes), read from the layer
        itself, or ``None`` when the layer does not record it (then the model's
        ``quantization_config`` is the source). peft's LoRA layer of ours uses it."""
        return None

    #: peft has a LoRA layer for this adapter's layers and finds them with ``"all-linear"``
    #: (bitsandbytes): :func:`~quantization_wrapper.training.prepare_model_for_training` then needs no
    #: peft integration for them.
    peft_native: ClassVar[bool] = False

    @classmethod
    def prepare_for_fsdp(cls, module: nn.Module) -> bool:
        """Make ``module`` ready for FSDP to shard its parameters (called by ``apply_fsdp`` before
        sharding); return whether anything was changed. Raise ``ValueError`` naming the fix when the
        layer cannot be sharded."""
        return False

    @classmethod
    def lora_layer_types(cls) -> tuple[type, ...]:
        """Quantized layer types peft has no LoRA layer for: peft is given
        :class:`~quantization_wrapper.peft_integration.QuantizedLoraLinear` for them (only the
        types whose library is already imported; asking must not import it)."""
        return ()

    @classmethod
    def peer_config_entries(cls, model: nn.Module, plan: Any,
                            layers: list) -> tuple[dict[str, Any], dict[str, Any]]:
        """What the library's own loader reads beside a checkpoint of ours, so that it opens the
        checkpoint too: ``(config.json additions, extra JSON files by name)``. ``layers`` are the
        plan's converted layers of this adapter's methods (``plan`` is the model's whole
        :class:`~quantization_wrapper.surgery.QuantizationPlan`). The default adds nothing."""
        return {}, {}

    @classmethod
    def native_readers(cls) -> dict[str, tuple[Callable[..., bool], Callable[..., nn.Module]]]:
        """The library's own checkpoint formats that ``load_quantized_model`` reads:
        ``{name: (detect(path) -> bool, load(path, model_config, *, device, backend,
        expected_methods, verify) -> model)}``; ``detect`` reads headers only, ``load`` raises
        :class:`~quantization_wrapper.errors.CheckpointError` naming what is wrong. The default
        reads none."""
        return {}

    # ------------------------------------------------------------------ layer level
    def quantize_linear(self, linear: nn.Linear, name: str | None = None, *,
                        config: QuantizationConfig | None = None) -> nn.Module:
        """Quantize an ``nn.Linear`` that holds real weights; returns the new module.

        The default builds the layer with :meth:`create_quantized_linear` on ``linear``'s device and
        dtype, then hands it the float weights: ``module.load_float_weight(weight, bias)`` when the
        layer has that method (it quantizes them), else by assignment -- copied into a ``weight`` /
        ``bias`` parameter, or set through an attribute (a property setter that quantizes, a buffer).

        Args:
            linear: the layer; it is not modified.
            name: its dotted name, used to look up ``layer_configs`` when ``config`` is ``None``.
            config: the per-layer config to use (the walker passes the resolved one).

        Raises:
            TypeError: the created layer takes float weights in none of these ways (implement
                ``quantize_linear`` on the adapter, or give the layer ``load_float_weight``).
        """
        config = self.layer_config(name, config)
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        module = self.create_quantized_linear(linear.in_features, linear.out_features, bias is not None,
                                              config=config, device=weight.device, dtype=weight.dtype)
        load = getattr(module, "load_float_weight", None)
        if callable(load):
            with torch.no_grad():
                load(weight, bias)
            return module
        _hand_float(self, module, "weight", weight)
        if bias is not None:
            _hand_float(self, module, "bias", bias)
        return module

    @abstractmethod
    def create_quantized_linear(self, in_features: int, out_features: int, bias: bool = True, *,
                                config: QuantizationConfig | None = None,
                                device: torch.device | str | None = None,
                                dtype: torch.dtype | None = None) -> nn.Module:
        """An empty quantized layer of the given shape, to be filled from a checkpoint.

        ``device="meta"`` allocates nothing.
        """

    def dequantize_module(self, module: nn.Module) -> nn.Linear:
        """An ``nn.Linear`` whose weight equals what ``module`` computes with.

        The default reads the float weight from ``module.dequantize()`` when the layer has it, else
        from a floating-point ``module.weight`` of shape ``(out_features, in_features)``, and the
        bias from ``module.bias``.

        Raises:
            TypeError: the layer exposes neither (implement ``dequantize_module`` on the adapter).
        """
        dequantize = getattr(module, "dequantize", None)
        with torch.no_grad():
            weight = dequantize() if callable(dequantize) else getattr(module, "weight", None)
            if not (isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.ndim == 2):
                raise TypeError(
                    f"{type(self).__name__}.dequantize_module: {type(module).__name__} has neither a dequantize() "
                    f"method returning the float weight nor a floating-point 2-D weight "
                    f"(got {type(weight).__name__}); implement dequantize_module on {type(self).__name__}")
            weight = weight.detach().clone()
            bias = getattr(module, "bias", None)
            bias = bias.detach().clone() if isinstance(bias, torch.Tensor) else None
        out_features, in_features = weight.shape
        linear = nn.Linear(in_features, out_features, bias is not None, device="meta")
        linear.weight = nn.Parameter(weight)
        if bias is not None:
            linear.bias = nn.Parameter(bias.to(weight.dtype))
        return linear

    def is_quantized_module(self, module: nn.Module) -> bool:
        """True when ``module`` is one of this adapter's quantized layers."""
        types = self.quantized_module_types()
        return bool(types) and isinstance(module, types)

    def module_nbytes(self, module: nn.Module) -> int:
        """Bytes of every tensor the module holds (parameters, buffers, library-side state)."""
        return tensor_nbytes(list(module.parameters()) + list(module.buffers()))

    def layer_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor needed to rebuild ``module``: flat names, plain tensors, ready for
        safetensors. :meth:`load_layer_state` on an empty layer from
        :meth:`create_quantized_linear` with the same config must restore identical outputs."""
        return {k: v.detach() for k, v in module.state_dict().items()}

    def load_layer_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
        """Fill ``module`` (from :meth:`create_quantized_linear`, possibly on meta) with ``state``
        without copying where possible; returns the filled module (may be a new object)."""
        module.load_state_dict(state, strict=True, assign=True)
        return module

    def layer_state_spec(self, in_features: int, out_features: int, bias: bool, state: Mapping[str, torch.Tensor],
                         *, config: QuantizationConfig) -> LayerStateSpec | None:
        """Every key :meth:`layer_state_dict` writes for such a layer, with its dtype and shape, as
        the format requires them (a dtype the format leaves to the model, e.g. the compute dtype,
        may be read from ``state``). ``None``: the adapter declares none, and only
        :meth:`load_layer_state`'s own checks apply."""
        return None

    def check_layer_state(self, in_features: int, out_features: int, bias: bool, state: Mapping[str, torch.Tensor],
                          *, config: QuantizationConfig) -> None:
        """Raise :class:`~quantization_wrapper.errors.CheckpointError` unless ``state`` matches
        :meth:`layer_state_spec` key for key, in dtype and shape."""
        spec = self.layer_state_spec(in_features, out_features, bias, state, config=config)
        if spec is not None:
            settings = [f"{config.bits}-bit"] + ([f"group {config.group_size}"] if config.group_size else [])
            where = (f"{config.method.value} layer {out_features}x{in_features} ({', '.join(settings)}, "
                     f"{'with' if bias else 'no'} bias)")
            check_state_spec(state, spec, where=where)

    def restore_linear(self, in_features: int, out_features: int, bias: bool, state: dict[str, torch.Tensor], *,
                       config: QuantizationConfig | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """A quantized layer rebuilt from :meth:`layer_state_dict` output: what the loader calls.
        By default :meth:`check_layer_state`, then :meth:`create_quantized_linear` on meta, then
        :meth:`load_layer_state`; an adapter overrides it where it can build the layer more directly.

        Raises:
            CheckpointError: ``state`` does not match the format (keys, dtypes, shapes).
        """
        self.check_layer_state(in_features, out_features, bias, state, config=config or self.config)
        empty = self.create_quantized_linear(in_features, out_features, bias, config=config, device="meta",
                                             dtype=dtype)
        return self.load_layer_state(empty, state)

    def layer_config(self, name: str | None, config: QuantizationConfig | None = None) -> QuantizationConfig:
        """The config to use for layer ``name``: ``config`` if given, else the resolved override."""
        if config is not None:
            return config
        return self.config.for_layer(name) if name else self.config

    def fit_group_size(self, in_features: int, out_features: int,
                       config: QuantizationConfig) -> tuple[QuantizationConfig | None, str | None]:
        """Fit the group size to a layer's shape.

        Returns ``(config, None)`` when it fits, ``(adjusted_config, reason)`` when a smaller valid
        group size is used, and ``(None, reason)`` when the layer must stay unquantized. The default
        rule: groups run along ``in_features``, which the group size must divide.
        """
        group = config.group_size
        if group is None or in_features % group == 0:
            return config, None
        spec = METHOD_SPECS[config.method]
        smaller = sorted((g for g in (spec.group_sizes or _halvings(group)) if g < group), reverse=True)
        for candidate in smaller:
            if in_features % candidate == 0:
                try:
                    adjusted = config.replace(group_size=candidate)
                except ValueError:
                    continue
                return adjusted, (f"group_size={group} does not divide in_features={in_features}; "
                                  f"using group_size={candidate}")
        return None, (f"no group size allowed for {config.method.value} (<= {group}) divides "
                      f"in_features={in_features}; layer kept in full precision")

    # ------------------------------------------------------------------ model level
    def for_method(self, method: QuantizationMethod | str) -> "QuantizationAdapter":
        """The adapter that serves ``method`` (this one, or a sibling sharing backend and device),
        used when ``layer_configs`` switches a layer to another method."""
        method = QuantizationMethod.parse(method)
        if method in self.methods:
            return self
        if method not in self._siblings:
            # with_overrides gives the method its own defaults and drops another library's backend_options
            self._siblings[method] = build_adapter(self.config.with_overrides(method=method), self.backend,
                                                   device=self.device)
        return self._siblings[method]

    def quantize_model(self, model: nn.Module, *, module_filter: Any = None, **kwargs: Any) -> nn.Module:
        """Replace the model's linear layers by quantized ones (in place; returns the model).

        Args:
            model: any ``nn.Module``; layers on the meta device become empty quantized layers.
            module_filter: a :class:`~quantization_wrapper.filters.QuantizeModuleFilter` or a
                callable ``(module, name) -> bool``.
            **kwargs: passed to :func:`~quantization_wrapper.surgery.replace_linear_with_quantized`
                (``skip_modules``, ``progress``).

        Raises:
            ValueError: the model already holds quantized layers or a quantization plan (quantize
                the full-precision model instead), or a layer to quantize has non-finite weights.
        """
        from ..surgery import refuse_quantized_model, replace_linear_with_quantized

        refuse_quantized_model(model, self.config.method)
        return replace_linear_with_quantized(model, self, module_filter=module_filter, **kwargs)

    def mark_model(self, model: nn.Module) -> None:
        """Set the attributes peft and transformers read on a quantized model."""
        model.is_quantized = True
        model.quantization_method = self.config.method.value
        if "transformers" in sys.modules:  # transformers reads hf_quantizer next to is_quantized (Trainer)
            from ..hf_quantizer import attach_hf_quantizer

            attach_hf_quantizer(model, getattr(model, "quantization_config", None) or self.config)
        if "peft" in sys.modules:  # plain get_peft_model (and TRL's) must wrap our layers: one idempotent,
            # uninstallable wrapper that acts only on models holding our layer types
            from ..peft_integration import install_peft_integration

            install_peft_integration(process_wide=True)

    def prepare_model_for_training(self, model: nn.Module, *, gradient_checkpointing: bool = True,
                                   use_reentrant: bool = False) -> nn.Module:
        """Freeze the base model and make it ready for LoRA (see :mod:`quantization_wrapper.training`)."""
        from ..training import prepare_model_for_training

        return prepare_model_for_training(model, self, gradient_checkpointing=gradient_checkpointing,
                                          use_reentrant=use_reentrant)

    def save_quantized_model(self, model: nn.Module, path: str, **kwargs: Any) -> None:
        """Save a quantized model (see :func:`quantization_wrapper.serialization.save_quantized_model`)."""
        from ..serialization import save_quantized_model

        save_quantized_model(model, path, **kwargs)

    def load_quantized_model(self, path: str, model_config: Any = None, **kwargs: Any) -> nn.Module:
        """Load a checkpoint saved by :meth:`save_quantized_model`, checking it was saved with a
        method this adapter serves."""
        from ..serialization import load_quantized_model

        return load_quantized_model(path, model_config, expected_methods=self.methods,
                                    backend=self.backend, **kwargs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(method={self.config.method.value!r}, bits={self.config.bits}, "
                f"group_size={self.config.group_size}, backend={self.backend.value!r})")


def _hand_float(adapter: QuantizationAdapter, module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Give ``module`` the float tensor ``name`` (see :meth:`QuantizationAdapter.quantize_linear`)."""
    param = module._parameters.get(name)
    if param is not None:
        if param.shape != value.shape:
            raise ValueError(f"{type(module).__name__}.{name} has shape {tuple(param.shape)}, the float layer's "
                             f"{tuple(value.shape)}")
        with torch.no_grad():
            param.copy_(value)
        return
    attr = inspect.getattr_static(type(module), name, None)
    settable = (isinstance(attr, property) and attr.fset is not None) or name in module._buffers
    if not settable:
        raise TypeError(
            f"{type(adapter).__name__}.quantize_linear: {type(module).__name__} takes no float {name}: give it a "
            f"load_float_weight(weight, bias) method, a {name!r} parameter or a settable {name!r} property, or "
            f"implement quantize_linear on {type(adapter).__name__}")
    with torch.no_grad():
        setattr(module, name, value)


_CREATE_KEYWORDS = ("config", "device", "dtype")


def _accept_create_keywords(create: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """``create`` unchanged when it takes ``config``, ``device`` and ``dtype``; else a wrapper that
    applies the missing ones around it (see :class:`QuantizationAdapter`)."""
    params = inspect.signature(create).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return create
    missing = [k for k in _CREATE_KEYWORDS if k not in params]
    if not missing:
        return create

    @functools.wraps(create)
    def wrapper(self: QuantizationAdapter, in_features: int, out_features: int, bias: bool = True,
                **kwargs: Any) -> nn.Module:
        given = {k: kwargs.pop(k) for k in missing if k in kwargs}
        config = given.get("config")
        if config is not None and config.with_overrides({}) != self.config.with_overrides({}):
            raise ValueError(
                f"{type(self).__name__}.create_quantized_linear takes no config, so it cannot build a layer with "
                f"config {config.with_overrides({})} (the adapter's is {self.config.with_overrides({})}): add a `config` keyword "
                f"to it, or drop layer_configs / use a group_size that divides every layer's in_features")
        device = given.get("device")
        if device is None:
            return create(self, in_features, out_features, bias, **kwargs)
        with torch.device(device):
            return create(self, in_features, out_features, bias, **kwargs)

    return wrapper


def _halvings(group: int) -> list[int]:
    out, g = [], group // 2
    while g >= 8:
        out.append(g)
        g //= 2
    return out
