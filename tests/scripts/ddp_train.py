"""Run by tests/test_trainer.py under torchrun / accelerate launch with 2 processes (gloo on CPU)."""

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
data = make_dataset(64)
config = WBConfig(top_layers=2, histogram_steps=0, diagnostics=False, bias_prior=False)


def args(lr, steps):
    return cpu_args(
        out / f"run_{lr}",
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        ddp_backend="gloo",
        dataloader_drop_last=True,
    )


# 1) lr = 0: compare the logged loss with the loss the two ranks' batches really have
probe = WBTrainer(
    model=tiny_model("bert", 4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    args=args(0.0, 1),
    train_dataset=data,
    wb_config=config,
)
loader = probe.get_train_dataloader()
batch = next(iter(loader))
with torch.no_grad():
    probe.model.eval()
    local = probe.model(**{k: v for k, v in batch.items()}).loss.detach()
losses = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
dist.all_gather(losses, local)
probe.train()
logged = [h["loss"] for h in probe.state.log_history if "loss" in h][0]

# 2) a real run: frozen blocks, trainable top, parameters identical across ranks afterwards
model = tiny_model("bert", 4)
before = {n: p.detach().clone() for n, p in model.named_parameters()}
trainer = WBTrainer(model=model, args=args(1e-3, 4), train_dataset=data, wb_config=config)
trainer.train()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
frozen_changed = any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)
trainable_changed = all(
    not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1
)
if dist.get_rank() == 0:
    (out / "report.json").write_text(
        json.dumps(
            {
                "world_size": dist.get_world_size(),
                "logged_loss": logged,
                "expected_loss": float(torch.stack(losses).mean()),
                "max_param_diff_across_ranks": float((gathered[0] - gathered[1]).abs().max()),
                "frozen_changed": frozen_changed,
                "find_unused_parameters": trainer.model_wrapped.find_unused_parameters,
                "trainable_changed": trainable_changed,
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
