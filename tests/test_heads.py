"""Tests for hf_wb.heads: output layer discovery, bias prior, head init, top-block re-init, head dropout."""

from __future__ import annotations

import csv
import logging
import math
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
import transformers
from conftest import ARCHS, tiny_model
from torch import nn

from hf_wb import heads
from hf_wb.heads import (
    DEFAULT_EPS,
    apply_head_recipe,
    find_head_dropout,
    find_output_layer,
    init_bias_prior,
    init_head,
    labels_from_dataset,
    reinit_top_layers,
    set_head_dropout,
)
from hf_wb.layers import layer_map

OUTPUT_LAYER = {
    "bert": "classifier",
    "roberta": "classifier.out_proj",
    "distilbert": "classifier",
    "deberta-v2": "classifier",
    "electra": "classifier.out_proj",
    "gpt2": "score",
    "llama": "score",
    "bart": "classification_head.out_proj",
}
HEAD_DROPOUT = {
    "bert": ["dropout"],
    "roberta": ["classifier.dropout"],
    "distilbert": ["dropout"],
    "deberta-v2": ["pooler.dropout", "dropout"],
    "electra": ["classifier.dropout"],
    "gpt2": [],
    "llama": [],
    "bart": ["classification_head.dropout"],
}
CLASSIFIERS = [a for a in ARCHS if a in OUTPUT_LAYER]
WITH_BIAS = [a for a in CLASSIFIERS if a not in {"gpt2", "llama"}]
LOGGER = "hf_wb.heads"


@pytest.fixture(autouse=True)
def _fresh_warn_once(monkeypatch):
    monkeypatch.setattr(heads, "_warned", set())


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def _inputs(arch: str, model: nn.Module) -> dict[str, torch.Tensor]:
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, pad, pad]])  # BART needs one eos (2) per row
    return {"input_ids": ids, "attention_mask": (ids != pad).long() if arch != "bart" else torch.ones_like(ids)}


def _logits_with_zero_weight(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    _, layer = find_output_layer(model)
    with torch.no_grad():
        layer.weight.zero_()
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------------------------------------- output layer


@pytest.mark.parametrize("arch", ARCHS)
def test_find_output_layer(arch):
    model = tiny_model(arch)
    if arch not in OUTPUT_LAYER:
        with pytest.raises(ValueError, match="no output layer for `num_labels`=2"):
            find_output_layer(model)
        return
    name, layer = find_output_layer(model)
    assert name == OUTPUT_LAYER[arch]
    assert layer is model.get_submodule(name)
    assert isinstance(layer, nn.Linear) and layer.out_features == 2
    assert (layer.bias is None) == (arch in {"gpt2", "llama"})


def test_find_output_layer_token_classification_and_regression():
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=5
    )
    assert find_output_layer(transformers.BertForTokenClassification(config))[0] == "classifier"
    assert find_output_layer(tiny_model("roberta", num_labels=1))[0] == "classifier.out_proj"
    with pytest.raises(ValueError, match="no output layer"):
        find_output_layer(transformers.BertModel(config))


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_find_head_dropout(arch):
    model = tiny_model(arch)
    assert [n for n, _ in find_head_dropout(model)] == HEAD_DROPOUT[arch]


def test_set_head_dropout(caplog):
    model = tiny_model("bert")
    assert set_head_dropout(model, 0.4) == ["dropout"]
    assert model.dropout.p == 0.4 and model.config.classifier_dropout == 0.4
    assert model.bert.embeddings.dropout.p == model.config.hidden_dropout_prob  # body untouched
    roberta = tiny_model("roberta")
    set_head_dropout(roberta, 0.3)
    assert roberta.classifier.dropout.p == 0.3
    distil = tiny_model("distilbert")
    set_head_dropout(distil, 0.25)
    assert distil.dropout.p == 0.25 and distil.config.seq_classif_dropout == 0.25
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert set_head_dropout(tiny_model("gpt2"), 0.3) == []
    assert any("no dropout module" in m for m in _warnings(caplog))
    for bad in (1.0, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match="`head_dropout`"):
            set_head_dropout(model, bad)


# ---------------------------------------------------------------------------------------------------- bias prior


