"""Benchmark: does the hf_wb recipe beat plain fine-tuning on GLUE? Quality at equal epochs and at equal wall time.

Every run is one subprocess of ``scripts/run_glue.py`` (``hf_wb.glue.run.main``), so no state (threads, caches,
seeds, allocator) leaks between runs and each run's ``train_runtime`` is the Trainer's own training time. The sweep is
tasks x recipes x learning rates x seeds, in two phases:

1. **equal epochs**: every recipe trains ``--epochs`` epochs at every LR of the grid.
2. **equal budget**: every non-baseline recipe, at its best LR of phase 1 (best mean dev score over seeds), trains for
   the wall time the baseline needed. Rule: ``max_steps = round(S * t_base / t)``, where ``S`` is the baseline's
   step count at that LR, and ``t_base`` and ``t`` the fastest time per optimizer step (``train_runtime / steps``) of
   the baseline and of the recipe over all their phase-1 runs on that task (every LR and seed; the minimum, as
   ``timeit`` does, because other work on a shared machine only ever slows a run down). The LR schedule (linear
   decay, 6% warmup) spans the new ``max_steps``. The baseline's equal-budget result is its phase-1 result, and so is
   that of a recipe whose budget buys within 10% of its phase-1 steps (``lwd``: nothing frozen, the baseline's speed).

Recipes (``--recipes``; all through ``hf_wb.WBTrainer``):

- ``baseline``: ``--recipe baseline`` = ``WBConfig.baseline()``: one LR everywhere, nothing frozen, bias prior off.
- ``headline``: ``WBConfig()`` defaults: the top 3 blocks and the head at 5x the LR, every block below and the
  embeddings frozen (eval-pinned), bias prior on.
- ``top3x10``: the same with the top 3 blocks and head at 10x.
- ``lwd``: nothing frozen, top 3 blocks and head at 5x, layer-wise decay 0.8 below (block ``d`` blocks below the top
  gets ``lr * 0.8**d``, embeddings one more step), bias prior on.

Monitoring is off in every run (``histogram_steps 0``, ``diagnostics false``) so timings compare the recipes only.
Scores are dev-set GLUE metrics x100: the mean of the task's GLUE metrics (Matthews correlation for CoLA, the mean of
F1 and accuracy for MRPC, accuracy for SST-2, mean of Pearson and Spearman for STS-B). The training set is the first
N rows of the task's train file (``--train-sizes``), the dev set is complete unless ``--max-eval-samples`` is given.

Each run is appended to ``<out-dir>/<name>.jsonl`` as soon as it ends; a rerun with the same settings skips the runs
already stored (resume after an interruption). The report (``<name>.md``) and plot (``<name>.png``) are rewritten
from the JSONL after every run, so a partial sweep always has a partial (marked) report.

Run (the committed results: 900 CoLA / 700 MRPC / 900 SST-2 train rows, batch 32, 3 epochs, 3 seeds, LRs 2e-5 and
5e-5 for every recipe and 1e-4 for the baseline, 4 recipes, both phases: 102 runs, about 2 h on 2 CPU cores)::

    python benchmarks/glue_compare.py --glue-dir ../shared/data/glue

Smoke run (a couple of minutes)::

    python benchmarks/glue_compare.py --quick --glue-dir ../shared/data/glue

Any task, model or grid (e.g. on a GPU)::

    python benchmarks/glue_compare.py --tasks rte stsb --model bert-base-uncased --train-sizes all \\
        --lrs 2e-5 3e-5 5e-5 --seeds 1 2 3 4 5 --threads 8 --out-dir results/bert
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RUN_GLUE = REPO / "scripts" / "run_glue.py"

logger = logging.getLogger("glue_compare")


@dataclass(frozen=True)
class Recipe:
    """A compared recipe: its name, what it is, and the ``run_glue`` arguments that select it."""

    name: str
    description: str
    args: tuple[str, ...]


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "baseline",
            "plain fine-tuning (WBConfig.baseline()): one LR everywhere, nothing frozen, bias prior off",
            ("--recipe", "baseline"),
        ),
        Recipe(
            "headline",
            "WBConfig() defaults: top 3 blocks + head at 5x, blocks below and embeddings frozen, bias prior on",
            ("--recipe", "hf_wb"),
        ),
        Recipe(
            "top3x10",
            "top 3 blocks + head at 10x, blocks below and embeddings frozen, bias prior on",
            ("--recipe", "hf_wb", "--top_lr_multiplier", "10"),
        ),
        Recipe(
            "lwd",
            "nothing frozen, top 3 blocks + head at 5x, layer-wise LR decay 0.8 below the top, bias prior on",
            ("--recipe", "hf_wb", "--freeze_layers", "0", "--layer_lr_decay", "0.8"),
        ),
    )
}
BASELINE = "baseline"
DEFAULT_TASKS = ("cola", "mrpc", "sst2")
DEFAULT_TRAIN_SIZES = {"cola": 900, "mrpc": 700, "sst2": 900}  # sized for about 2 h on 2 CPU cores (docstring)
PHASES = ("equal_epochs", "equal_budget")
REUSE_TOLERANCE = 0.1  # equal budget within 10% of the equal-epoch steps: reuse the equal-epoch runs

# GLUE task -> the eval metrics (without the ``eval_`` prefix) averaged into its score, in GLUE's convention.
SCORE_METRICS = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"),
    "stsb": ("pearson", "spearmanr"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}
SCORE_LABEL = {
    "cola": "Matthews corr.",
    "sst2": "accuracy",
    "mrpc": "mean of F1 and accuracy",
    "qqp": "mean of F1 and accuracy",
    "stsb": "mean of Pearson and Spearman",
    "mnli": "matched accuracy",
}


# ----- settings ---------------------------------------------------------------------------------------------------
def parse_train_sizes(values: list[str] | None, tasks: list[str]) -> dict[str, int | None]:
    """``["cola=2000", "mrpc=1500"]``, ``["1000"]`` (every task) or ``["all"]`` -> task -> row limit (None = all)."""
    sizes: dict[str, int | None] = {task: DEFAULT_TRAIN_SIZES.get(task) for task in tasks}
    for value in values or []:
        if "=" in value:
            task, _, size = value.partition("=")
            if task not in tasks:
                raise ValueError(f"`--train-sizes` names {task!r}, which is not in `--tasks` {tasks}.")
            sizes[task] = _size(size)
        else:
            sizes = {task: _size(value) for task in tasks}
    return sizes


def _size(value: str) -> int | None:
    if value.lower() in ("all", "none", "full"):
        return None
    size = int(value)
    if size <= 0:
        raise ValueError(f"`--train-sizes` values must be positive or 'all'; got {value!r}.")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=None, help=f"GLUE tasks (default {' '.join(DEFAULT_TASKS)}).")
    parser.add_argument(
        "--recipes", nargs="+", default=None, choices=sorted(RECIPES), help="Recipes (default: all; baseline first)."
    )
    parser.add_argument("--lrs", nargs="+", type=float, default=None, help="Base LR grid (default 2e-5 5e-5).")
    parser.add_argument(
        "--baseline-lrs",
        nargs="+",
        type=float,
        default=None,
        help="Extra LRs for the baseline only (default 1e-4; none with --quick): plain fine-tuning often wants a "
        "higher LR than recipes that multiply it for the top blocks; its best LR is taken over both grids.",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="Seeds (default 42 43 44).")
    parser.add_argument("--model", default="minilm", help="Model folder or Hub id; 'minilm' = the packaged MiniLM.")
    parser.add_argument(
        "--glue-dir",
        default=os.environ.get("GLUE_DIR", str(REPO.parent / "shared" / "data" / "glue")),
        help="GLUE folder in the original layout (default $GLUE_DIR, else ../shared/data/glue).",
    )
    parser.add_argument(
        "--train-sizes",
        nargs="+",
        default=None,
        help="Training rows per task: TASK=N pairs, one N for every task, or 'all' "
        f"(default {' '.join(f'{k}={v}' for k, v in DEFAULT_TRAIN_SIZES.items())}, other tasks all).",
    )
    parser.add_argument("--max-eval-samples", type=int, default=None, help="Dev rows per task (default: all).")
    parser.add_argument("--epochs", type=float, default=None, help="Epochs in the equal-epoch phase (default 3).")
    parser.add_argument("--max-steps", type=int, default=None, help="Fixed optimizer steps instead of --epochs.")
    parser.add_argument("--batch-size", type=int, default=32, help="Training batch size (default 32).")
    parser.add_argument("--eval-batch-size", type=int, default=128, help="Evaluation batch size (default 128).")
    parser.add_argument("--max-seq-length", type=int, default=128, help="Max tokens per input (default 128).")
    parser.add_argument(
        "--budget",
        choices=("best", "all", "none"),
        default="best",
        help="Equal-budget phase: at each recipe's best LR (default), at every LR, or skipped.",
    )
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of each run (default 2).")
    parser.add_argument("--cpu", action="store_true", help="Force CPU training (use_cpu) even when a GPU exists.")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="Extra run_glue arguments (last).")
    parser.add_argument("--out-dir", default=None, help="Where the .md/.jsonl/.png go (default results/).")
    parser.add_argument("--name", default=None, help="File stem of the outputs (default glue_compare).")
    parser.add_argument("--work-dir", default=None, help="Scratch folder for run outputs (default: a temp dir).")
    parser.add_argument("--keep-runs", action="store_true", help="Keep each run's output folder (models, logs).")
    parser.add_argument("--report-only", action="store_true", help="Rewrite the report and plot from the JSONL.")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Smoke run: 64 train / 64 dev rows, 1 seed, LR 5e-5, 4 steps, length 64 "
        "(outputs under outputs/glue_compare_quick unless --out-dir).",
    )
    return parser


@dataclass
class Settings:
    tasks: list[str]
    recipes: list[str]
    lrs: list[float]
    seeds: list[int]
    baseline_lrs: list[float]
    model: str
    glue_dir: str
    train_sizes: dict[str, int | None]
    max_eval_samples: int | None
    epochs: float
    max_steps: int | None
    batch_size: int
    eval_batch_size: int
    max_seq_length: int
    budget: str
    threads: int
    cpu: bool
    extra: list[str]
    out_dir: Path
    name: str
    quick: bool

    def lrs_for(self, recipe: str) -> list[float]:
        """The equal-epoch LR grid of a recipe: the shared grid, plus ``baseline_lrs`` for the baseline."""
        return sorted({*self.lrs, *self.baseline_lrs}) if recipe == BASELINE else list(self.lrs)


def settings_from_args(args: argparse.Namespace) -> Settings:
    quick = args.quick
    tasks = [t.lower().replace("-", "") for t in (args.tasks or DEFAULT_TASKS)]
    unknown = sorted(set(tasks) - set(SCORE_METRICS))
    if unknown:
        raise ValueError(f"`--tasks` has unknown GLUE tasks {unknown}; choose from {sorted(SCORE_METRICS)}.")
    recipes = list(args.recipes or RECIPES)
    if BASELINE not in recipes:
        raise ValueError(f"`--recipes` {recipes} must include {BASELINE!r}: every figure is relative to it.")
    recipes = [BASELINE] + [r for r in recipes if r != BASELINE]
    train_sizes = parse_train_sizes(args.train_sizes, tasks)
    if quick and args.train_sizes is None:
        train_sizes = {task: 64 for task in tasks}
    max_eval = args.max_eval_samples if args.max_eval_samples is not None else (64 if quick else None)
    max_steps = args.max_steps if args.max_steps is not None else (4 if quick else None)
    if max_steps is not None and max_steps <= 0:
        raise ValueError(f"`--max-steps` must be positive; got {max_steps}.")
    batch_size = 16 if quick and args.batch_size == 32 else args.batch_size
    max_seq_length = 64 if quick and args.max_seq_length == 128 else args.max_seq_length
    out_dir = Path(args.out_dir) if args.out_dir else (REPO / ("outputs/glue_compare_quick" if quick else "results"))
    return Settings(
        tasks=tasks,
        recipes=recipes,
        lrs=list(args.lrs or ([5e-5] if quick else [2e-5, 5e-5])),
        seeds=list(args.seeds or ([42] if quick else [42, 43, 44])),
        baseline_lrs=sorted(
            set(args.baseline_lrs if args.baseline_lrs is not None else ([] if quick else [1e-4]))
            - set(args.lrs or ([5e-5] if quick else [2e-5, 5e-5]))
        ),
        model=args.model,
        glue_dir=args.glue_dir,
        train_sizes=train_sizes,
        max_eval_samples=max_eval,
        epochs=args.epochs if args.epochs is not None else (1.0 if quick else 3.0),
        max_steps=max_steps,
        batch_size=batch_size,
        eval_batch_size=args.eval_batch_size,
        max_seq_length=max_seq_length,
        budget=args.budget,
        threads=args.threads,
        cpu=args.cpu,
        extra=list(args.extra or []),
        out_dir=out_dir,
        name=args.name or "glue_compare",
        quick=quick,
    )


# ----- runs ---------------------------------------------------------------------------------------------------------
def run_key(s: Settings, phase: str, task: str, recipe: str, lr: float, seed: int) -> str:
    """Identity of a run for resuming: everything that changes its result except the budget's step count."""
    ident = {
        "phase": phase,
        "task": task,
        "recipe": recipe,
        "recipe_args": list(RECIPES[recipe].args),
        "lr": lr,
        "seed": seed,
        "model": s.model,
        "train_rows": s.train_sizes[task],
        "max_eval_samples": s.max_eval_samples,
        "epochs": s.epochs,
        "max_steps": s.max_steps,
        "batch_size": s.batch_size,
        "max_seq_length": s.max_seq_length,
        "extra": s.extra,
    }
    return json.dumps(ident, sort_keys=True)


