"""Run by tests/test_faults_inputs.py under torchrun with 2 processes (gloo on CPU): an on-disk prefix cache under
DDP. Each rank writes OUT/rank-<rank>.json with its cache statistics."""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from conftest import cpu_args, tiny_model
from test_prefix_cache import Pad, varlen_dataset

from hf_wb import WBConfig, WBTrainer

out = Path(sys.argv[1])
config = WBConfig(
    top_layers=2,
    histogram_steps=0,
    diagnostics=False,
    bias_prior=False,
    cache_frozen_prefix="on",
    cache_dir=str(out / "cache"),
)
args = cpu_args(out / "run", max_steps=2, per_device_train_batch_size=4, ddp_backend="gloo")
trainer = WBTrainer(
    model=tiny_model("bert", 4), args=args, train_dataset=varlen_dataset(16), data_collator=Pad(), wb_config=config
)
trainer.train()
stats = trainer.wb_cache_stats
(out / f"rank-{dist.get_rank()}.json").write_text(json.dumps({k: stats[k] for k in ("built", "loaded", "examples")}))
