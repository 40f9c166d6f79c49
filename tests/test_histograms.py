"""WeightHistogramCallback: tags and steps in the event files, clipped gradients, update ratios, writers, rank 0."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback

from hf_wb.callbacks import WeightHistogramCallback
from hf_wb.stats import ParamStats, group_parameters, histograms, param_subrole


class TokenData(torch.utils.data.Dataset):
    """Sequences whose label is marked by token 3 or 4 at position 1 (learnable), random otherwise."""

    def __init__(self, n: int = 64, seq: int = 10, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(5, 100, (n, seq), generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.x[:, 1] = torch.where(self.y == 1, 3, 4)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.y[i]}


class VectorData(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, d: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


class SequentialMLP(nn.Module):
    """No ModuleList of blocks: layer_map refuses it, the callbacks fall back to one unit per module."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def train(model, data, out: Path, callbacks, steps: int = 5, report_to: str = "none", **kwargs) -> Trainer:
    defaults = dict(learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1)
    defaults.update(kwargs)
    args = TrainingArguments(
        str(out),
        max_steps=steps,
        per_device_train_batch_size=16,
        use_cpu=True,
        report_to=report_to,
        save_strategy="no",
        disable_tqdm=True,
        **defaults,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    return trainer


def events(path: Path) -> EventAccumulator:
    return EventAccumulator(str(path), size_guidance={"histograms": 0, "scalars": 0, "tensors": 0}).Reload()


def steps_of(acc: EventAccumulator, tag: str) -> list[int]:
    if tag in acc.Tags()["histograms"]:
        return [e.step for e in acc.Histograms(tag)]
    return [e.step for e in acc.Scalars(tag)]


UNITS = ["embeddings", "block_00", "block_01", "block_02", "block_03", "head"]


def test_event_files_hold_the_expected_tags_and_steps(tmp_path):
    train(tiny_model("bert"), TokenData(), tmp_path, [WeightHistogramCallback(every_n_steps=2)], steps=5)
    acc = events(tmp_path / "runs" / "hf_wb")
    hist = set(acc.Tags()["histograms"])
    blocks = [f"block_{i:02d}" for i in range(4)]
    expected = {f"weights/{b}/{r}" for b in blocks for r in ("attn", "ffn", "norm")}
    expected |= {f"biases/{u}" for u in UNITS} | {f"grads/{u}" for u in UNITS}
    expected |= {"weights/embeddings", "weights/embeddings/norm", "weights/head"}
    expected |= {f"drift/{u}" for u in UNITS} | {f"drift_biases/{u}" for u in UNITS}
    assert hist == expected
    scalars = set(acc.Tags()["scalars"])
    for prefix in ("weight_norm", "grad_norm", "update_ratio"):
        assert {f"{prefix}/{u}" for u in UNITS} <= scalars
    assert {"lr/group_0", "lr/group_1", "train/loss"} <= scalars
    # weights: at the start, every 2 steps, after the last step; gradients and ratios: every 2 steps
    assert steps_of(acc, "weights/block_03/attn") == [0, 2, 4, 5]
    assert steps_of(acc, "weight_norm/head") == [0, 2, 4, 5]
    assert steps_of(acc, "grads/block_03") == [2, 4]
    assert steps_of(acc, "update_ratio/block_00") == [2, 4]
    assert [e.value for e in acc.Scalars("lr/group_0")] == pytest.approx([1e-3, 1e-3])
    # a histogram counts every value of its group
    model = tiny_model("bert")
    n_attn = sum(p.numel() for n, p in model.named_parameters() if "layer.0.attention" in n and n.endswith("weight"))
    n_attn -= model.config.hidden_size  # the attention output LayerNorm weight is a norm
    assert acc.Histograms("weights/block_00/attn")[0].histogram_value.num == n_attn


def test_gradients_are_read_after_clipping_and_update_ratio_matches_sgd(tmp_path):
    torch.manual_seed(0)
    lr = 10.0  # with max_grad_norm=1e-3 the steps stay small, and large enough for float32 differences
    trainer = train(
        SequentialMLP(),
        VectorData(),
        tmp_path,
        [WeightHistogramCallback(every_n_steps=1)],
        steps=4,
        optim="sgd",
        learning_rate=lr,
        max_grad_norm=1e-3,
    )
    acc = events(tmp_path / "runs" / "hf_wb")
    units = ["net.0", "net.2", "net.4"]
    grad = {u: {e.step: e.value for e in acc.Scalars(f"grad_norm/{u}")} for u in units}
    weight = {u: {e.step: e.value for e in acc.Scalars(f"weight_norm/{u}")} for u in units}
    ratio = {u: {e.step: e.value for e in acc.Scalars(f"update_ratio/{u}")} for u in units}
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    for step in range(1, 5):
        total = math.sqrt(sum(grad[u][step] ** 2 for u in units))
        assert total == pytest.approx(1e-3, rel=1e-3)  # clipped to max_grad_norm
        assert logged[step - 1] > 1e-2  # the Trainer logs the norm before clipping
        for u in units:  # plain SGD: dW = -lr * g, so ||dW|| / ||W_before|| = lr * ||g|| / ||W_before||
            assert ratio[u][step] == pytest.approx(lr * grad[u][step] / weight[u][step - 1], rel=1e-4)


def test_frozen_parameters_have_no_gradient_histograms(tmp_path):
    model = tiny_model("bert")
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    train(model, TokenData(), tmp_path, [WeightHistogramCallback(every_n_steps=2)], steps=2)
    acc = events(tmp_path / "runs" / "hf_wb")
    assert "weights/embeddings" in acc.Tags()["histograms"]
    assert "grads/embeddings" not in acc.Tags()["histograms"]
    assert "grads/block_00" in acc.Tags()["histograms"]
    assert "update_ratio/embeddings" not in acc.Tags()["scalars"]
    assert "grad_norm/embeddings" not in acc.Tags()["scalars"]


def test_borrows_the_tensorboard_callback_writer(tmp_path):
    args = TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=16, use_cpu=True, report_to="tensorboard",
        save_strategy="no", disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    trainer = Trainer(model=tiny_model("bert"), args=args, train_dataset=TokenData())
    tb = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback))
    callback = WeightHistogramCallback(every_n_steps=1, writer=tb)
    trainer.add_callback(callback)
    trainer.train()
    assert not (tmp_path / "runs" / "hf_wb").exists()
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    acc = events(run)
    assert "grads/block_00" in acc.Tags()["histograms"]
    assert {"train/loss", "update_ratio/head"} <= set(acc.Tags()["scalars"])
    assert callback.writer is None


