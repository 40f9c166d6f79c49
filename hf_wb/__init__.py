"""hf_wb: weights and biases as first-class objects of fine-tuning with the Hugging Face Trainer.

The public names are imported on first use (PEP 562), so that ``import hf_wb`` and the ``hf-wb`` command start
without loading torch and transformers until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "DiagnosticsConfig": "hf_wb.callbacks",
    "WeightDiagnosticsCallback": "hf_wb.callbacks",
    "WeightHistogramCallback": "hf_wb.callbacks",
    "PreemptionCallback": "hf_wb.callbacks",
    "TrainingPreempted": "hf_wb.callbacks",
    "GradualUnfreezingCallback": "hf_wb.callbacks.unfreezing",
    "CONFIG_NAME": "hf_wb.config",
    "WBConfig": "hf_wb.config",
    "FreezePlan": "hf_wb.freezing",
    "freeze": "hf_wb.freezing",
    "is_eval_pinned": "hf_wb.freezing",
    "plan_freeze": "hf_wb.freezing",
    "unfreeze": "hf_wb.freezing",
    "apply_head_recipe": "hf_wb.heads",
    "find_output_layer": "hf_wb.heads",
    "init_bias_prior": "hf_wb.heads",
    "init_head": "hf_wb.heads",
    "labels_from_dataset": "hf_wb.heads",
    "reinit_top_layers": "hf_wb.heads",
    "set_head_dropout": "hf_wb.heads",
    "KFAC": "hf_wb.kfac",
    "LayerMap": "hf_wb.layers",
    "ParamInfo": "hf_wb.layers",
    "StackInfo": "hf_wb.layers",
    "layer_map": "hf_wb.layers",
    "build_param_groups": "hf_wb.param_groups",
    "lr_multipliers": "hf_wb.param_groups",
    "PrefixCache": "hf_wb.prefix_cache",
    "WBTrainer": "hf_wb.trainer",
}

if TYPE_CHECKING:  # pragma: no cover
    from hf_wb.callbacks import (
        DiagnosticsConfig,
        PreemptionCallback,
        TrainingPreempted,
        WeightDiagnosticsCallback,
        WeightHistogramCallback,
    )
    from hf_wb.callbacks.unfreezing import GradualUnfreezingCallback
    from hf_wb.config import CONFIG_NAME, WBConfig
    from hf_wb.freezing import FreezePlan, freeze, is_eval_pinned, plan_freeze, unfreeze
    from hf_wb.heads import (
        apply_head_recipe,
        find_output_layer,
        init_bias_prior,
        init_head,
        labels_from_dataset,
        reinit_top_layers,
        set_head_dropout,
    )
    from hf_wb.kfac import KFAC
    from hf_wb.layers import LayerMap, ParamInfo, StackInfo, layer_map
    from hf_wb.param_groups import build_param_groups, lr_multipliers
    from hf_wb.prefix_cache import PrefixCache
    from hf_wb.trainer import WBTrainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_wb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
    "PreemptionCallback",
    "TrainingPreempted",
    "PrefixCache",
    "KFAC",
]
