"""Speed and memory of the hf_wb recipe, measured side by side in one process.

Part 1, step time (packaged MiniLM, batch 32, length 128, synthetic token ids, AdamW), interleaved rounds:
  plain Trainer (full fine-tuning) | WBTrainer with WBConfig.baseline() (plugin overhead) | bottom 3 and 5 blocks
  frozen, naive (requires_grad=False only) vs eval-pinned (hf_wb) | monitoring callbacks at their defaults.
  Reports the median step time, ratios to the plain Trainer, peak RSS growth, optimizer-state bytes.

Plugin overhead where the compute does not hide it: the first two configurations of part 1 (plain Trainer vs
  WBTrainer + WBConfig.baseline()) on a model with MiniLM's architecture and parameter layout (6 blocks, the same
  tensors, so the same optimizer groups) but hidden size 32, where a whole loop iteration takes milliseconds. Many
  short interleaved rounds; the extra milliseconds per iteration, divided by part 1's MiniLM step, is the plugin's
  overhead on the real model (part 1's own ratio cannot resolve 1% on a shared machine).

Part 2, three epochs on real data (GLUE MRPC from GLUE_DIR, dynamic padding): plain Trainer vs the recipe
  (3 of 6 blocks frozen, eval-pinned) without the prefix cache, with a float32 cache and with a bfloat16 cache; cache
  build time shown separately, cache memory, and the dev scores.

    python benchmarks/throughput.py                 # both parts, writes results/throughput.md (+ .json)
    python benchmarks/throughput.py --quick         # a smoke run in about a minute
    python benchmarks/throughput.py --parts overhead   # the overhead measurement alone (part 1 runs it too)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_wb import WBConfig, WBTrainer, is_eval_pinned  # noqa: E402
from hf_wb.freezing import unpin_eval  # noqa: E402
from hf_wb.summary import resolve_model_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
transformers.logging.set_verbosity_error()


def clock() -> float:
    """The benchmark's clock. On a GPU: wall time. On the CPU: the process's CPU time. With one compute thread
    (``OMP_NUM_THREADS=1``, set by main() on CPU) that is the time the step computed, which other programs on a
    shared machine do not inflate the way they inflate wall time."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = clock()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(clock() - self._start)


class LoopTimer(TrainerCallback):
    """Time between consecutive step ends: the whole loop iteration (data, forward, backward, optimizer, callbacks)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(clock())

    @property
    def times(self) -> list[float]:
        return [b - a for a, b in zip(self.ends[:-1], self.ends[1:], strict=True)]


class PeakRSS:
    """Peak resident memory growth (MiB) while the block runs, sampled every 5 ms."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        _malloc_trim()
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def load_model(model_path: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(
        v.numel() * v.element_size() for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )


# ----- part 1: step time -----------------------------------------------------------------------------------------
QUIET = dict(histogram_steps=0, diagnostics=False, bias_prior=False)
STEP_CONFIGS: dict[str, dict[str, Any]] = {
    "plain Trainer (full)": {"trainer": "plain"},
    "WBTrainer baseline": {"wb": WBConfig.baseline(**QUIET)},
    "bottom 3 frozen, naive": {
        "wb": WBConfig(freeze_layers=3, top_layers=3, top_lr_multiplier=1, **QUIET),
        "naive": True,
    },
    "bottom 3 frozen, eval-pinned": {"wb": WBConfig(freeze_layers=3, top_layers=3, top_lr_multiplier=1, **QUIET)},
    "bottom 5 frozen, naive": {
        "wb": WBConfig(freeze_layers=5, top_layers=1, top_lr_multiplier=1, **QUIET),
        "naive": True,
    },
    "bottom 5 frozen, eval-pinned": {"wb": WBConfig(freeze_layers=5, top_layers=1, top_lr_multiplier=1, **QUIET)},
    "WBTrainer baseline + monitoring (defaults)": {
        "wb": WBConfig.baseline(bias_prior=False),
        "monitoring": True,
    },
}


def synthetic_dataset(n: int, length: int, vocab: int = 30522, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, length), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 1] % 2).tolist()})


