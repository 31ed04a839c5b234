"""MLX adapter: MLX's affine packed format (``mx.quantize``) held in PyTorch modules.

Each linear layer becomes a :class:`MLXQuantizedLinear` that stores exactly what ``mx.quantize``
returns and mlx-lm saves: ``weight`` (``uint32``, ``bits`` bits per value packed from the least
significant bit up, shape ``(out, in * bits / 32)``), ``scales`` and ``biases`` (one per group of
``group_size`` inputs, shape ``(out, in / group_size)``, in the compute dtype) and the linear's
``bias``. A weight is ``scales * q + biases`` per group, ``q`` in ``[0, 2**bits - 1]``.

Where ``mlx`` runs (Apple silicon, or Linux CPU with ``pip install "mlx[cpu]"``) layers are
quantized by ``mx.quantize`` itself and the forward pass runs ``mx.quantized_matmul`` whenever no
gradient has to flow through the input. Everywhere else -- training (so LoRA on top trains),
CUDA tensors, or no ``mlx`` installed -- a pure-PyTorch path unpacks the same bits and runs
``F.linear``; its quantizer is bit-identical to ``mx.quantize`` and its dequantized weight to
``mx.dequantize``.

On MLX's CPU backend the kernels for float16/bfloat16 accumulate in half precision: measured here
(2048x2048, 4-bit, group 64) they are 10x less accurate (bfloat16: 5% relative error) and 40x
slower than in float32, so on the CPU the MLX path computes in float32 from the stored half
scales and casts the result back. On Apple GPUs it computes in the stored dtype (Metal kernels
accumulate in float32).

``backend_options`` (per layer through ``layer_configs`` too):

* ``kernel``: ``"auto"`` (default: MLX when usable and no gradient is needed -- on MLX's CPU
  device only for inputs of at most :data:`MLX_CPU_MAX_ROWS` rows, where it is faster -- else
  PyTorch), ``"mlx"`` (always MLX; an error where it cannot run or when a gradient must flow
  through the input), ``"torch"`` (always the PyTorch path, even where MLX runs).

``storage_dtype`` is honoured: the packed bytes are viewed (not converted) as that dtype, so FSDP
can shard them with the other parameters; checkpoints always hold mlx-lm's ``uint32`` layout.
Converting a module's dtype (``model.half()``) casts scales, biases and bias and never touches the
packed bytes.

Memory: after ``quantize_linear`` or ``load_layer_state`` (where MLX runs) the module's tensors are
views of MLX's arrays, so both paths share one copy (MLX can export CPU memory without a copy but
not import it). Tensors replaced any other way are copied into MLX on the first MLX call; when
they keep changing (FSDP gathers them anew each forward) they are copied per call, not cached.
mlx-lm checkpoints: :meth:`MLXAdapter.layer_state_dict` gives its tensor names and
:func:`mlx_lm_quantization_config` its ``config["quantization"]`` entry.

Modules, each importing only those listed before it: ``codec`` (the format in PyTorch and the
bridge to MLX), ``layer`` (:class:`MLXQuantizedLinear`), ``adapter`` (:class:`MLXAdapter`,
registered when this package is imported), ``interop`` (mlx-lm's quantization config).
"""

from __future__ import annotations

from . import methods  # noqa: F401  (declares the methods before anything builds a config)
from . import codec
from .adapter import MLX_BACKEND_OPTIONS, MLXAdapter
from .codec import (MLX_BITS, MLX_GROUP_SIZES, affine_dequantize, affine_quantize, mlx_core,  # noqa: F401 (re-exported)
                    mlx_quantize, pack_bits, to_mx, to_torch, unpack_bits)
from .interop import mlx_lm_quantization_config
from .layer import MLX_CPU_MAX_ROWS, MLXQuantizedLinear

__all__ = [
    "MLXAdapter",
    "MLXQuantizedLinear",
    "MLX_BACKEND_OPTIONS",
    "MLX_CPU_MAX_ROWS",
    "affine_quantize",
    "affine_dequantize",
    "pack_bits",
    "unpack_bits",
    "mlx_quantize",
    "mlx_lm_quantization_config",
]
