"""Benchmark: K-FAC against AdamW under the recipe on GLUE, at equal steps and at equal time.

Method: for each task and seed, three trainings of the packaged MiniLM under the recipe of ``configs/glue/<task>.yaml``
(the top 3 of 6 blocks and the head train at 10x the base rate, everything below frozen, the prefix cache on; one
cache per procedure, filled by the first run and reused by the others, so every run trains the top blocks only), from
the same pre-trained weights and seeded head, on the same batches in the same order:

- ``adamw``: the config as it is (the Trainer's default AdamW, ``adamw_torch_fused``; base LR 2e-5, so 2e-4 for the
  trained blocks and the head);
- ``kfac``: ``WBConfig(optimizer="kfac")`` for the same epochs, so the same steps, with base LR ``--kfac-lr``
  (default 1e-3: 1e-2 for the trained blocks and the head, the rate the README's K-FAC section recommends; K-FAC's
  other settings at their documented defaults; not tuned here);
- ``kfac_equal_time``: K-FAC given AdamW's training time: ``max_steps = floor(T_adamw / t_kfac)``, where
  ``T_adamw`` is the CPU seconds of AdamW's optimizer steps (sum over its steps) and ``t_kfac`` K-FAC's mean CPU
  seconds per step in its equal-steps run. The LR schedule (warm-up fraction, linear decay) spans those fewer
  steps, as it would for a run planned with that budget. The CPU seconds it actually used are reported next to
  AdamW's.

Time is the process's CPU time (``time.process_time``, one compute thread) of each optimizer step, from the start
of the step to its end (forward, backward, optimizer step, and K-FAC's factor updates and eigendecompositions every
10 steps), so that the cache fill, evaluation and logging, which are the same for both optimizers, do not count.
Training loss is logged every ``--logging-steps`` steps (the Trainer's mean over those steps) with the cumulative
step CPU time; each run is scored once on the full dev set at its end (GLUE score x100).

Report (``results/<name>.md`` and ``.png``): dev scores (mean ± std over seeds, per seed) of the three runs, the
final training loss, per-step CPU cost of each optimizer and their ratio, and a plot of training loss against step
and against CPU seconds.

Default suite: MRPC (first 700 training rows, 3 epochs) and SST-2 (first 900 rows, 2 epochs), glue_compare's
training subsets, full dev sets, seeds 42 43 44. Estimated cost about 1,800 CPU-seconds in all (about 15 min wall
with ``--jobs 2`` on 2 otherwise idle cores), extrapolated from a run at 224 training rows on a loaded machine: AdamW
about 0.036 (MRPC) / 0.021 (SST-2) CPU-s per row-epoch with the cache, K-FAC 2.5x / 3.0x that per step, about 9 / 12 s
per dev evaluation. With ticket_curve.py's default suite (about 2,800) the two come to about 4,600 CPU-seconds::

    python benchmarks/kfac_compare.py --jobs 2                                        # the default suite
    python benchmarks/kfac_compare.py --tasks mrpc --seeds 42 --train-sizes 64 --name kfac_smoke

Results: ``results/kfac_compare.md``, ``.png`` and ``.jsonl`` (one record per task and seed; a rerun skips stored
records; ``--report-only`` rebuilds the report).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _recipe_setup import (  # noqa: E402
    add_suite_arguments,
    host,
    mean_std,
    run_suite,
    setup_task,
)

logger = logging.getLogger("kfac_compare")
RUNS = ("adamw", "kfac", "kfac_equal_time")


def procedure_key(args: argparse.Namespace, task: str, seed: int) -> str:
    return json.dumps(
        [task, seed, args.model, args.train_sizes[task], args.kfac_lr, args.kfac_args, args.logging_steps,
         args.max_eval_samples]
    )  # fmt: skip


def _train(setup: Any, seed: int, name: str, pool: dict, work: Path, **changes: Any) -> dict[str, Any]:
    """One training run of the recipe with ``changes`` (WBConfig fields and TrainingArguments) and its dev score."""
    from transformers import TrainerCallback

    from hf_wb.trainer import WBTrainer

    wb_fields = {f.name for f in dataclasses.fields(setup.parsed.wb_config)}
    config = dataclasses.replace(setup.parsed.wb_config, **{k: v for k, v in changes.items() if k in wb_fields})
    training = dataclasses.replace(
        setup.parsed.training, output_dir=str(work / name), **{k: v for k, v in changes.items() if k not in wb_fields}
    )
    steps_cpu: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.start = time.process_time()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            steps_cpu.append(time.process_time() - self.start)

    trainer = WBTrainer(
        model=setup.model(seed),
        args=training,
        train_dataset=setup.train,
        eval_dataset=setup.dev,
        data_collator=setup.collator,
        compute_metrics=setup.compute_metrics,
        wb_config=config,
        callbacks=[StepTimer()],
    )
    trainer.wb_cache_pool = pool  # one prefix cache per procedure: the first run fills it
    cpu = time.process_time()
    trainer.train()
    train_cpu = time.process_time() - cpu
    metrics = trainer.evaluate()
    cumulative = [sum(steps_cpu[:i]) for i in range(len(steps_cpu) + 1)]
    curve = [
        {"step": h["step"], "loss": h["loss"], "cpu_s": round(cumulative[min(h["step"], len(steps_cpu))], 3)}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    return {
        "run": name,
        "optimizer": config.optimizer or training.optim.value,
        "learning_rate": training.learning_rate,
        "steps": len(steps_cpu),
        "max_steps": training.max_steps,
        "step_cpu_s": round(sum(steps_cpu), 3),
        "mean_step_cpu_s": statistics.fmean(steps_cpu),
        "train_cpu_s": round(train_cpu, 3),
        "prefix_cache": trainer.wb_cache_status.get("on", False),
        "curve": curve,
        "final_loss": curve[-1]["loss"] if curve else None,
        "dev_score": setup.score(metrics),
        "dev_metrics": {k: float(v) for k, v in metrics.items()},
    }


def procedure(args: argparse.Namespace, task: str, seed: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix=f"kfac_compare_{task}_{seed}_"))
    start = time.perf_counter()
    overrides = ["--logging_steps", str(args.logging_steps)]
    kfac = {"optimizer": "kfac", "learning_rate": args.kfac_lr, "optim_args": args.kfac_args or None}
    try:
        setup = setup_task(
            task, seed, args.train_sizes[task], args.glue_dir, str(work), args.model, args.max_eval_samples, overrides
        )
        pool: dict = {}
        runs = [_train(setup, seed, "adamw", pool, work)]
        runs.append(_train(setup, seed, "kfac", pool, work, **kfac))
        budget = runs[0]["step_cpu_s"]
        steps = max(1, math.floor(budget / runs[1]["mean_step_cpu_s"]))
        runs.append(_train(setup, seed, "kfac_equal_time", pool, work, max_steps=steps, **kfac))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    training = setup.parsed.training
    return {
        "key": procedure_key(args, task, seed),
        "task": task,
        "seed": seed,
        "model": args.model,
        "train_rows": len(setup.train),
        "dev_rows": len(setup.dev),
        "epochs": training.num_train_epochs,
        "batch_size": training.per_device_train_batch_size,
        "recipe": setup.parsed.wb_config.to_dict(),
        "kfac_args": args.kfac_args,
        "runs": {r["run"]: r for r in runs},
        "overhead": runs[1]["mean_step_cpu_s"] / runs[0]["mean_step_cpu_s"],
        "process_wall_s": round(time.perf_counter() - start, 1),
        **host(),
    }


# ----- report ----------------------------------------------------------------------------------------------------
def write_report(records: list[dict[str, Any]], path: Path, command: str) -> None:
    lines = ["# kfac_compare: K-FAC against AdamW under the recipe", "", f"Command: `{command}`", ""]
    if not records:
        path.write_text("\n".join(lines) + "\nNo records yet.\n", encoding="utf-8")
        return
    r0 = records[0]
    a0, k0 = r0["runs"]["adamw"], r0["runs"]["kfac"]
    lines += [
        f"Packaged MiniLM ({r0['model']}), recipe of `configs/glue/<task>.yaml` (top {r0['recipe']['top_layers']} "
        f"blocks x{r0['recipe']['top_lr_multiplier']:g} over frozen blocks, prefix cache on), batch "
        f"{r0['batch_size']}. AdamW (`{a0['optimizer']}`): base LR {a0['learning_rate']:g}; K-FAC: base LR "
        f"{k0['learning_rate']:g}, "
        f"optim_args `{r0['kfac_args'] or 'defaults'}`. Equal steps: the config's epochs for both. Equal time: "
        "K-FAC's max_steps = floor(AdamW's summed step CPU seconds / K-FAC's mean step CPU seconds). CPU seconds = "
        f"process time of the optimizer steps (forward, backward, step), one thread. {r0['host']}, "
        f"torch {r0['torch']}.",
        "",
        "| task | run | steps | step CPU s (sum) | ms / step | dev score, mean ± std | per seed | final train loss |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for task in sorted({r["task"] for r in records}):
        recs = sorted((r for r in records if r["task"] == task), key=lambda r: r["seed"])
        for run in RUNS:
            rs = [r["runs"][run] for r in recs]
            losses = [x["final_loss"] for x in rs if x["final_loss"] is not None]
            lines.append(
                f"| {task} | {run} | {statistics.fmean(x['steps'] for x in rs):.0f} | "
                f"{statistics.fmean(x['step_cpu_s'] for x in rs):.1f} | "
                f"{1000 * statistics.fmean(x['mean_step_cpu_s'] for x in rs):.0f} | "
                f"{mean_std([x['dev_score'] for x in rs])} | "
                + ", ".join(f"{r['seed']}: {x['dev_score']:.2f}" for r, x in zip(recs, rs, strict=True))
                + f" | {mean_std(losses)} |"
            )
    lines += ["", "| task | K-FAC / AdamW CPU per step, mean ± std | Δ dev equal steps | Δ dev equal time |",
              "|---|---:|---:|---:|"]  # fmt: skip
    for task in sorted({r["task"] for r in records}):
        recs = [r for r in records if r["task"] == task]
        d_steps = [r["runs"]["kfac"]["dev_score"] - r["runs"]["adamw"]["dev_score"] for r in recs]
        d_time = [r["runs"]["kfac_equal_time"]["dev_score"] - r["runs"]["adamw"]["dev_score"] for r in recs]
        lines.append(
            f"| {task} | {mean_std([r['overhead'] for r in recs])}x | {mean_std(d_steps)} | {mean_std(d_time)} |"
        )
    total = sum(x["train_cpu_s"] for r in records for x in r["runs"].values())
    lines += ["", f"Δ = K-FAC - AdamW (same seed). Total training CPU seconds: {total:.0f}.", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_plot(records: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib missing (pip install -e .[report]): no plot")
        return
    tasks = sorted({r["task"] for r in records})
    if not tasks:
        return
    colors = {"adamw": "tab:blue", "kfac": "tab:red", "kfac_equal_time": "tab:orange"}
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.6 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks, strict=True):
        for r in (r for r in records if r["task"] == task):
            for run in RUNS:
                curve = r["runs"][run]["curve"]
                label = run if r is next(x for x in records if x["task"] == task) else None
                for ax, x in zip(row, ("step", "cpu_s"), strict=True):
                    ax.plot([p[x] for p in curve], [p["loss"] for p in curve], color=colors[run], lw=1, alpha=0.7,
                            label=label)  # fmt: skip
        row[0].set_xlabel("optimizer step")
        row[1].set_xlabel("CPU seconds of the optimizer steps")
        row[0].set_title(f"{task}: training loss per step (one line per seed)")
        row[1].set_title(f"{task}: training loss per CPU second")
        for ax in row:
            ax.set_ylabel("training loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----- main ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_suite_arguments(p, "kfac_compare")
    p.add_argument("--kfac-lr", type=float, default=1e-3, help="K-FAC's base LR (x10 for the trained blocks)")
    p.add_argument("--kfac-args", default="", help="K-FAC settings as optim_args, e.g. damping=0.01 (default: none)")
    p.add_argument("--logging-steps", type=int, default=5, help="training loss logged every N steps (default 5)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw_argv)
    logging.getLogger("hf_wb").setLevel(logging.WARNING)
    suite = run_suite(Path(__file__), args, raw_argv, procedure, procedure_key, logger)
    if suite is None:  # a child process ran one procedure
        return 0
    records, stem, command = suite
    write_report(records, Path(f"{stem}.md"), command)
    write_plot(records, Path(f"{stem}.png"))
    logger.info("report: %s", f"{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
