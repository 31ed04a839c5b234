"""Streaming a transformers checkpoint into a quantized model: the names this module always had,
now defined in :mod:`quantization_wrapper.checkpoint` (``streaming``, ``skeleton``,
``safetensors_io``)."""

from .checkpoint.safetensors_io import CheckpointFiles, SafetensorsReader
from .checkpoint.skeleton import build_empty_model, build_skeleton, model_from_config
from .checkpoint.streaming import load_and_quantize, release_freed_memory_to_os, tensor_worker_pool

__all__ = [
    "SafetensorsReader",
    "CheckpointFiles",
    "load_and_quantize",
    "model_from_config",
    "build_skeleton",
    "build_empty_model",
    "release_freed_memory_to_os",
    "tensor_worker_pool",
]