def test_prior_70_30_bert_all_padding_input():
    model = tiny_model("bert")
    result = init_bias_prior(model, [0] * 70 + [1] * 30)
    assert result["problem_type"] == "single_label_classification"
    assert result["priors"] == pytest.approx([0.7, 0.3])
    assert result["bias"] == pytest.approx([math.log(0.7), math.log(0.3)])
    ids = torch.zeros(2, 8, dtype=torch.long)  # all [PAD] (id 0)
    logits = _logits_with_zero_weight(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    torch.testing.assert_close(logits.softmax(-1), torch.tensor([[0.7, 0.3]] * 2), atol=1e-3, rtol=0)


@pytest.mark.parametrize("arch", WITH_BIAS)
def test_prior_step0_prediction_matches_frequencies(arch):
    model = tiny_model(arch)
    init_bias_prior(model, np.array([1] * 7 + [0] * 3))
    probs = _logits_with_zero_weight(model, _inputs(arch, model)).softmax(-1)
    torch.testing.assert_close(probs, torch.tensor([[0.3, 0.7]] * 2), atol=1e-3, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bias_free_head_warns_or_adds_bias(arch, caplog):
    model = tiny_model(arch)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = init_bias_prior(model, [1] * 7 + [0] * 3)
    assert result["bias"] is None and result["priors"] == pytest.approx([0.3, 0.7])
    assert model.score.bias is None
    assert any("has no bias" in m for m in _warnings(caplog))

    weight = model.score.weight
    result = init_bias_prior(model, [1] * 7 + [0] * 3, add_bias=True)
    assert result["added_bias"] and model.score.weight is weight
    torch.testing.assert_close(model.score.bias.detach(), torch.log(torch.tensor([0.3, 0.7])))
    probs = _logits_with_zero_weight(model, _inputs(arch, model)).softmax(-1)
    torch.testing.assert_close(probs, torch.tensor([[0.3, 0.7]] * 2), atol=1e-3, rtol=0)


def test_three_class_priors():
    model = tiny_model("roberta", num_labels=3)
    result = init_bias_prior(model, [0] * 5 + [1] * 3 + [2] * 2)
    expected = [math.log(0.5), math.log(0.3), math.log(0.2)]
    assert result["bias"] == pytest.approx(expected)
    torch.testing.assert_close(model.classifier.out_proj.bias.detach(), torch.tensor(expected))
    torch.testing.assert_close(model.classifier.out_proj.bias.detach().softmax(-1), torch.tensor([0.5, 0.3, 0.2]))


@pytest.mark.parametrize("explicit", [True, False])
def test_multi_label_priors(explicit):
    overrides = {"problem_type": "multi_label_classification"} if explicit else {}
    model = tiny_model("bert", num_labels=3, **overrides)
    rows = [[1, 0, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1]]  # p = (0.75, 0.25, 0.75)
    labels = rows if explicit else torch.tensor(rows, dtype=torch.float)  # float rows -> inferred multi-label
    result = init_bias_prior(model, labels)
    assert result["problem_type"] == "multi_label_classification"
    p = torch.tensor([0.75, 0.25, 0.75])
    torch.testing.assert_close(model.classifier.bias.detach(), torch.log(p / (1 - p)))
    torch.testing.assert_close(model.classifier.bias.detach().sigmoid(), p)


def test_multi_label_ignores_minus_100():
    model = tiny_model("bert", num_labels=2, problem_type="multi_label_classification")
    result = init_bias_prior(model, [[1, -100], [0, 1], [1, 1], [-100, 0]])
    assert result["priors"] == pytest.approx([2 / 3, 2 / 3])


def test_regression_mean():
    model = tiny_model("bert", num_labels=1)
    targets = [0.5, 4.0, 2.5, 3.0, 1.25]
    result = init_bias_prior(model, targets)
    assert result["problem_type"] == "regression"
    assert model.classifier.bias.item() == pytest.approx(np.mean(targets))
    multi = tiny_model("bert", num_labels=2, problem_type="regression")
    init_bias_prior(multi, [[1.0, 10.0], [3.0, 20.0]])
    torch.testing.assert_close(multi.classifier.bias.detach(), torch.tensor([2.0, 15.0]))
    with pytest.raises(ValueError, match="NaN"):
        init_bias_prior(model, [1.0, float("nan")])


def test_empty_class_is_clipped_with_a_warning(caplog):
    model = tiny_model("bert", num_labels=3)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = init_bias_prior(model, [0, 0, 1, 1, 1])
    assert result["clipped"] == [2]
    bias = model.classifier.bias.detach()
    assert torch.isfinite(bias).all()
    assert bias.softmax(-1)[2].item() == pytest.approx(DEFAULT_EPS / (1 + DEFAULT_EPS), rel=1e-4)
    assert any("class [2] never occurs" in m for m in _warnings(caplog))


def test_single_class_data_is_clipped_with_a_warning(caplog):
    model = tiny_model("bert")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = init_bias_prior(model, [1] * 50)
    assert result["clipped"] == [0] and all(math.isfinite(b) for b in result["bias"])
    assert len(_warnings(caplog)) == 1
    caplog.clear()
    multi = tiny_model("bert", num_labels=2, problem_type="multi_label_classification")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = init_bias_prior(multi, [[1, 0], [1, 0], [1, 1]])  # label 0 always on
    assert result["clipped"] == [0]
    assert result["bias"][0] == pytest.approx(math.log((1 - DEFAULT_EPS) / DEFAULT_EPS))
    assert torch.isfinite(multi.classifier.bias).all() and len(_warnings(caplog)) == 1


def test_token_classification_ragged_labels_ignore_minus_100():
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3
    )
    model = transformers.BertForTokenClassification(config)
    labels = [[-100, 0, 0, 1, -100], [-100, 2, 0, -100]]  # counts 3 / 1 / 1
    result = init_bias_prior(model, labels)
    assert result["num_examples"] == 5 and result["priors"] == pytest.approx([0.6, 0.2, 0.2])
    padded = torch.tensor([[-100, 0, 0, 1, -100], [-100, 2, 0, -100, -100]])
    assert init_bias_prior(model, padded)["priors"] == pytest.approx([0.6, 0.2, 0.2])


def _label_inputs():
    values = [1, 0, 1, 1, -100, 0, 1]
    ds = datasets.Dataset.from_dict({"label": values})
    return {
        "list": values,
        "numpy": np.array(values),
        "tensor": torch.tensor(values),
        "column": ds["label"],
        "torch_column": ds.with_format("torch")["label"],
        "tensors": [torch.tensor(v) for v in values],
    }


@pytest.mark.parametrize("kind", list(_label_inputs()))
def test_label_containers(kind):
    model = tiny_model("bert")
    result = init_bias_prior(model, _label_inputs()[kind])
    assert result["num_examples"] == 6 and result["priors"] == pytest.approx([2 / 6, 4 / 6])


def test_bad_labels_are_refused():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=r"class ids in \[0, 2\)"):
        init_bias_prior(model, [0, 1, 2])
    with pytest.raises(ValueError, match="No labels left"):
        init_bias_prior(model, [-100, -100])
    with pytest.raises(ValueError, match="disagrees"):
        regression = tiny_model("bert", problem_type="regression")
        init_bias_prior(regression, [0, 1], problem_type="multi_label_classification")
    with pytest.raises(TypeError, match="labels_from_dataset"):
        init_bias_prior(model, datasets.Dataset.from_dict({"label": [0, 1]}))
    with pytest.raises(ValueError, match="`eps`"):
        init_bias_prior(model, [0, 1], eps=0.0)


