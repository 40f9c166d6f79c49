"""The recipe under every engine: FSDP1 / FSDP2 (wrapped-model path, 2 processes), DeepSpeed ZeRO-1/2/3 (Trainer
path, 2 processes), torch.compile and bf16 autocast (Trainer path), and the guards of :mod:`hf_wb.engines`.

The multi-process runs use tests/scripts/engines_train.py under torchrun with gloo on CPU. The Trainer's own FSDP
path needs GPUs (accelerate runs FSDP only there): benchmarks/engines_gpu.py runs it where they exist.
"""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, cpu_args, tiny_model
from datasets import Dataset
from test_trainer import make_dataset
from torch import nn

from hf_wb import WBConfig, WBTrainer, build_param_groups
from hf_wb.engines import canonical_name, canonical_named_parameters, check_deepspeed_config
from hf_wb.layers import layer_map

QUIET = dict(histogram_steps=0, diagnostics=False, bias_prior=False)
RECIPE = WBConfig(top_layers=2, freeze_layers=1, **QUIET)


def _summary(groups):
    return [(g["name"], g["lr"], g["weight_decay"], [canonical_name(n) for n in g["param_names"]]) for g in groups]


# ----- names through wrappers ---------------------------------------------------------------------------------------
def test_canonical_name_strips_wrapper_components():
    name = "_fsdp_wrapped_module.bert.encoder.layer.0._fsdp_wrapped_module._checkpoint_wrapped_module.attn._orig_mod.w"
    assert canonical_name(name) == "bert.encoder.layer.0.attn.w"
    assert canonical_name("bert.encoder.layer.0.output.dense.weight") == "bert.encoder.layer.0.output.dense.weight"


def test_param_groups_see_through_wrapped_blocks():
    """Issue #10, failure 1 (the mechanism): blocks wrapped after the layer map was computed (activation
    checkpointing, torch.compile per block, as FSDP1 nests ``_fsdp_wrapped_module``) used to raise KeyError."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = tiny_model("bert", 4)
    lmap = layer_map(model)
    expected = _summary(build_param_groups(model, RECIPE, 1e-3, 0.01, lmap=lmap))
    layers = model.bert.encoder.layer
    layers[0] = checkpoint_wrapper(layers[0])
    layers[3] = torch.compile(layers[3], backend="eager")
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    assert any("_orig_mod" in n for n, _ in model.named_parameters())
    assert _summary(build_param_groups(model, RECIPE, 1e-3, 0.01, lmap=lmap)) == expected


def test_flat_parameters_refused():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self._flat_param = nn.Parameter(torch.zeros(3))

    with pytest.raises(ValueError, match="use_orig_params"):
        canonical_named_parameters(nn.Sequential(Flat()))


# ----- guards at construction ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_deepspeed_config_with_own_optimizer_refused_by_wbtrainer(tmp_path, block):
    """Issue #10, failure 2: WBTrainer used directly (not through run_glue) with such a DeepSpeed config trained
    with DeepSpeed's one-group optimizer, silently."""
    ds = {"zero_optimization": {"stage": 2}, block: {"type": "AdamW" if block == "optimizer" else "WarmupLR"}}
    args = cpu_args(tmp_path, deepspeed=ds, use_cpu=False)
    with pytest.raises(ValueError, match=rf"has an `{block}` block"):
        WBTrainer(model=tiny_model("bert"), args=args, train_dataset=make_dataset(), wb_config=RECIPE)


def test_deepspeed_check_is_shared_with_run_glue():
    from hf_wb.glue import run

    assert run.check_deepspeed_config is check_deepspeed_config


