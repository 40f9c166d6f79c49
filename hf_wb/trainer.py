"""`WBTrainer`: a thin `transformers.Trainer` subclass that applies an hf_wb recipe.

What it adds to the Trainer, and where:

- ``__init__`` / ``call_model_init``: freezes the embeddings and lower blocks and pins them to eval mode, before the
  optimizer exists (the Trainer builds it inside ``train()``);
- ``create_optimizer``: the recipe's param groups (:func:`hf_wb.build_param_groups`) with the optimizer class the
  Trainer's own ``get_optimizer_cls_and_kwargs`` picks for ``--optim`` (or LAMB);
- ``log``: the current LR of every group as ``lr/<group>``, and ``learning_rate`` as the base (x1) rate;
- ``_save_checkpoint`` / ``train(resume_from_checkpoint=...)`` / ``_load_optimizer_and_scheduler``: the recipe and
  the group layout are saved in every checkpoint and checked on resume, since optimizer state is loaded by group
  position: a changed recipe stops with an error that names what changed.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from hf_wb.config import CONFIG_NAME, WBConfig
from hf_wb.freezing import FreezePlan, freeze
from hf_wb.layers import LayerMap, layer_map, unwrap_model
from hf_wb.param_groups import NO_DECAY_SUFFIX, build_param_groups, decay_parameter_names

__all__ = ["WBTrainer", "STATE_NAME"]

logger = logging.getLogger(__name__)

STATE_NAME = "hf_wb_state.json"


class WBTrainer(Trainer):
    """`transformers.Trainer` with the hf_wb recipe: layer-wise LRs, frozen eval-pinned lower blocks, no weight decay
    on biases and norms, per-group LR logging and resume-safe checkpoints.

    Args:
        *args, **kwargs: everything `transformers.Trainer` takes.
        wb_config: the recipe; None = `WBConfig()` (top 3 blocks at 5x, everything below frozen).
    """

    def __init__(self, *args: Any, wb_config: WBConfig | None = None, **kwargs: Any) -> None:
        if wb_config is not None and not isinstance(wb_config, WBConfig):
            raise TypeError(f"`wb_config` must be a WBConfig, got {type(wb_config).__name__}.")
        self.wb_config = wb_config if wb_config is not None else WBConfig()
        self.wb_layer_map: LayerMap | None = None
        self.wb_freeze_plan: FreezePlan | None = None
        super().__init__(*args, **kwargs)
        if self.model is not None and self.model_init is None:
            self._apply_recipe(self.model)
        if self.model is not None and self.model_accepts_loss_kwargs and not loss_uses_num_items(self.model):
            # The Trainer takes any `**kwargs` in forward() as "the loss is normalised by num_items_in_batch" and
            # then multiplies the loss by the number of processes (and skips the division by the accumulation
            # steps). Classification heads compute a plain mean and ignore it: under DDP the loss and its
            # gradients would be doubled, with accumulation too large by the accumulation factor.
            self.model_accepts_loss_kwargs = False

    # ----- set-up before the optimizer exists ---------------------------------------------------------------------
    def _apply_recipe(self, model: nn.Module) -> None:
        model = unwrap_model(model)
        self.wb_layer_map = layer_map(model, self.wb_config.layers_pattern)
        self.wb_freeze_plan = freeze(model, self.wb_config, self.wb_layer_map)

    def call_model_init(self, trial: Any = None) -> nn.Module:
        model = super().call_model_init(trial)
        self._apply_recipe(model)
        return model

    # ----- optimizer ------------------------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        elif self.wb_config.optimizer == "lamb":
            optimizer_cls, optimizer_kwargs = _lamb(self.args)
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)
        if any(k in optimizer_kwargs for k in ("params", "model", "optimizer_dict")) or _is_factory(optimizer_cls):
            logger.warning(
                "optim=%s builds its own parameter groups; hf_wb's layer-wise rates cannot be applied (freezing "
                "still is). Use an element-wise optimizer such as adamw_torch for the full recipe.",
                self.args.optim,
            )
            return super().create_optimizer(model)

        unwrapped = unwrap_model(opt_model)
        lmap = self.wb_layer_map or layer_map(unwrapped, self.wb_config.layers_pattern)
        decay = set(self.get_decay_parameter_names(unwrapped)) & decay_parameter_names(unwrapped)
        groups = build_param_groups(
            unwrapped, self.wb_config, self.args.learning_rate, self.args.weight_decay, lmap=lmap, decay_names=decay
        )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        if "bitsandbytes" in str(optimizer_cls) and optimizer_kwargs.get("optim_bits", None) == 8:
            import bitsandbytes

            manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
            for module in unwrapped.modules():
                if isinstance(module, nn.Embedding):
                    manager.register_module_override(module, "weight", {"optim_bits": 32})
        logger.info("hf_wb param groups:\n%s", "\n".join(_describe(g) for g in groups))
        return self.optimizer

    # ----- logging --------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.optimizer is not None and "learning_rate" in logs:
            groups = self.optimizer.param_groups
            if groups and groups[0].get("lr_multiplier"):
                logs["learning_rate"] = float(groups[0]["lr"]) / groups[0]["lr_multiplier"]
            for group in groups:
                if group.get("name"):  # a unit's decayed and no_decay groups share one rate
                    logs.setdefault(f"lr/{group['name'].removesuffix(NO_DECAY_SUFFIX)}", float(group["lr"]))
        super().log(logs, start_time)

    # ----- checkpoints and resume -----------------------------------------------------------------------------------
    def wb_state(self) -> dict[str, Any]:
        """What a checkpoint records of the recipe: the group layout (names and sizes, in order) and frozen units."""
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        return {
            "groups": [{"name": g.get("name"), "size": len(g["params"])} for g in groups],
            "frozen_units": list(self.wb_freeze_plan.frozen_units) if self.wb_freeze_plan else [],
        }

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        output_dir = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        self.wb_config.save_pretrained(output_dir)
        with open(os.path.join(output_dir, STATE_NAME), "w", encoding="utf-8") as f:
            json.dump(self.wb_state(), f, indent=2, sort_keys=True)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save and not _internal_call:
            self.wb_config.save_pretrained(output_dir or self.args.output_dir)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):  # noqa: D102
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            self._check_resume_recipe(str(resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)

    def _check_resume_recipe(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, CONFIG_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"The checkpoint {checkpoint} has no {CONFIG_NAME}: it was not written by WBTrainer, so its optimizer "
                "state cannot be matched to hf_wb's parameter groups (the Trainer loads it by group position). "
                "Resume it with the Trainer that wrote it, or start a new run from its weights "
                "(from_pretrained) without resume_from_checkpoint."
            )
        saved = WBConfig.from_pretrained(path)
        changed = saved.diff(self.wb_config)
        if changed:
            details = ", ".join(f"`{k}`: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"Cannot resume from {checkpoint}: the hf_wb recipe changed ({details}). The optimizer state is "
                "stored per parameter group and would be loaded into the wrong groups. Resume with the checkpoint's "
                f"recipe (WBConfig.from_pretrained({checkpoint!r})) or start a new run."
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, STATE_NAME)):
            with open(os.path.join(checkpoint, STATE_NAME), encoding="utf-8") as f:
                saved = json.load(f)["groups"]
            current = self.wb_state()["groups"]
            if saved != current:
                raise ValueError(
                    f"Cannot resume from {checkpoint}: its optimizer has the parameter groups "
                    f"{[(g['name'], g['size']) for g in saved]} but this run builds "
                    f"{[(g['name'], g['size']) for g in current]}. The model or the recipe differs from the one that "
                    "wrote the checkpoint."
                )
        super()._load_optimizer_and_scheduler(checkpoint)


_MEAN_LOSSES = ("ForSequenceClassificationLoss", "ForQuestionAnsweringLoss")


def loss_uses_num_items(model: nn.Module) -> bool:
    """Whether ``model``'s own loss really normalises by ``num_items_in_batch`` (token-level losses computed
    through ``self.loss_function``), as the Trainer assumes for every model whose forward takes ``**kwargs``."""
    model = unwrap_model(model)
    explicit = type(model).__dict__.get("accepts_loss_kwargs")
    if explicit is not None:
        return bool(explicit)
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return True  # cannot tell: keep the Trainer's behaviour
    if "self.loss_function(" not in source:
        return False  # the model computes its own (mean) loss with torch.nn losses
    loss_fn = getattr(model, "loss_function", None)
    return getattr(loss_fn, "__name__", "") not in _MEAN_LOSSES


def _lamb(args: Any) -> tuple[type, dict[str, Any]]:
    try:
        from pytorch_optimizer import Lamb
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ImportError("WBConfig(optimizer='lamb') needs pytorch-optimizer: pip install pytorch-optimizer") from exc
    return Lamb, {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}


def _is_factory(optimizer_cls: Any) -> bool:
    try:
        from transformers.trainer_optimizer import is_optimizer_factory
    except ImportError:
        return False
    return bool(is_optimizer_factory(optimizer_cls))


def _describe(group: dict[str, Any]) -> str:
    n = sum(p.numel() for p in group["params"])
    return (
        f"  {group['name']:<24} lr={group['lr']:.3g} (x{group.get('lr_multiplier', 1):g}) "
        f"wd={group['weight_decay']:g} params={n:,}"
    )
