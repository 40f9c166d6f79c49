"""`WBTrainer`: a thin `transformers.Trainer` subclass that applies an hf_wb recipe.

What it adds to the Trainer, and where:

- ``__init__``: checks the engine set-up (:mod:`hf_wb.engines`), logs which engine runs;
- ``__init__`` / ``call_model_init``: freezes the embeddings and lower blocks and pins them to eval mode, before the
  optimizer exists (the Trainer builds it inside ``train()``);
- ``create_optimizer``: the recipe's param groups (:func:`hf_wb.build_param_groups`) with the optimizer class the
  Trainer's own ``get_optimizer_cls_and_kwargs`` picks for ``--optim`` (or LAMB);
- gradual unfreezing: owned by :class:`~hf_wb.callbacks.unfreezing.GradualUnfreezingCallback` (``wb_unfreezer``);
  the trainer hands it the model, layer map and freeze plan, orders the groups of a resumed run by it, and saves its
  state;
- ``log``: the current LR of every group as ``lr/<group>``, and ``learning_rate`` as the base (x1) rate;
- ``hyperparameter_search``: the Trainer's API with optuna, trials sharing one prefix cache per frozen boundary
  (:mod:`hf_wb.tune`; ``train(trial=...)`` applies a trial's recipe fields before the model is made);
- ``_save_checkpoint`` / ``train(resume_from_checkpoint=...)`` / ``_load_optimizer_and_scheduler``: the recipe and
  the group layout are saved in every checkpoint and checked on resume, since optimizer state is loaded by group
  position: a changed recipe stops with an error that names what changed. They are written before the Trainer's own
  files, so a checkpoint is complete (:mod:`hf_wb.checkpoints`) before it is pushed or older ones are rotated away;
  resume takes the newest complete checkpoint;
- ``train``: a termination signal finishes the step, saves a checkpoint and raises
  :class:`~hf_wb.callbacks.preemption.TrainingPreempted` (:mod:`hf_wb.callbacks.preemption`).
- ``_save_checkpoint`` / ``save_model``: weights holding NaN/Inf are never written (a checkpoint is skipped with an
  error in the log, so the older, finite checkpoints are not rotated away; ``save_model`` raises
  :class:`NonFiniteWeightsError`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, enable_full_determinism, set_seed

from hf_wb.callbacks.preemption import DEFAULT_SIGNALS, PreemptionCallback, TrainingPreempted
from hf_wb.callbacks.unfreezing import GradualUnfreezingCallback, check_scheduler, check_scheduler_args
from hf_wb.checkpoints import (
    STATE_NAME,
    changed_training_settings,
    finished_run,
    last_complete_checkpoint,
    resolve_resume,
    training_settings,
    write_json_atomic,
)
from hf_wb.config import CONFIG_NAME, WBConfig
from hf_wb.engines import Engine, check_requested_engine, log_engine, skip_unused_parameter_search
from hf_wb.extras import install_command, is_available
from hf_wb.freezing import FreezePlan, freeze
from hf_wb.layers import LayerMap, layer_map, unwrap_model
from hf_wb.param_groups import NO_DECAY_SUFFIX, build_param_groups, decay_parameter_names
from hf_wb.prefix_cache import INDEX_COLUMN, CacheUnsupported, PrefixCache, cache_boundary
from hf_wb.tickets import check_checkpoint_masks

__all__ = ["WBTrainer", "STATE_NAME", "NonFiniteWeightsError"]

logger = logging.getLogger(__name__)


class NonFiniteWeightsError(ValueError):
    """The model holds NaN/Inf weights: saving it would write a model that cannot be used."""


class WBTrainer(Trainer):
    """`transformers.Trainer` with the hf_wb recipe: layer-wise LRs, frozen eval-pinned lower blocks, no weight decay
    on biases and norms, per-group LR logging and resume-safe checkpoints.

    Args:
        *args, **kwargs: everything `transformers.Trainer` takes.
        wb_config: the recipe; None = `WBConfig()` (top 3 blocks at 5x, everything below frozen).
        preemption_signals: signals that stop training cleanly: the step in progress finishes, a checkpoint is
            saved and `train()` raises `TrainingPreempted` (default SIGTERM, SIGINT, SIGUSR1; None or "none" = off).
    """

    def __init__(
        self,
        *args: Any,
        wb_config: WBConfig | None = None,
        preemption_signals: str | Iterable[str | int] | None = DEFAULT_SIGNALS,
        **kwargs: Any,
    ) -> None:
        if wb_config is not None and not isinstance(wb_config, WBConfig):
            raise TypeError(f"`wb_config` must be a WBConfig, got {type(wb_config).__name__}.")
        self.wb_config = wb_config if wb_config is not None else WBConfig()
        self.wb_layer_map: LayerMap | None = None
        self.wb_freeze_plan: FreezePlan | None = None
        self.wb_unfreezer: GradualUnfreezingCallback | None = None
        if self.wb_config.unfreeze_every or self.wb_config.unfreeze_every_steps:
            self.wb_unfreezer = GradualUnfreezingCallback(self.wb_config)
            self.wb_unfreezer.stage_listeners.append(self._on_unfreeze_stage)
        self._wb_callbacks: list[Any] = []  # the callbacks WBTrainer adds: they share its layer map
        self.wb_prefix_cache: PrefixCache | None = None
        self._wb_original_datasets: tuple[Any, Any] | None = None
        self.wb_cache_stats: dict[str, Any] = {}
        # Set by hf_wb.tune during a search: prefix caches kept across trials (one per boundary), and the trial set-up.
        self.wb_cache_pool: dict[tuple[Any, ...], PrefixCache] | None = None
        self.wb_search: Any = None
        self.wb_cache_status: dict[str, Any] = {}
        self.wb_summary: dict[str, Any] | None = None
        self.wb_head_summary: dict[str, Any] = {}
        self._wb_labels: Any = None
        self._wb_model_ready: nn.Module | None = None
        requested = check_requested_engine(kwargs.get("args", args[1] if len(args) > 1 else None), self.wb_config)
        super().__init__(*args, **kwargs)
        self.wb_engine: Engine = log_engine(self, requested)
        self._wb_requested_engine = requested
        if skip_unused_parameter_search(self) and self.wb_engine.name == "DDP" and self.is_world_process_zero():
            logger.info(
                "hf_wb: DDP without find_unused_parameters (frozen parameters are not registered with DDP); pass "
                "--ddp_find_unused_parameters true if the loss does not use every trainable parameter."
            )
        if self.model is not None and self.model_init is None:
            self._apply_recipe(self.model)
        if self.model is not None and self.model_accepts_loss_kwargs and not loss_uses_num_items(self.model):
            # The Trainer takes any `**kwargs` in forward() as "the loss is normalised by num_items_in_batch" and
            # then multiplies the loss by the number of processes (and skips the division by the accumulation
            # steps). Classification heads compute a plain mean and ignore it: under DDP the loss and its
            # gradients would be doubled, with accumulation too large by the accumulation factor.
            self.model_accepts_loss_kwargs = False
        self._add_monitoring_callbacks()
        self.wb_preemption = PreemptionCallback(preemption_signals) if preemption_signals else None
        if self.wb_preemption is not None and self.wb_preemption.signals:
            self.add_callback(self.wb_preemption)
        from hf_wb.callbacks.summary import RunSummaryCallback
        from hf_wb.summary import format_run_summary

        # first in line, so that the summary is logged before the progress bar opens
        self.callback_handler.callbacks.insert(0, RunSummaryCallback(self._wb_start_summary, format_run_summary))
        if self.wb_unfreezer is not None:
            check_scheduler(self.lr_scheduler)  # refused now, not at the first unfreezing stage
            check_scheduler_args(self.args)
            self.add_callback(self.wb_unfreezer)

    # ----- set-up before the optimizer exists ---------------------------------------------------------------------
    def _train_labels(self) -> Any:
        dataset = getattr(self, "train_dataset", None)  # not set yet while Trainer.__init__ calls model_init
        if self._wb_labels is None and dataset is not None:
            from hf_wb.heads import labels_from_dataset

            self._wb_labels = labels_from_dataset(dataset, max_examples=100_000)
        return self._wb_labels

    def _add_monitoring_callbacks(self) -> None:
        from transformers.integrations import TensorBoardCallback

        from hf_wb.callbacks import WeightDiagnosticsCallback, WeightHistogramCallback

        tensorboard = next((c for c in self.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None)
        pattern = self.wb_config.layers_pattern
        from hf_wb.callbacks.diagnostics import DiagnosticsConfig

        if self.wb_config.histogram_steps and tensorboard is None and not is_available("tensorboard"):
            _warn_once(
                "hf_wb weight histograms are off: they are written to TensorBoard, which is not installed. Install it "
                f"with {install_command('report')}, or set WBConfig(histogram_steps=0) to silence this warning."
            )
        elif self.wb_config.histogram_steps:
            self._wb_callbacks.append(
                WeightHistogramCallback(
                    every_n_steps=self.wb_config.histogram_steps,
                    writer=tensorboard,
                    layers_pattern=pattern,
                    labels=self._train_labels(),
                )
            )
        if self.wb_config.diagnostics or self.wb_config.stop_on_nonfinite:
            every = self.wb_config.diagnostics_interval
            config = DiagnosticsConfig(every_n_steps=every, activation_window=min(every, 10))
            self._wb_callbacks.append(
                WeightDiagnosticsCallback(
                    config,
                    writer=tensorboard,
                    labels=self._train_labels(),
                    layers_pattern=pattern,
                    stop_on_nonfinite=self.wb_config.stop_on_nonfinite,
                    nonfinite_only=not self.wb_config.diagnostics,
                )
            )
        for callback in self._wb_callbacks:
            callback.lmap = self.wb_layer_map
            self.add_callback(callback)

    def _apply_recipe(self, model: nn.Module) -> None:
        """Head recipe first (re-init changes weights), then the layer map and freezing. The head recipe runs once
        per model; a resumed run then loads the checkpoint's weights over it."""
        from hf_wb.heads import apply_head_recipe

        model = unwrap_model(model)
        labels = self._train_labels() if self.wb_config.bias_prior else None
        self.wb_head_summary = apply_head_recipe(model, self.wb_config, labels)
        if self.wb_head_summary:
            logger.info("hf_wb head recipe: %s", self.wb_head_summary)
        self.wb_layer_map = layer_map(model, self.wb_config.layers_pattern)
        self.wb_freeze_plan = freeze(model, self.wb_config, self.wb_layer_map)
        for callback in self._wb_callbacks:  # one layer map per run
            callback.lmap = self.wb_layer_map
        if self.wb_unfreezer is not None:
            decay = set(self.get_decay_parameter_names(model)) & decay_parameter_names(model)
            self.wb_unfreezer.setup(model, self.wb_layer_map, self.wb_freeze_plan, decay)

    def _on_unfreeze_stage(self, units: list[str]) -> None:
        if self.wb_prefix_cache is not None:  # the frozen boundary moved
            self._rebuild_prefix_cache()

    def call_model_init(self, trial: Any = None) -> nn.Module:
        if self._wb_model_ready is not None:  # made (and prepared) by train() just before the Trainer asks
            model, self._wb_model_ready = self._wb_model_ready, None
            return model
        model = super().call_model_init(trial)
        self._apply_recipe(model)
        return model

    # ----- numerical faults -----------------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(model, inputs, *args, **kwargs)
        # the Trainer itself synchronises on this loss right after (its NaN/Inf logging filter): no extra wait
        if self.wb_config.stop_on_nonfinite and not bool(torch.isfinite(loss.detach()).all()):
            for callback in self.callback_handler.callbacks:
                if hasattr(callback, "note_nonfinite_loss"):
                    callback.note_nonfinite_loss(self.state.global_step + 1, float(loss.detach().float().mean()))
        return loss

    # ----- optimizer ------------------------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        elif self.wb_config.optimizer == "lamb":
            optimizer_cls, optimizer_kwargs = _lamb(self.args)
        elif self.wb_config.optimizer == "kfac":
            optimizer_cls, optimizer_kwargs = _kfac(self.args)
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
        if self.wb_unfreezer is not None:  # a resumed run: groups unfrozen during training come last, in order
            groups = self.wb_unfreezer.order_groups(groups)
        if self.wb_config.optimizer == "kfac":
            optimizer_kwargs["model"] = unwrapped  # K-FAC hooks the trainable Linear layers for its statistics
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

    # ----- hyperparameter search ----------------------------------------------------------------------------------
    def hyperparameter_search(
        self,
        hp_space: Callable[[Any], dict[str, Any]] | None = None,
        compute_objective: Callable[[dict[str, float]], float] | None = None,
        n_trials: int = 20,
        direction: str = "minimize",
        backend: str | None = None,
        hp_name: Callable[[Any], str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """`Trainer.hyperparameter_search` (optuna) where trials share the frozen-prefix cache; see
        :func:`hf_wb.tune.hyperparameter_search` for the search space, pruning, resume and the extra ``kwargs``."""
        from hf_wb.tune import hyperparameter_search

        return hyperparameter_search(
            self, hp_space, compute_objective, n_trials, direction, backend, hp_name, **kwargs
        )

    # ----- the run summary ------------------------------------------------------------------------------------------
    def wb_run_summary(self) -> dict[str, Any]:
        """What this run does (frozen units, rates, head recipe, cache, engine, the TrainingArguments that matter);
        see :func:`hf_wb.summary.run_summary`."""
        from hf_wb.summary import run_summary

        model = unwrap_model(self.model)
        lmap = self.wb_layer_map or layer_map(model, self.wb_config.layers_pattern)
        frozen = self.wb_freeze_plan.frozen_units if self.wb_freeze_plan else []
        return run_summary(
            model,
            lmap,
            self.wb_config,
            self.args,
            frozen,
            head_recipe=self.wb_head_summary,
            cache=self.wb_cache_status or None,
            engine=self._wb_engine(),
        )

    def _wb_start_summary(self) -> dict[str, Any]:
        self.wb_summary = self.wb_run_summary()
        return self.wb_summary

    def _wb_engine(self) -> str:
        if getattr(self, "is_deepspeed_enabled", False):
            return "DeepSpeed"
        if getattr(self, "is_fsdp_enabled", False):
            return "FSDP"
        mode = str(getattr(self.args.parallel_mode, "value", self.args.parallel_mode))
        device = str(self.args.device)
        if self.args.world_size > 1:
            return f"DDP ({device}, {self.args.ddp_backend or 'default backend'})" if mode == "distributed" else mode
        return f"single process ({device})"

    def _wb_write_summary(self, folder: str) -> None:
        from hf_wb.callbacks.summary import write_summary

        write_summary(folder, self.wb_summary or self.wb_run_summary())

    # ----- checkpoints and resume -----------------------------------------------------------------------------------
    def wb_state(self) -> dict[str, Any]:
        """What a checkpoint records of the recipe: the group layout (names and sizes, in order) and frozen units."""
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        return {
            "groups": [{"name": g.get("name"), "size": len(g["params"])} for g in groups],
            "frozen_units": list(self.wb_freeze_plan.frozen_units) if self.wb_freeze_plan else [],
            "unfreeze_stage": 0,
            "unfrozen_units": [],
            "training_args": training_settings(self.args),
            **(self.wb_unfreezer.state_dict() if self.wb_unfreezer is not None else {}),
        }

    def wb_first_nonfinite(self) -> str | None:
        """Name of the first parameter (in forward order) holding NaN/Inf, or ``None`` when every weight is finite."""
        from hf_wb.stats import ParamStats

        found = ParamStats(unwrap_model(self.model), self.wb_config.layers_pattern).first_nonfinite()
        return None if found is None else found[0]

    @property
    def wb_stopped_on_nonfinite(self) -> int | None:
        """The step at which ``stop_on_nonfinite`` stopped training, or ``None``."""
        from hf_wb.callbacks import WeightDiagnosticsCallback

        for cb in self.callback_handler.callbacks:
            if isinstance(cb, WeightDiagnosticsCallback) and cb.stopped_at is not None:
                return cb.stopped_at
        return None

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        bad = self.wb_first_nonfinite()
        if bad is not None:
            last = last_complete_checkpoint(self._get_output_dir(trial=trial)) if self.args.should_save else None
            logger.error(
                "hf_wb: not saving the checkpoint of step %d: the weights hold NaN/Inf (first: `%s`). The last "
                "checkpoint with finite weights is kept (%s); resume from it with a lower learning rate or "
                "`max_grad_norm`.",
                self.state.global_step,
                bad,
                last or "none yet",
            )
            return
        # hf_wb's files first: the Trainer writes trainer_state.json last, then pushes the checkpoint and deletes
        # older ones (save_total_limit), so the checkpoint is complete before anything counts it as saved.
        if self.args.should_save:
            output_dir = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            os.makedirs(output_dir, exist_ok=True)
            self.wb_config.save_pretrained(output_dir)
            self._wb_write_summary(output_dir)
            write_json_atomic(os.path.join(output_dir, STATE_NAME), self.wb_state())
        super()._save_checkpoint(model, trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # the Trainer pushes output_dir (the model) and the checkpoint folder; give the model its recipe too
        recipe = os.path.join(checkpoint_folder, CONFIG_NAME)
        if self.is_world_process_zero() and os.path.isfile(recipe):
            shutil.copy(recipe, os.path.join(self.args.output_dir, CONFIG_NAME))
        super()._push_from_checkpoint(checkpoint_folder)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        bad = self.wb_first_nonfinite() if self.model is not None else None
        if bad is not None:
            last = (
                last_complete_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir or "") else None
            )
            raise NonFiniteWeightsError(
                f"Refusing to save the model to {output_dir or self.args.output_dir}: its weights hold NaN/Inf (first "
                f"in forward order: `{bad}`). The last checkpoint with finite weights is {last or 'none'}; resume "
                "from it with a lower learning rate or gradient clipping (`max_grad_norm`), and see diagnostics.json."
            )
        if self.args.should_save and not _internal_call:  # before the Trainer's push_to_hub of the saved model
            os.makedirs(output_dir or self.args.output_dir, exist_ok=True)
            self.wb_config.save_pretrained(output_dir or self.args.output_dir)
            self._wb_write_summary(output_dir or self.args.output_dir)
        super().save_model(output_dir, _internal_call)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """`Trainer.train`, plus: ``resume_from_checkpoint`` True / ``"true"`` takes the newest *complete* checkpoint
        in ``output_dir`` (:func:`hf_wb.checkpoints.resolve_resume`), a path is checked to be complete, and a
        preemption signal ends training with :class:`TrainingPreempted` once the checkpoint is saved."""
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if self.wb_search is not None:  # a search trial: its recipe and arguments, before the model is made
            self.wb_search.setup_trial(self, kwargs.get("trial"))
        if self.model_init is not None:
            # The Trainer makes a fresh model inside train(); make it here instead, so that the head recipe and the
            # prefix cache below apply to the model that trains (call_model_init hands it over).
            enable_full_determinism(self.args.seed) if self.args.full_determinism else set_seed(self.args.seed)
            self.model = self.model_wrapped = self.call_model_init(kwargs.get("trial"))
            self._wb_model_ready = self.model
        if resume_from_checkpoint:
            self._check_resume_recipe(str(resume_from_checkpoint))
            changed = changed_training_settings(resume_from_checkpoint, self.args)
            last = finished_run(resume_from_checkpoint)
            more = (
                self.args.max_steps > last
                if last is not None and self.args.max_steps > 0
                else "num_train_epochs" in changed
            )
            if last is not None and not more:
                raise ValueError(
                    f"Cannot resume from {resume_from_checkpoint}: it is the last step ({last}) of a finished run, so "
                    "there is nothing left to train (and transformers would train one step past the end). Load its "
                    "weights with from_pretrained to evaluate or export them, give more steps (max_steps / "
                    "num_train_epochs) to train on, or start over (run_glue: --overwrite_output_dir)."
                )
            if changed:
                logger.warning("Resuming %s with other training settings than it was trained with: %s",
                               resume_from_checkpoint, _describe_changes(changed))  # fmt: skip
            check_checkpoint_masks(self.model, str(resume_from_checkpoint))
            state_file = os.path.join(str(resume_from_checkpoint), STATE_NAME)
            if self.wb_unfreezer is not None and os.path.isfile(state_file):
                with open(state_file, encoding="utf-8") as f:  # the stage, before the optimizer is rebuilt
                    self.wb_unfreezer.load_state_dict(json.load(f))
        preemption = self.wb_preemption
        if preemption is not None:
            preemption.install()  # before the cache build and the first step
        try:
            self._setup_prefix_cache()
            output = super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)
            if preemption is not None:
                self._raise_if_preempted(preemption, kwargs.get("trial"))
            return output
        finally:
            self._teardown_prefix_cache()
            if preemption is not None:
                preemption.uninstall()

    def _raise_if_preempted(self, preemption: PreemptionCallback, trial: Any) -> None:
        step = self.state.global_step
        checkpoint = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if preemption.preempted is None:
            late = preemption.agree(self.args.device)  # every process gets here: a signal after the last step
            if late is None:
                return
            preemption.preempted, preemption.stopped_at = late, self.state.global_step
            if self.args.load_best_model_at_end and self.state.best_model_checkpoint:
                logger.warning("%s received after the last step, with the best model loaded: not saved again.",
                               late.name)  # fmt: skip
            elif not os.path.isdir(checkpoint):
                logger.warning("%s received after the last step: saving a checkpoint of step %d.", late.name,
                               self.state.global_step)  # fmt: skip
                self._save_checkpoint(self.model_wrapped, trial)
        saved = checkpoint if os.path.isdir(checkpoint) else None
        logger.warning("Training preempted by %s after step %d; checkpoint: %s", preemption.preempted.name,
                       self.state.global_step, saved)  # fmt: skip
        raise TrainingPreempted(preemption.preempted.name, self.state.global_step, saved)

    # ----- frozen-prefix cache --------------------------------------------------------------------------------------
    def _setup_prefix_cache(self) -> None:
        mode = self.wb_config.cache_frozen_prefix
        if mode == "off" or self.train_dataset is None:
            reason = "`cache_frozen_prefix`='off'" if mode == "off" else "no training set"
            self.wb_cache_status = {"on": False, "reason": reason}
            return
        try:
            if isinstance(self.train_dataset, torch.utils.data.IterableDataset) or not hasattr(
                self.train_dataset, "__len__"
            ):
                raise CacheUnsupported("the training set is iterable (no length, no row index to key the cache by).")
            sharded = self._wb_requested_engine or (self.wb_engine if self.wb_engine.sharded else None)
            if sharded is not None:
                raise CacheUnsupported(
                    f"{sharded.name} gathers and releases the frozen blocks' parameters in their forward, which the "
                    "cache would skip."
                )
            cache = self._new_or_pooled_cache()
            self._wb_original_datasets = (self.train_dataset, self.eval_dataset)
            self.wb_prefix_cache = cache
            self._rebuild_prefix_cache()
        except CacheUnsupported as exc:
            self._teardown_prefix_cache()
            if mode == "on":
                raise CacheUnsupported(f"`cache_frozen_prefix`='on' cannot be served: {exc}") from exc
            logger.info("hf_wb prefix cache off ('auto'): %s", exc)
            self.wb_cache_status = {"on": False, "reason": f"'auto': {exc}"}
            return
        if self.wb_prefix_cache is not None:
            cache = self.wb_prefix_cache
            self.wb_cache_status = {
                "on": True,
                "reason": f"{mode!r}: embeddings and {cache.boundary.frozen_blocks} blocks frozen; "
                f"{cache.num_examples} examples, {cache.nbytes / 2**20:.1f} MiB {cache.dtype}"
                + (f" in {self.wb_config.cache_dir}" if self.wb_config.cache_dir else " in memory"),
            }

    def _new_or_pooled_cache(self) -> PrefixCache:
        """A new cache, or (in a search) the one an earlier trial with the same frozen boundary filled."""
        dtype, folder = self.wb_config.cache_dtype, self.wb_config.cache_dir
        if self.wb_cache_pool is None:
            return PrefixCache(self.model, self.wb_layer_map, dtype, folder)
        boundary = cache_boundary(self.model, self.wb_layer_map)
        key = (boundary.stack, boundary.frozen_blocks, dtype, folder)
        cache = self.wb_cache_pool.get(key)
        if cache is None:
            cache = self.wb_cache_pool[key] = PrefixCache(self.model, self.wb_layer_map, dtype, folder)
        else:
            logger.info("hf_wb prefix cache: reusing an earlier trial's cache (%d frozen blocks)", key[1])
            cache.rebind(self.model, self.wb_layer_map)
        return cache

    def _cache_sources(self) -> list[Any]:
        train, evals = self._wb_original_datasets
        if isinstance(evals, dict):
            return [train, *evals.values()]
        return [train] + ([evals] if evals is not None else [])

    def _rebuild_prefix_cache(self) -> None:
        cache = self.wb_prefix_cache
        cache.uninstall()
        try:
            cache.boundary = cache_boundary(self.model, self.wb_layer_map)
        except CacheUnsupported as exc:
            logger.info("hf_wb prefix cache off from here on: %s", exc)
            self.wb_cache_status = {"on": False, "reason": str(exc)}
            self._teardown_prefix_cache()
            return
        sources = self._cache_sources()
        # on disk under DDP: the local main process builds, the other ranks wait for it and load its files
        first = self.args.main_process_first(local=True, desc="hf_wb prefix cache")
        # computed under the autocast the training forward runs in, so a cached run equals an uncached one
        cache.mixed_precision = self.accelerator.mixed_precision
        with first if self.wb_config.cache_dir else contextlib.nullcontext(), self.accelerator.autocast():
            starts = cache.build(
                sources,
                self.data_collator,
                batch_size=self.args.per_device_eval_batch_size,
                device=self.args.device,
                progress=not self.args.disable_tqdm and self.is_local_process_zero(),
                lazy=False,  # built up front (length-sorted, own progress bar): every epoch runs at cached speed
            )
        indexed = [_with_index(src, start) for src, start in zip(sources, starts, strict=True)]
        self.train_dataset = indexed[0]
        _, evals = self._wb_original_datasets
        if isinstance(evals, dict):
            self.eval_dataset = dict(zip(evals, indexed[1:], strict=True))
        elif evals is not None:
            self.eval_dataset = indexed[1]
        cache.install()

    def _teardown_prefix_cache(self) -> None:
        if self.wb_prefix_cache is not None:
            cache = self.wb_prefix_cache
            self.wb_cache_stats = {**cache.stats, "examples": cache.num_examples, "bytes": cache.nbytes}
            cache.uninstall()
            self.wb_prefix_cache = None
        if self._wb_original_datasets is not None:
            self.train_dataset, self.eval_dataset = self._wb_original_datasets
            self._wb_original_datasets = None

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if INDEX_COLUMN not in self._signature_columns:
            self._signature_columns.append(INDEX_COLUMN)

    def _cached(self, inputs: dict[str, Any]):
        indices = inputs.pop(INDEX_COLUMN, None)
        if self.wb_prefix_cache is None or indices is None:
            return contextlib.nullcontext()
        return self.wb_prefix_cache.batch(indices, inputs.get("attention_mask"))

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        with self._cached(inputs):
            return super().compute_loss(model, inputs, *args, **kwargs)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        with self._cached(inputs):
            return super().prediction_step(model, inputs, *args, **kwargs)

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


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def _with_index(dataset: Any, start: int) -> Any:
    """``dataset`` with a column ``hf_wb_index`` = start, start + 1, ... (the rows' places in the prefix cache)."""
    indices = range(start, start + len(dataset))
    if hasattr(dataset, "add_column"):
        if INDEX_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(INDEX_COLUMN)
        return dataset.add_column(INDEX_COLUMN, list(indices))
    return _IndexedDataset(dataset, start)


class _IndexedDataset(torch.utils.data.Dataset):
    def __init__(self, dataset: Any, start: int) -> None:
        self.dataset, self.start = dataset, start

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], INDEX_COLUMN: self.start + i}


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


