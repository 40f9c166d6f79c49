"""A winning ticket on a GLUE task: ``hf-wb ticket configs/glue/<task>.yaml --rounds R --rate P`` (the logic; the
parser is in ``cli.py``).

Iterative magnitude pruning with rewind (:func:`hf_wb.tickets.find_ticket`) with the config's recipe and training
arguments: R + 1 trainings on the training split (round 0 dense, round ``r`` at sparsity ``1 - (1 - P) ** r``), each
from the pre-trained model (``model_init`` seeds with the config's ``seed``, so a new head starts the same in every
round), each evaluated on the task's dev split(s). No checkpoints are saved during the rounds (``save_strategy``
``no``) and nothing is reported to outside trackers (``report_to`` ``none``).

Output folder (``--output-dir``, default ``<config output_dir>-ticket``):

- ``round_<r>/``: the masks round ``r`` trained with (``hf_wb_ticket.safetensors``, ``hf_wb_ticket.json``), and
  what that round's trainer writes there (``hf_wb_summary.json`` with the sparsity per unit, the weight histograms
  and ``diagnostics.json`` when the recipe records them: ``hf-wb report OUT/round_<r>``);
- the ticket: the last round's masks (``hf_wb_ticket.safetensors``) and the history of rounds (``hf_wb_ticket.json``);
- the last round's trained model next to them: ``model.safetensors`` with the masks folded in
  (:func:`hf_wb.tickets.make_permanent`: plain ``weight`` tensors, zeros where pruned, loadable by any
  ``from_pretrained``), ``config.json``, the tokenizer, ``hf_wb_config.json`` and that round's
  ``hf_wb_summary.json`` (so ``hf-wb inspect OUT`` shows the recipe, its learning rate and the sparsity per unit).
  To train it further without the pruned weights growing back, re-apply the masks:
  ``load_ticket(AutoModelForSequenceClassification.from_pretrained(OUT), OUT)``;
- ``rounds.jsonl``: one line per round (round, sparsity, dev score, dev metrics, CPU and wall seconds, prefix cache
  ``fill`` / ``reuse`` / ``off``, sparsity per pruned module), appended as each round ends;
- ``results.json``: the search summary (task, rounds, rate, scope, every round's line, the totals).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

__all__ = ["ticket_glue", "ROUNDS_NAME"]

logger = logging.getLogger(__name__)

ROUNDS_NAME = "rounds.jsonl"
RESULTS_NAME = "results.json"


class RoundTable:
    """One printed row per finished round (round, sparsity, dev score, CPU seconds, prefix cache)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.bar = tqdm(total=total, desc="hf_wb ticket", unit="round", disable=not enabled)
        self.header_written = False

    def row(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if not self.header_written:
            self.bar.write(f"{'round':>5} {'sparsity':>8} {'dev':>7} {'cpu s':>8} {'wall s':>8} cache")
            self.header_written = True
        self.bar.write(
            f"{record['round']:>5} {100 * record['sparsity']:>7.1f}% {record['dev_score']:>7.2f} "
            f"{record['cpu_seconds']:>8.1f} {record['wall_seconds']:>8.1f} {record['prefix_cache']}"
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _dev_prefix(split: str, several: bool) -> str:
    """The metric prefix of a dev split: ``eval`` alone, ``eval_<name>`` when the task has several (MNLI's
    ``eval_matched`` / ``eval_mismatched``: the Trainer's prefixes for a dict of evaluation sets)."""
    return f"eval_{split.removeprefix('validation_')}" if several else "eval"


def ticket_glue(
    parsed: Any,
    output_dir: str | os.PathLike,
    rounds: int,
    rate: float,
    scope: str = "global",
    include_head: bool = False,
    rewind_step: int = 0,
    share_prefix_cache: bool = True,
    live: bool = True,
) -> dict[str, Any]:
    """Find a winning ticket for the GLUE config ``parsed`` (``hf_wb.glue.run.parse_args``'s result); returns (and
    writes) ``results.json``'s content.

    Args:
        parsed: the config file and command line, parsed.
        output_dir: where the rounds, the ticket, the model and the records go (see the module docstring).
        rounds: pruning rounds R (R + 1 trainings), >= 1.
        rate: fraction of the surviving weights pruned after each round, in (0, 1).
        scope: ``"global"`` (all pruned matrices ranked together) or ``"layer"`` (each by the same fraction).
        include_head: prune the head's weight matrices too.
        rewind_step: 0 = rewind to the pre-trained weights; ``k`` = to the weights after ``k`` steps of round 0.
        share_prefix_cache: the rounds share one in-memory frozen-prefix cache (when the recipe has one).
        live: print a row per finished round (and a progress bar over the rounds).
    """
    if rounds < 1:
        raise ValueError(f"`rounds` must be >= 1, got {rounds}.")
    if not 0.0 < rate < 1.0:
        raise ValueError(f"`rate` must be in (0, 1) (the fraction of surviving weights pruned per round), got {rate}.")
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding
    from transformers import set_seed as hf_set_seed

    from hf_wb.glue.data import tokenize_glue
    from hf_wb.glue.metrics import build_compute_metrics
    from hf_wb.glue.run import load_task_inputs, model_load_kwargs
    from hf_wb.glue.tasks import get_task
    from hf_wb.glue.tune import task_score
    from hf_wb.layers import unwrap_model
    from hf_wb.summary import SUMMARY_NAME, resolve_model_path
    from hf_wb.tickets import TicketRound, find_ticket, make_permanent
    from hf_wb.trainer import WBTrainer

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_args, data_args, training = parsed.model, parsed.data, parsed.training
    task = get_task(data_args.task_name)

    raw, config, tokenizer = load_task_inputs(task, model_args, data_args, ["train", *task.eval_splits])
    tokenized = tokenize_glue(
        raw, tokenizer, task, max_seq_length=data_args.max_seq_length, cache_dir=data_args.dataset_cache_dir
    )
    model_path, load_kwargs = resolve_model_path(model_args.model_name_or_path), model_load_kwargs(model_args)
    several = len(task.eval_splits) > 1
    dev: Any = (
        {split.removeprefix("validation_"): tokenized[split] for split in task.eval_splits}
        if several
        else tokenized[task.eval_splits[0]]
    )
    score_prefix = _dev_prefix(task.eval_splits[0], several)

    def model_init() -> Any:
        hf_set_seed(training.seed)  # a newly initialised head starts the same in every round
        return AutoModelForSequenceClassification.from_pretrained(model_path, config=config, **load_kwargs)

    compute_metrics = build_compute_metrics(task)
    collator = DataCollatorWithPadding(tokenizer)
    trainers: list[Any] = []

    def make_trainer(model: Any) -> Any:
        args = dataclasses.replace(
            training,
            output_dir=str(out / f"round_{len(trainers)}"),  # next to the masks find_ticket saves for this round
            save_strategy="no",
            load_best_model_at_end=False,
            report_to="none",
            disable_tqdm=True,
            push_to_hub=False,
        )
        trainer = WBTrainer(
            model=model,
            args=args,
            train_dataset=tokenized["train"],
            eval_dataset=dev,
            processing_class=tokenizer,
            data_collator=collator,
            compute_metrics=compute_metrics,
            wb_config=parsed.wb_config,
        )
        if live:  # the table replaces the Trainer's printed log dicts
            from transformers import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        trainers.append(trainer)
        return trainer

    rounds_path = out / ROUNDS_NAME
    rounds_path.write_text("", encoding="utf-8")
    records: list[dict[str, Any]] = []
    table = RoundTable(rounds + 1, enabled=live)

    def on_round(done: TicketRound) -> None:
        record = {
            "round": done.round,
            "sparsity": done.sparsity,
            "dev_score": task_score(task, done.metrics, prefix=score_prefix),
            "metrics": done.metrics,
            "cpu_seconds": done.cpu_seconds,
            "wall_seconds": done.wall_seconds,
            "prefix_cache": done.prefix_cache,
            "layer_sparsity": done.layer_sparsity,
        }
        records.append(record)
        with rounds_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        table.row(record)

    started = time.process_time(), time.perf_counter()
    try:
        find_ticket(
            model_init,
            make_trainer,
            rounds=rounds,
            rate=rate,
            output_dir=out,
            scope=scope,
            include_head=include_head,
            rewind_step=rewind_step,
            share_prefix_cache=share_prefix_cache,
            on_round=on_round,
        )
    finally:
        table.close()
    cpu_seconds, wall_seconds = time.process_time() - started[0], time.perf_counter() - started[1]

    # The last round's model, masks folded in (it is not trained further here), next to the ticket's masks.
    last = trainers[-1]
    model = unwrap_model(last.model)
    make_permanent(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    last.wb_config.save_pretrained(out)
    summary = Path(last.args.output_dir) / SUMMARY_NAME
    if summary.is_file():
        shutil.copyfile(summary, out / SUMMARY_NAME)

    results = {
        "task": task.name,
        "model_name_or_path": model_args.model_name_or_path,
        "rounds": rounds,
        "rate": rate,
        "scope": scope,
        "include_head": include_head,
        "rewind_step": rewind_step,
        "share_prefix_cache": share_prefix_cache,
        "sparsity": records[-1]["sparsity"],
        "dev_score": records[-1]["dev_score"],
        "dense_dev_score": records[0]["dev_score"],
        "history": records,
        "recipe": parsed.wb_config.to_dict(),
        "train_rows": len(tokenized["train"]),
        "dev_rows": {split: len(tokenized[split]) for split in task.eval_splits},
        "cpu_seconds": round(cpu_seconds, 2),
        "wall_seconds": round(wall_seconds, 2),
    }
    (out / RESULTS_NAME).write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n", "utf-8")
    logger.info(
        "hf_wb ticket: %d rounds, sparsity %.1f%%, dev %.2f (dense %.2f)",
        rounds,
        100 * results["sparsity"],
        results["dev_score"],
        results["dense_dev_score"],
    )
    return results
