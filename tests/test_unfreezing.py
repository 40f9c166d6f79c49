import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, cpu_args, tiny_model
from test_trainer import make_dataset
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState

from hf_wb import WBConfig, WBTrainer, build_param_groups
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
    assert trainer.wb_unfreezer.schedule() == [["block_01"], ["block_00"], ["embeddings"]]
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
    assert trainer.wb_unfreezer.stage == 2  # after steps 2 and 4: block_00, then embeddings
    assert trainer.wb_unfreezer.unfrozen_units == ["block_00", "embeddings"]


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
    assert resumed.wb_unfreezer.unfrozen_units == full.wb_unfreezer.unfrozen_units == ["block_01", "block_00"]
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
    # epochs 0-1: boundary after 2 blocks (cache built before training: 4 steps served); epochs 2-3: after 1 block,
    # a new cache built at the stage (4 steps served); epoch 4: no frozen block left -> the cache is off
    assert trainer.wb_cache_stats["built"] == 2
    assert trainer.wb_cache_stats["served_batches"] == 8
    assert trainer.wb_unfreezer.unfrozen_units == ["block_01", "block_00"]


def test_callback_validates_intervals():
    with pytest.raises(ValueError, match="Set exactly one of `every_epochs`"):
        GradualUnfreezingCallback(WBConfig())  # no interval in the recipe, none given
    with pytest.raises(ValueError, match="Set exactly one of `every_epochs`"):
        GradualUnfreezingCallback(WBConfig(), every_epochs=1, every_steps=2)
    with pytest.raises(TypeError, match="`config` must be a WBConfig"):
        GradualUnfreezingCallback(lambda s: None, every_epochs=1)


