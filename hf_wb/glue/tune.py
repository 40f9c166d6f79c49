"""Tune a GLUE recipe: ``hf-wb tune configs/glue/<task>.yaml --n-trials N`` (the logic; the parser is in ``cli.py``).

Selection never sees the dev set. The training rows (after ``max_train_samples``) are split once: a validation
fraction (``--val-fraction``, default 0.2) drawn at random with ``--split-seed`` (default 0) scores the trials, the
rest trains them. The search (:func:`hf_wb.tune.hyperparameter_search`, optuna, TPE sampler seeded with the config's
``seed``, median pruner after each epoch's evaluation) keeps the best trial's model; when it ends, that model, and
only that one, is evaluated on the GLUE dev split(s), once.

Output folder (``--output-dir``, default ``<config output_dir>-tune``):

- ``study.db``: the optuna study (sqlite); rerunning the same command resumes it (``--n-trials`` counts all
  finished trials; an interrupted trial runs again);
- ``trials.jsonl``: one line per trial (params, validation score, state, CPU and wall seconds, frozen boundary,
  whether the prefix cache was filled or reused, the full recipe), rewritten after every trial;
- ``best/``: the best trial's model, tokenizer and ``hf_wb_config.json`` (``hf-wb push-recipe OUT/best``);
- ``best.yaml``: the config file with the best trial's values, for ``python scripts/run_glue.py OUT/best.yaml``
  (it trains on every training row, the validation fraction included);
- ``results.json``: the search summary and the dev scores of the chosen configuration.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["task_score", "tune_glue", "write_best_yaml", "LiveTable"]

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
TRIALS_NAME = "trials.jsonl"
STUDY_NAME = "study.db"


def task_score(task: Any, metrics: dict[str, float], prefix: str = "eval") -> float:
    """The task's GLUE score x100: the mean of its metrics (``GlueTask.metrics``) in ``metrics``."""
    missing = [m for m in task.metrics if f"{prefix}_{m}" not in metrics]
    if missing:
        raise KeyError(f"{task.name} metrics lack {missing}; got {sorted(metrics)}.")
    return 100.0 * statistics.fmean(float(metrics[f"{prefix}_{m}"]) for m in task.metrics)