@pytest.mark.parametrize("source", ["args", "accelerate-env"])
def test_fsdp1_without_orig_params_refused(tmp_path, monkeypatch, source):
    if source == "args":
        args = cpu_args(tmp_path, fsdp="full_shard", fsdp_config={"version": 1, "use_orig_params": False})
    else:  # accelerate launch --config_file with fsdp_version: 1 and no fsdp_use_orig_params
        args = cpu_args(tmp_path)
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match=r"FSDP1 with `use_orig_params=False`.*fsdp_use_orig_params: true"):
        WBTrainer(model=tiny_model("bert"), args=args, wb_config=RECIPE)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, r"monitoring \(`histogram_steps`=100, `diagnostics`=True\)"),
        ({**QUIET, "unfreeze_every": 1}, r"gradual unfreezing"),
        ({**QUIET, "cache_frozen_prefix": "on"}, r"frozen-prefix cache"),
        ({**QUIET, "optimizer": "lamb"}, r"`optimizer`='lamb'"),
        ({**QUIET, "optimizer": "kfac"}, r"`optimizer`='kfac'"),
    ],
)
@pytest.mark.parametrize("engine", ["FSDP1", "FSDP2", "DeepSpeed ZeRO-1", "DeepSpeed ZeRO-2", "DeepSpeed ZeRO-3"])
def test_sharded_engines_refuse_what_they_cannot_do_exactly(tmp_path, monkeypatch, fields, message, engine):
    if engine.startswith("FSDP"):
        args = cpu_args(tmp_path, fsdp="full_shard", fsdp_config={"version": int(engine[-1])})
    else:  # accelerate launch --config_file deepspeed-zero2.yaml (set after the args, to keep the test light)
        args = cpu_args(tmp_path)
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", engine[-1])
    with pytest.raises(ValueError, match=rf"cannot apply this recipe exactly under {engine}: .*{message}"):
        WBTrainer(model=tiny_model("bert"), args=args, wb_config=WBConfig(**fields))


def test_sharded_engines_turn_the_auto_cache_off_and_say_why(tmp_path, monkeypatch):
    # accelerate launch --config_file deepspeed-zero2.yaml (FSDP arguments need several processes to construct)
    args = cpu_args(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    data = Dataset.from_dict({"input_ids": [[5, 6, 7]] * 8, "attention_mask": [[1, 1, 1]] * 8, "labels": [0, 1] * 4})
    trainer = WBTrainer(
        model=tiny_model("bert"),
        args=args,
        train_dataset=data,
        wb_config=WBConfig(cache_frozen_prefix="auto", **QUIET),
    )
    trainer._setup_prefix_cache()  # what train() does first; the engine itself cannot start on this CPU machine
    assert trainer.wb_prefix_cache is None
    assert trainer.wb_cache_status["on"] is False and "DeepSpeed ZeRO-2" in trainer.wb_cache_status["reason"]


def test_engine_logged_once(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="hf_wb.engines"):
        trainer = WBTrainer(model=tiny_model("bert"), args=cpu_args(tmp_path), wb_config=RECIPE)
    assert trainer.wb_engine.name == "single"
    assert [r.getMessage() for r in caplog.records if r.name == "hf_wb.engines"] == [
        "hf_wb engine: single, world size 1"
    ]


# ----- the Trainer path on one process: torch.compile, bf16 autocast ------------------------------------------------
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"torch_compile": True, "torch_compile_backend": "eager"}, id="torch_compile"),
        pytest.param({"bf16": True}, id="bf16"),
    ],
)
def test_recipe_exact_through_the_trainer(tmp_path, extra):
    model = tiny_model("bert", 4)
    args = cpu_args(tmp_path, max_steps=3, per_device_train_batch_size=8, weight_decay=0.01, **extra)
    args.lr_scheduler_type = "constant"
    trainer = WBTrainer(model=model, args=args, train_dataset=make_dataset(), wb_config=RECIPE)
    expected = _summary(build_param_groups(model, RECIPE, 1e-3, 0.01, lmap=trainer.wb_layer_map))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    if "torch_compile" in extra:
        assert hasattr(trainer.model_wrapped, "_orig_mod")  # it really ran compiled
    assert _summary(trainer.optimizer.param_groups) == expected
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[name]), name
        elif p.dim() > 1:
            assert not torch.equal(p, before[name]), name


