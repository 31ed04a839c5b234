"""quantization-wrapper: one API over the weight-quantization libraries of PyTorch.

Example::

    from backend_manager import BackendManager
    from quantization_wrapper import get_recommended_config, create_quantization_adapter

    bm = BackendManager()
    config = get_recommended_config(bm.backend, model_size_b=7.0,
                                    available_memory_gb=bm.get_memory_info()["available_gb"])
    adapter = create_quantization_adapter(bm.backend, config)
    model = adapter.quantize_model(model)

Importing this package imports none of the optional quantization libraries; each adapter imports
its library when it is first used.
"""


from backend_manager import Backend, BackendManager

from .adapters import (
    ADAPTER_REGISTRY,
    FallbackAdapter,
    QuantizationAdapter,
    get_adapter_class,
    register_adapter,
    registered_methods,
)
from .compatibility import (
    COMPATIBILITY_MATRIX,
    FALLBACK_CHAINS,
    Support,
    get_support,
    is_supported,
    render_compatibility_markdown,
    supported_methods,
    usable_methods,
)
from .config import (
    METHOD_SPECS,
    QuantizationConfig,
    QuantizationMethod,
    get_config,
    list_configs,
    register_config,
    unregister_config,
)
from .factory import QuantizationFallbackWarning, create_quantization_adapter
from .filters import (
    CombinedFilter,
    ExcludeModuleByName,
    ExcludeSubmodules,
    FunctionFilter,
    IncludeModuleByName,
    QuantizeModuleFilter,
)
from .patterns import best_match, matches
from .recommend import MemoryWarning, bits_per_weight, estimate_footprint_gb, get_recommended_config
from .surgery import (
    LayerPlan,
    QuantizationError,
    QuantizationPlan,
    get_quantization_plan,
    replace_linear_with_quantized,
)
from .checkpoint import (
    CheckpointError,
    ChecksumError,
    load_and_quantize,
    load_quantized_model,
    read_checkpoint_info,
    save_quantized_model,
    verify_checkpoint,
)
from .training import prepare_model_for_training
from .validation import Severity, ValidationIssue, validate_quantization_config

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendManager",
    "QuantizationMethod",
    "QuantizationConfig",
    "METHOD_SPECS",
    "get_config",
    "list_configs",
    "register_config",
    "unregister_config",
    "QuantizationAdapter",
    "FallbackAdapter",
    "ADAPTER_REGISTRY",
    "register_adapter",
    "get_adapter_class",
    "registered_methods",
    "create_quantization_adapter",
    "QuantizationFallbackWarning",
    "validate_quantization_config",
    "ValidationIssue",
    "Severity",
    "COMPATIBILITY_MATRIX",
    "FALLBACK_CHAINS",
    "Support",
    "get_support",
    "is_supported",
    "supported_methods",
    "usable_methods",
    "render_compatibility_markdown",
    "get_recommended_config",
    "estimate_footprint_gb",
    "bits_per_weight",
    "MemoryWarning",
    "replace_linear_with_quantized",
    "QuantizationPlan",
    "LayerPlan",
    "QuantizationError",
    "get_quantization_plan",
    "QuantizeModuleFilter",
    "ExcludeModuleByName",
    "ExcludeSubmodules",
    "IncludeModuleByName",
    "FunctionFilter",
    "CombinedFilter",
    "matches",
    "best_match",
    "prepare_model_for_training",
    "save_quantized_model",
    "load_quantized_model",
    "load_and_quantize",
    "verify_checkpoint",
    "read_checkpoint_info",
    "CheckpointError",
    "ChecksumError",
]

# Mixed precision: size estimates, sensitivity-driven bit allocation, static presets.
from .sizing import SizeEstimate, checkpoint_parameter_count, estimate_model_size, layer_nbytes  # noqa: E402
from .mixed_precision import (  # noqa: E402
    CalibrationStats,
    InfeasibleBudgetError,
    MixedPrecisionPlan,
    SensitivityAnalyzer,
    collect_calibration_stats,
    default_candidates,
    plan_mixed_precision,
)
from .presets import (  # noqa: E402
    QuantRule,
    adaptive_preset,
    component_preset,
    rules_to_layer_configs,
)

__all__ += [
    "estimate_model_size",
    "SizeEstimate",
    "layer_nbytes",
    "checkpoint_parameter_count",
    "plan_mixed_precision",
    "MixedPrecisionPlan",
    "SensitivityAnalyzer",
    "CalibrationStats",
    "collect_calibration_stats",
    "default_candidates",
    "InfeasibleBudgetError",
    "component_preset",
    "adaptive_preset",
    "rules_to_layer_configs",
    "QuantRule",
]

# QLoRA and FSDP glue (peft and torch.distributed are imported only when used).
from .fsdp import FSDP_SUPPORT, apply_fsdp, fsdp_quantized_bytes, save_lora_adapter  # noqa: E402
from .peft_integration import install_peft_integration, load_lora_adapter, prepare_lora_config  # noqa: E402
from .training import merge_lora  # noqa: E402

__all__ += [
    "merge_lora",
    "prepare_lora_config",
    "install_peft_integration",
    "load_lora_adapter",
    "save_lora_adapter",
    "apply_fsdp",
    "fsdp_quantized_bytes",
    "FSDP_SUPPORT",
]

# The peers' native checkpoints (mlx-lm / MLX, hqq), also read by load_quantized_model.
from .adapters.hqq import load_hqq_checkpoint  # noqa: E402
from .adapters.mlx.checkpoint import load_mlx_checkpoint  # noqa: E402
from .adapters.mlx.interop import save_mlx_lm  # noqa: E402
from .checkpoint import detect_native_format, load_native_checkpoint  # noqa: E402

__all__ += [
    "detect_native_format",
    "load_native_checkpoint",
    "load_mlx_checkpoint",
    "save_mlx_lm",
    "load_hqq_checkpoint",
]

# from_pretrained finds quant_method "quantization_wrapper" whatever the import order (never imports transformers)
from .hf_quantizer import register_when_transformers_loads  # noqa: E402

register_when_transformers_loads()

# capabilities.quantization_methods asks the compatibility matrix (also through an entry point, for
# programs that import only backend_manager)
from backend_manager.capabilities import register_method_provider  # noqa: E402

from .compatibility import usable_methods as _usable_methods  # noqa: E402

register_method_provider(_usable_methods)
