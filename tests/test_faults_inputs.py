"""Fault matrix, inputs part (issue #11): config values, GLUE data, and the on-disk prefix cache.

Each test is one case of #11's "Why" list: it failed before the fix (the run went on and came out wrong, or died
with an error that did not say what was wrong) and passes now.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO

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


def test_inspect_config_refuses_misspelled_keys_like_run_glue(tmp_path, capsys):
    # before: `hf-wb inspect --config` dropped keys it did not know (here a misspelled top_layers) and showed the
    # default recipe as if it were the file's
    from hf_wb.cli import main

    path = _glue_file(tmp_path, "top_layer: 2\n")
    with pytest.raises(ValueError) as from_run_glue:
        parse_args([str(path)])
    capsys.readouterr()
    assert main(["inspect", "minilm", "--config", str(path)]) != 0  # the CLI prints one line, no traceback
    err = capsys.readouterr().err
    assert "unknown keys ['top_layer']" in err
    assert err.strip() == f"hf-wb inspect: error: {from_run_glue.value}"


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


# ----- on-disk prefix cache -------------------------------------------------------------------------------------
def _disk_cache(cache_dir, model=None, dtype="float32"):
    from conftest import tiny_model

    from hf_wb import freeze, layer_map
    from hf_wb.prefix_cache import PrefixCache

    model = model if model is not None else tiny_model("bert", 4)
    freeze(model, WBConfig(top_layers=2))
    return PrefixCache(model, layer_map(model), dtype, str(cache_dir))


def _build(cache, n=12):
    from test_prefix_cache import Pad, varlen_dataset

    cache.build([varlen_dataset(n)], Pad(), progress=False)
    return cache


def _zero(path):
    path.write_bytes(bytes(path.stat().st_size))


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # one bit in the last value: a NaN or a wrong number, still a valid .npy
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-64])


@pytest.mark.parametrize("damage", [_zero, _flip, _truncate], ids=["zeroed", "bit-flipped", "truncated"])
@pytest.mark.parametrize("file", ["states.npy", "offsets.npy", "meta.json"])
def test_corrupt_disk_cache_is_rebuilt_with_a_warning(tmp_path, caplog, damage, file):
    # before: a zeroed or bit-flipped states.npy was reused and training came out wrong; a truncated one gave a
    # raw `mmap length` traceback
    first = _build(_disk_cache(tmp_path / "c"))
    exact = first.storage.clone()
    damage(tmp_path / "c" / first.key / file)
    caplog.set_level(logging.WARNING, logger="hf_wb")
    second = _build(_disk_cache(tmp_path / "c"))
    assert second.key == first.key and second.stats["built"] == 1 and second.stats["loaded"] == 0
    assert any("is not usable" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert torch.equal(second.storage, exact)
    third = _build(_disk_cache(tmp_path / "c"))  # the rebuilt cache is sound: reused as is
    assert third.stats == {**third.stats, "built": 0, "loaded": 1} and torch.equal(third.storage, exact)


def test_sound_disk_cache_is_reused_without_warning(tmp_path, caplog):
    first = _build(_disk_cache(tmp_path / "c", dtype="bfloat16"))
    caplog.set_level(logging.WARNING, logger="hf_wb")
    second = _build(_disk_cache(tmp_path / "c", dtype="bfloat16"))
    assert second.stats["built"] == 0 and second.stats["loaded"] == 1 and not caplog.records
    assert second.storage.dtype == torch.bfloat16 and torch.equal(second.storage, first.storage)


def test_changed_model_config_misses_the_cache(tmp_path):
    # before: the key covered weights, boundary, dtype and data, not the config: gelu -> relu reused stale states
    from conftest import tiny_model

    gelu = _build(_disk_cache(tmp_path / "c", tiny_model("bert", 4, hidden_act="gelu")))
    relu = _build(_disk_cache(tmp_path / "c", tiny_model("bert", 4, hidden_act="relu")))
    assert relu.key != gelu.key and relu.stats["built"] == 1 and relu.stats["loaded"] == 0
    assert not torch.equal(relu.storage, gelu.storage)
    same = _build(_disk_cache(tmp_path / "c", tiny_model("bert", 4, hidden_act="gelu")))
    assert same.key == gelu.key and same.stats["loaded"] == 1


def test_rebuild_never_rewrites_a_file_in_place(tmp_path):
    # before: the files were rewritten in place while another run had them memory-mapped (that run died of SIGBUS)
    reader = _build(_disk_cache(tmp_path / "c"))
    served = reader.storage.clone()
    states = tmp_path / "c" / reader.key / "states.npy"
    inode = states.stat().st_ino
    meta = tmp_path / "c" / reader.key / "meta.json"
    info = json.loads(meta.read_text())
    info["files"]["states.npy"]["xxh3_128"] = "0" * 32  # the rebuild below must replace this folder
    meta.write_text(json.dumps(info))
    writer = _build(_disk_cache(tmp_path / "c"))
    assert writer.stats["built"] == 1
    assert states.stat().st_ino != inode  # a new file renamed into place
    assert torch.equal(reader.storage, served)  # the first run's memory map still reads its own, intact bytes
    assert [p.name for p in (tmp_path / "c").iterdir() if p.is_dir()] == [reader.key]  # no temporary folder left


def test_two_concurrent_processes_build_once(tmp_path):
    # before: two runs sharing a folder both built the cache (and wrote the same files)
    script = REPO / "tests" / "scripts" / "cache_build.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    (tmp_path / "sync").mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "c"), str(tmp_path / "sync"), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads((tmp_path / "sync" / f"result-{i}.json").read_text()) for i in range(2)]
    assert sorted(r["stats"]["built"] for r in results) == [0, 1]
    assert sorted(r["stats"]["loaded"] for r in results) == [0, 1]
    assert results[0]["key"] == results[1]["key"] and results[0]["first"] == results[1]["first"]


def test_ddp_only_rank_0_builds_the_disk_cache(tmp_path):
    # before: under DDP every rank computed and wrote the same file
    script = REPO / "tests" / "scripts" / "ddp_cache.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run([*cmd, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["built"] == 1 and ranks[0]["loaded"] == 0
    assert ranks[1]["built"] == 0 and ranks[1]["loaded"] == 1
    assert ranks[0]["examples"] == ranks[1]["examples"] == 16


def test_data_key_is_the_inputs_content_hashed_once_per_dataset(monkeypatch):
    # before: every row was hashed in a Python loop, at every unfreeze stage and on every rank
    from test_prefix_cache import varlen_dataset

    from hf_wb import prefix_cache
    from hf_wb.prefix_cache import data_fingerprint

    a, b = varlen_dataset(20), varlen_dataset(20)
    calls = []
    digest = prefix_cache._arrow_digest
    monkeypatch.setattr(prefix_cache, "_arrow_digest", lambda *args: calls.append(1) or digest(*args))
    key = data_fingerprint([a])
    assert data_fingerprint([a]) == key and len(calls) == 1  # remembered by the dataset's fingerprint
    assert data_fingerprint([b]) == key  # built separately, same content: same key (other runs, other ranks)
    monkeypatch.setattr(prefix_cache, "_arrow_digest", digest)
    assert data_fingerprint([a.remove_columns("labels")]) == key  # only the model inputs count
    assert data_fingerprint([a]) != data_fingerprint([varlen_dataset(20, seed=1)])
    assert data_fingerprint([a.select(range(19))]) != data_fingerprint([a])
    assert data_fingerprint([a.select([1, 0, *range(2, 20)])]) != data_fingerprint([a])  # row order counts
    assert data_fingerprint([a.select(range(10)), a.select(range(10, 20))]) != data_fingerprint([a])
    changed = a.map(lambda row, i: {"input_ids": row["input_ids"][:-1] + [7]} if i == 5 else row, with_indices=True)
    assert data_fingerprint([changed]) != data_fingerprint([a])


def test_plain_torch_dataset_key_is_correct():
    from hf_wb.prefix_cache import data_fingerprint

    class Rows(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    one = Rows([{"input_ids": torch.tensor([1, 2]), "attention_mask": torch.tensor([1, 1])}])
    moved = Rows([{"input_ids": torch.tensor([1, 2, 1]), "attention_mask": torch.tensor([1])}])  # same bytes, shifted
    assert data_fingerprint([one], ("input_ids", "attention_mask")) != data_fingerprint(
        [moved], ("input_ids", "attention_mask")
    )
    same = Rows([{"input_ids": [1, 2], "attention_mask": [1, 1]}])
    assert data_fingerprint([same], ("input_ids", "attention_mask")) == data_fingerprint(
        [one], ("input_ids", "attention_mask")
    )


def test_cache_list_and_clear_command(tmp_path, capsys):
    from hf_wb.cli import main

    kept = _build(_disk_cache(tmp_path / "c"))
    other = _build(_disk_cache(tmp_path / "c"), n=8)
    (tmp_path / "c" / "unrelated").mkdir()
    _zero(tmp_path / "c" / other.key / "states.npy")
    assert main(["cache", "list", str(tmp_path / "c"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert kept.key in out and other.key in out and "corrupt" in out and "unrelated" not in out
    assert main(["cache", "clear", str(tmp_path / "c"), other.key]) == 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.is_dir()) == [kept.key, "unrelated"]
    assert main(["cache", "clear", str(tmp_path / "c")]) == 0
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["unrelated"]
