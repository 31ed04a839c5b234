"""optimum-quanto adapter: ``nn.Linear`` -> ``optimum.quanto.nn.QLinear`` with frozen weights.

Every layer goes through quanto's own ``QLinear.from_module`` + ``freeze()``, so the weights are
really stored quantized (quanto tensor subclasses holding packed ``uint8`` / ``int8`` /
``float8_e4m3fn`` data plus scales in the compute dtype), and a layer computes bit for bit what
``optimum.quanto.quantize(model, weights=...)`` + ``freeze(model)`` gives. What this adapter adds:

* **The real group size in the plan.** quanto 0.2.7 fixes it per layer: ``qint2``/``qint4`` use
  128 along ``in_features`` when ``in_features > 128``, else the first of 96, 64, 32 that divides
  ``in_features``; when none does (or ``in_features <= 128``) it quantizes per output row, one
  group of ``in_features``. ``qint8``/``qfloat8`` always use one scale per output row.
  :meth:`QuantoAdapter.fit_group_size` asks quanto and reports exactly that.
* **Two CPU kernel choices of quanto 0.2.7 on torch 2.13 routed around** (:class:`QuantoLinear`,
  a ``QLinear`` subclass): ``qint4`` bfloat16 layers whose ``out_features`` is not a multiple of
  16 (the tinygemm packing raises) keep quanto's kernel-agnostic weight, and bfloat16 inputs to
  ``qint8`` layers whose ``in_features`` is a multiple of 4 but not of 16 (``_weight_int8pack_mm``
  returns garbage or crashes) take quanto's generic matmul. Every other layer runs quanto's code.
* **Exact save/load.** :meth:`QuantoAdapter.layer_state_dict` is quanto's own state dict
  (``weight._data``, ``weight._scale``, ``weight._shift``, ``input_scale``, ``output_scale``,
  ``bias``), loadable by ``optimum.quanto.requantize`` with the map entries of
  :meth:`QuantoAdapter.quantization_map_entry`. quanto converts its CPU bfloat16 int4 (tinygemm)
  weights to that format lossily; the saved shifts are chosen so that reloading rebuilds the
  identical weights.

* **Shardable storage.** quanto's weights are tensor subclasses that FSDP2's ``fully_shard`` would
  turn into *dequantized* full-precision shards. :class:`QuantoLinear` holds the tensors inside
  them instead (:mod:`.storage`): the packed data as an integer ``nn.Parameter`` ``weight_data``
  (``uint8``/``int8``; qfloat8's bytes as ``uint8``), the scales and shifts as buffers; it
  rebuilds quanto's tensor from them on every use (views: no copy, no requantization), so
  ``fully_shard`` (direct or through ``apply_fsdp``) splits the packed data across ranks and the
  forward multiplies with what it gathered. ``layer.weight`` and ``state_dict()`` are quanto's.
* **Training speed on CPU.** A gradient through a CPU bfloat16 int4 layer (torch's int4 kernel
  layout) multiplies by quanto's dequantized weight, read straight from the kernel layout
  (``qtensors.dequantized``: the same bits as quanto's ``dequantize()``, which goes through a
  K x K identity matmul), in the forward and the backward; inference keeps quanto's kernel.

``storage_dtype`` cannot be honoured: quanto's data has its own dtypes (FSDP2 shards it as it is).
``backend_options`` takes no key (activation quantization would need quanto's calibration).

Modules, each importing only those listed before it: ``layout`` (torch's CPU int4 nibble layouts,
plain torch), ``qtensors`` (quanto's qtypes and weight tensors, quanto imported on use),
``storage`` (a quanto weight as plain tensors and back; imports quanto), ``layer``
(:class:`QuantoLinear` and its frozen templates; imports quanto, so it is imported on first use),
``adapter`` (:class:`QuantoAdapter`, registered when this package is imported), ``checkpoint``
(what optimum-quanto reads beside our checkpoints' weights).
"""

from __future__ import annotations

from typing import Any

from . import methods  # noqa: F401  (declares the methods before anything builds a config)
from .adapter import QuantoAdapter, quanto_group_size
from . import checkpoint  # noqa: F401,E402  (the adapter's checkpoint hooks)
from .layout import INT4PACK_CANDIDATES, cpu_int4pack_layout, int4pack, int4unpack, regroup_halves  # noqa: F401

__all__ = ["QuantoAdapter", "quanto_group_size"]



def __getattr__(name: str) -> Any:
    # ``QuantoLinear`` subclasses optimum-quanto's ``QLinear``, so its module imports quanto: it is
    # importable from here (and picklable by this name) without importing quanto with the package.
    if name == "QuantoLinear":
        from .layer import QuantoLinear

        return QuantoLinear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
