"""Benchmark: the sparsity-vs-dev-score curve of winning tickets (iterative magnitude pruning with rewind) under the
recipe, and what a round costs with and without the frozen-prefix cache.

Method: for each task and seed, :func:`hf_wb.tickets.find_ticket` on the packaged MiniLM with the recipe of
``configs/glue/<task>.yaml`` (the top 3 of 6 blocks and the head train at 10x the base rate, everything below frozen;
``cache_frozen_prefix: auto``, so the rounds share one in-memory prefix cache: round 0 fills it, later rounds reuse
it). Monitoring off, no checkpoints, no evaluation during training. Each round trains the config's epochs on the
task's training subset, is scored once on the full dev set (the task's GLUE score x100, ``task_score``), then
``--rate`` of the surviving weights of the trained blocks' weight matrices are pruned by global magnitude and the
survivors rewound to the pre-trained weights (the head is re-initialised from the seed every round and stays dense).
Round ``r`` trains at sparsity ``1 - (1 - rate) ** r`` of those matrices. Costs are the process's CPU seconds
(``time.process_time``, one compute thread: other programs on a shared machine slow the wall clock much less than a
process's own CPU time) of a round's training and dev evaluation.

Without the cache: for the first seed of each task, ``find_ticket`` runs again with ``cache_frozen_prefix: off`` for
``--nocache-rounds`` rounds (default 1: the dense round 0 and the first pruned round); the report sets those rounds'
CPU seconds against the cached run's same rounds (round 0 fills the cache, round 1 onwards reuses it) and gives
their dev scores side by side (the cache computes the same frozen outputs, so they should agree up to float
rounding).

Report (``results/<name>.md`` and ``.png``): per task, dev score per round (mean ± std over seeds, and each seed),
the dense score (round 0), the highest sparsity whose seed-mean score is within ``--tolerance`` (0.5) points of the
dense seed mean (and the same per seed), and the round costs with and without the cache.

Default suite: MRPC (first 700 training rows, 3 epochs, max length 128) and SST-2 (first 900 rows, 2 epochs, max
length 64): glue_compare's training subsets; full dev sets; seeds 42 43 44; 5 rounds at rate 0.35 (sparsity 0%,
35%, 57.7%, 72.5%, 82.1%, 88.4%). Estimated cost about 2,800 CPU-seconds in all (about 24 min wall with ``--jobs 2``
on 2 otherwise idle cores), extrapolated from a run at 224 training rows on a loaded machine: a cached round costs
about 0.036 (MRPC) / 0.021 (SST-2) CPU-s per row-epoch of training plus about 9 / 12 s for the dev evaluation and the
model load, so about 85 / 50 s at the default sizes; an uncached round about 1.3x the training part::

    python benchmarks/ticket_curve.py --jobs 2                                        # the default suite
    python benchmarks/ticket_curve.py --tasks mrpc --seeds 42 --train-sizes 64 --rounds 1 --name ticket_smoke

Results: ``results/ticket_curve.md``, ``.png`` and ``.jsonl`` (one record per task and seed; a rerun skips stored
records, so an interrupted suite resumes; ``--report-only`` rebuilds the report).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
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

logger = logging.getLogger("ticket_curve")


def procedure_key(args: argparse.Namespace, task: str, seed: int) -> str:
    return json.dumps(
        [task, seed, args.model, args.train_sizes[task], args.rounds, args.rate, args.max_eval_samples,
         args.nocache_rounds if seed == args.seeds[0] else 0]
    )  # fmt: skip


def _ticket_rounds(setup: Any, seed: int, config: Any, rounds: int, rate: float, out: Path) -> list[dict[str, Any]]:
    from hf_wb.tickets import find_ticket
    from hf_wb.trainer import WBTrainer

    training = dataclasses.replace(setup.parsed.training, output_dir=str(out / "trainer"))
    train_cpu: list[float] = []

    class TimedTrainer(WBTrainer):  # the training's own CPU seconds, apart from the round's dev evaluation
        def train(self, *args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return super().train(*args, **kwargs)
            finally:
                train_cpu.append(time.process_time() - start)

    def make_trainer(model: Any) -> WBTrainer:
        return TimedTrainer(
            model=model,
            args=training,
            train_dataset=setup.train,
            eval_dataset=setup.dev,
            data_collator=setup.collator,
            compute_metrics=setup.compute_metrics,
            wb_config=config,
        )

    history = find_ticket(lambda: setup.model(seed), make_trainer, rounds, rate, out / "ticket", scope="global")
    return [
        {
            "round": h.round,
            "sparsity": h.sparsity,
            "dev_score": setup.score(h.metrics),
            "dev_metrics": _task_metrics(h.metrics),
            "cpu_s": h.cpu_seconds,
            "train_cpu_s": round(cpu, 3),
            "wall_s": h.wall_seconds,
            "prefix_cache": h.prefix_cache,
        }
        for h, cpu in zip(history, train_cpu, strict=True)
    ]


METRIC_NAMES = ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr")


def _task_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The task's own metrics of an evaluation (accuracy, F1, ...), without loss and timings."""
    return {k.removeprefix("eval_"): float(v) for k, v in metrics.items() if k.removeprefix("eval_") in METRIC_NAMES}