# ----- two processes, gloo on CPU ---------------------------------------------------------------------------------
def _run_script(tmp_path, modes):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = REPO / "tests" / "scripts" / "engines_train.py"
    result = subprocess.run(
        [*cmd, str(script), ",".join(modes), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {m: json.loads((tmp_path / f"report_{m}.json").read_text()) for m in modes}, result.stderr


def _check_exact(report):
    assert report["world_size"] == 2
    assert report["groups"] == report["expected"]
    assert [g["name"] for g in report["groups"]][0] == "block_01"  # embeddings and block 0 frozen
    assert "bert.encoder.layer.0.output.dense.weight" in report["frozen"]
    assert report["frozen_changed"] == [] and report["trained_unchanged"] == []
    assert report["max_param_diff_across_ranks"] == 0.0


def test_fsdp1_and_fsdp2_two_processes(tmp_path):
    """Issue #10, failure 1: under FSDP1 (use_orig_params=True) create_optimizer raised KeyError on
    `_fsdp_wrapped_module.` names. FSDP2 (fully_shard) through the same checks."""
    reports, _ = _run_script(tmp_path, ["fsdp1", "fsdp2"])
    for report in reports.values():
        _check_exact(report)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_two_processes(tmp_path, stage):
    pytest.importorskip("deepspeed")
    reports, _ = _run_script(tmp_path, [f"zero{stage}"])
    report = reports[f"zero{stage}"]
    assert report["engine"] == f"DeepSpeed ZeRO-{stage}" and report["engine_world_size"] == 2
    assert report["optimizer"].startswith("DeepSpeedZeroOptimizer")
    _check_exact(report)


def test_fsdp_config_on_cpu_runs_as_ddp_and_says_so(tmp_path):
    """Issue #10, failure 8: on a machine without GPUs accelerate runs an FSDP config as plain DDP; now a warning
    says so (once, from the main process), and the recipe is exact under the DDP that runs."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: accelerate would run FSDP")
    reports, stderr = _run_script(tmp_path, ["fsdp-config-on-cpu"])
    report = reports["fsdp-config-on-cpu"]
    assert report["engine"] == "DDP" and report["engine_world_size"] == 2
    _check_exact(report)
    warning = "The configuration asks for FSDP2, but accelerate runs this job as DDP (world size 2) because"
    assert stderr.count(warning) == 1


def test_ddp_with_prefix_cache_two_processes(tmp_path):
    """The in-memory frozen-prefix cache under DDP: the recipe exact, the cache served batches, and the weights match
    the same run without the cache."""
    report = _run_script(tmp_path, ["ddp-cache"])[0]["ddp-cache"]
    assert report["engine"] == "DDP"
    _check_exact(report)
    assert report["served_batches"] == 12  # built before training: all 3 epochs, 4 steps each per rank
    assert report["max_diff_vs_uncached"] < 1e-5


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"torch_compile": True, "torch_compile_backend": "eager"}, id="torch_compile"),
        pytest.param({"bf16": True}, id="bf16"),
    ],
)
def test_prefix_cache_and_gradual_unfreezing_through_the_trainer(tmp_path, extra):
    """Under torch.compile / bf16 autocast: the frozen-prefix cache is served and gives the weights of the same run
    without it, and gradual unfreezing adds the released blocks with the recipe's rates."""
    from test_prefix_cache import Pad, varlen_dataset

    runs = {}
    for cache in ("off", "on"):
        trainer = WBTrainer(
            model=tiny_model("bert", 4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            args=cpu_args(tmp_path / cache, num_train_epochs=4, per_device_train_batch_size=8, **extra),
            train_dataset=varlen_dataset(16),
            data_collator=Pad(),
            wb_config=WBConfig(top_layers=2, unfreeze_every=2, cache_frozen_prefix=cache, **QUIET),
        )
        trainer.train()
        runs[cache] = trainer
    cached, plain = runs["on"], runs["off"]
    assert cached.wb_cache_stats["served_batches"] == 8  # built before each stage: all 4 epochs (2 steps each)
    assert cached.wb_unfreezer.unfrozen_units == ["block_01"]  # at epoch 2; block_00 stays frozen
    base = {g["name"]: g["lr"] / g["lr_multiplier"] for g in cached.optimizer.param_groups}
    assert base.keys() >= {"block_01", "block_02", "block_03", "head"} and "block_00" not in base
    first = next(iter(base.values()))
    assert all(v == pytest.approx(first) for v in base.values())  # each group: its multiplier x one schedule
    for (name, a), b in zip(plain.model.named_parameters(), cached.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