def test_cola_train_exact_log_priors(glue_dir):
    path = glue_dir / "CoLA" / "train.tsv"
    if not path.exists():
        pytest.skip(f"{path} not found")
    with path.open(encoding="utf-8", newline="") as f:
        labels = [int(row[1]) for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    assert (labels.count(0), labels.count(1)) == (2528, 6023)
    model = tiny_model("bert")
    result = init_bias_prior(model, labels)
    expected = [math.log(2528 / 8551), math.log(6023 / 8551)]
    assert result["bias"] == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(model.classifier.bias.detach(), torch.tensor(expected), atol=1e-7, rtol=0)
    assert result["bias"][1] - result["bias"][0] == pytest.approx(math.log(6023 / 2528))


# ---------------------------------------------------------------------------------------------------- head init


@pytest.fixture(scope="module")
def wide_bert():
    """A BERT whose classifier weight is 256 x 512 (131k values) for stable statistics."""
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=512, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    config.num_labels = 256
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


FAN_IN, FAN_OUT = 512, 256
EXPECTED_STD = {
    "xavier_uniform": math.sqrt(2 / (FAN_IN + FAN_OUT)),
    "xavier_normal": math.sqrt(2 / (FAN_IN + FAN_OUT)),
    "kaiming_normal": math.sqrt(2 / FAN_IN),
    "kaiming_uniform": math.sqrt(2 / FAN_IN),
    "normal": 0.05,
}


@pytest.mark.parametrize("method", list(EXPECTED_STD))
def test_head_init_statistics(wide_bert, method):
    with torch.no_grad():
        wide_bert.classifier.bias.fill_(3.0)
    assert init_head(wide_bert, method, std=0.05) == "classifier"
    w = wide_bert.classifier.weight.detach().double()
    std = EXPECTED_STD[method]
    assert abs(w.mean().item()) < 4 * std / math.sqrt(w.numel())
    assert w.std().item() == pytest.approx(std, rel=0.02)
    if method.endswith("uniform"):
        bound = std * math.sqrt(3)
        assert w.abs().max().item() <= bound and w.abs().max().item() > 0.99 * bound
    else:  # normal: kurtosis 3 (uniform has 1.8)
        kurtosis = ((w - w.mean()) ** 4).mean().item() / w.var().item() ** 2
        assert kurtosis == pytest.approx(3.0, abs=0.1)
    assert torch.count_nonzero(wide_bert.classifier.bias) == 0
    assert wide_bert.classifier.weight._is_hf_initialized


def test_head_init_keep_changes_nothing():
    model = tiny_model("bert")
    before = model.classifier.weight.detach().clone()
    assert init_head(model, "keep") is None
    torch.testing.assert_close(model.classifier.weight.detach(), before, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["zeros", "ones", "constant", "Zeros"])
def test_constant_head_init_is_refused(method):
    with pytest.raises(ValueError, match="symmetry"):
        init_head(tiny_model("bert"), method)


def test_unknown_head_init_and_bad_std():
    with pytest.raises(ValueError, match="not a known head init"):
        init_head(tiny_model("bert"), "orthogonal_please")
    with pytest.raises(ValueError, match="`head_init_std`"):
        init_head(tiny_model("bert"), "normal", std=0.0)
    with pytest.raises(ValueError, match="no output layer"):
        init_head(tiny_model("t5"), "xavier_uniform")


# ---------------------------------------------------------------------------------------------------- re-init


def _loaded(arch: str, tmp_path) -> nn.Module:
    """A tiny model saved and loaded back: every tensor carries `_is_hf_initialized`, as with real checkpoints."""
    original = tiny_model(arch)
    original.save_pretrained(tmp_path)
    model = type(original).from_pretrained(tmp_path, config=original.config)
    with torch.no_grad():  # move every value away from what an init would produce
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1 + 0.05)
    return model


