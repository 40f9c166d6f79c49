import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, cpu_args, tiny_model
from test_trainer import make_dataset
from transformers import TrainerCallback

from hf_wb import WBConfig, WBTrainer
from hf_wb.callbacks.unfreezing import GradualUnfreezingCallback

QUIET = dict(histogram_steps=0, diagnostics=False, bias_prior=False)


class Record(TrainerCallback):
    """Which blocks train and which are in train mode at the start of every epoch / step."""

    def __init__(self, model):
        self.model, self.epochs = model, []

    def on_step_begin(self, args, state, control, **kwargs):
        blocks = self.model.bert.encoder.layer
        trainable = [i for i, b in enumerate(blocks) if all(p.requires_grad for p in b.parameters())]
        in_train = [i for i, b in enumerate(blocks) if b.training]
        emb = self.model.bert.embeddings.word_embeddings.weight.requires_grad
        self.epochs.append((int(state.epoch + 1e-6), trainable, in_train, emb))


def args_for(tmp_path, **kw):
    return cpu_args(tmp_path / "out", **{"num_train_epochs": 4, "per_device_train_batch_size": 16, **kw})


def test_one_block_per_epoch_top_down_then_embeddings(tmp_path):
    model = tiny_model("bert", 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = WBTrainer(
        model=model,
        args=args_for(tmp_path),
        train_dataset=make_dataset(32),
        wb_config=WBConfig(top_layers=2, unfreeze_every=1, **QUIET),
    )
    rec = Record(model)
    trainer.add_callback(rec)
    assert trainer.wb_unfreeze_schedule() == [["block_01"], ["block_00"], ["embeddings"]]
    trainer.train()
    first = {}
    for epoch, trainable, in_train, emb in rec.epochs:
        first.setdefault(epoch, (trainable, in_train, emb))
    assert first[0] == ([2, 3], [2, 3], False)
    assert first[1] == ([1, 2, 3], [1, 2, 3], False)
    assert first[2] == ([0, 1, 2, 3], [0, 1, 2, 3], False)
    assert first[3] == ([0, 1, 2, 3], [0, 1, 2, 3], True)
    # the unfrozen blocks really train: they joined the optimizer
    for name in (
        "bert.encoder.layer.0.output.dense.weight",
        "bert.encoder.layer.1.output.dense.weight",
        "bert.embeddings.word_embeddings.weight",
    ):
        assert not torch.equal(dict(model.named_parameters())[name], before[name]), name
    names = [g["name"] for g in trainer.optimizer.param_groups]
    assert names[-6:] == [
        "block_01",
        "block_01/no_decay",
        "block_00",
        "block_00/no_decay",
        "embeddings",
        "embeddings/no_decay",
    ]


def test_unfrozen_group_gets_recipe_rate_under_schedule(tmp_path):
    config = WBConfig(top_layers=2, layer_lr_decay=0.5, unfreeze_every=1, **QUIET)
    trainer = WBTrainer(
        model=tiny_model("bert", 4),
        args=args_for(tmp_path, num_train_epochs=2),
        train_dataset=make_dataset(32),
        wb_config=config,
    )
    trainer.train()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    # linear decay to 0 over 4 steps; after the last step every group is at 0, but initial rates keep the recipe
    assert groups["block_01"]["initial_lr"] == pytest.approx(1e-3 * 0.5)
    assert groups["block_02"]["initial_lr"] == pytest.approx(5e-3)
    logs = [h for h in trainer.state.log_history if "lr/block_01" in h]
    first = logs[0]
    assert first["lr/block_01"] == pytest.approx(first["learning_rate"] * 0.5)


def test_step_interval(tmp_path):
    trainer = WBTrainer(
        model=tiny_model("bert", 4),
        args=args_for(tmp_path, max_steps=5),
        train_dataset=make_dataset(32),
        wb_config=WBConfig(top_layers=3, unfreeze_every_steps=2, **QUIET),
    )
    trainer.train()
    assert trainer.wb_unfreeze_stage == 2  # after steps 2 and 4: block_00, then embeddings
    assert trainer.wb_unfrozen_units == ["block_00", "embeddings"]


def test_resume_after_unfreeze_keeps_blocks_trainable_and_state(tmp_path):
    config = WBConfig(top_layers=2, unfreeze_every=1, **QUIET)
    data = make_dataset(32)
    args = args_for(tmp_path, num_train_epochs=3, save_strategy="steps", save_steps=3)  # 2 steps/epoch
    full = WBTrainer(model=tiny_model("bert", 4), args=args, train_dataset=data, wb_config=config)
    full.train()
    ckpt = Path(args.output_dir) / "checkpoint-3"  # mid epoch 1, after block_01 was unfrozen
    state = json.loads((ckpt / "hf_wb_state.json").read_text())
    assert state["unfreeze_stage"] == 1 and state["unfrozen_units"] == ["block_01"]
    model = tiny_model("bert", 4, seed=7)
    resumed = WBTrainer(model=model, args=args, train_dataset=data, wb_config=config)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.wb_unfrozen_units == full.wb_unfrozen_units == ["block_01", "block_00"]
    opt_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert [g["name"] for g in opt_state["param_groups"]][-2:] == ["block_01", "block_01/no_decay"]
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=n)


def test_unfreezing_with_prefix_cache_moves_boundary(tmp_path):
    from test_prefix_cache import Pad, varlen_dataset

    trainer = WBTrainer(
        model=tiny_model("bert", 4),
        args=args_for(tmp_path, num_train_epochs=5, per_device_train_batch_size=8),
        train_dataset=varlen_dataset(16),
        data_collator=Pad(),
        wb_config=WBConfig(top_layers=2, unfreeze_every=2, cache_frozen_prefix="on", **QUIET),
    )
    trainer.train()
    # epochs 0-1: boundary after 2 blocks (epoch 0 records, epoch 1 is served: 2 steps); epochs 2-3: after 1 block,
    # a new cache (epoch 3 served: 2 steps); epoch 4: no frozen block left -> the cache is off
    assert trainer.wb_cache_stats["built"] == 2
    assert trainer.wb_cache_stats["served_batches"] == 4
    assert trainer.wb_unfrozen_units == ["block_01", "block_00"]


def test_callback_validates_intervals():
    with pytest.raises(ValueError, match="Set exactly one of `every_epochs`"):
        GradualUnfreezingCallback(lambda s: None)


@pytest.mark.slow
def test_ddp_unfreezing_keeps_ranks_equal(tmp_path):
    script = REPO / "tests" / "scripts" / "ddp_unfreeze.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["unfrozen"] == ["block_01", "block_00"]
    assert report["unfrozen_changed"] is True
    assert report["max_param_diff_across_ranks"] == 0.0
