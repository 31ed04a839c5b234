"""Save and load quantized models: the names this module always had, now defined in
:mod:`quantization_wrapper.checkpoint` (``save``, ``load``, ``checksums``, ``description``,
``safetensors_io``)."""

from .checkpoint.checksums import HASH_BLOCK, verify_checkpoint
from .checkpoint.description import (BUFFER_PREFIX, BUFFERS_NAME, FORMAT_VERSION, INDEX_NAME, QUANT_CONFIG_NAME,
                                     WEIGHTS_NAME, read_checkpoint_info)
from .checkpoint.load import load_quantized_model
from .checkpoint.safetensors_io import parse_size
from .checkpoint.save import save_quantized_model
from .errors import CheckpointError, ChecksumError

__all__ = [
    "save_quantized_model",
    "load_quantized_model",
    "parse_size",
    "verify_checkpoint",
    "read_checkpoint_info",
    "CheckpointError",
    "ChecksumError",
    "FORMAT_VERSION",
    "QUANT_CONFIG_NAME",
    "HASH_BLOCK",
    "WEIGHTS_NAME",
    "INDEX_NAME",
    "BUFFER_PREFIX",
    "BUFFERS_NAME",
]
