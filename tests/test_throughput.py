"""Smoke test of benchmarks/throughput.py --quick: the outputs are well-formed (values are not asserted)."""

import json
import subprocess
import sys

import pytest
from conftest import GLUE_DIR, REPO


@pytest.mark.slow
def test_throughput_quick(tmp_path, glue_dir):
    out = tmp_path / "throughput.md"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--quick", "--output", str(out)]
    result = subprocess.run([*cmd, "--glue-dir", str(GLUE_DIR)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    for row in (
        "plain Trainer (full)",
        "WBTrainer baseline",
        "bottom 3 frozen, naive",
        "bottom 5 frozen, eval-pinned",
        "recipe + cache float32",
        "recipe + cache bfloat16",
        "plugin overhead",
        "plugin overhead where the compute does not hide it",
        "amortised",
    ):
        assert row in text, row
    raw = json.loads(out.with_suffix(".json").read_text())
    assert set(raw["epochs"]) == {
        "plain Trainer (full)",
        "recipe, eval-pinned, no cache",
        "recipe + cache float32",
        "recipe + cache bfloat16",
    }
    assert raw["epochs"]["recipe + cache float32"]["cache_mib"] > 0
    assert all(len(t) == 2 for t in raw["steps"]["times"].values())
    assert raw["overhead"]["rounds"] == len(raw["overhead"]["paired_diff_s"]) == 2
    assert raw["overhead"]["plain_s"] > 0 and raw["overhead"]["wb_s"] > 0

    # Rerunning one part keeps the other parts' tables and labels each with the command that measured it.
    before = {k: raw[k] for k in ("steps", "epochs", "monitoring")}
    result = subprocess.run([*cmd, "--parts", "overhead"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "recipe + cache bfloat16" in text and "bottom 5 frozen, eval-pinned" in text
    assert text.count("Command: `") == 2 and "--parts overhead" in text
    raw = json.loads(out.with_suffix(".json").read_text())
    assert {k: raw[k] for k in before} == before
    assert "--parts" not in raw["meta"]["command"] and "--parts" not in raw["epochs_meta"]["command"]
    assert "--parts overhead" in raw["overhead_meta"]["command"]
