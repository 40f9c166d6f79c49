"""Run by tests/test_unfreezing.py under torchrun with 2 processes: gradual unfreezing under DDP (gloo)."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import cpu_args, tiny_model
from test_trainer import make_dataset

from hf_wb import WBConfig, WBTrainer

out = Path(sys.argv[1])
model = tiny_model("bert", 4)
before = {n: p.detach().clone() for n, p in model.named_parameters()}
args = cpu_args(out / "run", num_train_epochs=3, per_device_train_batch_size=8, logging_steps=500, ddp_backend="gloo")
config = WBConfig(top_layers=2, unfreeze_every=1, histogram_steps=0, diagnostics=False, bias_prior=False)
trainer = WBTrainer(model=model, args=args, train_dataset=make_dataset(64), wb_config=config)
trainer.train()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
named = dict(model.named_parameters())
changed = all(
    not torch.equal(named[n], before[n])
    for n in named
    if n.startswith(("bert.encoder.layer.0.", "bert.encoder.layer.1.")) and named[n].dim() > 1
)
if dist.get_rank() == 0:
    (out / "report.json").write_text(
        json.dumps(
            {
                "unfrozen": trainer.wb_unfreezer.unfrozen_units,
                "unfrozen_changed": changed,
                "max_param_diff_across_ranks": float((gathered[0] - gathered[1]).abs().max()),
            }
        )
    )
dist.barrier()
dist.destroy_process_group()  # a gloo group left to interpreter teardown can SIGABRT at exit
# gloo's worker threads can still abort the interpreter's own teardown ("terminate called without an active
# exception", pytorch#190489) after everything is written and the group is destroyed: leave without that teardown
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