def test_injected_writer_is_used_and_left_open(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "mine"))
    train(tiny_model("bert"), TokenData(), tmp_path / "out", [WeightHistogramCallback(2, writer=writer)], steps=2)
    writer.add_scalar("after/training", 1.0, 0)  # still open
    writer.close()
    acc = events(tmp_path / "mine")
    assert "weights/block_00/ffn" in acc.Tags()["histograms"]
    assert "after/training" in acc.Tags()["scalars"]
    assert "train/loss" not in acc.Tags()["scalars"]  # the Trainer's logs are mirrored only into our own writer
    assert not (tmp_path / "out" / "runs").exists()


def test_scalars_only_and_custom_log_dir(tmp_path):
    callback = WeightHistogramCallback(every_n_steps=1, histograms=False, log_dir=str(tmp_path / "tb"))
    train(tiny_model("bert"), TokenData(), tmp_path / "out", [callback], steps=2)
    acc = events(tmp_path / "tb")
    assert acc.Tags()["histograms"] == []
    assert "update_ratio/block_02" in acc.Tags()["scalars"]


def test_fallback_grouping_for_models_without_blocks(tmp_path):
    train(SequentialMLP(), VectorData(), tmp_path, [WeightHistogramCallback(every_n_steps=1)], steps=2)
    acc = events(tmp_path / "runs" / "hf_wb")
    assert set(acc.Tags()["histograms"]) == {
        f"{kind}/net.{i}" for kind in ("weights", "biases", "grads", "drift", "drift_biases") for i in (0, 2, 4)
    }


