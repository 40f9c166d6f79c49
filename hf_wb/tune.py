"""Recipe search on a cached prefix: `WBTrainer.hyperparameter_search` with optuna.

The Trainer's own API and ``model_init`` contract (each trial trains a fresh ``model_init()`` model), with three
additions:

- **One prefix cache per frozen boundary, shared by the trials.** With the bottom blocks frozen, every trial's
  frozen prefix computes the same states for the same example. The trainer keeps the caches of a search in a pool
  keyed by the boundary (stack, number of frozen blocks, cache dtype and folder): the first trial at a boundary fills
  the cache (in memory while its first epoch runs; on disk under ``cache_dir`` before training), every later trial at
  that boundary trains the top blocks only, from its first step. When ``top_layers`` is searched the boundary moves:
  one cache per boundary. Each reuse checks the cache's key (frozen weights, boundary, dtype, data), so a
  ``model_init`` whose frozen weights differ between trials rebuilds instead of being served stale states. The
  search turns ``cache_frozen_prefix="off"`` into ``"auto"`` (exact wherever it applies, quiet otherwise);
  ``share_prefix_cache=False`` keeps the trainer's own setting and gives each trial its own cache.
- **The search space may set recipe fields** (``WBConfig``) as well as ``TrainingArguments`` fields. Each trial
  starts from the trainer's recipe and arguments as they were before the search, then applies the trial's values;
  a key that is neither refuses the trial (the Trainer would only warn). :func:`default_search_space` is the
  recipe's default (or plain fine-tuning's, for a recipe with nothing frozen and every multiplier 1).
- **Pruning, resume, budgets.** The objective is reported after each evaluation and optuna's pruner (default
  ``MedianPruner(n_startup_trials=2)``) stops bad trials; give ``eval_strategy="epoch"`` (or steps) for it to act.
  With ``storage`` (e.g. ``"sqlite:///out/study.db"``), ``study_name`` and ``load_if_exists=True`` a rerun continues
  an interrupted study: ``n_trials`` counts the study's finished trials (complete or pruned), and a trial that was
  running when the process died is marked failed and enqueued again with the same parameters. ``timeout`` (wall
  seconds) and ``cpu_budget`` (process CPU seconds) stop the search after the trial that crosses them.

Extra keyword arguments of :func:`hyperparameter_search` (besides those of ``optuna.create_study`` and
``timeout``, ``callbacks``, ``catch``, ``gc_after_trial`` of ``Study.optimize``): ``cpu_budget``, ``save_best_to``
(a folder: the best trial's model and ``hf_wb_config.json``, rewritten whenever a trial beats the best so far) and
``share_prefix_cache``, ``prefix_cache_pool`` (a dict the caller keeps: the caches then outlive the search, for
another search over the same data and frozen weights).

Each finished trial carries user attributes: ``cpu_seconds`` and ``wall_seconds`` (the trial's cost, from
``model_init`` to its last evaluation), ``frozen_blocks`` (the boundary), ``prefix_cache`` (``"fill"`` for the
first trial at a boundary, ``"reuse"`` afterwards, ``"off"``), ``hp`` (every value the space returned, suggested or
constant) and ``wb_config`` (the trial's full recipe).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hf_wb.config import WBConfig

if TYPE_CHECKING:  # pragma: no cover
    import optuna

    from hf_wb.trainer import WBTrainer

__all__ = [
    "NOT_SEARCHABLE",
    "default_search_space",
    "hyperparameter_search",
    "is_plain_fine_tuning",
    "top_layers_range",
    "trial_record",
]

logger = logging.getLogger(__name__)

# WBConfig fields a trial may not change: the trainer wires them in __init__ (callbacks) or they decide the cache
# itself, so a per-trial value would be silently ignored.
NOT_SEARCHABLE = (
    "histogram_steps",
    "diagnostics",
    "unfreeze_every",
    "unfreeze_every_steps",
    "cache_frozen_prefix",
    "cache_dtype",
    "cache_dir",
    "layers_pattern",
)


def is_plain_fine_tuning(config: WBConfig) -> bool:
    """Whether ``config`` is plain fine-tuning (nothing frozen, every LR multiplier 1), as ``WBConfig.baseline()``
    is."""
    head = config.head_lr_multiplier if config.head_lr_multiplier is not None else config.top_lr_multiplier
    return config.freeze_layers == 0 and config.top_lr_multiplier == 1 and head == 1 and config.layer_lr_decay == 1


def top_layers_range(num_blocks: int) -> tuple[int, int]:
    """The default range of ``top_layers`` for a stack of ``num_blocks``: from a sixth to a half of the blocks
    (MiniLM's 6: 1-3; BERT-base's 12: 2-6), so that at least half of the stack stays frozen and cacheable."""
    if num_blocks < 2:
        return 1, 1
    return max(1, num_blocks // 6), max(1, num_blocks // 2)


def default_search_space(config: WBConfig | None = None, num_blocks: int | None = None) -> Callable[[Any], dict]:
    """The default search space, as an ``hp_space`` function of an optuna trial.

    Every recipe: base ``learning_rate`` (log-uniform; 1e-5..1e-4 for the recipe, whose top blocks train at a
    multiple of it, 1e-5..2e-4 for plain fine-tuning), ``weight_decay`` (0..0.1), ``num_train_epochs`` (2..4) and
    ``warmup_steps`` as a fraction of the steps (0..0.1). A recipe with frozen blocks or multipliers (anything but
    :func:`is_plain_fine_tuning`) also searches ``top_lr_multiplier`` (1..20, log), ``head_lr_multiplier`` (1..50,
    log) and, when ``num_blocks`` is given, ``top_layers`` over :func:`top_layers_range` (with ``freeze_layers=-1``
    this moves the frozen boundary).

    Args:
        config: the recipe being tuned; None = ``WBConfig()``.
        num_blocks: blocks of the model's stack (the smallest stack's, for encoder-decoders); None = do not search
            ``top_layers``.
    """
    plain = is_plain_fine_tuning(config if config is not None else WBConfig())

    def hp_space(trial: Any) -> dict[str, Any]:
        params: dict[str, Any] = {
            "learning_rate": trial.suggest_float("learning_rate", 1e-5, 2e-4 if plain else 1e-4, log=True),
            "weight_decay": trial.suggest_float("weight_decay", 0.0, 0.1),
            "num_train_epochs": trial.suggest_int("num_train_epochs", 2, 4),
            "warmup_steps": trial.suggest_float("warmup_steps", 0.0, 0.1),
        }
        if not plain:
            params["top_lr_multiplier"] = trial.suggest_float("top_lr_multiplier", 1.0, 20.0, log=True)
            params["head_lr_multiplier"] = trial.suggest_float("head_lr_multiplier", 1.0, 50.0, log=True)
            if num_blocks is not None and num_blocks >= 2:
                low, high = top_layers_range(num_blocks)
                params["top_layers"] = trial.suggest_int("top_layers", low, high)
        return params

    return hp_space


class _TrialSetup:
    """Applies a trial's values to the trainer (``WBTrainer.train`` calls it before ``model_init``), always starting
    from the recipe and arguments the trainer had before the search."""

    def __init__(self, trainer: WBTrainer, hp_space: Callable[[Any], dict[str, Any]]) -> None:
        self.hp_space = hp_space
        self.base_config = trainer.wb_config
        self.base_args: dict[str, Any] = {}
        self.last_params: dict[str, Any] = {}
        self.wb_fields = {f.name for f in dataclasses.fields(WBConfig)}

    def setup_trial(self, trainer: WBTrainer, trial: Any) -> None:
        self.restore(trainer)
        if trial is None:
            return
        params = dict(self.hp_space(trial))
        self.last_params = params
        recipe: dict[str, Any] = {}
        for key, value in params.items():
            if key in NOT_SEARCHABLE:
                raise ValueError(
                    f"The search space sets `{key}`={value!r}, which a trial cannot change "
                    f"({', '.join(NOT_SEARCHABLE)} are wired when the trainer is made). "
                    "Set it in the trainer's WBConfig and leave it out of `hp_space`."
                )
            if key in self.wb_fields:
                recipe[key] = value
            elif hasattr(trainer.args, key):
                self.base_args.setdefault(key, getattr(trainer.args, key))
                setattr(trainer.args, key, value)
            else:
                raise ValueError(
                    f"The search space sets `{key}`={value!r}, which is neither a TrainingArguments field nor a "
                    "WBConfig field. Check the spelling in `hp_space`."
                )
        trainer.wb_config = dataclasses.replace(self.base_config, **recipe)

    def restore(self, trainer: WBTrainer) -> None:
        for key, value in self.base_args.items():
            setattr(trainer.args, key, value)
        trainer.wb_config = self.base_config


def trial_record(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """One finished trial as a JSON-able dict: number, state, value, params and the user attributes above."""
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value if trial.values is not None and len(trial.values) == 1 else trial.values,
        "params": dict(trial.params),
        "intermediate": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
        **{k: v for k, v in trial.user_attrs.items()},
        "started": trial.datetime_start.isoformat(timespec="seconds") if trial.datetime_start else None,
        "finished": trial.datetime_complete.isoformat(timespec="seconds") if trial.datetime_complete else None,
    }


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("WBTrainer.hyperparameter_search needs optuna: pip install 'hf-wb[tune]'") from exc
    return optuna


def _num_blocks(trainer: WBTrainer) -> int | None:
    lmap = trainer.wb_layer_map
    if lmap is None or not lmap.stacks:
        return None
    return min(stack.num_blocks for stack in lmap.stacks.values())


def hyperparameter_search(
    trainer: WBTrainer,
    hp_space: Callable[[Any], dict[str, Any]] | None = None,
    compute_objective: Callable[[dict[str, float]], float] | None = None,
    n_trials: int = 20,
    direction: str = "minimize",
    backend: str | None = None,
    hp_name: Callable[[Any], str] | None = None,
    **kwargs: Any,
) -> Any:
    """Run an optuna search over ``trainer`` (a ``WBTrainer`` with ``model_init``); see the module docstring.

    Returns ``transformers.trainer_utils.BestRun`` (trial number, objective, params) like the Trainer's.
    """
    from transformers.trainer_utils import BestRun, HPSearchBackend, default_compute_objective

    if backend is not None and str(getattr(backend, "value", backend)).lower() != "optuna":
        raise ValueError(
            f"WBTrainer.hyperparameter_search supports backend='optuna' (trials share the prefix cache in one "
            f"process); got {backend!r}. Use transformers.Trainer.hyperparameter_search for other backends."
        )
    optuna = _import_optuna()
    if trainer.model_init is None:
        raise RuntimeError(
            "To use hyperparameter search, pass the model through `model_init` (a fresh model for every trial)."
        )
    if trainer.args.world_size > 1:
        raise ValueError("WBTrainer.hyperparameter_search runs in one process; launch it without DDP.")
    if isinstance(direction, list):
        raise ValueError("WBTrainer.hyperparameter_search optimises one objective; pass `direction` as a string.")
    if n_trials < 1:
        raise ValueError(f"`n_trials` must be >= 1, got {n_trials}.")

    timeout = kwargs.pop("timeout", None)
    callbacks = list(kwargs.pop("callbacks", None) or [])
    catch = kwargs.pop("catch", ())
    gc_after_trial = kwargs.pop("gc_after_trial", False)
    cpu_budget = kwargs.pop("cpu_budget", None)
    save_best_to = kwargs.pop("save_best_to", None)
    share = kwargs.pop("share_prefix_cache", True)
    pool = kwargs.pop("prefix_cache_pool", None)
    own_sampler = "sampler" not in kwargs
    kwargs.setdefault("sampler", optuna.samplers.TPESampler(seed=trainer.args.seed))
    kwargs.setdefault("pruner", optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    study = optuna.create_study(direction=direction, **kwargs)
    if own_sampler and study.trials:  # a resumed study: a sampler seeded as before would repeat its first trials
        study.sampler = optuna.samplers.TPESampler(seed=trainer.args.seed + len(study.trials))

    states = optuna.trial.TrialState
    for stale in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        logger.warning("hf_wb search: trial %d was interrupted; marking it failed and running it again", stale.number)
        study.tell(stale.number, state=states.FAIL)
        study.enqueue_trial(dict(stale.params), skip_if_exists=False)
    finished = len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))
    remaining = n_trials - finished
    if remaining <= 0:
        logger.info("hf_wb search: the study already has %d finished trials (n_trials=%d)", finished, n_trials)

    space = hp_space or default_search_space(trainer.wb_config, _num_blocks(trainer))
    setup = _TrialSetup(trainer, space)
    base_cache_mode = trainer.wb_config.cache_frozen_prefix
    if share and base_cache_mode == "off":
        setup.base_config = dataclasses.replace(setup.base_config, cache_frozen_prefix="auto")
    boundaries_seen: set[Any] = set()
    started_cpu = time.process_time()

    def objective(trial: Any) -> float:
        trainer.objective = None
        trainer.wb_cache_stats = {}
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            trainer.train(trial=trial)
            if getattr(trainer, "objective", None) is None:  # no evaluation during training
                trainer.objective = trainer.compute_objective(trainer.evaluate())
        finally:
            plan = trainer.wb_freeze_plan
            frozen = max(plan.frozen_blocks.values(), default=0) if plan is not None else 0
            cached = bool(trainer.wb_cache_stats) and trainer.wb_config.cache_frozen_prefix != "off"
            trial.set_user_attr("cpu_seconds", round(time.process_time() - cpu, 3))
            trial.set_user_attr("wall_seconds", round(time.perf_counter() - wall, 3))
            trial.set_user_attr("frozen_blocks", frozen)
            trial.set_user_attr(
                "prefix_cache", ("reuse" if frozen in boundaries_seen else "fill") if cached else "off"
            )
            trial.set_user_attr("wb_config", trainer.wb_config.to_dict())
            trial.set_user_attr("hp", dict(setup.last_params))
            if cached:
                boundaries_seen.add(frozen)
        value = float(trainer.objective)
        if save_best_to is not None and _beats_best(study, value, direction):
            trainer.save_model(save_best_to)
            logger.info(
                "hf_wb search: trial %d is the best so far (%.4g); saved to %s", trial.number, value, save_best_to
            )
        return value

    def cpu_budget_spent(study: Any, _trial: Any) -> None:
        if cpu_budget is not None and time.process_time() - started_cpu >= cpu_budget:
            study.stop()

    trainer.hp_search_backend = HPSearchBackend.OPTUNA
    trainer.hp_space = lambda trial: {}  # the trial's values are applied by `setup` (before model_init)
    trainer.hp_name = hp_name
    trainer.compute_objective = default_compute_objective if compute_objective is None else compute_objective
    trainer.wb_search = setup
    trainer.wb_cache_pool = (pool if pool is not None else {}) if share else None
    try:
        if remaining > 0:
            study.optimize(
                objective,
                n_trials=remaining,
                timeout=timeout,
                catch=catch,
                gc_after_trial=gc_after_trial,
                callbacks=[cpu_budget_spent, *callbacks],
            )
    finally:
        setup.restore(trainer)
        trainer.hp_search_backend = None
        trainer.wb_search = None
        trainer.wb_cache_pool = None
    best = study.best_trial
    return BestRun(str(best.number), best.value, best.params)


def _beats_best(study: Any, value: float, direction: str) -> bool:
    try:
        best = study.best_value
    except ValueError:  # no completed trial yet
        return True
    return value > best if direction == "maximize" else value < best


def best_config(base: WBConfig, params: dict[str, Any]) -> WBConfig:
    """``base`` with the recipe fields of a trial's ``params`` (the TrainingArguments fields are left out)."""
    names = {f.name for f in dataclasses.fields(WBConfig)}
    return dataclasses.replace(base, **{k: v for k, v in params.items() if k in names})
