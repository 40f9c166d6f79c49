"""Smoke test of benchmarks/glue_compare.py: a --quick sweep on real GLUE rows with a tiny model, and resume."""

from __future__ import annotations

import json

import pytest
from conftest import GLUE_DIR, load_benchmark

pytestmark = pytest.mark.skipif(not (GLUE_DIR / "CoLA" / "train.tsv").is_file(), reason=f"no GLUE data at {GLUE_DIR}")


@pytest.mark.slow
def test_quick_sweep_writes_reports_and_resumes(tiny_bert_dir, tmp_path, monkeypatch):
    gc = load_benchmark("glue_compare")
    out = tmp_path / "out"
    argv = [
        "--quick",
        "--tasks", "cola",
        "--recipes", "baseline", "headline",
        "--model", str(tiny_bert_dir),
        "--glue-dir", str(GLUE_DIR),
        "--max-steps", "2",
        "--threads", "1",
        "--out-dir", str(out),
    ]  # fmt: skip
    assert gc.main(argv) == 0

    # every run of both phases stored, with its fields
    records = [json.loads(line) for line in (out / "glue_compare.jsonl").read_text().splitlines()]
    phases = sorted((r["phase"], r["recipe"]) for r in records)
    epoch_cells = gc.grid(records, "equal_epochs")
    reused = gc.reuses_epoch_runs(gc.settings_from_args(gc.build_parser().parse_args(argv)), epoch_cells, "cola",
                                  "headline", 5e-5)  # fmt: skip
    expected = [("equal_epochs", "baseline"), ("equal_epochs", "headline")]
    assert phases == expected if reused else [("equal_budget", "headline"), *expected]
    for r in records:
        for name in ("task", "recipe", "lr", "seed", "score", "train_runtime", "steps", "step_time", "metrics"):
            assert name in r, name
        assert r["task"] == "cola" and r["train_rows"] == 64 and r["eval_rows"] == 64
        assert "eval_matthews_correlation" in r["metrics"]
        assert r["score"] == pytest.approx(100 * r["metrics"]["eval_matthews_correlation"])
        assert r["recipe_config"]["bias_prior"] is (r["recipe"] != "baseline")
        assert r["recipe_config"]["histogram_steps"] == 0 and r["recipe_config"]["diagnostics"] is False
    for budget in (r for r in records if r["phase"] == "equal_budget"):
        assert budget["max_steps"] >= 1 and budget["steps"] == budget["max_steps"]

    # the report: both comparison tables, the grid appendix, the plot
    md = (out / "glue_compare.md").read_text()
    assert "Status: **complete**" in md
    for heading in ("## (a) Equal epochs", "## (b) Equal wall-clock budget", "## Appendix: the full LR grid"):
        assert heading in md
    table_rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(table_rows) == 2 + 2 + 2  # two recipes in (a), the step-time table and (b)
    assert "Step time" in md
    assert len([line for line in md.splitlines() if line.startswith("| cola | `")]) == 2  # the grid
    assert any(line.startswith("| `headline`") and "Δ" in line for line in table_rows)
    png = out / "glue_compare.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second invocation finds everything stored and runs nothing
    def no_run(*args, **kwargs):
        raise AssertionError("a stored run was run again")

    monkeypatch.setattr(gc, "execute_run", no_run)
    assert gc.main(argv) == 0
    assert len((out / "glue_compare.jsonl").read_text().splitlines()) == len(records)


def test_train_sizes_and_scores():
    gc = load_benchmark("glue_compare")
    assert gc.parse_train_sizes(["cola=100", "mrpc=all"], ["cola", "mrpc"]) == {"cola": 100, "mrpc": None}
    assert gc.parse_train_sizes(["50"], ["cola", "sst2"]) == {"cola": 50, "sst2": 50}
    with pytest.raises(ValueError, match="--train-sizes"):
        gc.parse_train_sizes(["rte=10"], ["cola"])
    assert gc.task_score("mrpc", {"eval_f1": 0.9, "eval_accuracy": 0.8}) == pytest.approx(85.0)
    with pytest.raises(KeyError, match="matthews"):
        gc.task_score("cola", {"eval_accuracy": 0.5})


def test_baseline_extra_lrs_widen_its_grid_but_not_the_budget():
    gc = load_benchmark("glue_compare")
    parse = gc.build_parser().parse_args
    s = gc.settings_from_args(parse(["--glue-dir", str(GLUE_DIR)]))
    assert (
        s.baseline_lrs == [1e-4] and s.lrs_for("baseline") == [2e-5, 5e-5, 1e-4] and s.lrs_for("lwd") == [2e-5, 5e-5]
    )
    assert gc.settings_from_args(parse(["--quick"])).baseline_lrs == []
    assert gc.settings_from_args(parse(["--baseline-lrs", "5e-5", "3e-4"])).baseline_lrs == [3e-4]  # grid LRs dropped
    assert gc.plan_count(gc.settings_from_args(parse(["--budget", "none"]))) == 3 * (3 + 2 + 2 + 2) * 3

    def run(recipe, lr, seed, score, step_time):
        return {"phase": "equal_epochs", "task": "cola", "recipe": recipe, "lr": lr, "seed": seed, "score": score,
                "steps": 100, "step_time": step_time}  # fmt: skip

    records = [run("baseline", lr, seed, 0.0, 1.0) for lr in (2e-5, 5e-5) for seed in s.seeds]
    records += [run("baseline", 1e-4, seed, 9.0, 0.5) for seed in s.seeds]  # best LR, and a faster (quieter) run
    records += [run("headline", lr, seed, 5.0, 0.5) for lr in (2e-5, 5e-5) for seed in s.seeds]
    cells = gc.grid(records, "equal_epochs")
    assert gc.best_lr(cells, "cola", "baseline") == 1e-4
    # the budget uses the baseline's step time on the shared grid only: 100 steps x 1.0 s / 0.5 s
    assert gc.budget_steps(s, cells, "cola", "headline", 2e-5) == 200
    assert "| `baseline` | 1.00 (1.00) |" in "\n".join(gc.step_time_table(s, records))
