"""The README's Quickstart runs as written (packaged MiniLM, MRPC rows from GLUE_DIR), at a tiny scale: the test
patches only the number of steps and rows, and fails if the README's code changes under it."""

from __future__ import annotations

import re

from conftest import REPO


def quickstart_code() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


PATCHES = {  # README text -> tiny-scale text; each must be present
    'train, dev = data["train"], data["validation"]': (
        'train, dev = data["train"].select(range(16)), data["validation"].select(range(8))'
    ),
    "num_train_epochs=3,": "max_steps=2, per_device_train_batch_size=8, use_cpu=True, report_to='none',",
}


def test_quickstart_runs_as_written(glue_dir, tmp_path, monkeypatch):
    code = quickstart_code()
    for old, new in PATCHES.items():
        assert old in code, f"README Quickstart changed: {old!r} not found; update tests/test_readme.py"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLUE_DIR", str(glue_dir))
    scope: dict = {}
    exec(compile(code, "README.md#quickstart", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step == 2
    assert any(k.startswith("lr/") for k in trainer.state.log_history[0])
    assert (tmp_path / "out" / "hf_wb_config.json").is_file()
    assert (tmp_path / "out" / "hf_wb_summary.json").is_file()
