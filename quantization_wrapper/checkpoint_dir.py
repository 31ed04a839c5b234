"""Where a checkpoint lives on disk: the names this module always had, now defined in
:mod:`quantization_wrapper.checkpoint.files`."""

from .checkpoint.files import *  # noqa: F401,F403  (re-exports)
from .checkpoint.files import __all__  # noqa: F401
