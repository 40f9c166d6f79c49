"""benchmarks/tune_compare.py: its report from stored records and resume (fast), and the quality part end to end on
real GLUE rows with a tiny model (slow)."""

from __future__ import annotations

import json

import pytest
from conftest import GLUE_DIR, load_benchmark


@pytest.fixture(scope="module")
def tc():
    return load_benchmark("tune_compare")


def _quality(task: str, seed: int, side: str, dev: float, command: str | None = "cmd-q") -> dict:
    base = side == "baseline"
    per_epoch = {"off": 30.0} if base else {"fill": 12.0, "reuse": 10.0}
    record = {"part": "quality", "key": f"{task}-{side}-{seed}", "task": task, "seed": seed, "side": side,
              "budget_cpu_s": 900, "trials": 10 if base else 30, "pruned": 2 if base else 9,
              "cpu_per_epoch": per_epoch, "dev_score": dev, "best_top_layers": None if base else 2}  # fmt: skip
    if command is not None:
        record["command"] = command
    return record


def test_report_suite_average_per_seed_and_commands_per_part(tc, tmp_path):
    timing = {"part": "timing", "model": "minilm", "blocks": 6, "train_rows": 128, "epochs": 2, "full_cpu_s": [16.0],
              "cached_cpu_s": [8.0], "ratio_cached": 0.5, "limit": 0.5, "ratio_fill": 0.6, "rounds": 1, "threads": 1,
              "host": "h", "command": "cmd-timing"}  # fmt: skip
    records = [
        timing,
        # seed 42: a +1 / b +3 -> suite +2; seed 43: a -1 / b +1 -> suite 0; seed 44: only task a (interrupted)
        _quality("a", 42, "baseline", 70.0, command=None),  # stored before records carried their command
        _quality("a", 42, "recipe", 71.0, command=None),
        _quality("b", 42, "baseline", 50.0),
        _quality("b", 42, "recipe", 53.0),
        _quality("a", 43, "baseline", 72.0),
        _quality("a", 43, "recipe", 71.0),
        _quality("b", 43, "baseline", 50.0),
        _quality("b", 43, "recipe", 51.0),
        _quality("a", 44, "baseline", 70.0),
        _quality("a", 44, "recipe", 75.0),
    ]
    tc.write_report(records, tmp_path / "r.md", "cmd-now")
    md = (tmp_path / "r.md").read_text()
    timing_part, quality_part = md.split("## Quality")
    assert "Measured by: `cmd-timing`" in timing_part and "cmd-q" not in timing_part
    assert "Measured by: `cmd-now`, `cmd-q`" in quality_part  # the records without a command: the current run's
    assert "| a | 42 | 900 | 10 (2) / 30 (9) | 70.00 | 71.00 | +1.00 | 2 |" in md
    assert "| a | +1.67 ± 3.06 |" in md  # +1, -1, +5
    assert "| b | +2.00 ± 1.41 |" in md  # +3, +1
    assert "| **suite average** (per seed: 42 +2.00, 43 +0.00) | **+1.00 ± 1.41** |" in md  # seed 44 left out
    assert "Seeds left out of the suite average (not every task measured yet): [44]." in md
    assert (
        "full fine-tuning 30.0, recipe trial on a cached prefix 10.0 (0.333x), recipe trial filling the cache 12.0"
        in md
    )


def test_quality_part_resumes_skipping_stored_procedures(tc, tmp_path, monkeypatch):
    args = tc.build_parser().parse_args(["--parts", "quality", "--tasks", "mrpc", "--seeds", "42", "43"])
    args.train_sizes = {"mrpc": 700}
    args.command = "cmd"
    jsonl = tmp_path / "q.jsonl"
    stored = {"part": "quality", "key": tc.procedure_key(args, "mrpc", "recipe", 42), "task": "mrpc", "seed": 42}
    tc.append(jsonl, stored)
    ran = []

    def fake(args, task, side, seed, work):
        ran.append((task, side, seed))
        return {"part": "quality", "key": tc.procedure_key(args, task, side, seed), "trials": 1, "dev_score": 0.0}

    monkeypatch.setattr(tc, "run_procedure", fake)
    args.work_dir = str(tmp_path / "work")
    tc.quality_part(args, jsonl)
    assert sorted(ran) == [("mrpc", "baseline", 42), ("mrpc", "baseline", 43), ("mrpc", "recipe", 43)]
    assert len(tc.load(jsonl)) == 4
    ran.clear()
    tc.quality_part(args, jsonl)  # everything stored: nothing runs again
    assert ran == []
    args.budget = 450  # another budget is another procedure
    tc.quality_part(args, jsonl)
    assert len(ran) == 4


@pytest.mark.slow
@pytest.mark.skipif(not (GLUE_DIR / "MRPC" / "train.tsv").is_file(), reason=f"no GLUE data at {GLUE_DIR}")
def test_quality_end_to_end_both_sides_share_one_budget(tc, tiny_bert_dir, tmp_path):
    argv = ["--parts", "quality", "--tasks", "mrpc", "--seeds", "42", "--train-sizes", "40", "--max-eval-samples",
            "16", "--budget", "4", "--model", str(tiny_bert_dir), "--glue-dir", str(GLUE_DIR),
            "--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "work"), "--jobs", "2"]  # fmt: skip
    assert tc.main(argv) == 0
    records = {r["side"]: r for r in tc.load(tmp_path / "tune_compare.jsonl")}
    assert set(records) == {"baseline", "recipe"}
    for side, r in records.items():
        assert r["trials"] >= 1 and r["train_rows"] == 40
        assert r["search_cpu_s"] >= 4  # the trial that crosses the budget finishes
        assert r["command"].startswith("python benchmarks/tune_compare.py --parts quality")
        trials = [json.loads(line) for line in (tmp_path / "work" / f"mrpc-{side}-s42" / "trials.jsonl").open()]
        if side == "baseline":
            assert {t["prefix_cache"] for t in trials} == {"off"} and r["best_top_layers"] is None
        else:  # the first trial at a boundary fills that boundary's cache, every later one there reuses it
            assert r["best_top_layers"] in (1, 2)
            seen: set[int] = set()
            for t in trials:
                boundary = t["params"]["top_layers"]
                assert t["prefix_cache"] == ("reuse" if boundary in seen else "fill")
                seen.add(boundary)
            assert len(trials) > len(seen)  # a boundary held several trials, so the reuse path ran
    md = (tmp_path / "tune_compare.md").read_text()
    assert "| mrpc | 42 | 4 |" in md and "**suite average** (per seed: 42 " in md
