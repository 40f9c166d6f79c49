"""benchmarks/ticket_curve.py and benchmarks/kfac_compare.py: their reports from stored records (fast), and one
procedure of each end to end on real GLUE rows with a tiny model (slow)."""

from __future__ import annotations

import json

import pytest
from conftest import GLUE_DIR, load_benchmark


def _ticket_record(seed: int, scores: list[float], nocache: bool) -> dict:
    rounds = [
        {"round": i, "sparsity": 1 - 0.75**i, "dev_score": s, "cpu_s": 10.0 if i else 12.0, "wall_s": 1.0,
         "prefix_cache": "reuse" if i else "fill"}
        for i, s in enumerate(scores)
    ]  # fmt: skip
    off = [dict(r, cpu_s=20.0, prefix_cache="off") for r in rounds[:2]] if nocache else []
    recipe = {"top_layers": 3, "top_lr_multiplier": 10.0, "cache_frozen_prefix": "auto"}
    return {"key": str(seed), "task": "mrpc", "seed": seed, "model": "minilm", "train_rows": 700, "dev_rows": 408,
            "epochs": 3, "recipe": recipe, "rate": 0.25, "rounds": rounds, "nocache_rounds": off, "host": "h",
            "torch": "t"}  # fmt: skip


def test_ticket_report_finds_highest_sparsity_within_tolerance(tmp_path):
    tc = load_benchmark("ticket_curve")
    # seed means: 80, 80, 79.6, 79.4 (-0.6 below dense), 79.6 (within again): the highest within 0.5 is round 4
    records = [
        _ticket_record(42, [80.0, 80.5, 79.6, 79.0, 79.8], nocache=True),
        _ticket_record(43, [80.0, 79.5, 79.6, 79.8, 79.4], nocache=False),
    ]
    assert tc._within([0.0, 0.25, 0.5], [80.0, 79.6, 79.4], 0.5) == (0.25, 79.6)
    records[0]["constant_baseline"] = {"dev_score": 74.8, "dev_metrics": {"accuracy": 0.684, "f1": 0.812}}
    for record, accuracy in zip(records, (0.70, 0.72), strict=True):
        record["rounds"][0]["dev_metrics"] = {"accuracy": accuracy, "f1": 0.8}
    tc.write_report(records, tmp_path / "r.md", "cmd", 0.5)
    md = (tmp_path / "r.md").read_text()
    assert "| 3 | 57.8% | 79.40 ± 0.57 | -0.60 | 79.00 | 79.80 | - | 10.0 | reuse |" in md  # no metrics stored
    assert "| 80.00 | 80.00 | accuracy 71.0, f1 80.0 |" in md  # round 0: both seeds' metrics, averaged
    assert "Input-blind reference (the training set's most frequent label for every dev row): score 74.80 " in md
    assert "(accuracy 68.4, f1 81.2)" in md
    assert "Highest sparsity within 0.5 points of dense (seed mean): **68.4%** (score 79.60)" in md
    assert "seed 42: 68.4%, seed 43: 57.8%" in md  # seed 43: 79.4 at round 4 is 0.6 below
    assert "| 42 | 0 | fill | 20.0 / 12.0 | **0.60x** | - | - |" in md
    assert "| 42 | 1 | reuse | 20.0 / 10.0 | **0.50x** | - | - |" in md
    tc.write_plot(records, tmp_path / "r.png", 0.5)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_kfac_report_tables(tmp_path):
    kc = load_benchmark("kfac_compare")

    def run(name: str, steps: int, ms: float, dev: float) -> dict:
        curve = [{"step": s, "loss": 1.0 / s, "cpu_s": s * ms / 1000} for s in range(5, steps + 1, 5)]
        return {"run": name, "optimizer": name[:5], "learning_rate": 1e-3, "steps": steps,
                "step_cpu_s": steps * ms / 1000, "mean_step_cpu_s": ms / 1000, "train_cpu_s": 1.0, "curve": curve,
                "final_loss": curve[-1]["loss"], "dev_score": dev}  # fmt: skip

    records = [
        {"key": str(seed), "task": "sst2", "seed": seed, "model": "minilm", "batch_size": 32, "kfac_args": "",
         "recipe": {"top_layers": 3, "top_lr_multiplier": 10.0}, "host": "h", "torch": "t", "overhead": 3.0,
         "runs": {"adamw": run("adamw", 60, 100, 80.0 + seed - 42), "kfac": run("kfac", 60, 300, 81.0),
                  "kfac_equal_time": run("kfac_equal_time", 20, 300, 78.0)}}
        for seed in (42, 43)
    ]  # fmt: skip
    kc.write_report(records, tmp_path / "k.md", "cmd")
    md = (tmp_path / "k.md").read_text()
    assert "| sst2 | adamw | 60 | 6.0 | 100 | 80.50 ± 0.71 | 42: 80.00, 43: 81.00 |" in md
    assert "| sst2 | kfac_equal_time | 20 | 6.0 | 300 | 78.00 ± 0.00 |" in md
    assert "| sst2 | 3.00 ± 0.00x | 0.50 ± 0.71 | -2.50 ± 0.71 |" in md
    kc.write_plot(records, tmp_path / "k.png")
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.skipif(not (GLUE_DIR / "MRPC" / "train.tsv").is_file(), reason=f"no GLUE data at {GLUE_DIR}")
def test_procedures_end_to_end(tiny_bert_dir, capsys):
    common = ["--tasks", "mrpc", "--seeds", "42", "--train-sizes", "32", "--max-eval-samples", "16",
              "--model", str(tiny_bert_dir), "--glue-dir", str(GLUE_DIR), "--procedure", "mrpc:42"]  # fmt: skip
    tc = load_benchmark("ticket_curve")
    assert tc.main([*common, "--rounds", "2", "--rate", "0.5"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["prefix_cache"] for r in record["rounds"]] == ["fill", "reuse", "reuse"]
    assert [round(r["sparsity"], 2) for r in record["rounds"]] == [0.0, 0.5, 0.75]
    assert [r["prefix_cache"] for r in record["nocache_rounds"]] == ["off", "off"]
    assert record["train_rows"] == 32 and record["dev_rows"] == 16
    assert all(0 < r["train_cpu_s"] < r["cpu_s"] for r in record["rounds"] + record["nocache_rounds"])

    kc = load_benchmark("kfac_compare")
    assert kc.main([*common, "--logging-steps", "1"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    adamw, kfac, timed = (record["runs"][r] for r in kc.RUNS)
    assert adamw["steps"] == kfac["steps"] == 3  # 32 rows / batch 32 x 3 epochs
    assert kfac["optimizer"] == "kfac" and adamw["optimizer"].startswith("adamw")
    assert timed["steps"] == timed["max_steps"] >= 1
    assert [p["step"] for p in adamw["curve"]] == [1, 2, 3]
    assert record["overhead"] == pytest.approx(kfac["mean_step_cpu_s"] / adamw["mean_step_cpu_s"])