def run_steps(
    name: str,
    spec: dict[str, Any],
    model_path: str,
    data: Dataset,
    steps: int,
    batch: int,
    out: Path,
    model: torch.nn.Module | None = None,
    timer: TrainerCallback | None = None,
):
    model = model if model is not None else load_model(model_path)
    args = TrainingArguments(
        output_dir=str(out / "steps"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=2e-5,
        save_strategy="no",
        report_to="none",
        logging_steps=10**6,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    timer = timer if timer is not None else StepTimer()
    if spec.get("trainer") == "plain":
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
    else:
        trainer = WBTrainer(model=model, args=args, train_dataset=data, wb_config=spec["wb"], callbacks=[timer])
        if spec.get("naive"):
            for module in model.modules():
                if is_eval_pinned(module):
                    unpin_eval(module)
    with PeakRSS() as mem:
        trainer.train()
    return timer.times, mem.mib, optimizer_state_bytes(trainer.optimizer)


def part1(model_path: str, rounds: int, steps: int, batch: int, length: int, out: Path, warmup: int = 2):
    data = synthetic_dataset(batch * (steps + warmup), length)
    times: dict[str, list[float]] = {n: [] for n in STEP_CONFIGS}
    mem: dict[str, list[float]] = {n: [] for n in STEP_CONFIGS}
    state: dict[str, int] = {}
    for r in range(rounds):
        order = list(STEP_CONFIGS) if r % 2 == 0 else list(reversed(STEP_CONFIGS))  # cancel drift
        for name in order:
            t, m, s = run_steps(name, STEP_CONFIGS[name], model_path, data, steps + warmup, batch, out)
            times[name] += t[warmup:]
            mem[name].append(m)
            state[name] = s
            print(f"  round {r + 1}/{rounds}  {name:<44} median {statistics.median(t[warmup:]):.3f} s", flush=True)
    return times, mem, state


def monitoring_amortised(model_path: str, steps: int, batch: int, length: int, out: Path) -> dict[str, float]:
    """Monitoring at the default `histogram_steps` (100) fires once per 100 steps: measure the steps it fires on
    (every step here) and the ones it does not, and amortise over 100 steps."""
    from hf_wb.callbacks import WeightDiagnosticsCallback, WeightHistogramCallback

    data = synthetic_dataset(batch * (steps + 2), length)
    results = {}
    for label, every in (("fires every step", 1), ("never fires", 10**6)):
        model = load_model(model_path)
        args = TrainingArguments(
            output_dir=str(out / "mon"),
            max_steps=steps + 2,
            per_device_train_batch_size=batch,
            save_strategy="no",
            report_to="none",
            logging_steps=10**6,
            disable_tqdm=True,
            seed=0,
            use_cpu=not torch.cuda.is_available(),
        )
        timer = StepTimer()
        cbs = [timer, WeightHistogramCallback(every_n_steps=every, log_dir=str(out / "tb"))]
        if every == 1:
            cbs.append(WeightDiagnosticsCallback(log_dir=str(out / "tb")))
        trainer = WBTrainer(
            model=model, args=args, train_dataset=data, callbacks=cbs, wb_config=WBConfig.baseline(**QUIET)
        )
        trainer.train()
        results[label] = statistics.median(timer.times[2:])
    return results


def small_minilm(model_path: str, seed: int = 0) -> torch.nn.Module:
    """MiniLM's architecture and parameter layout (same blocks, same tensors) at hidden size 32, random weights."""
    config = AutoConfig.from_pretrained(model_path, num_labels=2)
    config.update(dict(hidden_size=32, intermediate_size=64, num_attention_heads=2))
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config)


def plugin_overhead(model_path: str, out: Path, rounds: int = 8, steps: int = 60, batch: int = 8, length: int = 32):
    """Plain Trainer vs WBTrainer + WBConfig.baseline() on :func:`small_minilm`: median loop iteration (s) of each
    over interleaved rounds, and the per-round paired differences."""
    names = ("plain Trainer (full)", "WBTrainer baseline")
    data = synthetic_dataset(batch * (steps + 3), length)
    times: dict[str, list[float]] = {n: [] for n in names}
    paired: list[float] = []
    for r in range(rounds):
        medians = {}
        for name in names if r % 2 == 0 else tuple(reversed(names)):
            timer = LoopTimer()
            run_steps(
                name, STEP_CONFIGS[name], model_path, data, steps + 3, batch, out, small_minilm(model_path), timer
            )
            medians[name] = statistics.median(timer.times[2:])
            times[name] += timer.times[2:]
        paired.append(medians[names[1]] - medians[names[0]])
        print(f"  overhead round {r + 1}/{rounds}: {1e3 * paired[-1]:+.3f} ms per iteration", flush=True)
    return {
        "plain_s": statistics.median(times[names[0]]),
        "wb_s": statistics.median(times[names[1]]),
        "paired_diff_s": paired,
        "rounds": rounds,
        "steps": steps,
        "batch": batch,
        "length": length,
    }


# ----- part 2: three epochs, prefix cache ------------------------------------------------------------------------
def mrpc(model_path: str, train_rows: int, glue_dir: str, dev_rows: int | None = None):
    from hf_wb.glue.data import load_glue, tokenize_glue

    tok = AutoTokenizer.from_pretrained(model_path)
    raw = load_glue("mrpc", glue_dir)
    raw["train"] = raw["train"].shuffle(seed=0).select(range(min(train_rows, len(raw["train"]))))
    if dev_rows:
        raw["validation"] = raw["validation"].select(range(min(dev_rows, len(raw["validation"]))))
    data = tokenize_glue(raw, tok, "mrpc", max_seq_length=128)
    keep = ["input_ids", "attention_mask", "token_type_ids", "label"]
    data = data.remove_columns([c for c in data["train"].column_names if c not in keep])
    return tok, data["train"], data["validation"]


def part2(model_path: str, train_rows: int, epochs: int, batch: int, glue_dir: str, out: Path, dev_rows=None):
    from hf_wb.glue.metrics import build_compute_metrics

    tok, train, dev = mrpc(model_path, train_rows, glue_dir, dev_rows)
    variants = {
        "plain Trainer (full)": None,
        "recipe, eval-pinned, no cache": WBConfig(**QUIET),
        "recipe + cache float32": WBConfig(cache_frozen_prefix="on", cache_dtype="float32", **QUIET),
        "recipe + cache bfloat16": WBConfig(cache_frozen_prefix="on", cache_dtype="bfloat16", **QUIET),
    }
    rows = {}
    for name, config in variants.items():
        model = load_model(model_path)
        args = TrainingArguments(
            output_dir=str(out / "epochs"),
            num_train_epochs=epochs,
            per_device_train_batch_size=batch,
            per_device_eval_batch_size=64,
            learning_rate=5e-5,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            logging_steps=10**6,
            disable_tqdm=True,
            seed=0,
            use_cpu=not torch.cuda.is_available(),
        )
        common = dict(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=dev,
            data_collator=DataCollatorWithPadding(tok),
            compute_metrics=build_compute_metrics("mrpc"),
        )
        trainer = Trainer(**common) if config is None else WBTrainer(**common, wb_config=config)
        with PeakRSS() as mem:
            started = clock()
            trainer.train()
            wall = clock() - started
        stats = getattr(trainer, "wb_cache_stats", {}) or {}
        metrics = trainer.evaluate()
        rows[name] = {
            "wall_s": wall,
            "cache_build_s": stats.get("build_seconds", 0.0),
            "cache_mib": stats.get("bytes", 0) / 2**20,
            "peak_rss_growth_mib": mem.mib,
            "dev_f1": metrics.get("eval_f1"),
            "dev_accuracy": metrics.get("eval_accuracy"),
        }
        print(
            f"  {name:<34} {wall:7.1f} s  (cache build {rows[name]['cache_build_s']:.1f} s)  "
            f"dev F1 {rows[name]['dev_f1']:.4f}",
            flush=True,
        )
    return rows


# ----- report ----------------------------------------------------------------------------------------------------
def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; times are wall-clock"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} (CPU), "
        f"{torch.get_num_threads()} compute thread(s); times are the process's CPU time"
    )


