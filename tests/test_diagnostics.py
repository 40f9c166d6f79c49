"""WeightDiagnosticsCallback: each diagnosis fires on a constructed failure and stays silent on healthy runs."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainerControl, TrainerState, TrainingArguments

from hf_wb.callbacks import DiagnosticsConfig, Finding, WeightDiagnosticsCallback
from hf_wb.stats import ParamStats, bimodality_coefficient, depth_trend, kl_divergence

# checks every 5 steps, activations recorded over the 5 steps before each check, NaN checks every step
FAST = dict(every_n_steps=5, activation_window=5, nonfinite_every_n_steps=1)


class MLPConfig(PretrainedConfig):
    model_type = "hf_wb_test_mlp"

    def __init__(self, n_in=16, width=64, depth=3, num_labels=2, act="relu", grad_scale=1.0, **kwargs):
        super().__init__(num_labels=num_labels, **kwargs)
        self.n_in, self.width, self.depth, self.act, self.grad_scale = n_in, width, depth, act, grad_scale


class Block(nn.Module):
    def __init__(self, width: int, act: str) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.act = {"relu": nn.ReLU(), "sigmoid": nn.Sigmoid(), "gelu": nn.GELU(), "tanh": nn.Tanh()}[act]

    def forward(self, x):
        return self.act(self.linear(x))


class MLP(PreTrainedModel):
    """input layer -> ``depth`` blocks (a ModuleList, so layer_map finds them) -> classifier.

    ``grad_scale`` multiplies the gradient flowing back through each block boundary (forward unchanged): a
    construction of gradients that explode (> 1) with depth towards the input.
    """

    config_class = MLPConfig

    def __init__(self, config: MLPConfig) -> None:
        super().__init__(config)
        self.inp = nn.Linear(config.n_in, config.width)
        self.inp_act = nn.ReLU()
        self.blocks = nn.ModuleList(Block(config.width, config.act) for _ in range(config.depth))
        self.classifier = nn.Linear(config.width, config.num_labels)

    def _init_weights(self, module):  # keep PyTorch's default init
        pass

    def forward(self, x, labels=None):
        h = self.inp_act(self.inp(x))
        for block in self.blocks:
            h = block(h)
            if self.config.grad_scale != 1.0 and h.requires_grad:
                h.register_hook(lambda g: g * self.config.grad_scale)
        logits = self.classifier(h)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def mlp(seed: int = 0, **kwargs) -> MLP:
    torch.manual_seed(seed)
    return MLP(MLPConfig(**kwargs))


class VectorData(torch.utils.data.Dataset):
    """Gaussian inputs; label 1 when the first feature is in the top ``p1`` quantile (learnable)."""

    def __init__(self, n: int = 256, d: int = 16, p1: float = 0.5, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g)
        cut = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - p1))
        self.y = (self.x[:, 0] > cut).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


class TokenData(torch.utils.data.Dataset):
    """Random token sequences; the label (1 with probability ``p1``) is marked by token 3 or 4 at position 1."""

    def __init__(self, n: int = 128, seq: int = 10, p1: float = 0.5, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(5, 100, (n, seq), generator=g)
        self.y = (torch.rand(n, generator=g) < p1).long()
        self.x[:, 1] = torch.where(self.y == 1, 3, 4)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.y[i]}


def train(model, data, out: Path, steps: int = 10, config=None, callback=None, **kwargs):
    defaults = dict(
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=5,
        optim="adamw_torch",
        per_device_train_batch_size=32,
    )
    defaults.update(kwargs)
    args = TrainingArguments(
        str(out),
        max_steps=steps,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        **defaults,
    )
    callback = callback or WeightDiagnosticsCallback(DiagnosticsConfig(**(config or FAST)))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    return callback, trainer


def kinds(callback: WeightDiagnosticsCallback) -> set[str]:
    return {f.kind for f in callback.findings}


def only(callback: WeightDiagnosticsCallback, kind: str) -> list[Finding]:
    return [f for f in callback.findings if f.kind == kind]


# ------------------------------------------------------------------------------------------------------ healthy runs


def test_healthy_tiny_bert_is_silent(tmp_path):
    callback, trainer = train(
        tiny_model("bert"), TokenData(), tmp_path, steps=20, learning_rate=5e-4, per_device_train_batch_size=16
    )
    assert callback.findings == []
    assert trainer.state.log_history[-2]["loss"] < 0.7
    assert json.loads((tmp_path / "diagnostics.json").read_text()) == []  # checked and healthy


def test_healthy_relu_mlp_is_silent(tmp_path):
    callback, trainer = train(mlp(), VectorData(), tmp_path, steps=30, learning_rate=1e-3)
    assert callback.findings == []
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]  # it learns


# ---------------------------------------------------------------------------------------------- constructed failures


def test_learning_rate_that_kills_relu_units(tmp_path):
    callback, _ = train(mlp(), VectorData(), tmp_path, steps=10, learning_rate=0.2)
    dead = only(callback, "dead_units")
    assert dead, callback.findings
    layers = [x for f in dead for x in f.layers]
    assert "blocks.0.act" in layers
    evidence = dead[0].evidence[dead[0].layers[0]]
    assert evidence["dead_fraction"] > 0.25 and evidence["criterion"] == "exactly zero"
    assert "LeakyReLU" in dead[0].advice and "He" in dead[0].advice
    (bimodal,) = only(callback, "bimodal_weights")
    assert all(x.endswith("linear.weight") for x in bimodal.layers)
    for name in bimodal.layers:
        assert bimodal.evidence[name]["bimodality"] > 0.6 > bimodal.evidence[name]["at_start"]
    assert "dead ReLU" in bimodal.advice
    # the update ratio of Adam at lr 0.2 is far above 1e-3 too
    assert "update_ratio_high" in kinds(callback)


def test_near_zero_gelu_units(tmp_path):
    model = mlp(act="gelu")
    with torch.no_grad():
        model.blocks[1].linear.bias[:40] = -20.0  # 40 of 64 GELU units sit far left, where GELU(x) ~ 0
    callback, _ = train(model, VectorData(), tmp_path, steps=5, learning_rate=1e-4)
    (finding,) = only(callback, "dead_units")
    assert finding.layers == ["blocks.1.act"]
    assert finding.evidence["blocks.1.act"] == {"dead_fraction": 0.625, "features": 64, "criterion": "|y| <= 0.001"}


def test_values_near_the_dtype_limit_count_as_overflow():
    model = mlp()
    stats = ParamStats(model)
    assert stats.first_nonfinite(limit_fraction=0.1) is None
    with torch.no_grad():
        model.blocks[2].linear.weight[0, 0] = 1e38  # finite, but within 10x of float32's maximum
    assert stats.all_finite() is False  # the norm overflows
    assert stats.first_nonfinite(limit_fraction=0.1) == ("blocks.2.linear.weight", "block_02")
    assert stats.first_nonfinite() is None  # without the limit it is a finite number


def test_huge_learning_rate_overflows_and_names_the_first_layer(tmp_path):
    callback, trainer = train(mlp(), VectorData(), tmp_path, steps=10, learning_rate=1e8, optim="sgd", max_grad_norm=0)
    first = only(callback, "nonfinite")[0]
    assert first.severity == "critical"
    assert first.layers == ["inp.weight"]  # the first layer in forward order
    assert "max_grad_norm" in first.advice and "lower the learning rate" in first.advice
    assert trainer.state.global_step == 10  # without stop_on_nonfinite training goes on


def test_stop_on_nonfinite_stops_training_cleanly(tmp_path):
    callback = WeightDiagnosticsCallback(DiagnosticsConfig(**FAST), stop_on_nonfinite=True)
    _, trainer = train(
        mlp(), VectorData(), tmp_path, steps=20, learning_rate=1e8, optim="sgd", max_grad_norm=0, callback=callback
    )
    assert "nonfinite" in kinds(callback)
    assert trainer.state.global_step < 5


def test_nonfinite_loss_in_the_logs():
    callback = WeightDiagnosticsCallback(stop_on_nonfinite=True)
    state, control = TrainerState(), TrainerControl()
    state.global_step = 7
    args = TrainingArguments("unused", use_cpu=True, report_to="none")
    result = callback.on_log(args, state, control, logs={"loss": float("nan"), "grad_norm": 1.0, "epoch": 1.0})
    assert result is control and control.should_training_stop
    (finding,) = callback.findings
    assert finding.kind == "nonfinite" and finding.layers == ["loss"] and finding.step == 7


def test_strong_weight_decay_shrinks_weights(tmp_path):
    callback, _ = train(mlp(), VectorData(), tmp_path, steps=25, learning_rate=0.1, optim="sgd", weight_decay=1.0)
    (finding,) = only(callback, "shrinking_weights")
    assert "block_00" in finding.layers
    norms = finding.evidence["block_00"]["norms"]
    assert len(norms) == 5 and all(b < a for a, b in zip(norms, norms[1:], strict=False))
    assert finding.evidence["block_00"]["fell_by"] > 0.2
    assert "weight decay" in finding.advice


def test_zero_output_bias_on_imbalanced_labels(tmp_path):
    callback, _ = train(tiny_model("bert"), TokenData(p1=0.1), tmp_path, steps=1)
    (finding,) = callback.findings
    assert finding.kind == "bias_prior" and finding.step == 0 and finding.layers == ["classifier"]
    prior = finding.evidence["label_prior"]
    assert prior[0] > 0.85 and prior[0] + prior[1] == pytest.approx(1.0, abs=1e-3)
    assert finding.evidence["bias_implied"] == [0.5, 0.5]
    assert finding.evidence["kl_nats"] == pytest.approx(kl_divergence(prior, [0.5, 0.5]), abs=1e-3)
    assert "bias_prior" in finding.advice


def test_bias_prior_silent_when_balanced_or_already_set(tmp_path):
    callback, _ = train(tiny_model("bert"), TokenData(p1=0.5), tmp_path / "a", steps=1)
    assert callback.findings == []
    model = tiny_model("bert")
    with torch.no_grad():
        model.classifier.bias.copy_(torch.log(torch.tensor([0.9, 0.1])))
    labels = [0] * 90 + [1] * 10  # explicit labels win over the dataset's
    callback = WeightDiagnosticsCallback(DiagnosticsConfig(**FAST), labels=labels)
    train(model, TokenData(p1=0.5), tmp_path / "b", steps=1, callback=callback)
    assert callback.findings == []


def test_vanishing_gradients_with_depth(tmp_path):
    callback, _ = train(mlp(act="sigmoid", depth=8), VectorData(), tmp_path, steps=10)
    (finding,) = only(callback, "vanishing_gradients")
    assert finding.layers == ["block_00", "block_07"]
    assert finding.evidence["orders_of_magnitude"] > 2
    assert "Xavier/He" in finding.advice and "normalisation" in finding.advice and "residual" in finding.advice
    assert "exploding_gradients" not in kinds(callback)


def test_exploding_gradients_with_depth(tmp_path):
    callback, _ = train(
        mlp(act="tanh", depth=6, grad_scale=10.0), VectorData(), tmp_path, steps=10, learning_rate=1e-4
    )
    (finding,) = only(callback, "exploding_gradients")
    assert finding.layers == ["block_00", "block_05"]
    assert finding.evidence["orders_of_magnitude"] < -2
    assert "max_grad_norm" in finding.advice


def test_warmup_is_not_mistaken_for_a_low_learning_rate(tmp_path):
    # the first 10 steps are warm-up (LR below half its peak for the first 5): no update_ratio_low at step 5
    callback, _ = train(
        tiny_model("bert"), TokenData(), tmp_path, steps=10, learning_rate=1e-4, lr_scheduler_type="linear",
        warmup_steps=100, config=dict(FAST, patience=1),
    )  # fmt: skip
    assert "update_ratio_low" not in kinds(callback)


# --------------------------------------------------------------------------------------------------------- outputs


def test_learning_rate_too_low_reported_to_json_tensorboard_and_the_log_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_wb.callbacks.diagnostics"):
        callback, _ = train(
            tiny_model("bert"), TokenData(), tmp_path, steps=10, learning_rate=1e-9, config=dict(FAST, patience=1)
        )
    (finding,) = callback.findings
    assert finding.kind == "update_ratio_low" and finding.step == 5
    assert set(finding.layers) == {"embeddings", "block_00", "block_01", "block_02", "block_03", "head"}
    assert all(v["update_ratio"] < 1e-5 and v["lr"] == 1e-9 for v in finding.evidence.values())
    assert "too low" in finding.advice
    records = [r for r in caplog.records if "update_ratio_low" in r.getMessage()]
    assert len(records) == 1  # once per (kind, layer) although the condition holds again at step 10
    saved = json.loads((tmp_path / "diagnostics.json").read_text())
    assert saved == [f.to_dict() for f in callback.findings]
    assert set(saved[0]) == {"kind", "severity", "step", "layers", "message", "advice", "evidence"}
    acc = EventAccumulator(str(tmp_path / "runs" / "hf_wb"), size_guidance={"tensors": 0}).Reload()
    assert "diagnostics/update_ratio_low/text_summary" in acc.Tags()["tensors"]


def test_resumed_run_keeps_its_earlier_findings(tmp_path):
    earlier = [
        Finding("update_ratio_low", "warning", 5, ["head"], "m", "a", {"head": {"update_ratio": 1e-7}}).to_dict(),
        Finding("dead_units", "warning", 50, ["x.act"], "m", "a").to_dict(),  # after the checkpoint: dropped
    ]
    (tmp_path / "diagnostics.json").write_text(json.dumps(earlier))
    callback = WeightDiagnosticsCallback(DiagnosticsConfig(**FAST))
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    state, control = TrainerState(), TrainerControl()
    state.global_step = 10
    callback.on_train_begin(args, state, control, model=tiny_model("bert"), optimizer=None, train_dataloader=None)
    assert [f.to_dict() for f in callback.findings] == earlier[:1]
    callback._emit("update_ratio_low", "warning", 15, ["head", "block_00"], "m", {})  # head was reported already
    callback.on_train_end(args, state, control)
    saved = json.loads((tmp_path / "diagnostics.json").read_text())
    assert [(f["step"], f["layers"]) for f in saved] == [(5, ["head"]), (15, ["block_00"])]
    # a new run (step 0) starts a new list
    state.global_step = 0
    callback.on_train_begin(args, state, control, model=tiny_model("bert"), optimizer=None, train_dataloader=None)
    callback.on_train_end(args, state, control)
    assert callback.findings == [] and not (tmp_path / "diagnostics.json").exists()


def test_only_the_main_process_reports(tmp_path):
    callback = WeightDiagnosticsCallback(DiagnosticsConfig(**FAST))
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    state, control = TrainerState(), TrainerControl()
    state.is_world_process_zero = False
    model = tiny_model("bert")
    callback.on_train_begin(args, state, control, model=model, optimizer=None, train_dataloader=None)
    for step in range(5):
        state.global_step = step
        for event in ("on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end"):
            getattr(callback, event)(args, state, control, model=model)
    callback.on_log(args, state, control, logs={"loss": float("inf")})
    callback.on_train_end(args, state, control)
    assert callback.findings == []
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ config and stats


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "`every_n_steps`=0 must be >= 1"),
        ({"every_n_steps": 5, "activation_window": 6}, "`activation_window`=6 must be <= `every_n_steps`=5"),
        ({"dead_unit_fraction": 1.5}, r"`dead_unit_fraction`=1.5 must be in \(0, 1\)"),
        ({"update_ratio_low": 1.0, "update_ratio_high": 0.1}, "`update_ratio_low`=1.0 and `update_ratio_high`=0.1"),
        ({"nonfinite_every_n_steps": -1}, "`nonfinite_every_n_steps`=-1 must be >= 0"),
        ({"min_blocks": 1}, "`min_blocks`=1 must be >= 2"),
        ({"depth_orders": -1.0}, "`depth_orders`=-1.0 must be >= 0"),
        ({"bimodality_threshold": 0.0}, "`bimodality_threshold`=0.0 must be > 0"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiagnosticsConfig(**kwargs)


def test_every_threshold_is_documented():
    doc = DiagnosticsConfig.__doc__
    for f in fields(DiagnosticsConfig):
        stated = re.search(r"Default ([0-9.e+-]+?)[.,]?( |$|\()", f.metadata["help"])
        assert stated is not None and float(stated.group(1)) == f.default, f.name
        assert f"{f.name}:" in doc, f.name


def test_constructor_and_finding_errors():
    with pytest.raises(TypeError, match="`config` must be a DiagnosticsConfig"):
        WeightDiagnosticsCallback(config={"every_n_steps": 5})
    with pytest.raises(ValueError, match="`severity`='fatal'"):
        Finding("nonfinite", "fatal", 0, [], "", "")


def test_bimodality_coefficient_reference_values():
    g = torch.Generator().manual_seed(0)
    assert bimodality_coefficient(torch.randn(200_000, generator=g)) == pytest.approx(1 / 3, abs=0.01)
    assert bimodality_coefficient(torch.rand(200_000, generator=g)) == pytest.approx(5 / 9, abs=0.01)
    two = torch.cat([torch.randn(50_000, generator=g) - 3, torch.randn(50_000, generator=g) + 3])
    assert bimodality_coefficient(two) > 0.7
    assert math.isnan(bimodality_coefficient(torch.ones(10)))
    assert math.isnan(bimodality_coefficient(torch.randn(3)))


def test_depth_trend_and_kl():
    assert depth_trend([1e-4, 1e-3, 1e-2, 1e-1]) == pytest.approx(3.0)
    assert depth_trend([5.0, 0.5, 0.05]) == pytest.approx(-2.0)
    assert depth_trend([1.0, 0.0, float("nan")]) == 0.0
    assert kl_divergence([0.9, 0.1], [0.5, 0.5]) == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2))
    assert kl_divergence([1.0, 0.0], [1.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="`p` has 2 entries and `q` has 3"):
        kl_divergence([0.5, 0.5], [0.2, 0.3, 0.5])
