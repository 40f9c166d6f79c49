"""hf-wb report: reads a run's event files and diagnostics, writes a PNG, prints the findings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.integrations import TensorBoardCallback

from hf_wb.callbacks import DiagnosticsConfig, WeightDiagnosticsCallback, WeightHistogramCallback
from hf_wb.report import MAX_UNIT_ROWS, Histogram, _merge, _pick_rows, _rebin, findings_table, load_run, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, seq: int = 10) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(5, 100, (n, seq), generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.y[i]}


class VectorData(torch.utils.data.Dataset):
    def __init__(self, n: int = 128) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 16, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


class Blocks(nn.Module):
    """A ReLU MLP whose blocks sit in a ModuleList, so it has depth and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(16, 64)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(64, 2)

    def forward(self, x, labels=None):
        h = torch.relu(self.inp(x))
        for block in self.blocks:
            h = block(h)
        logits = self.head(h)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def args_for(out, steps: int, report_to: str = "none", **kwargs) -> TrainingArguments:
    return TrainingArguments(
        str(out), max_steps=steps, per_device_train_batch_size=32, use_cpu=True, report_to=report_to,
        save_strategy="no", disable_tqdm=True, logging_steps=2, lr_scheduler_type="constant", **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory):
    """A ReLU MLP trained at a learning rate that kills units, watched by both callbacks."""
    out = tmp_path_factory.mktemp("broken")
    config = DiagnosticsConfig(every_n_steps=4, activation_window=4)
    callbacks = [WeightHistogramCallback(every_n_steps=2), WeightDiagnosticsCallback(config)]
    trainer = Trainer(
        model=Blocks(), args=args_for(out, 12, learning_rate=0.2), train_dataset=VectorData(), callbacks=callbacks
    )
    trainer.train()
    return out


def test_report_png_and_findings_table(broken_run, tmp_path, capsys):
    output = tmp_path / "report.png"
    assert main([str(broken_run), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert f"Report written to {output}" in printed
    assert "dead_units" in printed and "advice for dead_units:" in printed
    data = output.read_bytes()
    assert data[:8] == PNG_MAGIC
    import matplotlib.image

    image = matplotlib.image.imread(str(output))
    height, width = image.shape[:2]
    assert width == 1650 and height > 1000  # 15 in x 110 dpi; five unit rows, the line plots and the findings
    assert image[..., :3].std() > 0.1  # not a blank canvas


def test_default_output_next_to_the_run(broken_run):
    assert main([str(broken_run)]) == 0
    assert (broken_run / "hf_wb_report.png").read_bytes()[:8] == PNG_MAGIC


def test_load_run_reads_histograms_scalars_and_findings(broken_run):
    data = load_run(broken_run)
    assert {"weights/block_00", "biases/head", "grads/block_02"} <= set(data.histograms)
    assert [h.step for h in data.histograms["grads/block_02"]] == [2, 4, 6, 8, 10, 12]
    assert [s for s, _ in data.scalars["weight_norm/head"]] == [0, 2, 4, 6, 8, 10, 12]
    assert "train/loss" in data.scalars  # mirrored by the histogram callback (report_to="none")
    assert data.findings == json.loads((broken_run / "diagnostics.json").read_text())
    for h in data.histograms["weights/block_00"]:
        assert h.num == 64 * 64  # every weight of the block's matrix is counted once


def test_merges_the_tensorboard_callback_run(tmp_path):
    args = args_for(tmp_path, 4, report_to="tensorboard", learning_rate=1e-3)
    trainer = Trainer(model=tiny_model("bert"), args=args, train_dataset=TokenData())
    tb = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback))
    trainer.add_callback(WeightHistogramCallback(every_n_steps=2, writer=tb))
    trainer.add_callback(WeightDiagnosticsCallback(DiagnosticsConfig(every_n_steps=2, activation_window=2)))
    trainer.train()
    data = load_run(tmp_path)
    assert len(data.event_dirs) == 2  # the Trainer's run (shared with the histograms) and the diagnostics writer
    assert {"train/loss", "train/learning_rate", "update_ratio/block_03"} <= set(data.scalars)
    assert "weights/block_01/ffn" in data.histograms
    assert main([str(tmp_path), "-o", str(tmp_path / "r.png")]) == 0