def write_report(
    path: Path,
    p1: Any,
    mon: dict[str, float] | None,
    p2: dict | None,
    overhead: dict[str, Any] | None,
    metas: dict[str, dict[str, Any] | None],
) -> None:
    lines = ["# Throughput: hf_wb against the plain Trainer", ""]
    commands: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for what, m in (
        ("step time", metas["steps"]),
        ("plugin overhead", metas["overhead"]),
        ("epochs", metas["epochs"]),
    ):
        if m:
            commands.setdefault(m["command"], (m, []))[1].append(what)
    for m, whats in commands.values():
        label = f" ({', '.join(whats)})" if len(commands) > 1 else ""
        lines.append(f"Machine{label}: {m['machine']}. Command: `{m['command']}`. Date: {m['date']}.")
    lines += [
        "",
        "Every table's figures come from one process, side by side, configurations interleaved; this machine is "
        "shared and noisy, so read the ratios, not the absolute times.",
        "",
    ]
    meta = metas["steps"] or {}
    if p1 is not None:
        times, mem, state = p1
        plain = statistics.median(times["plain Trainer (full)"])
        lines += [
            f"## Training step (packaged MiniLM, batch {meta['batch']}, length {meta['length']}, AdamW)",
            "",
            f"Median of {meta['rounds']} interleaved rounds x {meta['steps']} steps per configuration.",
            "",
            "| configuration | median step (s) | vs plain Trainer | peak RSS growth (MiB) | optimizer state (MiB) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, t in times.items():
            med = statistics.median(t)
            lines.append(
                f"| {name} | {med:.3f} | {med / plain:.3f}x | {statistics.median(mem[name]):.0f} | "
                f"{state[name] / 2**20:.1f} |"
            )
        base = statistics.median(times["WBTrainer baseline"])
        lines += ["", f"- plugin overhead (WBTrainer baseline vs plain Trainer): {100 * (base / plain - 1):+.1f}%"]
        for k in (3, 5):
            naive = statistics.median(times[f"bottom {k} frozen, naive"])
            pinned = statistics.median(times[f"bottom {k} frozen, eval-pinned"])
            lines.append(
                f"- bottom {k} frozen: naive {naive / plain:.3f}x, eval-pinned {pinned / plain:.3f}x of the full "
                f"step; pinning saves {100 * (1 - pinned / naive):.1f}% of the naive frozen step"
            )
        monitored = statistics.median(times["WBTrainer baseline + monitoring (defaults)"])
        lines.append(
            f"- monitoring at defaults over these steps (no histogram step among them): "
            f"{100 * (monitored / base - 1):+.1f}%"
        )
    if overhead:
        extra = overhead["wb_s"] - overhead["plain_s"]
        paired = overhead["paired_diff_s"]
        line = (
            "- plugin overhead where the compute does not hide it (MiniLM's 6 blocks and parameter layout at hidden "
            f"size 32, batch {overhead['batch']}, length {overhead['length']}, {overhead['rounds']} interleaved "
            f"rounds x {overhead['steps']} loop iterations): {1e3 * overhead['plain_s']:.2f} ms per iteration with "
            f"the plain Trainer, {1e3 * overhead['wb_s']:.2f} ms with WBTrainer: {1e3 * extra:+.2f} ms (per-round "
            f"paired differences {1e3 * min(paired):+.2f} to {1e3 * max(paired):+.2f} ms)"
        )
        if p1 is not None:
            minilm = statistics.median(p1[0]["plain Trainer (full)"])
            line += f", i.e. {100 * extra / minilm:+.3f}% of the MiniLM step above ({minilm:.3f} s)"
        lines.append(line)
    if mon:
        fire, quiet = mon["fires every step"], mon["never fires"]
        lines.append(
            f"- histograms + diagnostics on a step where they fire: {fire:.3f} s vs {quiet:.3f} s; amortised over the "
            f"default 100 steps: {100 * (fire - quiet) / 100 / quiet:+.2f}% per step"
        )
    if p2:
        plain = p2["plain Trainer (full)"]["wall_s"]
        m2 = metas["epochs"] or meta
        lines += [
            "",
            f"## {m2['epochs']} epochs on GLUE MRPC ({m2['train_rows']} train rows, dev {m2['dev_rows']}, "
            "dynamic padding, "
            f"batch {m2['batch2']})",
            "",
            "Recipe: WBConfig() defaults (top 3 of 6 blocks train at 5x, embeddings and blocks 0-2 frozen and "
            "eval-pinned). The cache is built before training (train and dev rows, length-sorted), shown separately "
            "and included in the train time. 'cache (MiB)' is what the cache held at the end.",
            "",
            "| variant | train time (s) | speed-up vs plain | cache build (s) | cache (MiB) | dev F1 | dev acc |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in p2.items():
            lines.append(
                f"| {name} | {r['wall_s']:.1f} | {plain / r['wall_s']:.2f}x | {r['cache_build_s']:.1f} | "
                f"{r['cache_mib']:.1f} | {r['dev_f1']:.4f} | {r['dev_accuracy']:.4f} |"
            )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="model folder / Hub id, or 'minilm' (packaged)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-rows", type=int, default=1000, help="MRPC train rows for part 2")
    parser.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", str(REPO.parent / "shared/data/glue")))
    parser.add_argument(
        "--parts", default="1,2", help="which parts to run: 1 (includes overhead), 2, overhead; comma-separated"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    parser.add_argument("--output", default=str(REPO / "results" / "throughput.md"))
    parser.add_argument("--threads", type=int, default=1, help="CPU compute threads (CPU time is measured)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.length, args.steps, args.rounds, args.epochs, args.train_rows = 8, 32, 2, 1, 1, 64
    model_path = resolve_model_path(args.model)
    out = Path(args.output).with_suffix("")
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"hf_wb_throughput_{os.getpid()}"
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    meta = {
        "machine": machine(),
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d"),
        "batch": args.batch,
        "length": args.length,
        "steps": args.steps,
        "rounds": args.rounds,
        "epochs": args.epochs,
        "train_rows": args.train_rows,
        "dev_rows": 32 if args.quick else 408,
        "batch2": 32 if not args.quick else 8,
    }
    unknown = parts - {"1", "2", "overhead"}
    if unknown:
        parser.error(f"--parts takes 1, 2 and overhead, got {sorted(unknown)}")
    if "1" in parts:
        parts.add("overhead")  # part 1 includes the overhead measurement
    p1 = mon = p2 = overhead = None
    json_path = out.with_suffix(".json")
    # A run of some parts keeps the other parts' stored results (and the commands that measured them) from the
    # previous JSON, so the report always shows every table, each labelled with its command.
    previous = json.loads(json_path.read_text(encoding="utf-8")) if json_path.is_file() else {}
    metas: dict[str, dict[str, Any] | None] = {"steps": meta, "overhead": meta, "epochs": meta}
    if "1" not in parts:
        if previous.get("steps"):
            steps_raw = previous["steps"]
            p1 = (steps_raw["times"], steps_raw["peak_rss_mib"], steps_raw["optimizer_state_bytes"])
            mon = previous.get("monitoring")
        metas["steps"] = previous.get("meta") if p1 else None
    if "overhead" not in parts:
        overhead = previous.get("overhead")
        metas["overhead"] = previous.get("overhead_meta", previous.get("meta")) if overhead else None
    if "2" not in parts:
        p2 = previous.get("epochs")
        metas["epochs"] = previous.get("epochs_meta", previous.get("meta")) if p2 else None
    if "1" in parts:
        print("part 1: step time", flush=True)
        p1 = part1(model_path, args.rounds, args.steps, args.batch, args.length, scratch)
        mon = monitoring_amortised(model_path, args.steps, args.batch, args.length, scratch)
    if "overhead" in parts:
        print("plugin overhead on MiniLM's layout at hidden size 32", flush=True)
        overhead = plugin_overhead(model_path, scratch, **(dict(rounds=2, steps=5) if args.quick else {}))
    if "2" in parts:
        print("part 2: epochs and the prefix cache", flush=True)
        p2 = part2(
            model_path,
            args.train_rows,
            args.epochs,
            meta["batch2"],
            args.glue_dir,
            scratch,
            dev_rows=32 if args.quick else None,
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_report(Path(args.output), p1, mon, p2, overhead, metas)
    raw = {"meta": metas["steps"], "overhead_meta": metas["overhead"], "epochs_meta": metas["epochs"]}
    raw.update(monitoring=mon, overhead=overhead, epochs=p2)
    if p1 is not None:
        raw["steps"] = {"times": p1[0], "peak_rss_mib": p1[1], "optimizer_state_bytes": p1[2]}
    json_path.write_text(json.dumps(raw, indent=2), encoding="utf-8")
    print(Path(args.output).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