@pytest.mark.parametrize("arch", ["bert", "deberta-v2", "gpt2", "bart"])
def test_reinit_changes_exactly_top_blocks_and_pooler(arch, tmp_path):
    model = _loaded(arch, tmp_path)
    assert all(getattr(p, "_is_hf_initialized", False) for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = reinit_top_layers(model, 2)

    lmap = layer_map(model)
    expected_modules = [b for s in lmap.stacks.values() for b in s.block_names[-2:]]
    expected_modules += [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == "pooler"]
    assert names == expected_modules
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {n for n in before if any(n.startswith(m + ".") for m in expected_modules)}
    assert changed == expected
    for name, module in model.named_modules():  # the model's own init: norms back to 1 / 0
        if any(name.startswith(m + ".") for m in expected_modules) and isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_plain_init_weights_skips_loaded_tensors(tmp_path):
    """Why the flags are cleared: transformers v5 leaves flagged (loaded) tensors alone."""
    model = _loaded("bert", tmp_path)
    block = model.bert.encoder.layer[3]
    before = block.attention.self.query.weight.detach().clone()
    for module in block.modules():
        model._init_weights(module)
    torch.testing.assert_close(block.attention.self.query.weight.detach(), before, atol=0, rtol=0)
    reinit_top_layers(model, 1)
    assert not torch.equal(block.attention.self.query.weight, before)
    std = model.config.initializer_range
    assert block.intermediate.dense.weight.std().item() == pytest.approx(std, rel=0.2)


def test_reinit_validation():
    model = tiny_model("bert")
    assert reinit_top_layers(model, 0) == []
    with pytest.raises(ValueError, match="has only 4 blocks"):
        reinit_top_layers(model, 5)
    with pytest.raises(ValueError, match="non-negative int"):
        reinit_top_layers(model, -1)


# ---------------------------------------------------------------------------------------------------- recipe


def _recipe(**kw) -> SimpleNamespace:
    return SimpleNamespace(
        **{
            "bias_prior": True,
            "head_init": "keep",
            "head_init_std": 0.01,
            "reinit_top_layers": 0,
            "head_dropout": None,
            "layers_pattern": None,
            **kw,
        }
    )


def test_apply_head_recipe_order_and_summary():
    model = tiny_model("roberta")
    config = _recipe(head_init="xavier_uniform", reinit_top_layers=1, head_dropout=0.3)
    summary = apply_head_recipe(model, config, labels=[0] * 7 + [1] * 3)
    assert summary["reinit"] == ["roberta.encoder.layer.3"]
    assert summary["head_dropout"] == {"p": 0.3, "modules": ["classifier.dropout"]}
    assert summary["head_init"] == {"method": "xavier_uniform", "layer": "classifier.out_proj"}
    assert summary["bias_prior"]["priors"] == pytest.approx([0.7, 0.3])
    # the prior comes last: head_init zeroed the bias, the prior overwrote it
    torch.testing.assert_close(model.classifier.out_proj.bias.detach(), torch.log(torch.tensor([0.7, 0.3])))
    assert model.classifier.dropout.p == 0.3


def test_apply_head_recipe_works_with_a_partial_config():
    model = tiny_model("bert")
    summary = apply_head_recipe(model, SimpleNamespace(), labels=[0, 1, 1, 1])
    assert set(summary) == {"bias_prior"} and summary["bias_prior"]["priors"] == pytest.approx([0.25, 0.75])


def test_apply_head_recipe_without_labels_warns_once(caplog):
    model = tiny_model("bert")
    before = model.classifier.bias.detach().clone()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert apply_head_recipe(model, _recipe())["bias_prior"] is None
        assert apply_head_recipe(tiny_model("bert"), _recipe())["bias_prior"] is None
    assert len([m for m in _warnings(caplog) if "no training labels" in m]) == 1
    torch.testing.assert_close(model.classifier.bias.detach(), before, atol=0, rtol=0)


def test_apply_head_recipe_runs_once_per_model():
    model = tiny_model("bert")
    config = _recipe(reinit_top_layers=1)
    first = apply_head_recipe(model, config, labels=[0, 1, 1, 1])
    block = {n: p.detach().clone() for n, p in model.bert.encoder.layer[3].named_parameters()}
    assert apply_head_recipe(model, config, labels=[0, 0, 0, 1]) is first  # e.g. a second trainer on the same model
    assert all(torch.equal(p, block[n]) for n, p in model.bert.encoder.layer[3].named_parameters())
    assert model.classifier.bias.detach().softmax(-1)[1].item() == pytest.approx(0.75)
    again = apply_head_recipe(model, config, labels=[0, 0, 0, 1], force=True)
    assert again["bias_prior"]["priors"] == pytest.approx([0.75, 0.25])
    query = model.bert.encoder.layer[3].attention.self.query.weight
    assert not torch.equal(query, block["attention.self.query.weight"])
    assert "_hf_wb_head_recipe" not in model.state_dict()


def test_apply_head_recipe_without_head(caplog):
    model = tiny_model("t5")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert apply_head_recipe(model, _recipe(), labels=[0, 1]) == {"bias_prior": None}
    assert not _warnings(caplog)
    with pytest.raises(ValueError, match="no output layer"):
        apply_head_recipe(tiny_model("t5"), _recipe(head_init="normal"), labels=[0, 1])


def test_apply_head_recipe_validates_before_changing_anything():
    model = tiny_model("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for bad in (_recipe(reinit_top_layers=2, head_init="zeros"), _recipe(reinit_top_layers=2, head_dropout=1.5)):
        with pytest.raises(ValueError):
            apply_head_recipe(model, bad, labels=[0, 1])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------------- labels


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, labels, key="labels"):
        self.labels, self.key = labels, key

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": torch.tensor([5, 6, 2]), self.key: torch.tensor(self.labels[i])}


def test_labels_from_dataset():
    ds = datasets.Dataset.from_dict({"label": [0, 1, 1, 0], "x": [1, 2, 3, 4]})
    assert labels_from_dataset(ds) == [0, 1, 1, 0]
    assert labels_from_dataset(ds.select([3, 1])) == [0, 1]
    assert labels_from_dataset(ds.with_format("torch")) == [0, 1, 1, 0]
    both = datasets.Dataset.from_dict({"label": [0, 0], "labels": [1, 1]})
    assert labels_from_dataset(both) == [1, 1]
    assert labels_from_dataset(datasets.Dataset.from_dict({"x": [1]})) is None
    assert labels_from_dataset(ds.to_iterable_dataset()) is None
    assert labels_from_dataset(_DictDataset([1, 0, 2])) == [1, 0, 2]
    assert labels_from_dataset(_DictDataset([[0, -100], [1, 1]], key="label")) == [[0, -100], [1, 1]]
    sample = labels_from_dataset(_DictDataset(list(range(100))), max_examples=10)
    assert len(sample) == 10 and len(set(sample)) == 10
    assert labels_from_dataset([(1, 2), (3, 4)]) is None
    assert labels_from_dataset(None) is None


# ---------------------------------------------------------------------------------------------------- it sticks


def test_init_survives_transformers_init_machinery():
    model = tiny_model("bert")
    init_head(model, "normal", std=0.3)
    init_bias_prior(model, [0] * 7 + [1] * 3)
    weight, bias = model.classifier.weight.detach().clone(), model.classifier.bias.detach().clone()
    for module in model.modules():  # as if the model were built again: every module marked not initialised
        module._is_hf_initialized = False
    model.init_weights()
    torch.testing.assert_close(model.classifier.weight.detach(), weight, atol=0, rtol=0)
    torch.testing.assert_close(model.classifier.bias.detach(), bias, atol=0, rtol=0)


def test_init_survives_trainer_construction_and_first_step(tmp_path):
    model = tiny_model("bert")
    labels = [0] * 7 + [1] * 3
    apply_head_recipe(model, _recipe(head_init="normal", head_init_std=0.2, reinit_top_layers=1), labels)
    weight, bias = model.classifier.weight.detach().clone(), model.classifier.bias.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=1,
        learning_rate=1e-3,
        weight_decay=0.0,
        per_device_train_batch_size=5,
        save_strategy="no",
        report_to="none",
        seed=123,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_DictDataset(labels))
    torch.testing.assert_close(trainer.model.classifier.bias.detach(), bias, atol=0, rtol=0)
    torch.testing.assert_close(trainer.model.classifier.weight.detach(), weight, atol=0, rtol=0)
    trainer.train()
    # one AdamW update moves each value by at most ~lr (first step: lr * g / (|g| + eps))
    bias_step = (trainer.model.classifier.bias.detach() - bias).abs()
    weight_step = (trainer.model.classifier.weight.detach() - weight).abs()
    assert bias_step.max().item() <= 1.01e-3 and bias_step.max().item() > 0
    assert weight_step.max().item() <= 1.01e-3 and weight_step.max().item() > 0


