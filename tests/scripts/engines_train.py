"""Run by tests/test_engines.py under torchrun with 2 processes (gloo on CPU): the recipe under one engine.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/scripts/engines_train.py MODE[,MODE] OUT_DIR

MODE (several, comma-separated, run one after the other; at most one that builds a Trainer with an engine):
- ``fsdp1`` / ``fsdp2``: the wrapped-model path (accelerate runs FSDP only on GPUs, so the Trainer cannot take it
  here): a tiny BERT with the recipe applied by ``WBTrainer`` is wrapped as accelerate wraps it (every block a unit,
  then the root; FSDP1 with ``use_orig_params=True``), the optimizer comes from ``WBTrainer.create_optimizer`` where
  the Trainer makes it (FSDP1: on the wrapped model; FSDP2: before wrapping, its parameters then switched to the
  sharded ones as accelerate does) and a few steps run by hand;
- ``zero1`` / ``zero2`` / ``zero3``: the Trainer path with a DeepSpeed config (no optimizer / scheduler block);
- ``fsdp-config-on-cpu``: the Trainer with an FSDP2 config, which accelerate runs as DDP on a machine without GPUs;
- ``ddp-cache``: DDP with the in-memory frozen-prefix cache, and the same run without it.

Rank 0 writes OUT_DIR/report_MODE.json: the expected groups (``build_param_groups`` on the unwrapped model) and the
optimizer's, whether frozen parameters stayed bit-identical and trained ones moved, and the largest difference of
the full parameters across ranks.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import cpu_args, tiny_model
from test_trainer import make_dataset

from hf_wb import WBConfig, WBTrainer, build_param_groups
from hf_wb.engines import canonical_name

modes, out = sys.argv[1].split(","), Path(sys.argv[2])
config = WBConfig(top_layers=2, freeze_layers=1, histogram_steps=0, diagnostics=False, bias_prior=False)
LR, WD = 1e-3, 0.01


def describe(groups):
    return [
        {
            "name": g["name"],
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
            "param_names": [canonical_name(n) for n in g["param_names"]],
        }
        for g in groups
    ]


def trainer_for(model, **kw):
    args = cpu_args(
        out / "run",
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=LR,
        weight_decay=WD,
        lr_scheduler_type="constant",
        ddp_backend="gloo",
        dataloader_drop_last=True,
        **kw,
    )
    return WBTrainer(model=model, args=args, train_dataset=make_dataset(32), wb_config=config)


def run(mode):
    model = tiny_model("bert", 4)
    report = {}
    engine = None

    if mode in ("fsdp1", "fsdp2"):
        trainer = trainer_for(model)  # applies the recipe (freezing) to the unwrapped model; starts the gloo group
        report["world_size"] = dist.get_world_size()
        expected = describe(build_param_groups(model, config, LR, WD, lmap=trainer.wb_layer_map))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        blocks = list(model.bert.encoder.layer)
        if mode == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            wrapped = FSDP(
                model,
                auto_wrap_policy=ModuleWrapPolicy({type(blocks[0])}),
                use_orig_params=True,
                device_id=torch.device("cpu"),
            )
            optimizer = trainer.create_optimizer(wrapped)  # where the Trainer makes it for FSDP1 (after wrapping)
        else:
            from torch.distributed.fsdp import fully_shard

            optimizer = trainer.create_optimizer()  # where the Trainer makes it for FSDP2 (before wrapping)
            names = {id(p): n for n, p in model.named_parameters()}
            for block in blocks:
                fully_shard(block)
            wrapped = fully_shard(model)
            sharded = dict(wrapped.named_parameters())
            for group in optimizer.param_groups:  # what accelerate's fsdp2_switch_optimizer_parameters does
                group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        report["groups"] = describe(optimizer.param_groups)
        report["expected"] = expected
        data = make_dataset(32, seed=dist.get_rank())  # each rank its own batches
        wrapped.train()
        for step in range(3):
            batch = {k: torch.tensor(data[step * 4 : step * 4 + 4][k]) for k in ("input_ids", "labels")}
            wrapped(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if mode == "fsdp1":
            with FSDP.summon_full_params(wrapped):
                after = {canonical_name(n): p.detach().clone() for n, p in wrapped.named_parameters()}
        else:
            after = {n: p.full_tensor().detach().clone() for n, p in wrapped.named_parameters()}
    elif mode == "ddp-cache":
        # DDP with the in-memory frozen-prefix cache against the same run without it (no dropout: same arithmetic)
        runs = {}
        for cache in ("off", "on"):
            model = tiny_model("bert", 4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            data = make_dataset(32).map(lambda row: {"attention_mask": [1] * len(row["input_ids"])})
            args = cpu_args(
                out / f"run_{cache}",
                num_train_epochs=3,
                per_device_train_batch_size=4,
                ddp_backend="gloo",
                dataloader_drop_last=True,
                lr_scheduler_type="constant",
                train_sampling_strategy="sequential",  # each rank sees its rows again: epochs 2-3 are served
            )
            recipe = dataclasses.replace(config, cache_frozen_prefix=cache)
            trainer = WBTrainer(model=model, args=args, train_dataset=data, wb_config=recipe)
            if cache == "on":
                expected = describe(build_param_groups(model, recipe, LR, 0.0, lmap=trainer.wb_layer_map))
                before = {n: p.detach().clone() for n, p in model.named_parameters()}
            trainer.train()
            runs[cache] = (trainer, {n: p.detach().clone() for n, p in model.named_parameters()})
        trainer, after = runs["on"]
        engine = trainer.wb_engine.name
        report["groups"] = describe(trainer.optimizer.param_groups)
        report["expected"] = expected
        report["served_batches"] = trainer.wb_cache_stats["served_batches"]
        report["max_diff_vs_uncached"] = max(float((after[n] - runs["off"][1][n]).abs().max()) for n in after)
    else:
        if mode.startswith("zero"):
            stage = int(mode[-1])
            ds = {
                "zero_optimization": {"stage": stage},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            }
            trainer = trainer_for(model, deepspeed=ds, use_cpu=False)
        else:
            trainer = trainer_for(model, fsdp="full_shard", fsdp_config={"version": 2})
        engine = trainer.wb_engine.name
        report["engine_world_size"] = trainer.wb_engine.world_size
        expected = describe(build_param_groups(model, config, LR, WD, lmap=trainer.wb_layer_map))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer.train()
        report["groups"] = describe(trainer.optimizer.param_groups)
        report["expected"] = expected
        report["optimizer"] = type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__
        if mode == "zero3":
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                after = {n: p.detach().clone() for n, p in model.named_parameters()}
        else:
            after = {n: p.detach().clone() for n, p in model.named_parameters()}

    report["engine"] = engine
    report["world_size"] = dist.get_world_size()
    requires_grad = {canonical_name(n): p.requires_grad for n, p in model.named_parameters()}
    frozen = sorted(n for n, r in requires_grad.items() if not r)
    trained = sorted(n for n, r in requires_grad.items() if r and before[n].dim() > 1)
    report["frozen"] = frozen
    report["frozen_changed"] = [n for n in frozen if not torch.equal(after[n], before[n])]
    report["trained_unchanged"] = [n for n in trained if torch.equal(after[n], before[n])]
    flat = torch.cat([after[k].float().flatten() for k in sorted(after)])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    report["max_param_diff_across_ranks"] = float((gathered[0] - gathered[1]).abs().max())
    if dist.get_rank() == 0:
        (out / f"report_{mode}.json").write_text(json.dumps(report, indent=1))


for mode in modes:
    run(mode)
dist.barrier()
dist.destroy_process_group()  # a gloo group left to interpreter teardown can SIGABRT at exit
# gloo's worker threads can still abort the interpreter's own teardown ("terminate called without an active
# exception", pytorch#190489) after everything is written and the group is destroyed: leave without that teardown
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