def test_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "No TensorBoard event files" in capsys.readouterr().err
    with pytest.raises(ValueError, match="No TensorBoard event files"):
        load_run(tmp_path)


def test_findings_table():
    assert findings_table([]) == "No diagnostics findings."
    finding = {
        "step": 40, "severity": "warning", "kind": "update_ratio_high",
        "layers": ["block_00", "block_01", "block_02", "block_03", "head"],
        "message": "the update-to-weight ratio stayed above 0.1 for 2 checks " * 3, "advice": "lower it",
    }  # fmt: skip
    lines = findings_table([finding], width=100).splitlines()
    assert lines[0].split() == ["step", "severity", "kind", "layers", "message"]
    assert lines[2].startswith("40    warning   update_ratio_high  block_00, block_01, block_02 (+2)")
    assert all(len(line) <= 100 for line in lines)
    assert lines[-1] == "advice for update_ratio_high: lower it"


def test_rebin_and_merge_keep_every_count():
    a = Histogram(5, np.array([-1.0, 0.0, 1.0]), np.array([3.0, 1.0]), 0.0)
    b = Histogram(5, np.array([0.5, 2.0, 4.0]), np.array([2.0, 2.0]), 0.0)
    grid = np.linspace(-2.0, 5.0, 15)
    assert _rebin(a, grid).sum() == pytest.approx(4.0)
    assert _rebin(a, np.array([-1.0, -0.5, 0.0]))[0] == pytest.approx(1.5)  # uniform inside a bucket
    (merged,) = _merge([[a], [b]])
    assert merged.num == pytest.approx(8.0) and merged.step == 5
    assert set(merged.edges) == {-1.0, 0.0, 0.5, 1.0, 2.0, 4.0}


def test_unit_rows_are_spread_over_depth():
    units = ["embeddings", *[f"block_{i:02d}" for i in range(24)], "head"]
    rows = _pick_rows(units, MAX_UNIT_ROWS)
    assert len(rows) == MAX_UNIT_ROWS and rows[0] == "embeddings" and rows[-1] == "head"
    assert _pick_rows(units[:5], MAX_UNIT_ROWS) == units[:5]


# ------------------------------------------------------------------------------------------------ fine-tuning report


class SkewedTokens(TokenData):
    """Labels 1 with probability 0.25, marked by token 3 or 4 at position 1 (learnable, with a non-uniform prior)."""

    def __init__(self, n: int = 64, seq: int = 10) -> None:
        super().__init__(n, seq)
        g = torch.Generator().manual_seed(1)
        self.y = (torch.rand(n, generator=g) < 0.25).long()
        self.x[:, 1] = torch.where(self.y == 1, 3, 4)


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    """WBTrainer with the default recipe (embeddings and block 0 frozen), the bias prior, evaluation every 2 steps."""
    from conftest import cpu_args

    from hf_wb import WBConfig, WBTrainer

    out = tmp_path_factory.mktemp("finetune")
    args = cpu_args(out, max_steps=6, logging_steps=2, eval_strategy="steps", eval_steps=2,
                    per_device_train_batch_size=16, per_device_eval_batch_size=32)  # fmt: skip
    trainer = WBTrainer(
        model=tiny_model("bert"), args=args, train_dataset=SkewedTokens(), eval_dataset=SkewedTokens(32),
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
        wb_config=WBConfig(histogram_steps=2),
    )  # fmt: skip
    trainer.train()
    return out, float(SkewedTokens().y.float().mean())


def _titles(fig) -> list[str]:
    return [ax.get_title(loc="left") for ax in fig.axes]


