"""A third-party training script: transformers' own logging set-up (as in HF's run_glue.py) or none at all, with
`Trainer` swapped for `WBTrainer`. Used by tests/test_run_summary.py in a subprocess.

    python third_party_train.py OUTPUT_DIR {run_glue|bare}
"""

import logging
import sys

import torch
import transformers

from hf_wb import WBConfig, WBTrainer

output_dir, mode = sys.argv[1], sys.argv[2]
if mode == "run_glue":  # transformers/examples/pytorch/text-classification/run_glue.py, with its defaults
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()

torch.manual_seed(0)
config = transformers.BertConfig(
    vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, num_labels=2
)
model = transformers.BertForSequenceClassification(config)
data = [
    {"input_ids": [5, 6 + i % 7, 7, 8], "attention_mask": [1, 1, 1, 1], "labels": int(i % 4 == 0)} for i in range(16)
]
args = transformers.TrainingArguments(
    output_dir,
    per_device_train_batch_size=4,
    max_steps=2,
    use_cpu=True,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,  # logging_steps stays at its default (500)
)
recipe = WBConfig(top_layers=2, top_lr_multiplier=10.0, histogram_steps=0, diagnostics=False)
trainer = WBTrainer(model=model, args=args, train_dataset=data, wb_config=recipe)
trainer.train()
print(
    "LOG_HISTORY",
    [sorted(k for k in entry if k.startswith("lr/")) + [entry["step"]] for entry in trainer.state.log_history],
)
