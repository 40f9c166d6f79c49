"""Freezing the embeddings and the lower blocks, and pinning what is frozen to eval mode.

The Trainer calls ``model.train()`` at every step. A frozen block left in train mode still runs dropout: it costs
time and feeds noise to the blocks above, although nothing in it learns. :func:`freeze` therefore *pins* every module
that holds only frozen weights (and the parameter-free modules, such as dropout, that sit inside the frozen part) to
eval mode: the module's class is swapped for a subclass whose ``train()`` keeps it in eval mode, so that
``model.train()`` leaves it there. The behaviour lives in the class, not on the instance (no bound method or closure
is stored on a module), so a pinned model survives ``pickle``, ``copy.deepcopy`` and ``torch.save(model)`` and is
still pinned after the round trip; the subclass keeps the class's name, and ``isinstance`` checks still hold.

:func:`freeze` only ever freezes: a parameter that was already frozen (by the user, or by PEFT around its adapters)
stays frozen, and the state before the call is recorded in the :class:`FreezePlan` (also kept on the model), so
that :func:`unfreeze` restores exactly that state and gradual unfreezing releases only what the recipe froze.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

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
    "recorded_plan",
]

logger = logging.getLogger(__name__)

_PLAN_ATTR = "_hf_wb_freeze_plan"


@dataclass
class FreezePlan:
    """What a recipe freezes: frozen units (``embeddings``, ``block_02``...), per stack the number of frozen bottom
    blocks, and whether each stack's embeddings are frozen.

    :func:`freeze` also records what it changed: ``newly_frozen`` (the parameters it set to ``requires_grad=False``;
    only those are ever made trainable again) and ``pinned_before`` (modules already eval-pinned before it ran)."""

    frozen_units: list[str] = field(default_factory=list)
    frozen_blocks: dict[str, int] = field(default_factory=dict)
    frozen_embeddings: dict[str, bool] = field(default_factory=dict)
    newly_frozen: list[str] = field(default_factory=list)
    pinned_before: list[str] = field(default_factory=list)

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

    Only ever freezes: parameters frozen before the call (by the user, by PEFT) stay frozen, and none is made
    trainable. A model frozen earlier by :func:`freeze` is first restored (:func:`unfreeze`), so calling it twice
    with different recipes gives the second recipe. Returns the :class:`FreezePlan` applied, which records the state
    before the call; it is also kept on the model for :func:`unfreeze`.
    """
    model = unwrap_model(model)
    if getattr(model, _PLAN_ATTR, None) is not None:
        unfreeze(model)
    lmap = lmap or layer_map(model, config.layers_pattern)
    plan = plan_freeze(model, config, lmap)
    plan.pinned_before = [n for n, m in model.named_modules() if is_eval_pinned(m)]
    plan.newly_frozen = freeze_units(model, plan.frozen_units, lmap)
    object.__setattr__(model, _PLAN_ATTR, plan)
    _warn_tied_output(model, lmap, set(plan.frozen_units))
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


def recorded_plan(model: nn.Module) -> FreezePlan | None:
    """The :class:`FreezePlan` that the last :func:`freeze` applied to ``model`` (None if not frozen by hf_wb)."""
    return getattr(unwrap_model(model), _PLAN_ATTR, None)


def _warn_tied_output(model: nn.Module, lmap: LayerMap, frozen_units: set[str]) -> None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        output = getter() if getter is not None else None
    except (NotImplementedError, AttributeError, TypeError):
        output = None
    weight = getattr(output, "weight", None)
    if not isinstance(weight, nn.Parameter):
        return
    name = next((n for n, p in model.named_parameters() if p is weight), None)
    if name is not None and name in lmap.params and lmap.unit(name) in frozen_units:
        logger.warning(
            "The output layer of %s shares its weight with the input embeddings (`%s`), which this recipe freezes: "
            "the output layer will not train. Set `freeze_embeddings`=False to train it (at the embeddings' rate), "
            "or untie the weights (`tie_word_embeddings`=False) before fine-tuning.",
            type(model).__name__,
            name,
        )


def freeze_units(model: nn.Module, units: list[str] | set[str], lmap: LayerMap) -> list[str]:
    """Set ``requires_grad=False`` on the parameters of ``units`` and pin the fully frozen modules to eval.

    Returns the names of the parameters this call froze (those that were trainable).
    """
    model = unwrap_model(model)
    units = set(units)
    named = dict(model.named_parameters())
    frozen = []
    for name, info in lmap.params.items():
        if unit_name(info.stack, info.role, info.depth) in units and named[name].requires_grad:
            named[name].requires_grad_(False)
            frozen.append(name)
    plan = getattr(model, _PLAN_ATTR, None)
    for _, module in pinnable_modules(model, lmap, _frozen_units(plan, units)):
        pin_eval(module)
    return frozen


def _frozen_units(plan: FreezePlan | None, extra: set[str] | None = None) -> set[str] | None:
    if plan is None:
        return extra
    return set(plan.frozen_units) | (extra or set())