def test_fine_tuning_report_panels(finetune_run):
    from hf_wb.report import build_figure

    out, p1 = finetune_run
    data = load_run(out)
    data.findings = [
        {"step": 4, "severity": "warning", "kind": "update_ratio_high", "layers": ["head"], "message": "m",
         "advice": "a"},
    ]  # fmt: skip
    fig = build_figure(data)
    titles = _titles(fig)
    # drift heat maps for the trained units only; the frozen ones are named in one line
    for unit in ("block_01", "block_02", "block_03", "head"):
        assert f"{unit} W - W0 (weights)" in titles
    assert not any(t.startswith(("embeddings ", "block_00 ")) for t in titles)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any(t.startswith("Frozen, not trained (drift 0, not drawn): embeddings, block_00 (") for t in texts)
    # one step axis from 0 for every panel that has a time axis
    timed = [ax for ax in fig.axes if ax.axison and ax.get_title(loc="left")]
    assert len(timed) >= 7 + 4 * 3
    assert {ax.get_xlim() for ax in timed} == {(0.0, 6.0)}
    # the eval metric next to the loss; training and eval loss together
    by_title = {ax.get_title(loc="left"): ax for ax in fig.axes}
    assert [line.get_label() for line in by_title["eval metric"].get_lines()][:1] == ["accuracy"]
    loss_lines = {line.get_label() for line in by_title["loss (training, eval)"].get_lines()}
    assert {"training loss", "eval loss"} <= loss_lines
    # the output bias as class probabilities with the label prior dashed (set by the recipe at step 0)
    (head,) = [ax for t, ax in by_title.items() if t.startswith("softmax(b)")]
    assert "dashed: label prior (set as the bias at step 0)" in head.get_title(loc="left")
    dashed = [line for line in head.get_lines() if line.get_linestyle() == "--"]
    assert sorted(round(line.get_ydata()[0], 4) for line in dashed) == pytest.approx([p1, 1 - p1], abs=1e-4)
    solid = [line for line in head.get_lines() if line.get_label() == "class 1"]
    assert solid[0].get_ydata()[0] == pytest.approx(p1, abs=1e-4)  # softmax(b) = prior at step 0
    # the finding is marked on every timed panel at its step
    for ax in timed:
        assert any(list(line.get_xdata()) == [4, 4] and line.get_linestyle() == ":" for line in ax.get_lines())


def test_old_runs_without_drift_still_render(broken_run):
    from hf_wb.report import build_figure

    data = load_run(broken_run)
    for tag in [t for t in data.histograms if t.startswith("drift")]:
        del data.histograms[tag]
    titles = _titles(build_figure(data))
    assert "block_00 weights" in titles and "block_00 W - W0 (weights)" not in titles


def test_a_pruned_run_gets_a_sparsity_panel(broken_run, tmp_path):
    """A run folder holding hf_wb_ticket.json (per pruned module) and no recorded sparsity in a summary: the panel
    has a bar per module, off the step axis; a dense ticket (round 0) adds none."""
    import shutil

    from hf_wb.report import build_figure, sparsity_text

    run = tmp_path / "run"
    shutil.copytree(broken_run, run)
    ticket = {"round": 1, "sparsity": {"blocks.0": 0.25, "blocks.1": 0.75, "total": 0.5}}
    (run / "hf_wb_ticket.json").write_text(json.dumps(ticket))
    data = load_run(run)
    assert data.sparsity == {"blocks.0": 0.25, "blocks.1": 0.75} and data.sparsity_total == 0.5
    assert sparsity_text(data).startswith("Ticket sparsity 50.0% (blocks.0 25.0%, blocks.1 75.0%); from ")
    fig = build_figure(data)
    (panel,) = [ax for ax in fig.axes if ax.get_title(loc="left") == "pruned per unit (ticket, 50.0% overall)"]
    assert [round(p.get_width(), 6) for p in panel.patches] == [25.0, 75.0]
    assert [t.get_text() for t in panel.get_yticklabels()] == ["blocks.0", "blocks.1"]
    assert panel.get_xlim() == (0.0, 115.0)  # a percentage axis, not the step axis
    # the summary's per-unit record wins over the ticket file's per-module one
    (run / "hf_wb_summary.json").write_text(json.dumps({"sparsity": {"units": {"block_01": 0.5}, "total": 0.5}}))
    assert load_run(run).sparsity == {"block_01": 0.5}
    # dense: nothing
    ticket["sparsity"] = {"blocks.0": 0.0, "total": 0.0}
    (run / "hf_wb_ticket.json").write_text(json.dumps(ticket))
    (run / "hf_wb_summary.json").unlink()
    data = load_run(run)
    assert data.sparsity == {} and sparsity_text(data) == ""
    assert not any(ax.get_title(loc="left").startswith("pruned per unit") for ax in build_figure(data).axes)
