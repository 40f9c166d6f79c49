"""The run summary: one concise description of the recipe at the start of training, visible in a third-party script
with transformers' default logging, saved as hf_wb_summary.json; lr/<group> logged at the first step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, cpu_args, tiny_model

from hf_wb import WBConfig, WBTrainer
from hf_wb.summary import format_run_summary

SCRIPT = REPO / "tests" / "scripts" / "third_party_train.py"


@pytest.mark.parametrize(("mode", "stream"), [("run_glue", "stdout"), ("bare", "stderr")])
def test_summary_is_visible_in_a_third_party_script(tmp_path, mode, stream):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "out"), mode],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = getattr(out, stream)
    assert "hf_wb: BertForSequenceClassification (4 blocks in bert.encoder.layer); trainable" in text
    assert "frozen: embeddings, block_00, block_01 (eval-pinned" in text
    assert "rates (base 5e-05): block_02, block_03, head x10 = 0.0005" in text
    assert "head: bias prior on classifier: label prior [0.75, 0.25]" in text
    assert "prefix cache: off (`cache_frozen_prefix`='off')" in text
    assert "engine: single process (cpu), world size 1" in text
    assert text.count("hf_wb: BertForSequenceClassification") == 1
    # lr/<group> at the first step although logging_steps is 500
    history = [x for x in out.stdout.splitlines() if x.startswith("LOG_HISTORY")][-1]
    assert "['lr/block_02', 'lr/block_03', 'lr/head', 1]" in history
    saved = json.loads((tmp_path / "out" / "hf_wb_summary.json").read_text())
    assert saved["frozen_units"] == ["embeddings", "block_00", "block_01"]
    assert saved["rates"] == [{"units": ["block_02", "block_03", "head"], "multiplier": 10.0, "lr": 5e-4}]


def test_summary_content_cache_and_json(tmp_path):
    model = tiny_model("bert", num_layers=4)
    data = [{"input_ids": [5, 6, 7, 8][: 2 + i % 3], "labels": i % 2} for i in range(8)]
    for row in data:
        row["attention_mask"] = [1] * len(row["input_ids"])
    recipe = WBConfig(
        top_layers=1,
        top_lr_multiplier=8.0,
        layer_lr_decay=0.5,
        freeze_layers=2,
        cache_frozen_prefix="auto",
        histogram_steps=0,
        diagnostics=False,
    )
    args = cpu_args(tmp_path, max_steps=2, per_device_train_batch_size=4, logging_steps=500)

    trainer = WBTrainer(model=model, args=args, train_dataset=data, wb_config=recipe, data_collator=_pad)
    trainer.train()
    summary = trainer.wb_summary
    assert summary["frozen_units"] == ["embeddings", "block_00", "block_01"]
    assert summary["rates"] == [
        {"units": ["block_02"], "multiplier": 0.5, "lr": 5e-4},
        {"units": ["block_03", "head"], "multiplier": 8.0, "lr": 8e-3},
    ]
    assert summary["prefix_cache"]["on"] is True and "2 blocks frozen" in summary["prefix_cache"]["reason"]
    assert summary["training_args"]["learning_rate"] == 1e-3
    assert summary["world_size"] == 1 and summary["trainable_params"] < summary["total_params"]
    text = format_run_summary(summary)
    assert "rates (base 0.001): block_02 x0.5 = 0.0005; block_03, head x8 = 0.008" in text
    assert "prefix cache: on ('auto': embeddings and 2 blocks frozen; 8 examples" in text
    assert json.loads((tmp_path / "hf_wb_summary.json").read_text())["rates"] == summary["rates"]
    assert trainer.state.log_history[0]["step"] == 1 and "lr/head" in trainer.state.log_history[0]


def _pad(rows):
    import torch

    n = max(len(r["input_ids"]) for r in rows)
    return {
        "input_ids": torch.tensor([r["input_ids"] + [0] * (n - len(r["input_ids"])) for r in rows]),
        "attention_mask": torch.tensor([r["attention_mask"] + [0] * (n - len(r["attention_mask"])) for r in rows]),
        **({"labels": torch.tensor([r["labels"] for r in rows])} if "labels" in rows[0] else {}),
        **({"hf_wb_index": torch.tensor([r["hf_wb_index"] for r in rows])} if "hf_wb_index" in rows[0] else {}),
    }


def test_a_ticket_applied_shows_its_sparsity_in_the_summaries(tmp_path):
    import torch

    from hf_wb.summary import format_summary, mask_sparsity, recipe_summary
    from hf_wb.tickets import apply_masks, prunable_modules

    recipe = WBConfig(top_layers=2, histogram_steps=0, diagnostics=False, bias_prior=False)
    model = tiny_model("bert", num_layers=4)
    assert mask_sparsity(model) is None  # dense: no sparsity anywhere
    assert "sparsity" not in json.dumps(recipe_summary(model, recipe)[1])
    modules = prunable_modules(model, recipe)
    # block_02: a quarter of each matrix pruned; block_03: half
    masks = {}
    for name, module in modules.items():
        mask = torch.ones_like(module.weight, dtype=torch.bool).flatten()
        mask[: mask.numel() // (4 if ".layer.2." in name else 2)] = False
        masks[name] = mask.view_as(module.weight)
    apply_masks(model, masks)

    rows, totals = recipe_summary(model, recipe)
    by_unit = {r.unit: r.sparsity for r in rows}
    assert by_unit["block_02"] == pytest.approx(0.25) and by_unit["block_03"] == pytest.approx(0.5)
    assert by_unit["block_01"] is None and by_unit["head"] is None
    zeros = sum(int((~m).sum()) for m in masks.values())
    assert totals["sparsity"]["zeros"] == zeros and totals["sparsity"]["matrices"] == 12
    table = format_summary(rows, totals).splitlines()
    assert table[0].split()[-1] == "sparsity"
    assert [line.split()[-1] for line in table if line.startswith(("block_02", "block_03"))] == ["25.0%", "50.0%"]
    assert [line.split()[-1] for line in table if line.startswith("block_01")] == ["(eval)"]  # blank cell
    assert table[-1].startswith(f"ticket: {zeros:,} of ")

    # the run summary logged when training starts, and its JSON
    args = cpu_args(tmp_path, max_steps=1, per_device_train_batch_size=4)
    data = [{"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1, 1], "labels": i % 2} for i in range(4)]
    trainer = WBTrainer(model=model, args=args, train_dataset=data, wb_config=recipe)
    trainer.train()
    saved = json.loads((tmp_path / "hf_wb_summary.json").read_text())
    assert saved["sparsity"]["units"] == pytest.approx({"block_02": 0.25, "block_03": 0.5})
    assert saved["sparsity"]["total"] == pytest.approx(zeros / saved["sparsity"]["weights"])
    assert "  ticket: " in format_run_summary(saved) and "block_02 25.0%, block_03 50.0%" in format_run_summary(saved)