class LiveTable:
    """An optuna callback: a progress bar over the trials and one table row per finished trial (best so far)."""

    def __init__(self, total: int | None, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.bar = tqdm(total=total, desc="hf_wb tune", unit="trial", disable=not enabled)
        self.header_written = False

    def __call__(self, study: Any, trial: Any) -> None:
        if not self.enabled:
            return
        if not self.header_written:
            self.bar.write(f"{'trial':>5} {'state':<8} {'score':>7} {'best':>7} {'cpu s':>7} {'cache':<6} params")
            self.header_written = True
        try:
            best = f"{study.best_value:7.2f}"
        except ValueError:
            best = f"{'-':>7}"
        value = f"{trial.value:7.2f}" if trial.value is not None else f"{'-':>7}"
        params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        cpu = trial.user_attrs.get("cpu_seconds")
        cpu = f"{cpu:7.1f}" if cpu is not None else f"{'-':>7}"
        cache = trial.user_attrs.get("prefix_cache", "-")
        self.bar.write(f"{trial.number:>5} {trial.state.name:<8} {value} {best} {cpu} {cache:<6} {params}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_trials(study: Any, path: Path) -> None:
    """Rewrite ``trials.jsonl`` from the study (atomically: a reader never sees half a file)."""
    from hf_wb.tune import trial_record

    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for trial in study.trials:
            f.write(json.dumps(trial_record(trial), sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_best_yaml(
    path: Path, file_values: dict[str, Any], explicit: dict[str, Any], hp: dict[str, Any], recipe: dict[str, Any]
) -> None:
    """``best.yaml``: the tuned config file's values, then the command line's, then the best trial's training values
    and its full recipe (every WBConfig field, so the file alone decides the recipe under any ``--recipe``)."""
    import yaml

    values = {**file_values, **explicit}
    values.pop("recipe", None)
    values.pop("wb_config", None)
    values.update(hp)
    values.update({k: v for k, v in recipe.items() if k != "hf_wb_version"})
    header = (
        "# Written by `hf-wb tune`: the best trial's values over the tuned config. Run it with\n"
        f"#   python scripts/run_glue.py {path}\n"
    )
    path.write_text(header + yaml.safe_dump(_plain(values), sort_keys=False), encoding="utf-8")


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        if hasattr(v, "value"):  # enums (IntervalStrategy, ...)
            v = v.value
        if isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def tune_glue(
    parsed: Any,
    output_dir: str | os.PathLike,
    n_trials: int = 20,
    timeout: float | None = None,
    cpu_budget: float | None = None,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    hp_space: Callable[[Any], dict[str, Any]] | None = None,
    share_prefix_cache: bool = True,
    explicit: dict[str, Any] | None = None,
    live: bool = True,
) -> dict[str, Any]:
    """Search the recipe of ``parsed`` (``hf_wb.glue.run.parse_args``'s result) and evaluate the chosen
    configuration on dev once; returns (and writes) ``results.json``'s content.

    Args:
        parsed: the tuned config file and command line, parsed.
        output_dir: where the study, trials, best model and results go (see the module docstring).
        n_trials: finished trials the study should hold.
        timeout: stop after the trial that crosses this many wall-clock seconds (this invocation).
        cpu_budget: stop after the trial that crosses this many seconds of process CPU time (this invocation).
        val_fraction: share of the training rows that scores the trials.
        split_seed: seed of the train / validation split.
        hp_space: the search space; None = :func:`hf_wb.tune.default_search_space`.
        share_prefix_cache: trials share one frozen-prefix cache per boundary.
        explicit: values given on the command line (written into ``best.yaml`` over the config file's).
        live: show the progress bar and the table of trials.
    """
    import optuna
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
    )

    from hf_wb.config import WBConfig
    from hf_wb.glue.data import tokenize_glue
    from hf_wb.glue.metrics import build_compute_metrics
    from hf_wb.glue.run import _eval_prefix, load_config_file, load_task_inputs, model_load_kwargs
    from hf_wb.glue.tasks import get_task
    from hf_wb.summary import resolve_model_path
    from hf_wb.trainer import WBTrainer

    if not 0 < val_fraction < 1:
        raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}.")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_args, data_args, training = parsed.model, parsed.data, parsed.training
    task = get_task(data_args.task_name)

    raw, config, tokenizer = load_task_inputs(task, model_args, data_args, ["train", *task.eval_splits])
    carved = raw["train"].train_test_split(test_size=val_fraction, seed=split_seed, shuffle=True)
    raw["search_train"], raw["search_validation"] = carved["train"], carved["test"]
    del raw["train"]
    logger.info(
        "hf_wb tune: %d training rows -> %d train the trials, %d score them (val_fraction %g, split seed %d); "
        "the dev set is evaluated once, for the chosen configuration",
        len(carved["train"]) + len(carved["test"]),
        len(carved["train"]),
        len(carved["test"]),
        val_fraction,
        split_seed,
    )

    tokenized = tokenize_glue(
        raw, tokenizer, task, max_seq_length=data_args.max_seq_length, cache_dir=data_args.dataset_cache_dir
    )
    model_path, load_kwargs = resolve_model_path(model_args.model_name_or_path), model_load_kwargs(model_args)

    def model_init() -> Any:
        return AutoModelForSequenceClassification.from_pretrained(model_path, config=config, **load_kwargs)

    args = dataclasses.replace(
        training,
        output_dir=str(out / "trials"),
        eval_strategy="epoch",  # the pruner acts on each epoch's validation score
        save_strategy="no",
        load_best_model_at_end=False,
        report_to="none",
        disable_tqdm=True,
        push_to_hub=False,
    )
    compute_metrics = build_compute_metrics(task)
    collator = DataCollatorWithPadding(tokenizer)
    trainer = WBTrainer(
        model_init=model_init,
        args=args,
        train_dataset=tokenized["search_train"],
        eval_dataset=tokenized["search_validation"],
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
        wb_config=parsed.wb_config,
    )

    if live:  # the table replaces the Trainer's printed log dicts and optuna's per-trial log lines
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = LiveTable(n_trials, enabled=live)
    trials_path = out / TRIALS_NAME
    started = time.process_time(), time.perf_counter()
    try:
        best = trainer.hyperparameter_search(
            hp_space=hp_space,
            compute_objective=lambda metrics: task_score(task, metrics),
            n_trials=n_trials,
            direction="maximize",
            storage=f"sqlite:///{(out / STUDY_NAME).resolve()}",
            study_name=f"hf_wb-{task.name}",
            load_if_exists=True,
            timeout=timeout,
            cpu_budget=cpu_budget,
            save_best_to=str(out / "best"),
            share_prefix_cache=share_prefix_cache,
            callbacks=[lambda study, trial: write_trials(study, trials_path), table],
        )
    finally:
        table.close()
    cpu_seconds, wall_seconds = time.process_time() - started[0], time.perf_counter() - started[1]
    study = optuna.load_study(study_name=f"hf_wb-{task.name}", storage=f"sqlite:///{(out / STUDY_NAME).resolve()}")
    write_trials(study, trials_path)
    best_trial = study.best_trial
    recipe = WBConfig(**{k: v for k, v in best_trial.user_attrs["wb_config"].items() if k != "hf_wb_version"})
    hp = {k: v for k, v in best_trial.user_attrs.get("hp", best_trial.params).items() if not hasattr(recipe, k)}

    # The dev set: once, for the chosen configuration's model (a plain Trainer: evaluation only, no recipe applied).
    best_model = AutoModelForSequenceClassification.from_pretrained(out / "best")
    evaluator = Trainer(
        model=best_model,
        args=dataclasses.replace(args, eval_strategy="no"),
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
    )
    if live:
        from transformers import PrinterCallback

        evaluator.remove_callback(PrinterCallback)
    dev: dict[str, Any] = {}
    for split in task.eval_splits:
        prefix = _eval_prefix(split)
        dev.update(evaluator.evaluate(eval_dataset=tokenized[split], metric_key_prefix=prefix))
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    results = {
        "task": task.name,
        "model_name_or_path": model_args.model_name_or_path,
        "best_trial": int(best.run_id),
        "best_validation_score": best.objective,
        "best_params": hp,
        "best_recipe": recipe.to_dict(),
        "dev_score": task_score(task, dev),
        "dev_metrics": dev,
        "trials_finished": len(finished),
        "trials_pruned": sum(t.state.name == "PRUNED" for t in finished),
        "search_cpu_seconds": round(cpu_seconds, 2),
        "search_wall_seconds": round(wall_seconds, 2),
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "search_train_rows": len(tokenized["search_train"]),
        "search_validation_rows": len(tokenized["search_validation"]),
    }
    (out / RESULTS_NAME).write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n", "utf-8")
    file_values = load_config_file(parsed.config_file) if parsed.config_file else {}
    explicit = {**(explicit or {}), "output_dir": str(out / "final")}
    write_best_yaml(out / "best.yaml", file_values, explicit, hp, recipe.to_dict())
    logger.info(
        "hf_wb tune: best trial %s, validation %.2f, dev %.2f", best.run_id, best.objective, results["dev_score"]
    )
    return results


def explicit_values(parser: Any, argv: list[str], parsed: Any) -> dict[str, Any]:
    """The run_glue values given on the command line (``argv``), read back from the parsed dataclasses."""
    from hf_wb.glue.run import _explicit_dests

    sources = [parsed.model, parsed.data, parsed.recipe, parsed.wb_config, parsed.training]
    out = {}
    for dest in _explicit_dests(parser, argv):
        for source in sources:
            if hasattr(source, dest):
                out[dest] = getattr(source, dest)
                break
    return out