def _kfac(args: Any) -> tuple[type, dict[str, Any]]:
    """K-FAC and its settings from ``--optim_args`` ("damping=0.03,inverse_update_steps=10"); the model is added
    when the optimizer is built (a ``model`` key here would read as an optimizer that makes its own groups)."""
    from hf_wb.kfac import KFAC, KFAC_DEFAULTS

    kwargs: dict[str, Any] = {"lr": args.learning_rate}
    for item in filter(None, (args.optim_args or "").replace(" ", "").split(",")):
        key, _, value = item.partition("=")
        if key not in KFAC_DEFAULTS:
            raise ValueError(
                f"`optim_args` entry {item!r} is not a K-FAC setting; known: {', '.join(sorted(KFAC_DEFAULTS))} "
                "(e.g. --optim_args 'damping=1e-3,inverse_update_steps=10')."
            )
        try:
            kwargs[key] = float(value)
        except ValueError as exc:
            raise ValueError(f"`optim_args` entry {item!r}: {key} must be a number, got {value!r}.") from exc
    for key in ("factor_update_steps", "inverse_update_steps"):
        if key in kwargs and float(kwargs[key]).is_integer():
            kwargs[key] = int(kwargs[key])
    return KFAC, kwargs


def _is_factory(optimizer_cls: Any) -> bool:
    try:
        from transformers.trainer_optimizer import is_optimizer_factory
    except ImportError:
        return False
    return bool(is_optimizer_factory(optimizer_cls))


def _describe_changes(changed: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"`{k}`: {old!r} -> {new!r}" for k, (old, new) in changed.items())


def _describe(group: dict[str, Any]) -> str:
    n = sum(p.numel() for p in group["params"])
    return (
        f"  {group['name']:<24} lr={group['lr']:.3g} (x{group.get('lr_multiplier', 1):g}) "
        f"wd={group['weight_decay']:g} params={n:,}"
    )