def task_score(task: str, result: dict[str, Any]) -> float:
    """The task's GLUE score x100 from ``run_glue``'s results (mean of the task's GLUE metrics)."""
    names = SCORE_METRICS[task]
    missing = [n for n in names if f"eval_{n}" not in result]
    if missing:
        raise KeyError(f"run_glue results for {task} lack {missing}; got {sorted(result)}.")
    return 100.0 * statistics.fmean(float(result[f"eval_{n}"]) for n in names)


def steps_per_epoch(rows: int, batch_size: int) -> int:
    return math.ceil(rows / batch_size)


def run_glue_argv(
    s: Settings, task: str, recipe: str, lr: float, seed: int, output_dir: Path, max_steps: int | None
) -> list[str]:
    argv = [
        "--task_name", task,
        "--model_name_or_path", s.model,
        "--data_dir", s.glue_dir,
        "--max_seq_length", str(s.max_seq_length),
        "--output_dir", str(output_dir),
        "--do_train", "--do_eval",
        "--num_train_epochs", str(s.epochs),
        "--per_device_train_batch_size", str(s.batch_size),
        "--per_device_eval_batch_size", str(s.eval_batch_size),
        "--learning_rate", str(lr),
        "--weight_decay", "0.01",
        "--warmup_steps", "0.06",
        "--lr_scheduler_type", "linear",
        "--seed", str(seed),
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--logging_steps", "50",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--dataloader_num_workers", "0",
        "--histogram_steps", "0",
        "--diagnostics", "false",
    ]  # fmt: skip
    argv += list(RECIPES[recipe].args)
    if s.train_sizes[task] is not None:
        argv += ["--max_train_samples", str(s.train_sizes[task])]
    if s.max_eval_samples is not None:
        argv += ["--max_eval_samples", str(s.max_eval_samples)]
    if max_steps is not None:
        argv += ["--max_steps", str(max_steps)]
    if s.cpu:
        argv += ["--use_cpu"]
    return argv + s.extra


