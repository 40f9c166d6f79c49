"""Shared set-up of ticket_curve.py and kfac_compare.py: one GLUE task under its config's recipe, the jsonl records,
the runner that puts each procedure in its own single-threaded process, and host info. Not a benchmark itself."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TASKS = ("mrpc", "sst2")
DEFAULT_TRAIN_SIZES = {"cola": 900, "mrpc": 700, "sst2": 900}  # glue_compare's subsets
DEFAULT_GLUE_DIR = os.environ.get("GLUE_DIR", str(REPO.parent / "shared" / "data" / "glue"))


@dataclass
class TaskSetup:
    """Everything one procedure needs: the parsed config, the task, the tokenized splits and the pieces of a
    trainer."""

    parsed: Any
    task: Any
    train: Any
    dev: Any
    tokenizer: Any
    collator: Any
    compute_metrics: Any
    model_path: str
    model_config: Any

    def model(self, seed: int) -> Any:
        """The pre-trained model with its head initialised from ``seed`` (the same every time it is called)."""
        from transformers import AutoModelForSequenceClassification, set_seed

        set_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(self.model_path, config=self.model_config)

    def constant_baseline(self) -> dict[str, float]:
        """The dev metrics of a model that ignores its input: the training set's most frequent label for every dev
        row (the training mean for regression), the floor a fine-tune has to beat to mean anything."""
        import numpy as np
        from transformers import EvalPrediction

        train = np.asarray(self.train["label"])
        dev = np.asarray(self.dev["label"])
        if self.task.is_regression:
            predictions = np.full((len(dev), 1), float(train.mean()))
        else:
            predictions = np.zeros((len(dev), self.task.num_labels))
            predictions[:, np.bincount(train.astype(int)).argmax()] = 1.0
        metrics = self.compute_metrics(EvalPrediction(predictions=predictions, label_ids=dev))
        return {f"eval_{k}": float(v) for k, v in metrics.items()}

    def score(self, metrics: dict[str, float]) -> float:
        from hf_wb.glue.tune import task_score

        return task_score(self.task, metrics)


def setup_task(
    task_name: str,
    seed: int,
    train_size: int | None,
    glue_dir: str,
    output_dir: str,
    model: str = "minilm",
    max_eval_samples: int | None = None,
    overrides: list[str] | None = None,
) -> TaskSetup:
    """Parse ``configs/glue/<task>.yaml`` with ``overrides`` (run_glue command-line flags; monitoring off, no
    checkpoints, evaluation only where the caller asks) and load, truncate and tokenize the task's train and dev
    splits as ``run_glue`` does."""
    import transformers
    from transformers import DataCollatorWithPadding

    from hf_wb.glue.data import tokenize_glue
    from hf_wb.glue.metrics import build_compute_metrics
    from hf_wb.glue.run import load_task_inputs, parse_args
    from hf_wb.glue.tasks import get_task
    from hf_wb.summary import resolve_model_path

    transformers.logging.set_verbosity_error()
    argv = [
        str(REPO / "configs" / "glue" / f"{task_name}.yaml"),
        "--model_name_or_path", model, "--data_dir", glue_dir, "--output_dir", output_dir, "--seed", str(seed),
        "--histogram_steps", "0", "--no_diagnostics", "--save_strategy", "no", "--eval_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--dataloader_num_workers", "0",
    ]  # fmt: skip
    if train_size is not None:
        argv += ["--max_train_samples", str(train_size)]
    if max_eval_samples is not None:
        argv += ["--max_eval_samples", str(max_eval_samples)]
    parsed = parse_args(argv + list(overrides or []))
    data = parsed.data
    task = get_task(data.task_name)
    raw, model_config, tokenizer = load_task_inputs(task, parsed.model, data, ["train", task.eval_splits[0]])
    model_path = resolve_model_path(parsed.model.model_name_or_path)
    tokenized = tokenize_glue(raw, tokenizer, task, max_seq_length=data.max_seq_length)
    return TaskSetup(
        parsed,
        task,
        tokenized["train"],
        tokenized[task.eval_splits[0]],
        tokenizer,
        DataCollatorWithPadding(tokenizer),
        build_compute_metrics(task),
        model_path,
        model_config,
    )


def parse_sizes(values: list[str] | None, tasks: list[str]) -> dict[str, int | None]:
    """``--train-sizes``: one N for every task, or TASK=N pairs (``all`` = every row); default glue_compare's."""
    sizes: dict[str, int | None] = {t: DEFAULT_TRAIN_SIZES.get(t) for t in tasks}
    for value in values or []:
        task, _, n = value.rpartition("=")
        for t in [task] if task else tasks:
            sizes[t] = None if n == "all" else int(n)
    return sizes


