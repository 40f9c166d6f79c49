"""hf_wb: weights and biases as first-class objects of fine-tuning with the Hugging Face Trainer."""

__version__ = "0.1.0"

from hf_wb.callbacks import (  # noqa: E402
    DiagnosticsConfig,
    PreemptionCallback,
    TrainingPreempted,
    WeightDiagnosticsCallback,
    WeightHistogramCallback,
)
from hf_wb.callbacks.unfreezing import GradualUnfreezingCallback  # noqa: E402
from hf_wb.config import CONFIG_NAME, WBConfig  # noqa: E402
from hf_wb.freezing import FreezePlan, freeze, is_eval_pinned, plan_freeze, unfreeze  # noqa: E402
from hf_wb.heads import (  # noqa: E402
    apply_head_recipe,
    find_output_layer,
    init_bias_prior,
    init_head,
    labels_from_dataset,
    reinit_top_layers,
    set_head_dropout,
)
from hf_wb.kfac import KFAC  # noqa: E402
from hf_wb.layers import LayerMap, ParamInfo, StackInfo, layer_map  # noqa: E402
from hf_wb.param_groups import build_param_groups, lr_multipliers  # noqa: E402
from hf_wb.prefix_cache import PrefixCache  # noqa: E402
from hf_wb.trainer import WBTrainer  # noqa: E402

__all__ = [
    "__version__",
    "CONFIG_NAME",
    "WBConfig",
    "WBTrainer",
    "LayerMap",
    "ParamInfo",
    "StackInfo",
    "layer_map",
    "build_param_groups",
    "lr_multipliers",
    "FreezePlan",
    "freeze",
    "unfreeze",
    "plan_freeze",
    "is_eval_pinned",
    "apply_head_recipe",
    "find_output_layer",
    "init_bias_prior",
    "init_head",
    "labels_from_dataset",
    "reinit_top_layers",
    "set_head_dropout",
    "WeightHistogramCallback",
    "WeightDiagnosticsCallback",
    "DiagnosticsConfig",
    "GradualUnfreezingCallback",
    "PreemptionCallback",
    "TrainingPreempted",
    "PrefixCache",
    "KFAC",
]