def unfreeze_units(model: nn.Module, units: list[str] | set[str], lmap: LayerMap) -> list[nn.Parameter]:
    """Make the parameters of ``units`` that :func:`freeze` froze trainable again and release their modules from
    eval-pinning. Parameters that were frozen before :func:`freeze` ran (by the user, by PEFT) stay frozen.

    Returns the parameters that were frozen and now train (for adding them to an optimizer).
    """
    model = unwrap_model(model)
    units = set(units)
    named = dict(model.named_parameters())
    plan = getattr(model, _PLAN_ATTR, None)
    releasable = set(plan.newly_frozen) if plan is not None else set(named)
    released = []
    for name, info in lmap.params.items():
        if (
            unit_name(info.stack, info.role, info.depth) in units
            and name in releasable
            and not named[name].requires_grad
        ):
            named[name].requires_grad_(True)
            released.append(named[name])
    if plan is not None:
        plan.frozen_units = [u for u in plan.frozen_units if u not in units]
    keep = pinnable_modules(model, lmap, _frozen_units(plan))
    keep_ids = {id(m) for _, m in keep}
    pinned_before = set(plan.pinned_before) if plan is not None else set()
    for name, module in model.named_modules():
        if is_eval_pinned(module) and id(module) not in keep_ids and name not in pinned_before:
            unpin_eval(module, mode=model.training)
    for _, module in keep:  # a pinned parent that now holds trainable blocks leaves its frozen children to pin
        pin_eval(module)
    return released


def unfreeze(model: nn.Module, plan: FreezePlan | None = None) -> None:
    """Undo :func:`freeze`: the parameters it froze train again and the modules it pinned leave eval-pinning.

    Args:
        model: the model :func:`freeze` was applied to.
        plan: the :class:`FreezePlan` that :func:`freeze` returned; default: the one it recorded on the model.
            Without either (a model hf_wb never froze), every parameter is made trainable and every module unpinned.
    """
    model = unwrap_model(model)
    plan = plan if plan is not None else getattr(model, _PLAN_ATTR, None)
    if plan is None:
        for p in model.parameters():
            p.requires_grad_(True)
        pinned_before: set[str] = set()
    else:
        named = dict(model.named_parameters())
        for name in plan.newly_frozen:
            if name in named:
                named[name].requires_grad_(True)
        pinned_before = set(plan.pinned_before)
    for name, module in model.named_modules():
        if is_eval_pinned(module) and name not in pinned_before:
            unpin_eval(module, mode=model.training)
    model.__dict__.pop(_PLAN_ATTR, None)


def pinnable_modules(
    model: nn.Module, lmap: LayerMap, frozen_units: set[str] | None = None
) -> list[tuple[str, nn.Module]]:
    """The outermost modules whose parameters are all frozen and that sit wholly inside frozen units.

    ``frozen_units`` are the units the recipe froze (default: every unit whose parameters are all frozen). A module
    the user or PEFT froze outside them is not pinned: pinning follows the recipe. Parameter-free modules (dropout)
    count by their position: one registered inside the frozen part of a stack (GPT-2's ``drop`` after the frozen
    embeddings) is pinned with it.
    """
    model = unwrap_model(model)
    trainable_units = {lmap.unit(n) for n, p in model.named_parameters() if p.requires_grad and n in lmap.params}
    if frozen_units is None:
        frozen_units = {lmap.unit(n) for n, p in model.named_parameters() if not p.requires_grad and n in lmap.params}
    frozen_units = set(frozen_units) - trainable_units

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


class _EvalPinned:
    """Mixin of the pinned classes: ``train()`` keeps the module (and its children) in eval mode.

    ``pin_eval`` swaps a module's class for ``_EvalPinned + its class`` (one subclass per class, cached, with the same
    name); pickling rebuilds it through :func:`_new_pinned`, so the copy is pinned too.
    """

    _hf_wb_base: type[nn.Module]

    def train(self, mode: bool = True) -> Any:
        return super().train(False)  # type: ignore[misc]

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _new_pinned, (type(self)._hf_wb_base,), self.__getstate__()


_PINNED_CLASSES: dict[type, type] = {}


def _pinned_class(cls: type) -> type:
    if cls not in _PINNED_CLASSES:
        _PINNED_CLASSES[cls] = type(
            cls.__name__,
            (_EvalPinned, cls),
            {"_hf_wb_base": cls, "__module__": cls.__module__, "__qualname__": cls.__qualname__},
        )
    return _PINNED_CLASSES[cls]


def _new_pinned(cls: type) -> nn.Module:
    """Unpickling: an empty instance of the pinned subclass of ``cls`` (its state is set by ``__setstate__``)."""
    pinned = _pinned_class(cls)
    return pinned.__new__(pinned)


def pin_eval(module: nn.Module) -> None:
    """Keep ``module`` (and its children) in eval mode, whatever ``train()`` its parents call."""
    if not is_eval_pinned(module):
        module.__class__ = _pinned_class(type(module))
    nn.Module.train(module, False)


def unpin_eval(module: nn.Module, mode: bool = True) -> None:
    """Undo :func:`pin_eval` and put ``module`` in ``mode``."""
    if is_eval_pinned(module):
        module.__class__ = type(module)._hf_wb_base
    module.train(mode)


def is_eval_pinned(module: nn.Module) -> bool:
    return isinstance(module, _EvalPinned)