def test_reinit_keeps_parent_level_init_rules():
    """GPT-2's block init scales `c_proj` by 1/sqrt(2 n_layer) from the parent module: it must not be skipped."""
    config = transformers.GPT2Config(vocab_size=100, n_embd=256, n_layer=4, n_head=2, n_positions=64, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2ForSequenceClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    reinit_top_layers(model, 1)
    block = model.transformer.h[3]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)


# ---------------------------------------------------------------------------------------------------- WBTrainer


def _trainer_applies_head_recipe() -> bool:
    import inspect

    import hf_wb.trainer

    return "apply_head_recipe" in inspect.getsource(hf_wb.trainer)


@pytest.mark.skipif(
    not _trainer_applies_head_recipe(), reason="WBTrainer does not call hf_wb.heads.apply_head_recipe yet"
)
def test_wbtrainer_end_to_end(tmp_path):
    from hf_wb import WBConfig, WBTrainer

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 28 + [1] * 12)[torch.randperm(40, generator=g)].tolist()  # 70 / 30
    ids = torch.randint(5, 100, (40, 10), generator=g).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "label": labels})
    model = tiny_model("bert")
    config = WBConfig(
        bias_prior=True,
        head_init="normal",
        head_init_std=0.2,
        reinit_top_layers=1,
        head_dropout=0.3,
        histogram_steps=0,
        diagnostics=False,
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=1,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = WBTrainer(model=model, args=args, train_dataset=data, wb_config=config)
    prior = torch.log(torch.tensor([0.7, 0.3]))
    torch.testing.assert_close(model.classifier.bias.detach(), prior)  # applied at construction
    assert model.dropout.p == 0.3
    assert model.classifier.weight.std().item() == pytest.approx(0.2, rel=0.3)
    trainer.train()
    group = next(gr for gr in trainer.optimizer.param_groups if any(p is model.classifier.bias for p in gr["params"]))
    lr = group.get("initial_lr", group["lr"])  # the head's own rate (recipe multiplier included)
    step = (model.classifier.bias.detach() - prior).abs().max().item()
    assert 0 < step <= 1.01 * lr  # the prior, up to one AdamW update
