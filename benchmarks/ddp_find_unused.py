"""Benchmark: the step time of 2-process DDP with and without ``find_unused_parameters``.

transformers turns ``find_unused_parameters`` on for every ``PreTrainedModel``; ``WBTrainer`` turns it off unless the
user sets ``ddp_find_unused_parameters`` (the recipe's frozen parameters are not registered with DDP, so the search
finds nothing). This script measures what that saves: the packaged MiniLM under the default recipe (top 3 of 6
blocks train), ``torchrun --standalone --nproc_per_node 2`` over gloo, one compute thread per process, the two
settings interleaved round by round. Each run reports the median time of its optimizer steps after ``--warmup``.

Run (about 4 minutes on 2 CPU cores)::

    python benchmarks/ddp_find_unused.py

Writes ``results/ddp_find_unused.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback, TrainingArguments

    from hf_wb import WBConfig, WBTrainer
    from hf_wb.summary import resolve_model_path

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n = args.batch * 2 * (args.steps + 1)
    ids = torch.randint(1000, 20000, (n, args.seq), generator=g)
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * args.seq] * n, "labels": (ids[:, 0] % 2).tolist()}
    )
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=2)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    training = TrainingArguments(
        output_dir=args.out + "_run",
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=2e-5,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        ddp_backend="gloo",
        ddp_find_unused_parameters=True if args.find_unused == "true" else None,
        logging_steps=10_000,
    )
    config = WBConfig(histogram_steps=0, diagnostics=False)
    trainer = WBTrainer(model=model, args=training, train_dataset=data, wb_config=config, callbacks=[Timer()])
    trainer.train()
    if dist.get_rank() == 0:
        Path(args.out).write_text(
            json.dumps(
                {
                    "find_unused_parameters": trainer.model_wrapped.find_unused_parameters,
                    "median_step_s": statistics.median(times[args.warmup :]),
                    "steps": len(times),
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--out", default=str(REPO / "results" / "ddp_find_unused.md"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--find-unused", dest="find_unused", default="default", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    rows: dict[str, list[float]] = {"true": [], "default": []}
    flags: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for setting in ("true", "default"):
                out = os.path.join(tmp, f"{setting}_{r}.json")
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                cmd += [__file__, "--worker", "--find-unused", setting, "--out", out]
                cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
                cmd += ["--batch", str(args.batch), "--seq", str(args.seq)]
                subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                result = json.loads(Path(out).read_text())
                rows[setting].append(result["median_step_s"])
                flags[setting] = result["find_unused_parameters"]
                print(f"round {r} {setting}: {result['median_step_s'] * 1000:.1f} ms/step", flush=True)
    on, off = statistics.median(rows["true"]), statistics.median(rows["default"])
    lines = [
        "# DDP step time with and without find_unused_parameters",
        "",
        f"`python benchmarks/ddp_find_unused.py --steps {args.steps} --rounds {args.rounds}` on {platform.machine()}, "
        f"{os.cpu_count()} CPU cores; packaged MiniLM, default recipe (top 3 of 6 blocks train), 2 processes "
        f"(torchrun, gloo, 1 thread each), batch {args.batch} x {args.seq} tokens per process, median optimizer-step "
        f"wall time after {args.warmup} warm-up steps, settings interleaved over {args.rounds} rounds.",
        "",
        "| setting | DDP find_unused_parameters | median step (ms) | per round (ms) |",
        "|---|---|---:|---|",
        f"| `--ddp_find_unused_parameters true` (transformers' default) | {flags['true']} | {on * 1000:.1f} | "
        + ", ".join(f"{t * 1000:.1f}" for t in rows["true"])
        + " |",
        f"| WBTrainer's default | {flags['default']} | {off * 1000:.1f} | "
        + ", ".join(f"{t * 1000:.1f}" for t in rows["default"])
        + " |",
        "",
        f"Ratio (WBTrainer's default / find_unused_parameters=True): **{off / on:.3f}**.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