def procedure(args: argparse.Namespace, task: str, seed: int) -> dict[str, Any]:
    """One task and seed: the ticket search (and, for the first seed, the uncached rounds), in this process."""
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix=f"ticket_curve_{task}_{seed}_"))
    start = time.perf_counter()
    try:
        setup = setup_task(
            task, seed, args.train_sizes[task], args.glue_dir, str(work), args.model, args.max_eval_samples
        )
        config = setup.parsed.wb_config
        constant = setup.constant_baseline()
        rounds = _ticket_rounds(setup, seed, config, args.rounds, args.rate, work / "cached")
        nocache_rounds = args.nocache_rounds if seed == args.seeds[0] else 0
        nocache = []
        if nocache_rounds:
            off = dataclasses.replace(config, cache_frozen_prefix="off")
            nocache = _ticket_rounds(setup, seed, off, nocache_rounds, args.rate, work / "nocache")
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
        "learning_rate": training.learning_rate,
        "max_seq_length": setup.parsed.data.max_seq_length,
        "recipe": config.to_dict(),
        "rate": args.rate,
        "scope": "global",
        "rounds": rounds,
        "nocache_rounds": nocache,
        "constant_baseline": {"dev_score": setup.score(constant), "dev_metrics": _task_metrics(constant)},
        "process_wall_s": round(time.perf_counter() - start, 1),
        **host(),
    }


# ----- report ----------------------------------------------------------------------------------------------------
def _metrics_text(metrics: list[dict[str, float]]) -> str:
    """``accuracy 70.1, f1 81.2``: each metric's mean over the given evaluations, x100 (old records: "-")."""
    names = [n for n in METRIC_NAMES if metrics and all(n in m for m in metrics)]
    return ", ".join(f"{n} {100 * statistics.fmean(m[n] for m in metrics):.1f}" for n in names) or "-"


def _within(sparsities: list[float], scores: list[float], tolerance: float) -> tuple[float, float] | None:
    """The highest sparsity whose score is within ``tolerance`` points of the dense score (round 0), and its score."""
    ok = [(s, v) for s, v in zip(sparsities, scores, strict=True) if v >= scores[0] - tolerance]
    return max(ok) if ok else None