def execute_run(
    s: Settings,
    work_dir: Path,
    phase: str,
    task: str,
    recipe: str,
    lr: float,
    seed: int,
    max_steps: int | None,
    keep: bool,
) -> dict[str, Any]:
    """Run one fine-tuning in a fresh process and return its record (raises RuntimeError on failure)."""
    output_dir = work_dir / f"{phase}-{task}-{recipe}-lr{lr:g}-s{seed}"
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    argv = run_glue_argv(s, task, recipe, lr, seed, output_dir, max_steps)
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(s.threads),
        MKL_NUM_THREADS=str(s.threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    log_path = output_dir / "run.log"
    start = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.run(
            [sys.executable, str(RUN_GLUE), *argv], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )
    wall = time.perf_counter() - start
    results_path = output_dir / "all_results.json"
    if proc.returncode != 0 or not results_path.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"run_glue failed (exit {proc.returncode}), log {log_path}:\n{tail}")
    result = json.loads(results_path.read_text(encoding="utf-8"))
    if not keep:
        shutil.rmtree(output_dir)
    rows = int(result.get("train_samples", 0))
    steps = max_steps if max_steps is not None else math.ceil(steps_per_epoch(rows, s.batch_size) * s.epochs)
    return {
        "key": run_key(s, phase, task, recipe, lr, seed),
        "phase": phase,
        "task": task,
        "recipe": recipe,
        "recipe_args": list(RECIPES[recipe].args),
        "lr": lr,
        "seed": seed,
        "model": s.model,
        "train_rows": rows,
        "eval_rows": result.get("eval_samples"),
        "epochs": s.epochs if max_steps is None else round(steps / steps_per_epoch(rows, s.batch_size), 3),
        "max_steps": max_steps,
        "steps": steps,
        "batch_size": s.batch_size,
        "max_seq_length": s.max_seq_length,
        "score": task_score(task, result),
        "metrics": {k: v for k, v in result.items() if k.startswith("eval_")},
        "train_runtime": float(result["train_runtime"]),
        "step_time": float(result["train_runtime"]) / steps,
        "train_loss": result.get("train_loss"),
        "process_wall_s": round(wall, 2),
        "threads": s.threads,
        "recipe_config": result.get("recipe"),
        "hf_wb_version": result.get("hf_wb_version"),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
    }


