"""Freezing the embeddings and the lower blocks, and pinning what is frozen to eval mode.

The Trainer calls ``model.train()`` at every step. A frozen block left in train mode still runs dropout: it costs
time and feeds noise to the blocks above, although nothing in it learns. :func:`freeze` therefore *pins* every module
that holds only frozen weights (and the parameter-free modules, such as dropout, that sit inside the frozen part) to
eval mode: their ``train()`` is replaced on the instance so that ``model.train()`` leaves them in eval mode.
:func:`unfreeze` undoes both.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field

from torch import nn

from hf_wb.config import WBConfig
from hf_wb.layers import BLOCK, EMBEDDINGS, LayerMap, layer_map, unit_name, unwrap_model

__all__ = [
    "FreezePlan",
    "plan_freeze",
    "freeze",
    "unfreeze",
    "freeze_units",
    "unfreeze_units",
    "pin_eval",
    "unpin_eval",
    "is_eval_pinned",
    "pinnable_modules",
]

logger = logging.getLogger(__name__)

_PINNED = "_hf_wb_eval_pinned"


@dataclass
class FreezePlan:
    """What a recipe freezes: frozen units (``embeddings``, ``block_02``...), per stack the number of frozen bottom
    blocks, and whether each stack's embeddings are frozen."""

    frozen_units: list[str] = field(default_factory=list)
    frozen_blocks: dict[str, int] = field(default_factory=dict)
    frozen_embeddings: dict[str, bool] = field(default_factory=dict)

    @property
    def any_frozen(self) -> bool:
        return bool(self.frozen_units)


def plan_freeze(model: nn.Module, config: WBConfig, lmap: LayerMap | None = None) -> FreezePlan:
    """Which units ``config`` freezes in ``model``; checks the recipe against the model's depth."""
    lmap = lmap or layer_map(model, config.layers_pattern)
    plan = FreezePlan()
    for label, stack in lmap.stacks.items():
        n = stack.num_blocks
        k = config.num_frozen_blocks(n)
        if k > n:
            raise ValueError(
                f"`freeze_layers`={config.freeze_layers} but the stack {stack.module_name!r} has only {n} blocks. "
                f"Use at most {n}, or -1 for every block below the top `top_layers`."
            )
        if config.freeze_layers != -1 and k > max(n - config.top_layers, 0):
            raise ValueError(
                f"`freeze_layers`={k} would freeze blocks that `top_layers`={config.top_layers} puts at the top of "
                f"{stack.module_name!r} ({n} blocks). Use `freeze_layers` <= {max(n - config.top_layers, 0)} or -1."
            )
        embeddings = config.embeddings_frozen(k > 0) and bool(lmap.params_of(label, EMBEDDINGS))
        plan.frozen_blocks[label] = k
        plan.frozen_embeddings[label] = embeddings
        if embeddings:
            plan.frozen_units.append(unit_name(label, EMBEDDINGS, None))
        plan.frozen_units.extend(unit_name(label, BLOCK, i) for i in range(k))
    frozen = set(plan.frozen_units)
    if all(lmap.unit(name) in frozen for name in lmap.params):
        raise ValueError(
            f"This recipe freezes every parameter of {type(model).__name__}: nothing would train. Lower "
            "`freeze_layers` or set `freeze_embeddings=False`."
        )
    return plan


def freeze(model: nn.Module, config: WBConfig, lmap: LayerMap | None = None) -> FreezePlan:
    """Freeze what ``config`` says (embeddings, bottom blocks of each stack) and pin it to eval mode.

    Everything else is made trainable, so calling it twice with different recipes gives the second recipe.
    Returns the :class:`FreezePlan` applied.
    """
    model = unwrap_model(model)
    lmap = lmap or layer_map(model, config.layers_pattern)
    plan = plan_freeze(model, config, lmap)
    unfreeze(model)
    freeze_units(model, plan.frozen_units, lmap)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    logger.info(
        "hf_wb froze %s (%d of %d parameters, %.1f%%)",
        ", ".join(plan.frozen_units) or "nothing",
        n_frozen,
        n_total,
        100 * n_frozen / max(n_total, 1),
    )
    return plan


