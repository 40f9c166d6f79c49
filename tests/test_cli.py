"""The `hf-wb` command: start-up without torch/transformers for --help and argument errors, one-line Hub errors
(offline, auth, missing repo) for push and pull, and `inspect` of a run folder with its own recipe and base LR."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, cpu_args, tiny_model

from hf_wb import cli
from hf_wb.config import CONFIG_NAME, WBConfig
from hf_wb.hub import HubError


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hf_wb.cli", *args], capture_output=True, text=True, env=full_env, timeout=300
    )


HEAVY = ("torch", "transformers")
PROBE = (
    "import sys\n"
    "from hf_wb.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules), 'EXIT', code)\n"
)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["inspect", "--help"],
        ["push-recipe", "--help"],
        ["tune", "--help"],
        ["cache", "--help"],
        ["ticket", "--help"],
        ["inspect"],
        ["no-such-command"],
        ["ticket", "configs/glue/mrpc.yaml", "--rounds", "0", "--rate", "0.2"],
        ["ticket", "configs/glue/mrpc.yaml", "--rounds", "2", "--rate", "1.0"],
    ],
    ids=[
        "help",
        "inspect-help",
        "push-help",
        "tune-help",
        "cache-help",
        "ticket-help",
        "missing-model",
        "bad-command",
        "ticket-rounds",
        "ticket-rate",
    ],
)
def test_help_and_argument_errors_do_not_import_torch_or_transformers(argv):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    line = [x for x in out.stdout.splitlines() if x.startswith("HEAVY")][-1]
    assert line.startswith("HEAVY [] EXIT"), line
    assert line.endswith("EXIT 0") == (argv[-1] == "--help")


def test_import_hf_wb_is_light_until_a_name_is_used():
    code = (
        "import sys, hf_wb; light = 'torch' not in sys.modules; "
        "from hf_wb import WBTrainer; print(light, 'torch' in sys.modules, WBTrainer.__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert out.stdout.split() == ["True", "True", "WBTrainer"]


# --- Hub errors: one line, the fix, non-zero exit, no traceback ---


def test_push_recipe_offline_is_one_line(tmp_path):
    WBConfig(top_lr_multiplier=10.0).save_pretrained(tmp_path)
    out = run_cli("push-recipe", str(tmp_path), "--repo-id", "someone/recipe", env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = [x for x in out.stderr.splitlines() if x.strip() and "Setting accelerator" not in x]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("hf-wb push-recipe: error: Cannot push the recipe to 'someone/recipe'")
    assert "HF_HUB_OFFLINE=1" in lines[0] and "save_pretrained" in lines[0]


def test_pull_recipe_offline_is_one_line():
    out = run_cli("inspect", "minilm", "--config", "someone/recipe", env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    (line,) = [x for x in out.stderr.splitlines() if x.strip() and "Setting accelerator" not in x]
    assert "Cannot load the hf_wb recipe 'someone/recipe'" in line and "HF_HUB_OFFLINE=1" in line
    assert f"local folder holding {CONFIG_NAME}" in line


def _http_error(cls_name: str, status: int):
    from huggingface_hub import errors

    cls = getattr(errors, cls_name)
    http = importlib.import_module(errors.HfHubHTTPError.__mro__[1].__module__.split(".")[0])  # httpx or its fork
    response = http.Response(status, request=http.Request("GET", "https://huggingface.co/api/x"))
    return cls(f"{status} Client Error", response=response)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (lambda: _http_error("HfHubHTTPError", 401), "not authorised"),
        (lambda: _http_error("HfHubHTTPError", 403), "not authorised"),
        (lambda: __import__("huggingface_hub").errors.LocalTokenNotFoundError("no token"), "hf auth login"),
        (lambda: _http_error("RepositoryNotFoundError", 404), "repository does not exist"),
        (lambda: ConnectionError("Name or service not known"), "cannot reach the Hugging Face Hub (no network?)"),
    ],
    ids=["401", "403", "no-token", "missing-repo", "network"],
)
def test_push_recipe_hub_errors(tmp_path, monkeypatch, capsys, error, expected):
    import transformers.utils

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def fail(self, repo_id, *args, **kwargs):
        raise error()

    monkeypatch.setattr(transformers.utils.PushToHubMixin, "push_to_hub", fail)
    WBConfig().save_pretrained(tmp_path)
    assert cli.main(["push-recipe", str(tmp_path), "--repo-id", "someone/recipe"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err, err


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (lambda: _http_error("RepositoryNotFoundError", 404), "repository does not exist"),
        (lambda: _http_error("RemoteEntryNotFoundError", 404), f"holds no {CONFIG_NAME}"),
        (lambda: _http_error("GatedRepoError", 403), "gated"),
        (lambda: _http_error("HfHubHTTPError", 401), "not authorised"),
    ],
    ids=["missing-repo", "missing-file", "gated", "401"],
)
def test_pull_recipe_hub_errors(monkeypatch, error, expected):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def fail(*args, **kwargs):
        raise error()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(HubError, match="Cannot load the hf_wb recipe 'someone/recipe'") as info:
        WBConfig.from_pretrained("someone/recipe")
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_bug_is_not_disguised_as_a_hub_error(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def fail(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(TypeError, match="a bug"):
        WBConfig.from_pretrained("someone/recipe")


# --- inspect of a run folder ---


def _table(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = line.split()
        if cells and (cells[0] in ("embeddings", "head") or cells[0].startswith("block_")):
            rows[cells[0]] = cells
    return rows


def test_inspect_a_run_folder_uses_its_recipe_and_learning_rate(tmp_path, capsys):
    from hf_wb import WBTrainer

    model = tiny_model("bert", num_layers=4)
    data = [{"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1, 1], "labels": i % 2} for i in range(8)]
    recipe = WBConfig(top_layers=2, top_lr_multiplier=10.0, histogram_steps=0, diagnostics=False)
    args = cpu_args(
        tmp_path / "run", learning_rate=3e-4, weight_decay=0.05, max_steps=1, per_device_train_batch_size=4
    )
    trainer = WBTrainer(model=model, args=args, train_dataset=data, wb_config=recipe)
    trainer.train()
    trainer.save_model()
    saved = json.loads((tmp_path / "run" / "hf_wb_summary.json").read_text())
    assert saved["training_args"]["learning_rate"] == 3e-4 and saved["training_args"]["weight_decay"] == 0.05

    assert cli.main(["inspect", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"recipe from {tmp_path / 'run'}, base lr 0.0003 (recorded in" in out
    rows = _table(out)
    # x10 of the recorded 3e-4, not the default recipe's x5 of 5e-5
    for unit in ("block_02", "block_03", "head"):
        assert rows[unit][-6:] == ["0.003", "10", "0.05", "/", "0", "trainable"], rows[unit]
    for unit in ("embeddings", "block_00", "block_01"):
        assert rows[unit][-2:] == ["frozen", "(eval)"]
    # the modules column says where each unit lives: not the encoder for the embeddings and head rows
    assert rows["embeddings"][1:3] == ["bert.embeddings", "-"]
    assert rows["block_02"][1:3] == ["bert.encoder.layer.2", "2"]
    assert rows["head"][1:4] == ["bert.pooler,", "classifier", "-"]

    # --lr still wins; a folder without the recorded arguments says so
    assert cli.main(["inspect", str(tmp_path / "run"), "--lr", "1e-3"]) == 0
    assert _table(capsys.readouterr().out)["head"][-6] == "0.01"
    (tmp_path / "run" / "hf_wb_summary.json").unlink()
    assert cli.main(["inspect", str(tmp_path / "run")]) == 0
    assert "not recorded in" in capsys.readouterr().out