class GroupRates(TrainerCallback):
    """(group names, lrs, initial lrs) of the optimizer after every step."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        groups = optimizer.param_groups
        self.steps.append(
            ([g.get("name") for g in groups], [g["lr"] for g in groups], [g["initial_lr"] for g in groups])
        )


def test_plain_trainer_unfreezes_with_recipe_rates_under_the_schedule(tmp_path):
    config = WBConfig(top_layers=2, layer_lr_decay=0.5, unfreeze_every=1, **QUIET)
    model = tiny_model("bert", 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unfreezer = GradualUnfreezingCallback(config)
    rates = GroupRates()
    trainer = Trainer(
        model=model,
        args=args_for(tmp_path, num_train_epochs=3, lr_scheduler_type="cosine"),
        train_dataset=make_dataset(32),
        callbacks=[unfreezer, rates],
    )
    # frozen by the component as the Trainer was built, before it makes its optimizer
    assert not model.bert.encoder.layer[1].output.dense.weight.requires_grad
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    trainer.train()
    assert unfreezer.unfrozen_units == ["block_01", "block_00"]
    names, lrs, initial = rates.steps[-1]
    assert names[2:] == ["block_01", "block_01/no_decay", "block_00", "block_00/no_decay"]
    # the recipe's rate for the depth: lr * 0.5 ** (distance below the lowest top block)
    assert initial[2:] == pytest.approx([1e-3 * 0.5, 1e-3 * 0.5, 1e-3 * 0.25, 1e-3 * 0.25])
    # at every step, every group is at the schedule's current factor of its own rate
    scheduler = trainer.lr_scheduler
    assert len(scheduler.base_lrs) == len(scheduler.lr_lambdas) == len(names)
    for _, step_lrs, step_initial in rates.steps:
        factor = step_lrs[0] / step_initial[0]
        assert [lr / i for lr, i in zip(step_lrs, step_initial, strict=True)] == pytest.approx(
            [factor] * len(step_lrs)
        )
    named = dict(model.named_parameters())
    for name in ("bert.encoder.layer.0.output.dense.weight", "bert.encoder.layer.1.output.dense.weight"):
        assert not torch.equal(named[name], before[name]), name
    assert torch.equal(
        named["bert.embeddings.word_embeddings.weight"], before["bert.embeddings.word_embeddings.weight"]
    )


def test_callback_added_after_construction_is_refused(tmp_path):
    trainer = Trainer(model=tiny_model("bert", 4), args=args_for(tmp_path), train_dataset=make_dataset(32))
    trainer.add_callback(GradualUnfreezingCallback(WBConfig(unfreeze_every=1)))
    with pytest.raises(RuntimeError, match="added after the Trainer was built"):
        trainer.train()


def _plateau_setup(tmp_path, min_lr=1e-7):
    config = WBConfig(top_layers=2, layer_lr_decay=0.5, unfreeze_every=1, **QUIET)
    model = tiny_model("bert", 4)
    unfreezer = GradualUnfreezingCallback(config)
    unfreezer.setup(model)
    optimizer = torch.optim.AdamW(build_param_groups(model, config, lr=1e-3, lmap=unfreezer.lmap))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0, min_lr=min_lr)
    args = args_for(tmp_path, learning_rate=1e-3)
    unfreezer.on_train_begin(args, TrainerState(), TrainerControl(), optimizer=optimizer, lr_scheduler=scheduler)
    return unfreezer, optimizer, scheduler, args


def test_reduce_lr_on_plateau_new_group_gets_recipe_rate_times_reduction(tmp_path):
    unfreezer, optimizer, scheduler, args = _plateau_setup(tmp_path)
    for metric in (1.0, 2.0, 3.0):  # the first sets the best, the next two are worse: two reductions
        scheduler.step(metric)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-3 * 0.25)
    unfreezer.on_epoch_begin(args, TrainerState(epoch=1.0), TrainerControl())
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["block_01"]["lr"] == pytest.approx(1e-3 * 0.5 * 0.25)
    assert groups["block_01/no_decay"]["lr"] == pytest.approx(1e-3 * 0.5 * 0.25)
    assert len(scheduler.min_lrs) == len(scheduler._last_lr) == len(optimizer.param_groups)
    scheduler.step(4.0)  # a reduction after the stage reaches the new groups as well
    assert groups["block_01"]["lr"] == pytest.approx(1e-3 * 0.5 * 0.125)
    assert groups["block_02"]["lr"] == pytest.approx(5e-3 * 0.125)


def test_reduce_lr_on_plateau_new_group_respects_min_lr(tmp_path):
    unfreezer, optimizer, scheduler, args = _plateau_setup(tmp_path, min_lr=2e-4)
    for metric in (1.0, 2.0, 3.0, 4.0):
        scheduler.step(metric)
    unfreezer.on_epoch_begin(args, TrainerState(epoch=2.0), TrainerControl())
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["block_00"]["lr"] == pytest.approx(2e-4)  # 1e-3 * 0.25 * 0.0625 is below the floor
    assert scheduler.min_lrs[-1] == 2e-4


def test_wbtrainer_reduce_lr_on_plateau_trains_through_unfreezing(tmp_path):
    # failure 7 of issue 10: this stopped at the first stage, mid-training, with a TypeError
    trainer = WBTrainer(
        model=tiny_model("bert", 4),
        args=args_for(
            tmp_path,
            num_train_epochs=3,
            lr_scheduler_type="reduce_lr_on_plateau",
            lr_scheduler_kwargs={"factor": 0.5, "patience": 0},
            eval_strategy="epoch",
        ),
        train_dataset=make_dataset(32),
        eval_dataset=make_dataset(16, seed=1),
        wb_config=WBConfig(top_layers=2, unfreeze_every=1, **QUIET),
    )
    trainer.train()
    assert trainer.wb_unfreezer.unfrozen_units == ["block_01", "block_00"]
    groups = trainer.optimizer.param_groups
    ratios = [g["lr"] / (1e-3 * g["lr_multiplier"]) for g in groups]
    assert ratios == pytest.approx([ratios[0]] * len(groups))  # every group at the same reduction of its recipe rate
    assert len(trainer.lr_scheduler.min_lrs) == len(groups)


@pytest.mark.parametrize("how", ["lr_scheduler_type", "optimizers"])
def test_undrivable_scheduler_refused_at_construction(tmp_path, how):
    model = tiny_model("bert", 4)
    kwargs = {}
    if how == "optimizers":
        optimizer = torch.optim.AdamW([p for p in model.parameters()], lr=1e-3)
        kwargs["optimizers"] = (optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1))
        name, args = "StepLR", args_for(tmp_path)
    else:
        name, args = "GreedyLR", args_for(tmp_path, lr_scheduler_type="greedy", eval_strategy="epoch")
    with pytest.raises(TypeError, match=f"Gradual unfreezing cannot drive the LR scheduler {name}"):
        WBTrainer(
            model=model,
            args=args,
            train_dataset=make_dataset(32),
            eval_dataset=make_dataset(8),
            wb_config=WBConfig(top_layers=2, unfreeze_every=1, **QUIET),
            **kwargs,
        )
    with pytest.raises(TypeError, match=f"cannot drive the LR scheduler {name}"):  # a plain Trainer: also at once
        Trainer(
            model=tiny_model("bert", 4),
            args=args,
            train_dataset=make_dataset(32),
            eval_dataset=make_dataset(8),
            callbacks=[GradualUnfreezingCallback(WBConfig(top_layers=2, unfreeze_every=1))],
            **kwargs,
        )


def test_state_dict_round_trip_and_mismatch():
    config = WBConfig(top_layers=2, unfreeze_every=1)
    first = GradualUnfreezingCallback(config)
    first.setup(tiny_model("bert", 4))
    first.unfreeze_to(1)
    assert first.state_dict() == {"unfreeze_stage": 1, "unfrozen_units": ["block_01"]}
    model = tiny_model("bert", 4)
    second = GradualUnfreezingCallback(config)
    second.setup(model)
    second.load_state_dict(first.state_dict())
    assert second.stage == 1 and second.plan.frozen_units == ["embeddings", "block_00"]
    assert model.bert.encoder.layer[1].output.dense.weight.requires_grad
    assert not model.bert.encoder.layer[1].training or model.training  # released from eval-pinning
    third = GradualUnfreezingCallback(config)
    third.setup(tiny_model("bert", 4))
    with pytest.raises(ValueError, match="released \\['block_00'\\] but this run's schedule releases"):
        third.load_state_dict({"unfreeze_stage": 1, "unfrozen_units": ["block_00"]})


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


def test_plain_trainer_resume_after_a_stage_is_refused_not_silent(tmp_path):
    # documented limit: a plain Trainer rebuilds its optimizer as two groups before any callback runs, so the
    # checkpoint's optimizer state (two groups more per stage) cannot be matched: torch refuses it
    config = WBConfig(top_layers=2, unfreeze_every=1)
    args = args_for(tmp_path, num_train_epochs=2, save_strategy="steps", save_steps=3)  # 2 steps/epoch
    data = make_dataset(32)
    first = Trainer(
        model=tiny_model("bert", 4), args=args, train_dataset=data, callbacks=[GradualUnfreezingCallback(config)]
    )
    first.train()
    again = Trainer(
        model=tiny_model("bert", 4), args=args, train_dataset=data, callbacks=[GradualUnfreezingCallback(config)]
    )
    with pytest.raises(ValueError, match="different number of parameter groups"):
        again.train(resume_from_checkpoint=str(Path(args.output_dir) / "checkpoint-3"))