def freeze_units(model: nn.Module, units: list[str] | set[str], lmap: LayerMap) -> None:
    """Set ``requires_grad=False`` on the parameters of ``units`` and pin the fully frozen modules to eval."""
    model = unwrap_model(model)
    units = set(units)
    named = dict(model.named_parameters())
    for name, info in lmap.params.items():
        if unit_name(info.stack, info.role, info.depth) in units:
            named[name].requires_grad_(False)
    for _, module in pinnable_modules(model, lmap):
        pin_eval(module)


def unfreeze_units(model: nn.Module, units: list[str] | set[str], lmap: LayerMap) -> list[nn.Parameter]:
    """Make the parameters of ``units`` trainable again and release their modules from eval-pinning.

    Returns the parameters that were frozen and now train (for adding them to an optimizer).
    """
    model = unwrap_model(model)
    units = set(units)
    named = dict(model.named_parameters())
    released = []
    for name, info in lmap.params.items():
        if unit_name(info.stack, info.role, info.depth) in units and not named[name].requires_grad:
            named[name].requires_grad_(True)
            released.append(named[name])
    keep = pinnable_modules(model, lmap)
    keep_ids = {id(m) for _, m in keep}
    for module in model.modules():
        if is_eval_pinned(module) and id(module) not in keep_ids:
            unpin_eval(module, mode=model.training)
    for _, module in keep:  # a pinned parent that now holds trainable blocks leaves its frozen children to pin
        pin_eval(module)
    return released


def unfreeze(model: nn.Module) -> None:
    """Make every parameter trainable and release every eval-pinned module (the inverse of :func:`freeze`)."""
    model = unwrap_model(model)
    for p in model.parameters():
        p.requires_grad_(True)
    for module in model.modules():
        if is_eval_pinned(module):
            unpin_eval(module, mode=model.training)


def pinnable_modules(model: nn.Module, lmap: LayerMap) -> list[tuple[str, nn.Module]]:
    """The outermost modules whose parameters are all frozen and that sit wholly inside frozen units.

    Parameter-free modules (dropout) count by their position: one registered inside the frozen part of a stack
    (GPT-2's ``drop`` after the frozen embeddings) is pinned with it.
    """
    model = unwrap_model(model)
    frozen_units = {lmap.unit(n) for n, p in model.named_parameters() if not p.requires_grad and n in lmap.params}
    trainable_units = {lmap.unit(n) for n, p in model.named_parameters() if p.requires_grad and n in lmap.params}
    frozen_units -= trainable_units

    def all_frozen(prefix: str, module: nn.Module) -> bool:
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                return False
        children = list(module.named_children())
        if not children:
            unit = lmap.module_units.get(prefix)
            if unit is None or unit_name(*unit) not in frozen_units:
                return False
        return all(all_frozen(f"{prefix}.{n}" if prefix else n, c) for n, c in children)

    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if all_frozen(full, child):
                found.append((full, child))
            else:
                visit(full, child)

    visit("", model)
    return found


def _pinned_train(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def pin_eval(module: nn.Module) -> None:
    """Keep ``module`` (and its children) in eval mode, whatever ``train()`` its parents call."""
    if not is_eval_pinned(module):
        object.__setattr__(module, "train", types.MethodType(_pinned_train, module))
        object.__setattr__(module, _PINNED, True)
    nn.Module.train(module, False)


def unpin_eval(module: nn.Module, mode: bool = True) -> None:
    """Undo :func:`pin_eval` and put ``module`` in ``mode``."""
    if is_eval_pinned(module):
        module.__dict__.pop("train", None)
        module.__dict__.pop(_PINNED, None)
    module.train(mode)


def is_eval_pinned(module: nn.Module) -> bool:
    return bool(module.__dict__.get(_PINNED, False))