def load_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----- aggregation --------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def current_records(s: Settings, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored runs that belong to these settings (others in the file are ignored)."""
    wanted = {
        run_key(s, phase, task, recipe, lr, seed)
        for phase in PHASES
        for task in s.tasks
        for recipe in s.recipes
        for lr in s.lrs_for(recipe)
        for seed in s.seeds
    }
    latest: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["key"] in wanted:
            latest[r["key"]] = r
    return list(latest.values())


def grid(records: list[dict[str, Any]], phase: str) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
    """(task, recipe, lr) -> runs of one phase."""
    out: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["phase"] == phase:
            out[(r["task"], r["recipe"], r["lr"])].append(r)
    return out


def best_lr(cells: dict[tuple[str, str, float], list[dict[str, Any]]], task: str, recipe: str) -> float | None:
    """The LR whose mean dev score over seeds is highest (ties: the smaller LR)."""
    candidates = [(statistics.fmean(r["score"] for r in runs), -lr, lr) for (t, rc, lr), runs in cells.items()
                  if t == task and rc == recipe and runs]  # fmt: skip
    return max(candidates)[2] if candidates else None


def budget_steps(s: Settings, epoch_cells: dict, task: str, recipe: str, lr: float) -> int | None:
    """Steps that fill the baseline's train time at ``lr`` at the recipe's measured step time (see module doc).

    Step times are the fastest over all equal-epoch runs of a recipe on the task (every LR of the shared grid and
    every seed: the step time does not depend on them): other work on a shared machine only ever slows a run down,
    so the minimum is the least disturbed estimate, and it is taken the same way for the baseline and the recipe.
    """
    base = epoch_cells.get((task, BASELINE, lr), [])
    # the shared grid only: the baseline's extra LRs (--baseline-lrs) must not move the budget of the other runs
    base_all = [
        r for (t, rc, x), runs in epoch_cells.items() if t == task and rc == BASELINE and x in s.lrs for r in runs
    ]
    own = [r for (t, rc, _), runs in epoch_cells.items() if t == task and rc == recipe for r in runs]
    if len(base) < len(s.seeds) or not own:
        return None
    base_steps = statistics.fmean(r["steps"] for r in base)
    ratio = min(r["step_time"] for r in base_all) / min(r["step_time"] for r in own)
    return max(1, round(base_steps * ratio))


def reuses_epoch_runs(s: Settings, epoch_cells: dict, task: str, recipe: str, lr: float) -> bool:
    """True when the budget buys within ``REUSE_TOLERANCE`` of the steps the recipe took at equal epochs.

    Then its equal-epoch runs already fill the budget (e.g. ``lwd``, which freezes nothing and runs at the
    baseline's speed) and no extra runs are made: they would repeat them with timing noise in the step count.
    """
    steps = budget_steps(s, epoch_cells, task, recipe, lr)
    own = epoch_cells.get((task, recipe, lr), [])
    if steps is None or not own:
        return False
    epoch_steps = statistics.fmean(r["steps"] for r in own)
    return abs(steps / epoch_steps - 1) <= REUSE_TOLERANCE


def summarize(s: Settings, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Best-of-grid tables for both phases, paired deltas, and the full grid (as plain data for the report/plot)."""
    epoch_cells = grid(records, "equal_epochs")
    budget_cells = grid(records, "equal_budget")
    out: dict[str, Any] = {"phases": {}}
    for phase in PHASES:
        rows = {}
        for recipe in s.recipes:
            per_task = {}
            for task in s.tasks:
                lr = best_lr(epoch_cells, task, recipe)
                if lr is None:
                    continue
                if (
                    phase == "equal_budget"
                    and recipe != BASELINE
                    and not reuses_epoch_runs(s, epoch_cells, task, recipe, lr)
                ):
                    runs = budget_cells.get((task, recipe, lr), [])
                else:
                    runs = epoch_cells.get((task, recipe, lr), [])
                if not runs:
                    continue
                mean, std = _mean_std([r["score"] for r in runs])
                per_task[task] = {
                    "lr": lr,
                    "n": len(runs),
                    "mean": mean,
                    "std": std,
                    "time": statistics.fmean(r["train_runtime"] for r in runs),
                    "epochs": statistics.fmean(r["epochs"] for r in runs),
                    "steps": statistics.fmean(r["steps"] for r in runs),
                    "by_seed": {r["seed"]: r["score"] for r in runs},
                }
            rows[recipe] = per_task
        base = rows.get(BASELINE, {})
        for per_task in rows.values():
            for task, cell in per_task.items():
                if task in base:
                    paired = [cell["by_seed"][sd] - base[task]["by_seed"][sd]
                              for sd in cell["by_seed"] if sd in base[task]["by_seed"]]  # fmt: skip
                    cell["delta"], cell["delta_std"] = _mean_std(paired)
                    cell["time_ratio"] = cell["time"] / base[task]["time"]
            complete = len(per_task) == len(s.tasks) and all(t in base for t in s.tasks)
            if complete:
                seeds = set.intersection(*(set(c["by_seed"]) for c in per_task.values()))
                seeds &= set.intersection(*(set(base[t]["by_seed"]) for t in s.tasks))
                avg_by_seed = {sd: statistics.fmean(per_task[t]["by_seed"][sd] for t in s.tasks) for sd in seeds}
                base_by_seed = {sd: statistics.fmean(base[t]["by_seed"][sd] for t in s.tasks) for sd in seeds}
                avg_mean = statistics.fmean(per_task[t]["mean"] for t in s.tasks)
                delta, delta_std = _mean_std([avg_by_seed[sd] - base_by_seed[sd] for sd in sorted(seeds)])
                time_total = sum(per_task[t]["time"] for t in s.tasks)
                base_total = sum(base[t]["time"] for t in s.tasks)
                per_task["_avg"] = {
                    "mean": avg_mean,
                    "std": _mean_std(list(avg_by_seed.values()))[1],
                    "delta": delta,
                    "delta_std": delta_std,
                    "time": time_total,
                    "time_ratio": time_total / base_total,
                    "n": len(seeds),
                }
        out["phases"][phase] = rows
    out["grid"] = {
        f"{task}|{recipe}|{lr:g}": {
            "task": task,
            "recipe": recipe,
            "lr": lr,
            "n": len(runs),
            "mean": _mean_std([r["score"] for r in runs])[0],
            "std": _mean_std([r["score"] for r in runs])[1],
            "time": statistics.fmean(r["train_runtime"] for r in runs),
            "steps": statistics.fmean(r["steps"] for r in runs),
        }
        for phase_cells in (epoch_cells,)
        for (task, recipe, lr), runs in sorted(phase_cells.items())
    }
    return out


# ----- report -------------------------------------------------------------------------------------------------------
def _fmt(mean: float, std: float | None = None, signed: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text if std is None else f"{text} ± {std:.2f}"


def phase_table(s: Settings, rows: dict[str, dict[str, Any]], budget: bool) -> list[str]:
    head = ["recipe"] + [f"{t} ({SCORE_LABEL.get(t, 'accuracy')})" for t in s.tasks]
    head += ["average", "Δ avg vs baseline (points)", "train time (s)", "time ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for recipe in s.recipes:
        per_task = rows.get(recipe, {})
        cells = [f"`{recipe}`"]
        for task in s.tasks:
            c = per_task.get(task)
            if c is None:
                cells.append("-")
                continue
            extra = f"lr {c['lr']:g}"
            if budget and recipe != BASELINE:
                extra += f", {c['epochs']:.1f} ep"
            delta = "" if recipe == BASELINE or "delta" not in c else f"; Δ {_fmt(c['delta'], c['delta_std'], True)}"
            cells.append(f"{_fmt(c['mean'], c['std'])} ({extra}{delta})")
        avg = per_task.get("_avg")
        if avg:
            cells += [
                _fmt(avg["mean"], avg["std"]),
                "0 (reference)" if recipe == BASELINE else _fmt(avg["delta"], avg["delta_std"], True),
                f"{avg['time']:.1f}",
                f"{avg['time_ratio']:.2f}",
            ]
        else:
            cells += ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def step_time_table(s: Settings, records: list[dict[str, Any]]) -> list[str]:
    fastest: dict[tuple[str, str], float] = {}
    for r in records:
        if r["phase"] == "equal_epochs" and r["lr"] in s.lrs:  # the shared grid, as budget_steps() uses
            key = (r["task"], r["recipe"])
            fastest[key] = min(fastest.get(key, math.inf), r["step_time"])
    lines = ["| recipe | " + " | ".join(s.tasks) + " |", "|" + "---|" * (len(s.tasks) + 1)]
    for recipe in s.recipes:
        cells = []
        for task in s.tasks:
            own, base = fastest.get((task, recipe)), fastest.get((task, BASELINE))
            cells.append("-" if own is None or base is None else f"{own:.2f} ({own / base:.2f})")
        lines.append(f"| `{recipe}` | " + " | ".join(cells) + " |")
    return lines


def write_report(s: Settings, records: list[dict[str, Any]], planned: int, failed: int, command: str) -> Path:
    summary = summarize(s, records)
    md = s.out_dir / f"{s.name}.md"
    done = len(records)
    status = "complete" if done >= planned and not failed else f"PARTIAL: {done} of {planned} planned runs stored"
    if failed:
        status += f", {failed} failed (see the log)"
    sizes = ", ".join(f"{t} {s.train_sizes[t] if s.train_sizes[t] else 'all'}" for t in s.tasks)
    steps_rule = f"{s.max_steps} optimizer steps" if s.max_steps else f"{s.epochs:g} epochs"
    when = max((r["finished_at"] for r in records), default="-")
    threads = {r["threads"] for r in records}
    hosts = sorted({r["host"] for r in records})
    counts: dict[tuple[str, str, float], int] = defaultdict(int)
    for r in records:
        if r["phase"] == "equal_epochs":
            counts[(r["task"], r["recipe"], r["lr"])] += 1
    missing = [
        f"{task} `{recipe}` lr {lr:g} ({counts[(task, recipe, lr)]} of {len(s.seeds)} seeds)"
        for task in s.tasks
        for recipe in s.recipes
        for lr in s.lrs_for(recipe)
        if counts[(task, recipe, lr)] < len(s.seeds)
    ]
    lines = [
        "# GLUE: the hf_wb recipes against plain fine-tuning",
        "",
        f"Status: **{status}** (last run finished {when}).",
        "",
    ]
    if missing:
        lines += [
            "Equal-epoch grid cells with fewer runs than seeds (a cell with none is not a candidate for the best "
            f"LR): {'; '.join(missing)}.",
            "",
        ]
    lines += [
        f"Model `{s.model}`; tasks {', '.join(s.tasks)}; training rows (the first N of train.tsv): {sizes}; dev "
        f"rows: {s.max_eval_samples or 'all'}; {steps_rule} at batch {s.batch_size}, max length "
        f"{s.max_seq_length}, AdamW, linear decay with 6% warmup, weight decay 0.01; base LR grid "
        f"{', '.join(f'{lr:g}' for lr in s.lrs)}"
        + (f" (the baseline also at {', '.join(f'{lr:g}' for lr in s.baseline_lrs)})" if s.baseline_lrs else "")
        + f"; seeds {', '.join(map(str, s.seeds))}. Every run is a fresh "
        f"process with {', '.join(map(str, sorted(threads))) or s.threads} thread(s) on {'; '.join(hosts) or '-'}; "
        "monitoring off in every run (`histogram_steps 0`, `diagnostics false`).",
        "",
        "Scores: dev-set GLUE metric x100 "
        + ", ".join(f"{t}: {SCORE_LABEL.get(t, 'accuracy')}" for t in s.tasks)
        + ". Per task: mean ± std over seeds at the recipe's best LR (highest mean dev score; selected on dev, "
        "as GLUE papers do, so every recipe gets the same optimistic selection). Δ: the paired difference to the "
        "baseline (same seed), mean ± std over seeds, in points. Train time: the Trainer's `train_runtime`, summed "
        "over tasks; time ratio = recipe / baseline (< 1 is faster).",
        "",
        "Recipes (all through `hf_wb.WBTrainer`):",
        "",
    ]
    lines += [f"- `{name}`: {RECIPES[name].description} (`{' '.join(RECIPES[name].args)}`)" for name in s.recipes]
    lines += [
        "",
        "## (a) Equal epochs",
        "",
        *phase_table(s, summary["phases"]["equal_epochs"], budget=False),
        "",
        "Step time (s per optimizer step, the fastest of the recipe's (a) runs on the task at the shared LR grid; "
        "other work on the shared machine only slows runs down) and its ratio to the baseline's:",
        "",
        *step_time_table(s, records),
        "",
        "## (b) Equal wall-clock budget",
        "",
        "Each non-baseline recipe, at its best LR from (a), trains for the baseline's train time: "
        "`max_steps = round(baseline_steps * baseline_step_time / recipe_step_time)`, step times = the fastest of all "
        "(a) runs of each recipe on the task (other work on the machine only slows runs down); the LR schedule spans "
        "the new step count; `ep` = the epochs this amounts to. The baseline row is its (a) result, and so is the row "
        f"of a recipe whose budget buys within {REUSE_TOLERANCE:.0%} of its equal-epoch steps (it already runs at the "
        "baseline's speed; no extra runs are made).",
        "",
        *phase_table(s, summary["phases"]["equal_budget"], budget=True),
        "",
        f"![scores]({s.name}.png)",
        "",
        "## Appendix: the full LR grid (equal epochs)",
        "",
        "| task | recipe | lr | runs | score | train time (s) | steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in summary["grid"].values():
        lines.append(
            f"| {cell['task']} | `{cell['recipe']}` | {cell['lr']:g} | {cell['n']} "
            f"| {_fmt(cell['mean'], cell['std'])} | {cell['time']:.1f} | {cell['steps']:.0f} |"
        )
    lines += ["", "Reproduce:", "", "```", command, "```", ""]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines), encoding="utf-8")
    (s.out_dir / f"{s.name}_summary.json").unlink(missing_ok=True)
    write_plot(s, summary, s.out_dir / f"{s.name}.png")
    return md


def write_plot(s: Settings, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(s.tasks) + ["average"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    width = 0.8 / len(s.recipes)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    titles = {"equal_epochs": "(a) equal epochs", "equal_budget": "(b) equal wall-clock budget"}
    for ax, phase in zip(axes[:2], PHASES, strict=True):
        rows = summary["phases"][phase]
        for i, recipe in enumerate(s.recipes):
            per_task = rows.get(recipe, {})
            means, stds = [], []
            for g in groups:
                c = per_task.get("_avg" if g == "average" else g)
                means.append(c["mean"] if c else math.nan)
                stds.append(c["std"] if c else 0.0)
            xs = [j + (i - (len(s.recipes) - 1) / 2) * width for j in range(len(groups))]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=recipe, color=colors[i % len(colors)])
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel("dev score x100 (mean ± std over seeds)")
        ax.set_title(titles[phase])
        finite = [c["mean"] for r in rows.values() for c in r.values() if not math.isnan(c["mean"])]
        if finite:
            ax.set_ylim(min(0.0, min(finite) - 3), min(100.0, max(finite) + 5))
            ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    ax = axes[2]
    for i, recipe in enumerate(s.recipes):
        for phase, marker in zip(PHASES, ("o", "s"), strict=True):
            avg = summary["phases"][phase].get(recipe, {}).get("_avg")
            if avg is None or (recipe == BASELINE and phase == "equal_budget"):
                continue
            ax.errorbar(
                avg["time"], avg["mean"], yerr=avg["std"], fmt=marker, color=colors[i % len(colors)], capsize=3,
                label=f"{recipe} ({'equal epochs' if phase == 'equal_epochs' else 'equal budget'})",
            )  # fmt: skip
    ax.set_xlabel("train time summed over tasks (s)")
    ax.set_ylabel("average dev score x100")
    ax.set_title("score vs train time")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.suptitle(f"hf_wb recipes vs plain fine-tuning: {s.model}, GLUE dev")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- driver -------------------------------------------------------------------------------------------------------
def plan_count(s: Settings, records: list[dict[str, Any]] | None = None) -> int:
    """Runs the sweep makes: every equal-epoch run, plus the equal-budget runs that the stored results call for."""
    epochs = len(s.tasks) * sum(len(s.lrs_for(recipe)) for recipe in s.recipes) * len(s.seeds)
    if s.budget == "none":
        return epochs
    cells = grid(records or [], "equal_epochs")
    budget = 0
    for task in s.tasks:
        for recipe in s.recipes[1:]:
            lrs = s.lrs if s.budget == "all" else [best_lr(cells, task, recipe) or s.lrs[0]]
            for lr in lrs:
                if not reuses_epoch_runs(s, cells, task, recipe, lr):
                    budget += len(s.seeds)
    return epochs + budget


def sweep(s: Settings, work_dir: Path, keep: bool, command: str) -> tuple[int, int]:
    """Run every missing run (task by task: equal epochs, then equal budget); returns (new runs, failures)."""
    jsonl = s.out_dir / f"{s.name}.jsonl"
    new = failed = 0

    def stored() -> list[dict[str, Any]]:
        return current_records(s, load_records(jsonl))

    def one(phase: str, task: str, recipe: str, lr: float, seed: int, max_steps: int | None) -> None:
        nonlocal new, failed
        key = run_key(s, phase, task, recipe, lr, seed)
        if any(r["key"] == key for r in stored()):
            return
        logger.info("run %s %s %s lr=%g seed=%d max_steps=%s", phase, task, recipe, lr, seed, max_steps)
        try:
            record = execute_run(s, work_dir, phase, task, recipe, lr, seed, max_steps, keep)
        except RuntimeError as exc:
            failed += 1
            logger.error("%s", exc)
            return
        append_record(jsonl, record)
        new += 1
        logger.info(
            "  score %.2f, train %.1fs (%d steps), process %.1fs",
            record["score"], record["train_runtime"], record["steps"], record["process_wall_s"],
        )  # fmt: skip
        records = stored()
        write_report(s, records, plan_count(s, records), failed, command)

    for task in s.tasks:
        for seed in s.seeds:
            for lr in sorted({*s.lrs, *s.baseline_lrs}):
                for recipe in s.recipes:
                    if lr in s.lrs_for(recipe):
                        one("equal_epochs", task, recipe, lr, seed, s.max_steps)
        if s.budget == "none":
            continue
        cells = grid(stored(), "equal_epochs")
        for recipe in s.recipes[1:]:
            lrs = s.lrs if s.budget == "all" else [best_lr(cells, task, recipe)]
            for lr in lrs:
                if lr is None:
                    continue
                steps = budget_steps(s, cells, task, recipe, lr)
                if steps is None:
                    logger.warning("no budget for %s %s lr=%g: phase-1 runs missing", task, recipe, lr)
                    continue
                if reuses_epoch_runs(s, cells, task, recipe, lr):
                    logger.info(
                        "%s %s lr=%g: the budget buys %d steps, as at equal epochs: reused", task, recipe, lr, steps
                    )
                    continue
                for seed in s.seeds:
                    one("equal_budget", task, recipe, lr, seed, steps)
    records = stored()
    write_report(s, records, plan_count(s, records), failed, command)
    return new, failed


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO, stream=sys.stdout)
    args = build_parser().parse_args(argv)
    s = settings_from_args(args)
    argv_text = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/glue_compare.py " + " ".join(a for a in argv_text if a != "--report-only")
    if args.report_only:
        jsonl = s.out_dir / f"{s.name}.jsonl"
        records = current_records(s, load_records(jsonl))
        md = write_report(s, records, plan_count(s, records), 0, command)
        logger.info("report: %s", md)
        return 0
    if not any((Path(s.glue_dir) / d).is_dir() for d in ("CoLA", "MRPC", "SST-2", "RTE", "STS-B")):
        logger.warning("%s holds no GLUE task folders: run_glue will fall back to the Hub dataset.", s.glue_dir)
    s.out_dir.mkdir(parents=True, exist_ok=True)
    if args.work_dir:
        work_dir = Path(args.work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        new, failed = sweep(s, work_dir, args.keep_runs, command)
    else:
        with tempfile.TemporaryDirectory(prefix="glue_compare_") as tmp:
            new, failed = sweep(s, Path(tmp), args.keep_runs, command)
    logger.info(
        "%d new runs, %d failed; %s",
        new,
        failed,
        ", ".join(str(s.out_dir / f"{s.name}{x}") for x in (".md", ".jsonl")),
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
