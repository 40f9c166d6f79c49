"""`GradualUnfreezingCallback`: move the frozen boundary down on a schedule (ULMFiT's gradual unfreezing).

One object owns gradual unfreezing, in the shape of Lightning's ``BaseFinetuning``: the freeze plan and the stage
reached, the schedule (which units each stage releases), how released units join the optimizer (their own groups,
at the rate the recipe gives their depth under the schedule's current factor, with a fresh optimizer state) and the
LR scheduler, the gradient averaging that DDP cannot do for them, and the state a checkpoint keeps
(:meth:`~GradualUnfreezingCallback.state_dict` / :meth:`~GradualUnfreezingCallback.load_state_dict`).

It takes the optimizer and the LR scheduler from the callback arguments, so it works with a plain
``transformers.Trainer`` (pass it in ``callbacks=[...]``: it freezes the model in ``on_init_end``, before the Trainer
builds its optimizer), and ``WBTrainer`` adds it when ``WBConfig.unfreeze_every`` or ``unfreeze_every_steps`` is set.

Schedulers it can drive: every ``LambdaLR`` (all transformers schedules but two) and ``ReduceLROnPlateau``
(``lr_scheduler_type="reduce_lr_on_plateau"``). Anything else (``GreedyLR``, ``SequentialLR``, ``StepLR``...) is
refused before training starts (at ``WBTrainer`` construction), never at the first stage.

Resume: the stage must be back before the optimizer is rebuilt, so that the groups come in the order the checkpoint
stored them. ``WBTrainer`` does that (it saves :meth:`state_dict` in ``hf_wb_state.json`` and calls
:meth:`load_state_dict` at the start of ``train(resume_from_checkpoint=...)``). A plain ``Trainer`` rebuilds its
optimizer as two groups before any callback runs, so it cannot resume a run that has already unfrozen a stage: torch
refuses the checkpoint's optimizer state (different number of parameter groups). Use ``WBTrainer`` to resume.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_wb.config import WBConfig
from hf_wb.freezing import FreezePlan, freeze, unfreeze_units
from hf_wb.layers import BLOCK, EMBEDDINGS, LayerMap, layer_map, unit_name, unwrap_model
from hf_wb.param_groups import NO_DECAY_SUFFIX, build_param_groups, decay_parameter_names

__all__ = ["GradualUnfreezingCallback", "unfreeze_schedule", "check_scheduler", "sync_gradients_across_ranks"]

logger = logging.getLogger(__name__)

DRIVABLE_SCHEDULERS = (LambdaLR, ReduceLROnPlateau)


def unfreeze_schedule(plan: FreezePlan) -> list[list[str]]:
    """The unfreezing stages of ``plan``: each lists, per stack, its highest still-frozen block (then, one stage
    after its lowest block, its embeddings)."""
    stages = []
    for j in range(1, max((k + 1 for k in plan.frozen_blocks.values()), default=0) + 1):
        stage = []
        for label, k in plan.frozen_blocks.items():
            if k - j >= 0:
                stage.append(unit_name(label, BLOCK, k - j))
            elif j == k + 1 and plan.frozen_embeddings.get(label):
                stage.append(unit_name(label, EMBEDDINGS, None))
        if stage:
            stages.append(stage)
    return stages


def _inner(obj: Any, attr: str) -> Any:
    """The torch object behind accelerate's wrappers (``AcceleratedOptimizer.optimizer``,
    ``AcceleratedScheduler.scheduler``)."""
    return getattr(obj, attr, obj) if obj is not None else None


def check_scheduler(scheduler: Any) -> None:
    """Raise ``TypeError`` unless gradual unfreezing can give new groups their rate under ``scheduler``."""
    scheduler = _inner(scheduler, "scheduler")
    if scheduler is None or isinstance(scheduler, DRIVABLE_SCHEDULERS):
        return
    raise TypeError(
        f"Gradual unfreezing cannot drive the LR scheduler {type(scheduler).__name__}: newly unfrozen blocks join "
        "the optimizer as new parameter groups, and it can give them their rate only under a LambdaLR (every "
        "transformers schedule except 'greedy') or ReduceLROnPlateau ('reduce_lr_on_plateau'). Use one of those "
        "(`lr_scheduler_type` 'linear', 'cosine', 'constant', 'reduce_lr_on_plateau'...) or set `unfreeze_every` and "
        "`unfreeze_every_steps` to 0."
    )


def check_scheduler_args(args: TrainingArguments) -> None:
    """Build the scheduler ``args`` asks for on a throw-away optimizer and :func:`check_scheduler` it, so that an
    undrivable schedule is refused before training starts."""
    from transformers.optimization import get_scheduler

    probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    kwargs = dict(getattr(args, "lr_scheduler_kwargs", None) or {})
    try:
        scheduler = get_scheduler(
            args.lr_scheduler_type, probe, num_warmup_steps=1, num_training_steps=10, scheduler_specific_kwargs=kwargs
        )
    except (ValueError, TypeError, KeyError) as exc:  # the Trainer reports a bad schedule itself when it builds it
        logger.debug("hf_wb: could not probe lr_scheduler_type=%r: %s", args.lr_scheduler_type, exc)
        return
    check_scheduler(scheduler)


def sync_gradients_across_ranks(params: list[nn.Parameter]) -> None:
    """Parameters unfrozen after DDP wrapped the model are unknown to its reducer: average their gradients across
    ranks ourselves, as soon as each is accumulated (before clipping, like DDP's own)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    world = dist.get_world_size()

    def average(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)

    for p in params:
        p.register_post_accumulate_grad_hook(average)


class GradualUnfreezingCallback(TrainerCallback):
    """Every ``every_epochs`` epochs (or ``every_steps`` optimizer steps) unfreeze one more stage: the highest
    still-frozen block of each stack, then the embeddings.

    The stage is a pure function of the training position (``epoch // every_epochs`` or ``global_step //
    every_steps``), so a resumed run reaches the same stage at the same point.

    Args:
        config: the recipe (what is frozen, the LR multipliers of each depth); None = ``WBConfig()``.
        every_epochs: epoch interval; None = ``config.unfreeze_every``; 0 = not on epochs.
        every_steps: optimizer-step interval; None = ``config.unfreeze_every_steps``; 0 = not on steps.

    Attributes:
        stage: number of stages unfrozen so far.
        unfrozen_units: the units unfrozen so far, in order.
        plan: the :class:`~hf_wb.freezing.FreezePlan` (its ``frozen_units`` shrink as stages are released).
        lmap: the run's layer map.
        stage_listeners: functions called with the units of each stage once they train (``WBTrainer`` rebuilds its
            frozen-prefix cache there).
    """

    def __init__(
        self, config: WBConfig | None = None, every_epochs: int | None = None, every_steps: int | None = None
    ) -> None:
        if config is not None and not isinstance(config, WBConfig):
            raise TypeError(f"`config` must be a WBConfig, got {type(config).__name__}.")
        self.config = config if config is not None else WBConfig()
        every_epochs = self.config.unfreeze_every if every_epochs is None else every_epochs
        every_steps = self.config.unfreeze_every_steps if every_steps is None else every_steps
        if every_epochs < 0 or every_steps < 0 or bool(every_epochs) == bool(every_steps):
            raise ValueError(
                f"Set exactly one of `every_epochs` ({every_epochs}) and `every_steps` ({every_steps}) to a positive "
                "interval (WBConfig's `unfreeze_every` / `unfreeze_every_steps`)."
            )
        self.every_epochs = every_epochs
        self.every_steps = every_steps
        self.stage = 0
        self.unfrozen_units: list[str] = []
        self.plan: FreezePlan | None = None
        self.lmap: LayerMap | None = None
        self.stage_listeners: list[Callable[[list[str]], None]] = []
        self._model: nn.Module | None = None
        self._decay_names: set[str] | None = None
        self._optimizer: Any = None
        self._scheduler: Any = None
        self._base_lr: float | None = None
        self._weight_decay = 0.0

    # ----- set-up -------------------------------------------------------------------------------------------------
    def setup(
        self,
        model: nn.Module,
        lmap: LayerMap | None = None,
        plan: FreezePlan | None = None,
        decay_names: Collection[str] | None = None,
    ) -> None:
        """Take charge of ``model``: with ``plan`` (the recipe already froze it, as ``WBTrainer`` does) adopt it,
        otherwise freeze ``model`` by the recipe now. Resets the stage to 0."""
        model = unwrap_model(model)
        self.lmap = lmap if lmap is not None else layer_map(model, self.config.layers_pattern)
        self.plan = plan if plan is not None else freeze(model, self.config, self.lmap)
        self._model = model
        self._decay_names = set(decay_names) if decay_names is not None else None
        self.stage, self.unfrozen_units = 0, []

    def schedule(self) -> list[list[str]]:
        """The stages, each the list of units it releases (empty before :meth:`setup`)."""
        return unfreeze_schedule(self.plan) if self.plan is not None else []

    # ----- the transition ---------------------------------------------------------------------------------------
    def unfreeze_to(self, stage: int) -> None:
        """Unfreeze up to ``stage`` (idempotent): the units become trainable, leave eval-pinning and, during training,
        join the optimizer with the rate the recipe gives their depth and a fresh state."""
        if self.plan is None:
            raise RuntimeError("GradualUnfreezingCallback.setup(model) must run before unfreezing.")
        schedule = self.schedule()
        stage = min(stage, len(schedule))
        while self.stage < stage:
            units = schedule[self.stage]
            released = unfreeze_units(self._model, units, self.lmap)
            self.stage += 1
            self.unfrozen_units.extend(units)
            self.plan.frozen_units = [u for u in self.plan.frozen_units if u not in units]
            logger.info("hf_wb gradual unfreezing, stage %d: %s now train", self.stage, ", ".join(units))
            if self._optimizer is not None:
                self._add_groups(units)
                sync_gradients_across_ranks(released)
            for listener in self.stage_listeners:
                listener(units)

    def _add_groups(self, units: list[str]) -> None:
        model = self._model
        decay = self._decay_names if self._decay_names is not None else decay_parameter_names(model)
        groups = build_param_groups(model, self.config, self._base_lr, self._weight_decay, self.lmap, decay)
        new = [g for g in groups if g["name"].removesuffix(NO_DECAY_SUFFIX) in units]
        optimizer = _inner(self._optimizer, "optimizer")
        scheduler = _inner(self._scheduler, "scheduler")
        factor = self._schedule_factor(optimizer, scheduler)
        named = all("param_names" in g for g in optimizer.param_groups)  # torch wants all groups named, or none
        for group in new:
            if not named:
                group.pop("param_names", None)
            recipe_lr = group["lr"]
            group["initial_lr"] = recipe_lr
            group["lr"] = recipe_lr * factor
            if isinstance(scheduler, ReduceLROnPlateau):
                floor = scheduler.default_min_lr if scheduler.default_min_lr is not None else min(scheduler.min_lrs)
                group["lr"] = max(group["lr"], floor)
                scheduler.min_lrs.append(floor)
            elif isinstance(scheduler, LambdaLR):
                scheduler.base_lrs.append(recipe_lr)
                scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
            optimizer.add_param_group(group)
            if scheduler is not None:
                scheduler._last_lr.append(group["lr"])

    def _schedule_factor(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> float:
        """The factor the scheduler applies now to every group's recipe rate."""
        check_scheduler(scheduler)
        if scheduler is None:
            return 1.0
        if isinstance(scheduler, LambdaLR):
            return float(scheduler.lr_lambdas[0](scheduler.last_epoch))
        # ReduceLROnPlateau: factor ** reductions so far, read off the groups (the least clamped by `min_lr`)
        ratios = []
        for group in optimizer.param_groups:
            recipe = group.get("initial_lr") or self._base_lr * group.get("lr_multiplier", 1.0)
            if recipe:
                ratios.append(group["lr"] / recipe)
        return max(ratios, default=1.0)

    def order_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``groups`` as a resumed run must build them: the groups of units unfrozen during training last, in
        unfreeze order (the order the checkpoint's optimizer state has them)."""
        order = {u: i for i, u in enumerate(self.unfrozen_units)}
        return sorted(groups, key=lambda g: order.get(str(g.get("name", "")).removesuffix(NO_DECAY_SUFFIX), -1))

    # ----- checkpoint state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the stage and the units unfrozen so far."""
        return {"unfreeze_stage": self.stage, "unfrozen_units": list(self.unfrozen_units)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Return to the checkpoint's stage (before the optimizer is rebuilt) and check it released the same units."""
        self.unfreeze_to(int(state.get("unfreeze_stage", 0)))
        saved = state.get("unfrozen_units")
        if saved is not None and list(saved) != self.unfrozen_units:
            raise ValueError(
                f"The checkpoint's gradual unfreezing released {list(saved)} but this run's schedule releases "
                f"{self.unfrozen_units} by stage {self.stage}: the model or the recipe differs from the one that "
                "wrote the checkpoint."
            )

    # ----- callback events --------------------------------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # a plain Trainer: freeze now, before it builds its optimizer inside train()
        model = kwargs.get("model")
        if self.plan is None and model is not None:
            self.setup(model)
        check_scheduler(kwargs.get("lr_scheduler"))
        check_scheduler_args(args)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.plan is None:
            raise RuntimeError(
                "GradualUnfreezingCallback was added after the Trainer was built, so it could not freeze the model "
                "before the optimizer was: pass it in `Trainer(callbacks=[...])`, or call its `setup(model)` first."
            )
        check_scheduler(kwargs.get("lr_scheduler"))
        self._optimizer = kwargs.get("optimizer")
        self._scheduler = kwargs.get("lr_scheduler")
        self._base_lr = args.learning_rate
        self._weight_decay = args.weight_decay

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.every_epochs:
            self._follow(kwargs)
            self.unfreeze_to(int((state.epoch or 0.0) + 1e-6) // self.every_epochs)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.every_steps:
            self._follow(kwargs)
            self.unfreeze_to(state.global_step // self.every_steps)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._optimizer = self._scheduler = None

    def _follow(self, kwargs: dict[str, Any]) -> None:
        """The optimizer and scheduler the Trainer passes now (they are rebuilt between ``train()`` calls)."""
        if kwargs.get("optimizer") is not None:
            self._optimizer = kwargs["optimizer"]
        if kwargs.get("lr_scheduler") is not None:
            self._scheduler = kwargs["lr_scheduler"]
