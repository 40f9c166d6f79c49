"""Every YAML file under configs/ parses: GLUE configs through run_glue's own parser, accelerate configs through
accelerate's config loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hf_wb.config import WBConfig
from hf_wb.glue import task_names
from hf_wb.glue.run import parse_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))
GLUE_YAML = sorted((CONFIGS / "glue").glob("*.yaml"))
ACCELERATE_YAML = sorted((CONFIGS / "accelerate").glob("*.yaml"))


def test_every_glue_task_has_a_config():
    assert sorted(p.stem for p in GLUE_YAML) == sorted(task_names())


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_yaml_is_a_mapping(path):
    assert isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict)


@pytest.mark.parametrize("path", GLUE_YAML, ids=lambda p: p.stem)
def test_glue_config_parses_through_run_glue(path):
    args = parse_args([str(path)])
    assert args.data.task_name == path.stem
    assert args.model.model_name_or_path == "minilm"
    assert args.training.output_dir == f"outputs/{path.stem}"
    assert args.training.do_train and args.training.do_eval
    assert args.training.eval_strategy == "epoch"
    assert isinstance(args.training.learning_rate, float) and 0 < args.training.learning_rate < 1e-3
    assert args.training.num_train_epochs >= 1
    assert 32 <= args.data.max_seq_length <= 512
    assert isinstance(args.wb_config, WBConfig)
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    for name in ("top_layers", "top_lr_multiplier", "freeze_layers", "bias_prior"):
        assert getattr(args.wb_config, name) == values[name]


@pytest.mark.parametrize("path", GLUE_YAML, ids=lambda p: p.stem)
def test_glue_config_baseline_switch(path):
    assert parse_args([str(path), "--recipe", "baseline"]).wb_config == WBConfig.baseline()


@pytest.mark.parametrize("path", ACCELERATE_YAML, ids=lambda p: p.stem)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))  # raises on unknown keys
    assert config.num_processes >= 1


def test_accelerate_setups_present():
    assert {p.stem for p in ACCELERATE_YAML} >= {"cpu-ddp", "single-gpu", "multi-gpu-bf16", "fsdp", "deepspeed-zero2"}


def test_cpu_ddp_starts_two_processes_on_cpu():
    # `--cpu` would select accelerate's single-process launcher; MULTI_GPU + use_cpu starts torchrun on CPU/gloo.
    values = yaml.safe_load((CONFIGS / "accelerate" / "cpu-ddp.yaml").read_text())
    assert values["distributed_type"] == "MULTI_GPU"
    assert values["use_cpu"] is True
    assert values["num_processes"] == 2


def test_deepspeed_config_leaves_optimizer_and_scheduler_to_the_trainer():
    values = yaml.safe_load((CONFIGS / "accelerate" / "deepspeed-zero2.yaml").read_text())
    assert values["deepspeed_config"]["zero_stage"] == 2
    assert "deepspeed_config_file" not in values["deepspeed_config"]
    assert not {"optimizer", "scheduler"} & set(values["deepspeed_config"])


def test_multi_gpu_configs_use_bf16():
    for name in ("single-gpu", "multi-gpu-bf16", "fsdp", "deepspeed-zero2"):
        assert yaml.safe_load((CONFIGS / "accelerate" / f"{name}.yaml").read_text())["mixed_precision"] == "bf16"
