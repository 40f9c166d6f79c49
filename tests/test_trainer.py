import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, cpu_args, tiny_model
from datasets import Dataset
from transformers import Trainer

from hf_wb import WBConfig, WBTrainer
from hf_wb.trainer import STATE_NAME


def make_dataset(n=64, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, seq), generator=g)
    labels = (ids[:, 0] > 50).long()  # learnable
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def make_args(tmp_path, **kw):
    defaults = {"max_steps": 6, "per_device_train_batch_size": 8, "lr_scheduler_type": "linear"}
    return cpu_args(tmp_path / "out", **{**defaults, **kw})


QUIET = dict(histogram_steps=0, diagnostics=False, bias_prior=False)


def test_frozen_unchanged_trainable_changed(tmp_path):
    model = tiny_model("bert", 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = WBTrainer(
        model=model, args=make_args(tmp_path), train_dataset=make_dataset(), wb_config=WBConfig(top_layers=2, **QUIET)
    )
    trainer.train()
    for n, p in model.named_parameters():
        frozen = n.startswith("bert.embeddings") or n.startswith(("bert.encoder.layer.0.", "bert.encoder.layer.1."))
        assert p.requires_grad is not frozen
        if frozen:
            assert torch.equal(p, before[n]), n
        elif p.dim() > 1:
            assert not torch.equal(p, before[n]), n


def test_group_lrs_before_and_after_scheduler_steps(tmp_path):
    args = make_args(tmp_path, warmup_steps=2, max_steps=6)
    config = WBConfig(
        top_layers=2,
        top_lr_multiplier=10.0,
        head_lr_multiplier=2.0,
        layer_lr_decay=0.5,
        freeze_layers=0,
        freeze_embeddings=False,
        **QUIET,
    )
    trainer = WBTrainer(model=tiny_model("bert", 4), args=args, train_dataset=make_dataset(), wb_config=config)
    trainer.create_optimizer_and_scheduler(num_training_steps=6)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.0] * len(trainer.optimizer.param_groups)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()  # warmup step 1 of 2: half of each group's own rate
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["block_03"] == pytest.approx(0.5 * 1e-2)
    assert lrs["block_01"] == pytest.approx(0.5 * 1e-3 * 0.5)
    assert lrs["embeddings"] == pytest.approx(0.5 * 1e-3 * 0.5**3)
    assert lrs["head"] == pytest.approx(0.5 * 2e-3)


def test_every_group_lr_logged(tmp_path):
    args = make_args(tmp_path, warmup_steps=0, max_steps=4)
    config = WBConfig(top_layers=2, top_lr_multiplier=5.0, layer_lr_decay=0.5, freeze_layers=1, **QUIET)
    trainer = WBTrainer(model=tiny_model("bert", 4), args=args, train_dataset=make_dataset(), wb_config=config)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    for step, h in enumerate(logs, start=1):
        base = 1e-3 * (1 - (step - 1) / 4)  # linear decay; logged after the step, before the next scheduler step
        base_after = 1e-3 * (1 - step / 4)
        assert h["learning_rate"] in (pytest.approx(base), pytest.approx(base_after))
        factor = h["learning_rate"] / 1e-3
        assert h["lr/block_03"] == pytest.approx(5e-3 * factor)
        assert h["lr/block_02"] == pytest.approx(5e-3 * factor)
        assert h["lr/block_01"] == pytest.approx(0.5e-3 * factor)
        assert h["lr/head"] == pytest.approx(5e-3 * factor)
        assert "lr/block_00" not in h and "lr/embeddings" not in h  # frozen


def _losses(trainer):
    return [round(h["loss"], 6) for h in trainer.state.log_history if "loss" in h]


def test_resume_continues_exactly(tmp_path):
    config = WBConfig(top_layers=2, **QUIET)
    data = make_dataset(96)
    args = make_args(tmp_path, max_steps=8, save_strategy="steps", save_steps=4, num_train_epochs=2)
    full = WBTrainer(
        model=tiny_model("bert", 4, hidden_dropout_prob=0.3), args=args, train_dataset=data, wb_config=config
    )
    full.train()
    ckpt = Path(args.output_dir) / "checkpoint-4"
    assert json.loads((ckpt / "hf_wb_config.json").read_text())["top_layers"] == 2
    state = json.loads((ckpt / STATE_NAME).read_text())
    assert [g["name"] for g in state["groups"]][:2] == ["block_02", "block_02/no_decay"]

    resumed = WBTrainer(
        model=tiny_model("bert", 4, seed=123, hidden_dropout_prob=0.3), args=args, train_dataset=data, wb_config=config
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert _losses(resumed)[-4:] == _losses(full)[-4:]
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=n)


def test_resume_with_changed_recipe_refused(tmp_path):
    data = make_dataset()
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    WBTrainer(
        model=tiny_model("bert", 4), args=args, train_dataset=data, wb_config=WBConfig(top_layers=2, **QUIET)
    ).train()
    other = WBTrainer(
        model=tiny_model("bert", 4),
        args=args,
        train_dataset=data,
        wb_config=WBConfig(top_layers=3, top_lr_multiplier=10, **QUIET),
    )
    with pytest.raises(ValueError, match=r"recipe changed \(`top_layers`: 2 -> 3, `top_lr_multiplier`: 5.0 -> 10"):
        other.train(resume_from_checkpoint=True)