def write_report(records: list[dict[str, Any]], path: Path, command: str, tolerance: float) -> None:
    lines = ["# ticket_curve: winning tickets under the recipe", "", f"Command: `{command}`", ""]
    if not records:
        path.write_text("\n".join(lines) + "\nNo records yet.\n", encoding="utf-8")
        return
    r0 = records[0]
    lines += [
        f"Packaged MiniLM ({r0['model']}), recipe of `configs/glue/<task>.yaml` (top {r0['recipe']['top_layers']} "
        f"blocks x{r0['recipe']['top_lr_multiplier']:g} over frozen blocks, prefix cache "
        f"`{r0['recipe']['cache_frozen_prefix']}`), IMP with rewind to the pre-trained weights, global magnitude "
        f"pruning of the trained blocks' weight matrices at rate {r0['rate']:g} per round; dev score = GLUE score "
        f"x100 on the dev rows; CPU seconds = process time of a round's training and dev evaluation, one thread. "
        f"{r0['host']}, torch {r0['torch']}.",
        "",
    ]
    summary = []
    for task in sorted({r["task"] for r in records}):
        recs = sorted((r for r in records if r["task"] == task), key=lambda r: r["seed"])
        n = min(len(r["rounds"]) for r in recs)
        seeds = [r["seed"] for r in recs]
        spars = [recs[0]["rounds"][i]["sparsity"] for i in range(n)]
        scores = [[r["rounds"][i]["dev_score"] for r in recs] for i in range(n)]
        means = [statistics.fmean(s) for s in scores]
        lines += [
            f"## {task} ({recs[0]['train_rows']} training rows x {recs[0]['epochs']:g} epochs, "
            f"{recs[0]['dev_rows']} dev rows, {len(recs)} seed(s))",
            "",
            "| round | sparsity | dev score, mean ± std | Δ vs dense | " + " | ".join(f"seed {s}" for s in seeds)
            + " | metrics (mean) | CPU s (mean) | prefix cache |",
            "|---:|---:|---:|---:|" + "---:|" * len(seeds) + "---|---:|---|",
        ]  # fmt: skip
        for i in range(n):
            cpu = statistics.fmean(r["rounds"][i]["cpu_s"] for r in recs)
            cache = "/".join(sorted({r["rounds"][i]["prefix_cache"] for r in recs}))
            lines.append(
                f"| {i} | {100 * spars[i]:.1f}% | {mean_std(scores[i])} | {means[i] - means[0]:+.2f} | "
                + " | ".join(f"{v:.2f}" for v in scores[i])
                + f" | {_metrics_text([r['rounds'][i].get('dev_metrics', {}) for r in recs])} | {cpu:.1f} | {cache} |"
            )
        best = _within(spars, means, tolerance)
        per_seed = []
        for j, seed in enumerate(seeds):
            b = _within(spars, [scores[i][j] for i in range(n)], tolerance)
            per_seed.append(f"seed {seed}: {100 * b[0]:.1f}%" if b else f"seed {seed}: -")
        lines += [
            "",
            f"Dense (round 0): {mean_std(scores[0])}. Highest sparsity within {tolerance:g} points of dense (seed "
            f"mean): **{100 * best[0]:.1f}%** (score {best[1]:.2f}); per seed: {', '.join(per_seed)}.",
            "",
        ]
        constant = recs[0].get("constant_baseline")
        if constant:
            lines += [
                f"Input-blind reference (the training set's most frequent label for every dev row): score "
                f"{constant['dev_score']:.2f} ({_metrics_text([constant['dev_metrics']])}). A round at or below it "
                "has learned nothing the label prior does not give.",
                "",
            ]
        summary.append((task, means[0], best, per_seed))
        nocache = [r for r in recs if r.get("nocache_rounds")]
        if nocache:
            lines += [
                "Round cost with and without the prefix cache (same seed, same rounds; process CPU seconds of "
                "the round's training + dev evaluation, and of its training alone):",
                "",
                "| seed | round | cached state | round: off / cached (CPU s) | ratio | training only: off / "
                "cached | ratio | dev off | dev cached |",
                "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
            ]
            for r in nocache:
                for off in r["nocache_rounds"]:
                    on = r["rounds"][off["round"]]
                    train = ""
                    if "train_cpu_s" in on and "train_cpu_s" in off:
                        train = (f"{off['train_cpu_s']:.1f} / {on['train_cpu_s']:.1f} | "
                                 f"**{on['train_cpu_s'] / off['train_cpu_s']:.2f}x**")  # fmt: skip
                    lines.append(
                        f"| {r['seed']} | {off['round']} | {on['prefix_cache']} | {off['cpu_s']:.1f} / "
                        f"{on['cpu_s']:.1f} | **{on['cpu_s'] / off['cpu_s']:.2f}x** | {train or '- | -'} | "
                        f"{off['dev_score']:.2f} | {on['dev_score']:.2f} |"
                    )
            lines += [
                "",
                "The dev evaluation after each round runs the whole model in both cases (the trainer releases the "
                "cache when training ends), so the round ratio is diluted by it; the training-only ratio is the "
                "cache's effect on training.",
            ]
            lines.append("")
    lines += ["## Summary", "", f"| task | dense dev | highest sparsity within {tolerance:g} points (seed mean) | "
              "score there | per seed |", "|---|---:|---:|---:|---|"]  # fmt: skip
    for task, dense, best, per_seed in summary:
        lines.append(f"| {task} | {dense:.2f} | {100 * best[0]:.1f}% | {best[1]:.2f} | {', '.join(per_seed)} |")
    total = sum(x["cpu_s"] for r in records for x in r["rounds"] + r.get("nocache_rounds", []))
    lines += ["", f"Total CPU seconds of the rounds above: {total:.0f}.", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_plot(records: list[dict[str, Any]], path: Path, tolerance: float) -> None:
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
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        recs = [r for r in records if r["task"] == task]
        n = min(len(r["rounds"]) for r in recs)
        x = [100 * recs[0]["rounds"][i]["sparsity"] for i in range(n)]
        for r in recs:
            ax.plot(x, [r["rounds"][i]["dev_score"] for i in range(n)], "o-", lw=0.8, ms=3, alpha=0.4,
                    label=f"seed {r['seed']}")  # fmt: skip
        means = [statistics.fmean(r["rounds"][i]["dev_score"] for r in recs) for i in range(n)]
        ax.plot(x, means, "o-", color="black", lw=2, label="seed mean")
        ax.axhline(means[0] - tolerance, color="red", ls="--", lw=1, label=f"dense - {tolerance:g}")
        constant = recs[0].get("constant_baseline")
        if (
            constant
            and constant["dev_score"] >= min(min(r["rounds"][i]["dev_score"] for r in recs) for i in range(n)) - 5
        ):
            ax.axhline(constant["dev_score"], color="gray", ls=":", lw=1, label="majority label (input-blind)")
        ax.set_title(f"{task}: winning tickets (MiniLM, recipe)")
        ax.set_xlabel("sparsity of the trained blocks' weight matrices (%)")
        ax.set_ylabel("dev score (GLUE x100)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----- main ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_suite_arguments(p, "ticket_curve")
    p.add_argument("--rounds", type=int, default=5, help="pruning rounds; rounds + 1 trainings (default 5)")
    p.add_argument("--rate", type=float, default=0.35, help="share of surviving weights pruned per round (0.35)")
    p.add_argument(
        "--nocache-rounds", type=int, default=1, help="rounds rerun without the prefix cache, first seed (default 1)"
    )
    p.add_argument("--tolerance", type=float, default=0.5, help="points below dense that still count (default 0.5)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw_argv)
    logging.getLogger("hf_wb").setLevel(logging.WARNING)
    logging.getLogger("hf_wb.tickets").setLevel(logging.INFO)  # one line per round in the procedure's log
    suite = run_suite(Path(__file__), args, raw_argv, procedure, procedure_key, logger)
    if suite is None:  # a child process ran one procedure
        return 0
    records, stem, command = suite
    write_report(records, Path(f"{stem}.md"), command, args.tolerance)
    write_plot(records, Path(f"{stem}.png"), args.tolerance)
    logger.info("report: %s", f"{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