def host() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "host": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def add_suite_arguments(p: argparse.ArgumentParser, name: str) -> None:
    """The options both suites share: what to run (tasks, seeds, sizes, model), how (jobs) and where to write."""
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    p.add_argument("--train-sizes", nargs="+", default=None, help="one N for all tasks or TASK=N pairs")
    p.add_argument("--max-eval-samples", type=int, default=None, help="first N dev rows (default: all)")
    p.add_argument("--model", default="minilm")
    p.add_argument("--jobs", type=int, default=1, help="procedures side by side, one thread each (default 1)")
    p.add_argument("--glue-dir", default=DEFAULT_GLUE_DIR)
    p.add_argument("--out-dir", default=str(REPO / "results"))
    p.add_argument("--name", default=name, help=f"report name (default {name})")
    p.add_argument("--work-dir", default=None, help="keep the procedures' logs here (default: a temp dir)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the stored records")
    p.add_argument("--procedure", default=None, help=argparse.SUPPRESS)  # TASK:SEED, internal


def run_suite(
    script: Path,
    args: argparse.Namespace,
    raw_argv: list[str],
    procedure: Callable[[argparse.Namespace, str, int], dict[str, Any]],
    procedure_key: Callable[[argparse.Namespace, str, int], str],
    logger: Any,
) -> tuple[list[dict[str, Any]], Path, str] | None:
    """A suite's main flow. With ``--procedure TASK:SEED`` (the child process): run that one procedure, print its
    record, return None. Otherwise run the procedures not stored yet (unless ``--report-only``) and return the records
    of this suite's tasks and seeds, the report's path stem and the command the report names."""
    args.train_sizes = parse_sizes(args.train_sizes, args.tasks)
    if args.procedure:
        task, _, seed = args.procedure.partition(":")
        print(json.dumps(procedure(args, task, int(seed)), sort_keys=True))
        return None
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem, jsonl = out / args.name, out / f"{args.name}.jsonl"
    command = report_command(script.name, raw_argv, out / f"{args.name}.md", args.report_only)
    if not args.report_only:
        stored = {r["key"] for r in load(jsonl)}
        todo = [(t, s) for s in args.seeds for t in args.tasks if procedure_key(args, t, s) not in stored]
        work = Path(args.work_dir or tempfile.mkdtemp(prefix=f"{script.stem}_"))
        base = [a for a in raw_argv if a != "--report-only"]
        run_procedures(script.resolve(), base, todo, args.jobs, jsonl, work, logger)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    keys = {procedure_key(args, t, s) for t in args.tasks for s in args.seeds}
    return [r for r in load(jsonl) if r["key"] in keys], stem, command


def report_command(script: str, raw_argv: list[str], report: Path, report_only: bool) -> str:
    """The command a report names: this one, or with ``--report-only`` the one the existing report already names
    (the command that measured the records, not the one that redrew them)."""
    if report_only and report.is_file():
        for line in report.read_text(encoding="utf-8").splitlines():
            if line.startswith("Command: `") and line.endswith("`"):
                return line[len("Command: `") : -1]
    return f"python benchmarks/{script} " + " ".join(raw_argv)


def load(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


_append_lock = threading.Lock()


def append(path: Path, record: dict[str, Any]) -> None:
    with _append_lock, path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def run_procedures(
    script: Path, base_argv: list[str], todo: list[tuple[str, int]], jobs: int, jsonl: Path, work: Path, log: Any
) -> None:
    """Run ``script --procedure TASK:SEED`` once per item of ``todo``, each in its own process with one compute
    thread, ``jobs`` side by side; each prints its record as the last line of stdout, which is appended to
    ``jsonl``. CPU seconds are the process's own, so running several side by side leaves them comparable."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )

    def one(task: str, seed: int) -> None:
        log.info("%s seed %d: started", task, seed)
        work.mkdir(parents=True, exist_ok=True)
        log_path = work / f"{task}-s{seed}.log"
        argv = [sys.executable, str(script), *base_argv, "--procedure", f"{task}:{seed}"]
        with log_path.open("w", encoding="utf-8") as stderr:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=REPO, text=True)
        if proc.returncode != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise RuntimeError(f"{script.name} --procedure {task}:{seed} failed (exit {proc.returncode}):\n{tail}")
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        append(jsonl, record)
        log.info("%s seed %d: done", task, seed)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(one, *item) for item in todo]:
            future.result()