def test_only_the_main_process_writes(tmp_path):
    callback = WeightHistogramCallback(every_n_steps=1)
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    state = TrainerState()
    state.is_world_process_zero = False
    control = TrainerControl()
    model = tiny_model("bert")
    for event in ("on_train_begin", "on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end"):
        getattr(callback, event)(args, state, control, model=model, optimizer=None)
    callback.on_log(args, state, control, logs={"loss": 1.0})
    callback.on_train_end(args, state, control, model=model)
    assert callback.writer is None
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_steps": 0}, ValueError, "`every_n_steps`=0 must be >= 1"),
        ({"every_n_steps": 2.5}, TypeError, "`every_n_steps` must be an int"),
        ({"bins": 1}, ValueError, "`bins`=1"),
        ({"update_sample_size": 0}, ValueError, "`update_sample_size`=0"),
        ({"writer": "runs"}, TypeError, "`writer` must be"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        WeightHistogramCallback(**kwargs)


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("bert.encoder.layer.3.attention.self.query.weight", "attn"),
        ("bert.encoder.layer.3.attention.output.dense.weight", "attn"),
        ("bert.encoder.layer.3.attention.output.LayerNorm.weight", "norm"),
        ("bert.encoder.layer.3.intermediate.dense.weight", "ffn"),
        ("bert.encoder.layer.3.output.dense.bias", "ffn"),
        ("transformer.h.0.attn.c_attn.weight", "attn"),
        ("transformer.h.0.mlp.c_proj.weight", "ffn"),
        ("transformer.h.0.ln_2.weight", "norm"),
        ("model.layers.1.post_attention_layernorm.weight", "norm"),
        ("model.layers.1.mlp.down_proj.weight", "ffn"),
        ("encoder.block.0.layer.1.DenseReluDense.wi.weight", "ffn"),
        ("encoder.block.0.layer.0.SelfAttention.q.weight", "attn"),
        ("distilbert.transformer.layer.0.ffn.lin1.weight", "ffn"),
        ("distilbert.transformer.layer.0.sa_layer_norm.weight", "norm"),
        ("model.encoder.layers.0.fc1.weight", "ffn"),
        ("blocks.0.linear.weight", "other"),
    ],
)
def test_param_subrole(name, role):
    assert param_subrole(name) == role


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5", "bart", "distilbert", "deberta-v2"])
def test_every_block_parameter_gets_a_role(arch):
    entries = group_parameters(tiny_model(arch))
    assert {e.subrole for e in entries if e.depth is not None} <= {"attn", "ffn", "norm"}
    assert [e.order for e in entries] == sorted(e.order for e in entries)


def test_histograms_count_every_finite_value_once():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, float("nan"), float("inf")])
    y = torch.linspace(-1, 4, 100)
    (h,) = histograms({"g": [x, y]}, bins=10).values()
    assert h.num == 104 and sum(h.bucket_counts) == 104
    assert h.min == -1.0 and h.max == 4.0
    assert h.bucket_limits[-1] == pytest.approx(4.0) and len(h.bucket_limits) == 10
    assert h.sum == pytest.approx(6.0 + y.double().sum().item())
    assert h.sum_squares == pytest.approx(14.0 + (y.double() ** 2).sum().item())
    (c,) = histograms({"const": [torch.zeros(7)]}, bins=4).values()  # a constant tensor still gets a range
    assert c.num == 7 and c.min < 0.0 < c.max


def test_update_ratio_on_a_strided_sample():
    model = nn.Linear(1000, 300)
    stats = ParamStats(model, update_sample_size=1000)
    stats.snapshot()
    with torch.no_grad():
        model.weight.mul_(1.01)
        model.bias.mul_(1.01)
    (ratio,) = stats.update_ratios().values()
    assert ratio == pytest.approx(0.01, rel=1e-3)
    assert stats.update_ratios() == {}  # the snapshot is consumed


def test_drift_from_the_start_matches_the_weights_and_skips_frozen_units(tmp_path):
    model = tiny_model("bert")
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, TokenData(), tmp_path, [WeightHistogramCallback(every_n_steps=2)], steps=4, learning_rate=1e-2)
    acc = events(tmp_path / "runs" / "hf_wb")
    assert "drift/embeddings" not in acc.Tags()["histograms"]  # frozen: no copy kept, nothing drawn
    assert "drift_ratio/embeddings" not in acc.Tags()["scalars"]
    assert steps_of(acc, "drift/block_02") == [2, 4]
    assert steps_of(acc, "drift_ratio/block_02") == [0, 2, 4]
    names = [n for n in start if n.startswith("bert.encoder.layer.2.")]
    params = dict(model.named_parameters())
    delta = torch.cat([(params[n].detach() - start[n]).reshape(-1) for n in names])
    w0 = torch.cat([start[n].reshape(-1) for n in names])
    ratios = {e.step: e.value for e in acc.Scalars("drift_ratio/block_02")}
    assert ratios[0] == 0.0
    assert ratios[4] == pytest.approx((delta.norm() / w0.norm()).item(), rel=1e-4)
    (last,) = [h for h in acc.Histograms("drift/block_02") if h.step == 4]
    weights = [n for n in names if not n.endswith("bias")]
    assert last.histogram_value.num == sum(params[n].numel() for n in weights)
    assert last.histogram_value.sum == pytest.approx(
        sum((params[n].detach() - start[n]).double().sum().item() for n in weights), abs=1e-4
    )


