"""Benchmark: the per-step cost of K-FAC against AdamW under the recipe (packaged MiniLM, top 3 of 6 blocks train).

Both optimizers get the same model, batches and recipe (``WBConfig()`` defaults, monitoring off); the runs are
interleaved round by round in one process and timed by the process's CPU time with one compute thread. Reported:
the mean time of an optimizer step (forward, backward and optimizer step) after ``--warmup`` steps, and the ratio.
K-FAC's eigendecompositions run every ``inverse_update_steps`` (default 10) steps, so ``--steps`` should cover
several of them.

Run (about 4 minutes on 2 CPU cores)::

    python benchmarks/kfac_overhead.py

Writes ``results/kfac_overhead.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(optimizer: str | None, args: argparse.Namespace) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback, TrainingArguments

    from hf_wb import WBConfig, WBTrainer
    from hf_wb.summary import resolve_model_path

    g = torch.Generator().manual_seed(0)
    n = args.batch * (args.steps + 1)
    ids = torch.randint(1000, 20000, (n, args.seq), generator=g)
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * args.seq] * n, "labels": (ids[:, 0] % 2).tolist()}
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=2)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.process_time() - self.start)

    training = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="kfac_overhead_"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-2 if optimizer == "kfac" else 2e-5,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        logging_steps=10**6,
    )
    config = WBConfig(optimizer=optimizer, histogram_steps=0, diagnostics=False, bias_prior=False)
    trainer = WBTrainer(model=model, args=training, train_dataset=data, wb_config=config, callbacks=[Timer()])
    trainer.train()
    return statistics.fmean(times[args.warmup :])  # the mean: eigendecomposition steps count at their share


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=23)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--out", default=str(REPO / "results" / "kfac_overhead.md"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    rows: dict[str, list[float]] = {"adamw": [], "kfac": []}
    for r in range(args.rounds):
        for name, opt in (("adamw", None), ("kfac", "kfac")):
            rows[name].append(run(opt, args))
            print(f"round {r} {name}: {rows[name][-1] * 1000:.0f} ms/step", flush=True)
    adamw, kfac = statistics.median(rows["adamw"]), statistics.median(rows["kfac"])
    lines = [
        "# K-FAC per-step cost against AdamW",
        "",
        f"`python benchmarks/kfac_overhead.py --steps {args.steps} --rounds {args.rounds}` on {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, one compute thread, process CPU time; packaged "
        f"MiniLM, `WBConfig()` recipe (top 3 of 6 blocks train), batch {args.batch} x {args.seq} tokens, mean step "
        f"after {args.warmup} warm-up steps (K-FAC: factors every step, eigendecompositions every 10), interleaved "
        f"over {args.rounds} rounds.",
        "",
        "| optimizer | mean step (ms), median of rounds | per round (ms) |",
        "|---|---:|---|",
        f"| AdamW (`adamw_torch`) | {adamw * 1000:.0f} | "
        + ", ".join(f"{t * 1000:.0f}" for t in rows["adamw"])
        + " |",
        f"| K-FAC (`optimizer='kfac'`) | {kfac * 1000:.0f} | "
        + ", ".join(f"{t * 1000:.0f}" for t in rows["kfac"])
        + " |",
        "",
        f"K-FAC / AdamW step time: **{kfac / adamw:.2f}x**.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
