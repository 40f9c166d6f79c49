"""K-FAC: faster per step than SGD, exact statistics under gradient accumulation, the recipe's groups kept,
checkpoints and resume, DDP ranks in agreement."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, cpu_args, tiny_model
from test_trainer import make_dataset
from torch import nn

from hf_wb import WBConfig, WBTrainer, build_param_groups
from hf_wb.kfac import KFAC

QUIET = dict(histogram_steps=0, diagnostics=False, bias_prior=False)


def _regression(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=g) * torch.logspace(-1.5, 1, 16)  # badly conditioned inputs
    y = torch.tanh(x @ torch.randn(16, 4, generator=g)) + 0.1 * torch.randn(256, 4, generator=g)
    return x, y


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))


def _train(make_optimizer, steps=40):
    model = _mlp()
    x, y = _regression()
    opt = make_optimizer(model)
    for i in range(steps):
        rows = slice(i * 32 % 256, i * 32 % 256 + 32)
        loss = nn.functional.mse_loss(model(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


@pytest.mark.parametrize("lr", [0.003, 0.03])
def test_kfac_lowers_the_loss_faster_per_step_than_sgd(lr):
    sgd = _train(lambda m: torch.optim.SGD(m.parameters(), lr=lr))
    kfac = _train(lambda m: KFAC(m.parameters(), m, lr=lr, momentum=0.0))
    assert kfac < 0.7 * sgd, (kfac, sgd)


def test_factors_of_an_accumulated_step_equal_the_whole_batch():
    x, y = _regression()

    def factors(micro_batches):
        model = _mlp()
        opt = KFAC(model.parameters(), model, lr=0.0, momentum=0.0)
        for chunk_x, chunk_y in zip(x[:32].chunk(micro_batches), y[:32].chunk(micro_batches), strict=True):
            (nn.functional.mse_loss(model(chunk_x), chunk_y) / micro_batches).backward()
        opt.step()
        return [(opt.state[m.weight]["kfac_A"], opt.state[m.weight]["kfac_G"]) for m in (model[0], model[2])]

    for (a1, g1), (a4, g4) in zip(factors(1), factors(4), strict=True):
        torch.testing.assert_close(a1, a4)
        torch.testing.assert_close(g1, g4)


def test_settings_are_checked():
    model = _mlp()
    with pytest.raises(ValueError, match="`damping` must be finite"):
        KFAC(model.parameters(), model, damping=0.0)
    with pytest.raises(ValueError, match="`inverse_update_steps`"):
        KFAC(model.parameters(), model, inverse_update_steps=2.5)
    with pytest.raises(ValueError, match="`kl_clip`"):
        KFAC(model.parameters(), model, kl_clip=float("nan"))


def _kfac_trainer(tmp_path, model=None, **args):
    defaults = dict(max_steps=6, per_device_train_batch_size=8, learning_rate=0.01, weight_decay=0.01)
    return WBTrainer(
        model=model or tiny_model("bert", 4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        args=cpu_args(tmp_path / "out", **{**defaults, **args}),
        train_dataset=make_dataset(96),
        wb_config=WBConfig(top_layers=2, top_lr_multiplier=10.0, optimizer="kfac", **QUIET),
    )


def test_wbtrainer_kfac_keeps_the_recipe(tmp_path):
    model = tiny_model("bert", 4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _kfac_trainer(tmp_path, model, optim_args="damping=0.01,inverse_update_steps=2")
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, KFAC) and (opt.damping, opt.inverse_update_steps) == (0.01, 2)
    expected = build_param_groups(model, trainer.wb_config, 0.01, 0.01)
    got = opt.param_groups
    assert [g["name"] for g in got] == [g["name"] for g in expected]
    assert [g["param_names"] for g in got] == [g["param_names"] for g in expected]
    assert [g["weight_decay"] for g in got] == [g["weight_decay"] for g in expected]
    assert [g["initial_lr"] for g in got] == pytest.approx([g["lr"] for g in expected])  # x10 top, x10 head
    preconditioned = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "kfac_A" in opt.state[m.weight]
    ]
    assert preconditioned and all(
        n.startswith(("bert.encoder.layer.2.", "bert.encoder.layer.3.")) for n in preconditioned if "encoder" in n
    )
    assert "bert.encoder.layer.0.attention.self.query" not in preconditioned  # frozen: no statistics
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), n
        elif p.dim() > 1:
            assert not torch.equal(p, before[n]), n
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_optim_args_that_are_not_kfac_settings_are_refused(tmp_path):
    trainer = _kfac_trainer(tmp_path, optim_args="dampening=0.1")
    with pytest.raises(ValueError, match="'dampening=0.1' is not a K-FAC setting"):
        trainer.train()


def test_kfac_resume_continues_exactly(tmp_path):
    args = dict(max_steps=8, save_strategy="steps", save_steps=4, optim_args="inverse_update_steps=3")
    full = _kfac_trainer(tmp_path, **args)
    full.train()
    ckpt = Path(full.args.output_dir) / "checkpoint-4"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert saved["kfac"]["steps"] == 4 and any("kfac_A" in s for s in saved["state"].values())
    other_start = tiny_model("bert", 4, seed=7, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    resumed = _kfac_trainer(tmp_path, model=other_start, **args)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.optimizer.optimizer.steps == 8
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=n)


@pytest.mark.slow
def test_kfac_ddp_ranks_agree(tmp_path):
    script = REPO / "tests" / "scripts" / "ddp_kfac.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run([*cmd, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2 and report["preconditioned_layers"] > 0
    assert report["factor_diff_before_reduce"] > 0  # the ranks saw different batches ...
    assert report["max_factor_diff_across_ranks"] == 0.0  # ... and agree on the reduced factors
    assert report["max_param_diff_across_ranks"] == 0.0
    assert report["trainable_changed"] and not report["frozen_changed"]
