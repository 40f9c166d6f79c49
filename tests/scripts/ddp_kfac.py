"""Run by tests/test_kfac.py under torchrun with 2 processes (gloo on CPU): K-FAC factors reduced across ranks."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import cpu_args, tiny_model
from test_trainer import make_dataset

import hf_wb.kfac
from hf_wb import WBConfig, WBTrainer

out = Path(sys.argv[1])
local_factors = []
reduce = hf_wb.kfac._all_reduce_mean


def recording_reduce(tensors):
    if not local_factors:
        local_factors.append(torch.cat([t.flatten() for t in tensors]).clone())
    reduce(tensors)


hf_wb.kfac._all_reduce_mean = recording_reduce

model = tiny_model("bert", 4)
before = {n: p.detach().clone() for n, p in model.named_parameters()}
args = cpu_args(
    out / "run",
    max_steps=4,
    per_device_train_batch_size=4,
    learning_rate=0.01,
    ddp_backend="gloo",
    dataloader_drop_last=True,
)
config = WBConfig(top_layers=2, optimizer="kfac", histogram_steps=0, diagnostics=False, bias_prior=False)
trainer = WBTrainer(model=model, args=args, train_dataset=make_dataset(64), wb_config=config)
trainer.train()
opt = trainer.optimizer.optimizer
factors = [s[k] for s in opt.state.values() for k in ("kfac_A", "kfac_G") if k in s]


def spread(t):
    gathered = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return float((gathered[0] - gathered[1]).abs().max())


report = {
    "world_size": dist.get_world_size(),
    "preconditioned_layers": len(factors) // 2,
    "factor_diff_before_reduce": spread(local_factors[0]),
    "max_factor_diff_across_ranks": spread(torch.cat([f.flatten() for f in factors])),
    "max_param_diff_across_ranks": spread(torch.cat([p.detach().flatten() for p in model.parameters()])),
    "frozen_changed": any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad),
    "trainable_changed": all(
        not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1
    ),
}
if dist.get_rank() == 0:
    (out / "report.json").write_text(json.dumps(report))
dist.barrier()
dist.destroy_process_group()  # a gloo group left to interpreter teardown can SIGABRT at exit
# gloo's worker threads can still abort the interpreter's own teardown ("terminate called without an active
# exception", pytorch#190489) after everything is written and the group is destroyed: leave without that teardown
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