def test_reference_copies_are_on_the_cpu_and_only_for_trainable_parameters():
    model = tiny_model("bert")
    for p in model.bert.encoder.layer[0].parameters():
        p.requires_grad_(False)
    stats = ParamStats(model)
    copied = stats.keep_reference()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert copied == trainable and stats.reference_bytes == 4 * trainable
    assert all(r is None or r.device.type == "cpu" for r in stats._reference)
    assert stats.keep_reference() == 0  # copied once
    for p in model.bert.encoder.layer[0].parameters():  # unfrozen later: copied from then on
        p.requires_grad_(True)
    assert stats.keep_reference() == sum(p.numel() for p in model.bert.encoder.layer[0].parameters())
    _, ratios = stats.drift_histograms()
    assert set(ratios) == {"embeddings", "block_00", "block_01", "block_02", "block_03", "head"}
    assert all(v == 0.0 for v in ratios.values())


def test_output_bias_lines_and_label_prior(tmp_path):
    model = tiny_model("bert")
    data = TokenData()
    train(model, data, tmp_path, [WeightHistogramCallback(every_n_steps=2)], steps=2)
    acc = events(tmp_path / "runs" / "hf_wb")
    p1 = data.y.float().mean().item()
    assert [e.value for e in acc.Scalars("head/label_prior/1")] == pytest.approx([p1])
    assert [e.value for e in acc.Scalars("head/bias_prior_applied")] == [0.0]  # a plain Trainer: no recipe
    bias = model.classifier.bias.detach()
    (implied,) = [e.value for e in acc.Scalars("head/implied/softmax/1") if e.step == 2]
    assert implied == pytest.approx(bias.softmax(0)[1].item(), rel=1e-5)
    assert [e.step for e in acc.Scalars("head/bias/0")] == [0, 2]


DDP_SCRIPT = """
import json, os, sys
import torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model
from test_histograms import TokenData
from transformers import Trainer, TrainingArguments
from hf_wb.callbacks import WeightDiagnosticsCallback, DiagnosticsConfig, WeightHistogramCallback

out = sys.argv[1]
args = TrainingArguments(out, max_steps=4, per_device_train_batch_size=8, use_cpu=True, report_to="none",
                         save_strategy="no", disable_tqdm=True, logging_steps=1, learning_rate=1e-9)
cfg = DiagnosticsConfig(every_n_steps=1, activation_window=1, patience=1, nonfinite_every_n_steps=2)  # all-reduce
hist = WeightHistogramCallback(every_n_steps=2, log_dir=os.path.join(out, "tb", "rank" + os.environ["RANK"]))
diag = WeightDiagnosticsCallback(cfg, stop_on_nonfinite=True)
trainer = Trainer(model=tiny_model("bert"), args=args, train_dataset=TokenData(), callbacks=[hist, diag])
trainer.train()
with open(os.path.join(out, "rank" + os.environ["RANK"] + ".json"), "w") as f:
    result = {{"world": trainer.args.world_size, "findings": len(diag.findings), "step": trainer.state.global_step}}
    json.dump(result, f)
torch.distributed.destroy_process_group()  # a gloo group left to interpreter teardown can SIGABRT at exit
"""


@pytest.mark.slow
def test_rank_zero_only_under_two_process_ddp(tmp_path):
    import json

    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(REPO / "tests"))))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(script), str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert ranks[0]["world"] == 2 and ranks[0]["step"] == ranks[1]["step"] == 4
    assert (out / "tb" / "rank0").is_dir() and not (out / "tb" / "rank1").exists()
    assert "grads/block_00" in events(out / "tb" / "rank0").Tags()["histograms"]
    # the learning rate of 1e-9 gives tiny update ratios: rank 0 reports them, rank 1 stays silent
    findings = json.loads((out / "diagnostics.json").read_text())
    assert {f["kind"] for f in findings} >= {"update_ratio_low"}
    assert ranks[0]["findings"] == len(findings) > 0 and ranks[1]["findings"] == 0
    assert len(list((out / "runs" / "hf_wb").glob("events.out.tfevents.*"))) == 1  # rank 0's diagnostics text