def test_resume_with_changed_model_refused(tmp_path):
    data = make_dataset()
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)  # checkpoint-2: mid-run
    WBTrainer(
        model=tiny_model("bert", 4), args=args, train_dataset=data, wb_config=WBConfig(top_layers=2, **QUIET)
    ).train()
    # same recipe, deeper model: block_02 is frozen now, block_03/04 train -> other groups
    other = WBTrainer(
        model=tiny_model("bert", 5), args=args, train_dataset=data, wb_config=WBConfig(top_layers=2, **QUIET)
    )
    with pytest.raises(ValueError, match="its optimizer has the parameter groups"):
        other.train(resume_from_checkpoint=str(Path(args.output_dir) / "checkpoint-2"))


def test_resume_from_plain_trainer_checkpoint_refused(tmp_path):
    data = make_dataset()
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    Trainer(model=tiny_model("bert", 4), args=args, train_dataset=data).train()
    trainer = WBTrainer(model=tiny_model("bert", 4), args=args, train_dataset=data, wb_config=WBConfig(**QUIET))
    with pytest.raises(ValueError, match="was not written by WBTrainer"):
        trainer.train(resume_from_checkpoint=True)


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd", "adafactor", "rmsprop"])
def test_trainer_optim_choices_keep_groups(tmp_path, optim):
    trainer = WBTrainer(
        model=tiny_model("bert", 4),
        args=make_args(tmp_path, optim=optim, max_steps=1),
        train_dataset=make_dataset(),
        wb_config=WBConfig(top_layers=2, **QUIET),
    )
    trainer.train()
    names = [g["name"] for g in trainer.optimizer.param_groups]
    assert names == ["block_02", "block_02/no_decay", "block_03", "block_03/no_decay", "head", "head/no_decay"]


def test_lamb(tmp_path):
    from pytorch_optimizer import Lamb

    trainer = WBTrainer(
        model=tiny_model("bert", 4),
        args=make_args(tmp_path, max_steps=2),
        train_dataset=make_dataset(),
        wb_config=WBConfig(optimizer="lamb", **QUIET),
    )
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, Lamb)
    assert trainer.optimizer.param_groups[0]["name"] == "block_01"


def test_model_init_gets_recipe(tmp_path):
    trainer = WBTrainer(
        model_init=lambda: tiny_model("bert", 4),
        args=make_args(tmp_path, max_steps=1),
        train_dataset=make_dataset(),
        wb_config=WBConfig(top_layers=1, **QUIET),
    )
    trainer.train()
    assert (
        not trainer.model.bert.encoder.layer[2].weight.requires_grad
        if hasattr(trainer.model.bert.encoder.layer[2], "weight")
        else not any(p.requires_grad for p in trainer.model.bert.encoder.layer[2].parameters())
    )


def test_save_model_writes_recipe(tmp_path):
    trainer = WBTrainer(
        model=tiny_model("bert", 4),
        args=make_args(tmp_path, max_steps=1),
        train_dataset=make_dataset(),
        wb_config=WBConfig(top_layers=2, **QUIET),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert WBConfig.from_pretrained(tmp_path / "final").top_layers == 2


def test_wb_config_type_checked():
    with pytest.raises(TypeError, match="`wb_config` must be a WBConfig"):
        WBTrainer(model=tiny_model("bert"), wb_config={"top_layers": 2})


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_ddp_two_processes(tmp_path, launcher):
    """Real 2-process DDP over gloo on CPU: frozen blocks, no unused-parameter error, the logged loss is not
    doubled, and the ranks end with identical parameters."""
    script = REPO / "tests" / "scripts" / "ddp_train.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "0",
        ]
    result = subprocess.run([*cmd, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2
    # lr=0: the weights never move, so the logged loss of step 1 must equal the mean loss of the two ranks' batches
    assert report["logged_loss"] == pytest.approx(report["expected_loss"], rel=1e-4)
    assert report["max_param_diff_across_ranks"] == 0.0
    assert report["frozen_changed"] is False and report["trainable_changed"] is True
    # DDP without the unused-parameter search (frozen parameters are not registered), and no warning on any rank
    assert report["find_unused_parameters"] is False
    assert "find_unused_parameters=True was specified" not in result.stderr


def test_loss_kwargs_detection(tmp_path):
    import transformers

    from hf_wb.trainer import loss_uses_num_items

    assert not loss_uses_num_items(tiny_model("bert"))  # own CrossEntropyLoss (mean)
    assert not loss_uses_num_items(tiny_model("llama"))  # self.loss_function = ForSequenceClassificationLoss
    lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    assert loss_uses_num_items(lm)  # token-level loss normalised by num_items_in_batch
    # args given: without them the Trainer makes ./tmp_trainer in the current directory (the checkout)
    trainer = WBTrainer(model=tiny_model("bert"), args=cpu_args(tmp_path), wb_config=WBConfig(**QUIET))
    assert trainer.model_accepts_loss_kwargs is False


@pytest.mark.parametrize("use_model_init", [False, True])
def test_callbacks_share_the_trainers_layer_map(tmp_path, monkeypatch, use_model_init):
    import hf_wb.stats

    def no_second_map(*args, **kwargs):
        raise AssertionError("a callback computed a layer map of its own")

    monkeypatch.setattr(hf_wb.stats, "layer_map", no_second_map)
    kwargs = {"model_init": lambda: tiny_model("bert", 4)} if use_model_init else {"model": tiny_model("bert", 4)}
    trainer = WBTrainer(
        args=make_args(tmp_path, max_steps=2),
        train_dataset=make_dataset(16),
        wb_config=WBConfig(histogram_steps=1, diagnostics=True, bias_prior=False, unfreeze_every_steps=1),
        **kwargs,
    )
    trainer.train()
    callbacks = [*trainer._wb_callbacks, trainer.wb_unfreezer]
    assert len(callbacks) == 3
    assert all(cb.lmap is trainer.wb_layer_map for cb in callbacks)
