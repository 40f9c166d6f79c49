"""Fault matrix, inputs part (issue #11): config values, GLUE data, and the on-disk prefix cache.

Each test is one case of #11's "Why" list: it failed before the fix (the run went on and came out wrong, or died
with an error that did not say what was wrong) and passes now.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from hf_wb import WBConfig
from hf_wb.glue import GLUE_TASKS, load_glue
from hf_wb.glue.run import parse_args

FLOAT_FIELDS = [f.name for f in dataclasses.fields(WBConfig) if f.type in ("float", "float | None")]
INT_FIELDS = [f.name for f in dataclasses.fields(WBConfig) if f.type in ("int", "int | None")]
BOOL_FIELDS = [f.name for f in dataclasses.fields(WBConfig) if f.type in ("bool", "bool | None")]


# ----- config values --------------------------------------------------------------------------------------------
def test_the_field_lists_are_found():
    assert {"top_lr_multiplier", "head_lr_multiplier", "layer_lr_decay", "head_init_std", "head_dropout"} <= set(
        FLOAT_FIELDS
    )
    assert {"top_layers", "freeze_layers", "histogram_steps"} <= set(INT_FIELDS)
    assert {"bias_prior", "diagnostics", "freeze_embeddings"} <= set(BOOL_FIELDS)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf"])
def test_nan_and_inf_refused_for_every_float_field(name, value):
    # before: a NaN multiplier passed every `<= 0` check and the group lr became nan
    with pytest.raises(ValueError, match=rf"`{name}` must be a finite number"):
        WBConfig(**{name: value})


@pytest.mark.parametrize("name", ["bias_prior", "diagnostics"])
@pytest.mark.parametrize(("text", "expected"), [("false", False), ("False", False), ("no", False), ("true", True)])
def test_boolean_strings_from_json_are_booleans(tmp_path, name, text, expected):
    # before: the string "false" was kept as is, and a non-empty string is truthy
    path = tmp_path / "hf_wb_config.json"
    path.write_text(json.dumps({name: text}))
    loaded = getattr(WBConfig.from_pretrained(path), name)
    assert loaded is expected
    assert getattr(WBConfig(**{name: text}), name) is expected


def test_unreadable_boolean_refused_with_the_field():
    with pytest.raises(ValueError, match=r"`bias_prior` must be a boolean .* got 'maybe'"):
        WBConfig(bias_prior="maybe")


@pytest.mark.parametrize(("value", "expected"), [("3", 3), (2.0, 2), ("2.0", 2), (" 4 ", 4)])
def test_int_fields_convert_numbers_given_as_strings_or_integral_floats(value, expected):
    # before: "3" or 2.0 reached `range()` / comparisons and failed deep inside with a TypeError
    config = WBConfig(top_layers=value)
    assert config.top_layers == expected and type(config.top_layers) is int


@pytest.mark.parametrize("value", [2.5, "2.5", "three", True])
def test_int_fields_refuse_fractions_words_and_booleans_with_the_field(value):
    with pytest.raises((ValueError, TypeError), match=r"`top_layers` must be an integer"):
        WBConfig(top_layers=value)


@pytest.mark.parametrize("value", ["on", "off", "true", "false", "ON", True, False])
def test_cache_mode_accepts_on_off_true_false(value):
    expected = "on" if str(value).lower() in ("on", "true") else "off"
    assert WBConfig(cache_frozen_prefix=value).cache_frozen_prefix == expected


def _glue_file(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text("task_name: mrpc\noutput_dir: " + str(tmp_path / "out") + "\n" + text)
    return path


def test_yaml_on_off_and_strings_reach_the_recipe(tmp_path):
    # YAML 1.1 reads `on` as True: before, the config then refused "true" for cache_frozen_prefix
    path = _glue_file(tmp_path, "cache_frozen_prefix: on\nbias_prior: 'false'\ntop_layers: '2'\nfreeze_layers: 1.0\n")
    args = parse_args([str(path), "--use_cpu", "true"])
    assert args.wb_config.cache_frozen_prefix == "on" and args.wb_config.bias_prior is False
    assert args.wb_config.top_layers == 2 and args.wb_config.freeze_layers == 1


def test_yaml_nan_and_fraction_refused_with_file_and_field(tmp_path):
    with pytest.raises(ValueError, match=r"run.yaml: `top_lr_multiplier` must be a finite number"):
        parse_args([str(_glue_file(tmp_path, "top_lr_multiplier: .nan\n"))])
    with pytest.raises(ValueError, match=r"run.yaml: `top_layers` must be an integer, got 2.5"):
        parse_args([str(_glue_file(tmp_path, "top_layers: 2.5\n"))])


def test_command_line_nan_and_boolean_strings(tmp_path):
    base = ["--task_name", "mrpc", "--output_dir", str(tmp_path / "o"), "--use_cpu", "true"]
    with pytest.raises(ValueError, match=r"`head_lr_multiplier` must be a finite number"):
        parse_args([*base, "--head_lr_multiplier", "nan"])
    args = parse_args([*base, "--bias_prior", "false", "--cache_frozen_prefix", "true"])
    assert args.wb_config.bias_prior is False and args.wb_config.cache_frozen_prefix == "on"


def test_inspect_config_refuses_misspelled_keys_like_run_glue(tmp_path):
    # before: `hf-wb inspect --config` dropped keys it did not know (here a misspelled top_layers) and showed the
    # default recipe as if it were the file's
    from hf_wb.cli import main

    path = _glue_file(tmp_path, "top_layer: 2\n")
    with pytest.raises(ValueError) as from_run_glue:
        parse_args([str(path)])
    with pytest.raises(ValueError) as from_inspect:
        main(["inspect", "minilm", "--config", str(path)])
    assert "unknown keys ['top_layer']" in str(from_inspect.value)
    assert str(from_inspect.value) == str(from_run_glue.value)


def test_inspect_config_applies_the_same_values_and_recipe_choice(tmp_path):
    from hf_wb.cli import load_recipe

    config, rest = load_recipe(
        str(_glue_file(tmp_path, "recipe: baseline\nbias_prior: 'true'\nlearning_rate: 0.0001\n"))
    )
    assert config.top_lr_multiplier == 1.0 and config.bias_prior is True  # the baseline, plus the file's field
    assert rest["learning_rate"] == 0.0001 and "recipe" not in rest


# ----- data -----------------------------------------------------------------------------------------------------
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"


def _stsb(tmp_path, *scores):
    folder = tmp_path / "STS-B"
    folder.mkdir(exist_ok=True)
    rows = "".join(f"{i}\tg\tf\ty\to\ts\ts\tone\ttwo\t{s}\n" for i, s in enumerate(scores))
    (folder / "train.tsv").write_text(STSB_HEADER + rows)
    return folder / "train.tsv"


@pytest.mark.parametrize("bad", ["7.5", "-1", "inf", "5.01"])
def test_stsb_score_outside_0_to_5_refused_with_file_and_line(tmp_path, bad):
    # before: 7.5, -1 and inf were read as scores and trained on
    path = _stsb(tmp_path, "3.2", "0", bad)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}, line 4: label '{bad}' is (outside stsb's score range 0..5|not a)"
    ):
        load_glue("stsb", data_dir=tmp_path, splits=["train"])


def test_stsb_nan_score_refused_with_file_and_line(tmp_path):
    # before: a NaN score trained to a NaN eval loss, with advice to enable gradient clipping
    path = _stsb(tmp_path, "1.0", "nan")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 3: label 'nan' is not a finite number"):
        load_glue("stsb", data_dir=tmp_path, splits=["train"])


def test_stsb_edges_of_the_range_accepted(tmp_path):
    _stsb(tmp_path, "0", "5", "5.000", "2.5")
    assert load_glue("stsb", data_dir=tmp_path, splits=["train"])["train"]["label"] == [0.0, 5.0, 5.0, 2.5]


@pytest.mark.parametrize(
    ("task", "header"), [("mrpc", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"), ("stsb", STSB_HEADER)]
)
def test_headers_only_file_refused_naming_the_file(tmp_path, task, header):
    # before: 0 rows loaded, and the run failed later without naming the file
    folder = tmp_path / GLUE_TASKS[task].folder
    folder.mkdir()
    (folder / "dev.tsv").write_text(header)
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder / 'dev.tsv'))}: the file holds no examples"):
        load_glue(task, data_dir=tmp_path, splits=["validation"])


def test_headerless_empty_file_refused(tmp_path):
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "train.tsv").write_text("")
    with pytest.raises(ValueError, match=r"train.tsv: the file holds no examples"):
        load_glue("cola", data_dir=tmp_path, splits=["train"])


def test_classification_label_outside_the_label_set_refused(tmp_path):
    folder = tmp_path / "MRPC"
    folder.mkdir()
    (folder / "train.tsv").write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta\tb\n2\t1\t2\ta\tb\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder / 'train.tsv'))}, line 3: label '2' is not valid"):
        load_glue("mrpc", data_dir=tmp_path, splits=["train"])


def test_hub_splits_are_checked_too(monkeypatch):
    from datasets import Dataset, Features, Value

    monkeypatch.delenv("GLUE_DIR", raising=False)
    bad = Dataset.from_dict(
        {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [1.0, math.nan], "idx": [0, 1]},
        features=Features(
            {
                "sentence1": Value("string"),
                "sentence2": Value("string"),
                "label": Value("float32"),
                "idx": Value("int32"),
            }
        ),
    )
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: bad)
    with pytest.raises(ValueError, match=r"nyu-mll/glue \(stsb, split 'train'\), row 1: label nan is not a finite"):
        load_glue("stsb", splits=["train"])
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: bad.select([]))
    with pytest.raises(ValueError, match=r"split 'train'\) holds no examples"):
        load_glue("stsb", splits=["train"])
