"""Checkpoints: save and load quantized models, stream a transformers checkpoint into a quantized
model, and read the peers' own formats.

Modules, by job (the first four are low level: they import nothing above the registry):

* ``files``: which files in a directory are ours, staging, the atomic exchange commit, recovery
  after an interrupted save, reads confined to the checkpoint directory.
* ``safetensors_io``: the memory-mapped safetensors reader, a transformers checkpoint's weight
  files, the streaming writer (byte for byte ``safetensors.torch.save_file``), ``parse_size``.
* ``checksums``: sha256 per file, CRC-32 per block and per tensor; ``verify_checkpoint``.
* ``description``: ``quantization_config.json`` (schema check, format constants), and the config and
  adapter of each planned layer.
* ``skeleton``: the one meta-device skeleton builder, and the check of a loaded tensor against it.
* ``save``: ``save_quantized_model``.
* ``load``: ``load_quantized_model``.
* ``streaming``: ``load_and_quantize`` (the streaming pipeline, its worker pool and allocator policy).
* ``native``: which native reader a path belongs to (the readers are the backends',
  ``QuantizationAdapter.native_readers``) and the steps they share.
* ``interop``: the ``config.json`` and extra files the peers' loaders read (the entries are the
  backends', ``QuantizationAdapter.peer_config_entries``).

Nothing here imports an adapter module: adapters are found through :mod:`quantization_wrapper.registry`.
"""

from ..errors import CheckpointError, ChecksumError
from .checksums import verify_checkpoint
from .description import FORMAT_VERSION, QUANT_CONFIG_NAME, read_checkpoint_info
from .files import recover
from .load import load_quantized_model
from .native import detect_native_format, load_native_checkpoint
from .safetensors_io import CheckpointFiles, SafetensorsReader, parse_size
from .save import save_quantized_model
from .skeleton import build_empty_model, build_skeleton, model_from_config
from .streaming import load_and_quantize

__all__ = [
    "save_quantized_model",
    "load_quantized_model",
    "load_and_quantize",
    "verify_checkpoint",
    "read_checkpoint_info",
    "parse_size",
    "recover",
    "detect_native_format",
    "load_native_checkpoint",
    "SafetensorsReader",
    "CheckpointFiles",
    "model_from_config",
    "build_skeleton",
    "build_empty_model",
    "CheckpointError",
    "ChecksumError",
    "FORMAT_VERSION",
    "QUANT_CONFIG_NAME",
]
