"""Model + recipe -> optimizer parameter groups (pure: nothing here knows about the training loop).

Each group carries its own, already multiplied ``lr`` (Hugging Face schedulers scale every group's own rate, so a
``lr_scale`` key would be ignored by them), its ``weight_decay`` (0.0 for biases and norm weights, by the Trainer's
own rule), a readable ``name``, its ``lr_multiplier`` and ``param_names``. Frozen parameters are left out and no
group is empty.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import nn
from transformers import Trainer

from hf_wb.config import WBConfig
from hf_wb.engines import canonical_name, canonical_named_parameters
from hf_wb.layers import BLOCK, EMBEDDINGS, HEAD, LayerMap, layer_map, unit_name, unwrap_model

__all__ = ["build_param_groups", "lr_multipliers", "decay_parameter_names", "NO_DECAY_SUFFIX"]

NO_DECAY_SUFFIX = "/no_decay"


def lr_multipliers(lmap: LayerMap, config: WBConfig) -> dict[str, float]:
    """LR multiplier of every unit (``embeddings``, ``block_03``, ``head``, ``encoder/block_01``...).

    Top ``top_layers`` blocks of each stack: ``top_lr_multiplier``; a block ``d`` below the lowest top block:
    ``layer_lr_decay ** d``; embeddings: block 0's multiplier times ``layer_lr_decay``; head: ``head_multiplier``.
    """
    out: dict[str, float] = {}
    for label, stack in lmap.stacks.items():
        top_start = max(stack.num_blocks - config.top_layers, 0)
        block = {
            i: config.top_lr_multiplier if i >= top_start else config.layer_lr_decay ** (top_start - i)
            for i in range(stack.num_blocks)
        }
        out[unit_name(label, EMBEDDINGS, None)] = block[0] * config.layer_lr_decay
        for i, mult in block.items():
            out[unit_name(label, BLOCK, i)] = mult
        out[unit_name(label, HEAD, None)] = config.head_multiplier
    return out


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: the Trainer's own rule (no biases, no norm weights), plus any
    parameter of a module whose class name says it is a norm (custom RMSNorm / LayerNorm classes)."""
    names = set(Trainer.get_decay_parameter_names(None, model))  # the rule does not use the Trainer instance
    for module_name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            prefix = f"{module_name}." if module_name else ""
            names -= {f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False)}
    return names


def build_param_groups(
    model: nn.Module,
    config: WBConfig | None = None,
    lr: float = 5e-5,
    weight_decay: float = 0.0,
    lmap: LayerMap | None = None,
    decay_names: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer groups for ``model`` under ``config``, ready for any ``torch.optim`` optimizer.

    Args:
        model: the model (DDP / FSDP / DeepSpeed / compile / activation-checkpointing wrappers are seen through).
        config: the recipe; None = ``WBConfig()``.
        lr: the base learning rate (``TrainingArguments.learning_rate``).
        weight_decay: decoupled weight decay for every decayed parameter.
        lmap: a precomputed :func:`~hf_wb.layers.layer_map`.
        decay_names: parameters that get weight decay; default :func:`decay_parameter_names`.

    Returns:
        Groups in forward order (per stack: embeddings, blocks bottom to top, head), each split into a decayed
        group and a ``/no_decay`` one when both are non-empty.
    """
    config = config or WBConfig()
    model = unwrap_model(model)
    lmap = lmap or layer_map(model, config.layers_pattern)
    decay_names = {canonical_name(n) for n in (decay_parameter_names(model) if decay_names is None else decay_names)}
    multipliers = lr_multipliers(lmap, config)
    named = canonical_named_parameters(model)  # FSDP1 / compile / checkpointing wrappers insert name components

    buckets: dict[tuple[str, bool], list[str]] = {}
    for name in lmap.params:
        if not named[name].requires_grad:
            continue
        buckets.setdefault((lmap.unit(name), name in decay_names), []).append(name)

    groups = []
    for unit in lmap.units():
        for decayed in (True, False):
            names = buckets.get((unit, decayed))
            if not names:
                continue
            groups.append(
                {
                    "params": [named[n] for n in names],
                    "param_names": names,
                    "lr": lr * multipliers[unit],
                    "lr_multiplier": multipliers[unit],
                    "weight_decay": weight_decay if decayed else 0.0,
                    "name": unit if decayed else unit + NO_DECAY_SUFFIX,
                }
            )
    if not groups:
        raise ValueError(
            f"No trainable parameter is left in {type(model).__name__}: every parameter is frozen. Lower "
            "`freeze_layers` or set `freeze_embeddings=False`."
        )
    return groups
