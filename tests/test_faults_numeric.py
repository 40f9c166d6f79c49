"""Numerical faults (issue 11.6): non-finite losses, gradients, weights and targets; loss divergence; checks in short
runs; diagnostics.json always written; no non-finite checkpoint or final model."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import cpu_args, tiny_model
from test_diagnostics import MLP, MLPConfig, TokenData, VectorData, mlp
from test_run_glue import mrpc_argv, tiny_model_dir  # noqa: F401 (a fixture)
from transformers import Trainer, TrainerCallback

from hf_wb import WBConfig, WBTrainer
from hf_wb.callbacks import DiagnosticsConfig, WeightDiagnosticsCallback
from hf_wb.trainer import NonFiniteWeightsError

# the tiny BERT's block 2 FFN output weight: trainable under the default recipe (top 3 of 4 blocks)
BLOCK2 = "bert.encoder.layer.2.output.dense.weight"
BLOCK3 = "bert.encoder.layer.3.output.dense.weight"


class Inject(TrainerCallback):
    """Write NaN into some parameters at the end of optimizer step ``at`` (a weight that overflowed)."""

    def __init__(self, names: list[str], at: int) -> None:
        self.names, self.at = names, at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name in self.names:
                    params[name][0, 0] = float("nan")


def wb_trainer(out, steps: int, recipe: WBConfig | None = None, callbacks=(), **kwargs) -> WBTrainer:
    args = cpu_args(out, max_steps=steps, per_device_train_batch_size=16, lr_scheduler_type="constant", **kwargs)
    trainer = WBTrainer(model=tiny_model("bert"), args=args, train_dataset=TokenData(), wb_config=recipe)
    for cb in callbacks:
        trainer.add_callback(cb)
    return trainer


def diagnostics_of(trainer) -> WeightDiagnosticsCallback:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, WeightDiagnosticsCallback))


def all_finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ settings wiring


def test_wbconfig_fields_reach_the_callback_and_the_command_line(tmp_path):
    trainer = wb_trainer(tmp_path, 1, WBConfig(histogram_steps=0, diagnostics_steps=7, stop_on_nonfinite=False))
    callback = diagnostics_of(trainer)
    assert callback.config.every_n_steps == 7 and callback.config.activation_window == 7
    assert callback.stop_on_nonfinite is False and callback.nonfinite_only is False
    # defaults: stop on, checks at the histogram interval
    callback = diagnostics_of(wb_trainer(tmp_path, 1, WBConfig(histogram_steps=20)))
    assert callback.stop_on_nonfinite is True and callback.config.every_n_steps == 20
    # diagnostics off but stop_on_nonfinite on: only the non-finite checks run
    callback = diagnostics_of(wb_trainer(tmp_path, 1, WBConfig(diagnostics=False)))
    assert callback.nonfinite_only and callback.stop_on_nonfinite
    assert WBConfig(histogram_steps=0).diagnostics_interval == 100
    with pytest.raises(ValueError, match="`diagnostics_steps` must be >= 0"):
        WBConfig(diagnostics_steps=-1)

    from hf_wb.glue.run import parse_args

    parsed = parse_args(
        [
            "--task_name",
            "cola",
            "--output_dir",
            str(tmp_path),
            "--stop_on_nonfinite",
            "false",
            "--diagnostics_steps",
            "9",
        ]
    )
    assert parsed.wb_config.stop_on_nonfinite is False and parsed.wb_config.diagnostics_steps == 9


# ------------------------------------------------------------------------------------------- non-finite values


def test_nonfinite_gradient_stops_at_that_step_names_the_tensor_and_discards_the_update(tmp_path):
    model = tiny_model("bert")
    # no clipping: a clipped NaN norm would make every gradient NaN (the finding says so)
    args = cpu_args(
        tmp_path, max_steps=10, per_device_train_batch_size=16, lr_scheduler_type="constant", max_grad_norm=0.0
    )
    trainer = WBTrainer(model=model, args=args, train_dataset=TokenData(), wb_config=WBConfig(histogram_steps=0))
    param = dict(model.named_parameters())[BLOCK3]
    param.register_hook(lambda g: g * float("nan") if trainer.state.global_step == 3 else g)  # the 4th step's grad
    before = {}

    class Keep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                before.update({n: p.detach().clone() for n, p in model.named_parameters()})

    trainer.add_callback(Keep())
    trainer.train()
    callback = diagnostics_of(trainer)
    assert trainer.state.global_step == 4 and callback.stopped_at == 4 == trainer.wb_stopped_on_nonfinite
    (finding,) = [f for f in callback.findings if f.kind == "nonfinite"]
    assert finding.layers == [BLOCK3] and finding.step == 4
    assert finding.evidence == {"where": "gradients", "unit": "block_03", "update_discarded": True}
    assert all_finite(model)  # the update of step 4 was discarded: the weights are those of step 3
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    saved = json.loads((tmp_path / "diagnostics.json").read_text())
    assert [f["kind"] for f in saved] == ["nonfinite"]


def test_nonfinite_weight_names_the_first_layer_in_forward_order(tmp_path):
    trainer = wb_trainer(tmp_path, 10, WBConfig(histogram_steps=0), callbacks=[Inject([BLOCK3, BLOCK2], at=2)])
    trainer.train()
    callback = diagnostics_of(trainer)
    assert trainer.state.global_step == 3  # checked before the optimizer step that follows
    (finding,) = [f for f in callback.findings if f.kind == "nonfinite"]
    assert finding.layers == [BLOCK2] and finding.evidence["where"] == "weights"  # block 2 comes before block 3
    assert "`" + BLOCK2 + "` (unit block_02)" in finding.message
    assert "max_grad_norm" in finding.advice


def test_without_stop_training_goes_on_but_nothing_nonfinite_is_saved(tmp_path, caplog):
    recipe = WBConfig(histogram_steps=0, stop_on_nonfinite=False)
    trainer = wb_trainer(
        tmp_path, 6, recipe, callbacks=[Inject([BLOCK2], at=3)], save_strategy="steps", save_steps=2,
        save_total_limit=1,
    )  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="hf_wb.trainer"):
        trainer.train()
    assert trainer.state.global_step == 6
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]  # 4 and 6 refused, 2 kept
    first = trainer.wb_first_nonfinite()  # the NaN spread through the updates: the lowest trainable block by now
    assert first is not None and first.startswith("bert.encoder.layer.1.")
    refused = [r.getMessage() for r in caplog.records if "not saving the checkpoint" in r.getMessage()]
    assert len(refused) == 2 and f"`{first}`" in refused[0] and "checkpoint-2" in refused[0]
    with pytest.raises(NonFiniteWeightsError, match=f"Refusing to save.*`{first}`.*checkpoint-2"):
        trainer.save_model()
    assert not (tmp_path / "model.safetensors").exists()
    # the last finite checkpoint resumes
    resumed = wb_trainer(tmp_path, 4, recipe, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4 and all_finite(resumed.model)
    resumed.save_model()
    assert (tmp_path / "model.safetensors").exists()


def test_nonfinite_targets_point_at_the_data(tmp_path):
    class Scores(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
            self.y = self.x[:, 0].clone()
            self.y[5] = float("nan")  # one NaN regression score

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict:
            return {"x": self.x[i], "labels": self.y[i]}

    class Regressor(MLP):
        def forward(self, x, labels=None):
            h = self.inp_act(self.inp(x))
            for block in self.blocks:
                h = block(h)
            out = self.classifier(h).squeeze(-1)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    torch.manual_seed(0)
    model = Regressor(MLPConfig(num_labels=1))
    callback = WeightDiagnosticsCallback(DiagnosticsConfig(every_n_steps=2, activation_window=2))
    trainer = Trainer(model=model, args=cpu_args(tmp_path, max_steps=2, per_device_train_batch_size=32),
                      train_dataset=Scores(), callbacks=[callback])  # fmt: skip
    trainer.train()
    finding = callback.findings[0]
    assert finding.kind == "nonfinite" and finding.layers == ["labels"] and finding.step == 0
    assert "1 of 64 training targets" in finding.message and "example 5" in finding.message
    assert "fix the data" in finding.advice and "max_grad_norm" not in finding.advice
    # with stop_on_nonfinite the run is refused before the first step
    callback = WeightDiagnosticsCallback(stop_on_nonfinite=True)
    trainer = Trainer(model=Regressor(MLPConfig(num_labels=1)), args=cpu_args(tmp_path / "b", max_steps=2),
                      train_dataset=Scores(), callbacks=[callback])  # fmt: skip
    with pytest.raises(ValueError, match="Training targets are not finite: 1 of 64.*fix the data"):
        trainer.train()
    assert json.loads((tmp_path / "b" / "diagnostics.json").read_text())[0]["layers"] == ["labels"]


# ------------------------------------------------------------------------------------------------ loss divergence


def test_learning_rate_10_without_clipping_is_reported_as_divergence(tmp_path):
    callback = WeightDiagnosticsCallback(DiagnosticsConfig(every_n_steps=5, activation_window=5))
    trainer = Trainer(
        model=mlp(), args=cpu_args(tmp_path, max_steps=20, learning_rate=10.0, max_grad_norm=0.0,
                                   per_device_train_batch_size=32, lr_scheduler_type="constant"),
        train_dataset=VectorData(), callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert max(losses) > 3 * losses[0]  # the construction: the loss explodes
    (finding,) = [f for f in callback.findings if f.kind == "loss_divergence"]
    assert finding.layers == ["loss"] and finding.evidence["smoothed_loss"] > 2 * finding.evidence["minimum"]
    assert "`max_grad_norm`=1.0" in finding.advice and "clipping is off" in finding.advice
    assert "lower the learning rate (now 10)" in finding.advice


def test_divergence_rule_on_logged_losses():
    callback = WeightDiagnosticsCallback(DiagnosticsConfig())
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments("unused", use_cpu=True, report_to="none", max_grad_norm=1.0)
    state, control = TrainerState(), TrainerControl()

    def feed(losses):
        for step, loss in enumerate(losses, 1):
            state.global_step = step
            callback.on_log(args, state, control, logs={"loss": loss})

    feed([0.7, 0.5, 0.3, 0.2, 0.25, 0.3, 0.28])  # noisy but not diverging: 1.5x the minimum at most
    assert callback.findings == []
    feed([0.9, 3.0, 8.0])  # above 2x the minimum and above the start, twice in a row
    (finding,) = callback.findings
    assert finding.kind == "loss_divergence" and finding.step == 3
    assert "clipping already on (`max_grad_norm`=1)" in finding.advice


# ------------------------------------------------------------------------------- short runs and diagnostics.json


def test_a_run_shorter_than_the_interval_is_checked_at_its_last_step(tmp_path):
    callback = WeightDiagnosticsCallback(DiagnosticsConfig(every_n_steps=100, patience=1))
    Trainer(model=mlp(), args=cpu_args(tmp_path, max_steps=3, learning_rate=1e-9, per_device_train_batch_size=32,
                                             lr_scheduler_type="constant"),
            train_dataset=VectorData(), callbacks=[callback]).train()  # fmt: skip
    (finding,) = callback.findings
    assert finding.kind == "update_ratio_low" and finding.step == 3


def test_diagnostics_json_is_an_empty_list_after_a_healthy_checked_run(tmp_path):
    trainer = wb_trainer(tmp_path, 3, WBConfig(histogram_steps=0), learning_rate=5e-4)
    trainer.train()
    assert diagnostics_of(trainer).findings == []
    assert json.loads((tmp_path / "diagnostics.json").read_text()) == []
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_run_glue_marks_a_run_stopped_on_nonfinite_values_and_exits_1(tiny_model_dir, glue_dir, tmp_path):  # noqa: F811
    from hf_wb.glue.run import main

    out = tmp_path / "out"
    # Adam at lr 1e30: the first update makes the weights ~1e30, the next forward pass overflows to NaN
    argv = mrpc_argv(tiny_model_dir, glue_dir, out, "--learning_rate", "1e30", "--do_eval", "false")
    assert main(argv) == 1
    results = json.loads((out / "all_results.json").read_text())
    assert isinstance(results["stopped_on_nonfinite"], int) and results["stopped_on_nonfinite"] <= 3
    findings = json.loads((out / "diagnostics.json").read_text())
    assert any(f["kind"] == "nonfinite" for f in findings)
    assert (out / "model.safetensors").exists()  # the last finite state (the faulty update was discarded)
