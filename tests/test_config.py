import json
import logging

import pytest
from transformers import HfArgumentParser

from hf_wb import CONFIG_NAME, WBConfig, __version__


def test_defaults_are_headline_recipe():
    c = WBConfig()
    assert (c.top_layers, c.top_lr_multiplier, c.head_multiplier, c.freeze_layers) == (3, 5.0, 5.0, -1)
    assert c.num_frozen_blocks(6) == 3 and c.embeddings_frozen(True)


def test_baseline():
    b = WBConfig.baseline()
    assert b.top_lr_multiplier == 1.0 and b.head_multiplier == 1.0 and b.num_frozen_blocks(12) == 0
    assert b.embeddings_frozen(False) is False and b.bias_prior is False


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_layers": 0}, r"`top_layers` must be >= 1, got 0"),
        ({"top_lr_multiplier": 0}, r"`top_lr_multiplier` must be > 0, got 0"),
        ({"top_lr_multiplier": -2.0}, r"`top_lr_multiplier` must be > 0, got -2.0"),
        ({"head_lr_multiplier": 0.0}, r"`head_lr_multiplier` must be > 0 or None, got 0.0"),
        ({"layer_lr_decay": 0.0}, r"`layer_lr_decay` must be in \(0, 1\], got 0.0"),
        ({"layer_lr_decay": 1.5}, r"`layer_lr_decay` must be in \(0, 1\], got 1.5"),
        ({"freeze_layers": -2}, r"`freeze_layers` must be -1 .* got -2"),
        ({"optimizer": "sgdx"}, r"`optimizer` must be None .* got 'sgdx'"),
        ({"head_init": "zeros"}, r"`head_init`='zeros' is refused: a constant init makes every output unit identical"),
        ({"head_init": "orthogonal"}, r"`head_init` must be one of"),
        ({"head_init_std": 0}, r"`head_init_std` must be > 0"),
        ({"reinit_top_layers": -1}, r"`reinit_top_layers` must be >= 0"),
        ({"reinit_top_layers": 4}, r"`reinit_top_layers`=4 re-initialises blocks below the top `top_layers`=3"),
        ({"head_dropout": 1.0}, r"`head_dropout` must be in \[0, 1\)"),
        ({"histogram_steps": -1}, r"`histogram_steps` must be >= 0"),
        ({"cache_frozen_prefix": "maybe"}, r"`cache_frozen_prefix` must be one of"),
        ({"cache_dtype": "int8"}, r"`cache_dtype` must be one of"),
        ({"unfreeze_every": -1}, r"`unfreeze_every` must be >= 0"),
        ({"unfreeze_every_steps": -1}, r"`unfreeze_every_steps` must be >= 0"),
        ({"unfreeze_every": 1, "unfreeze_every_steps": 10}, r"Set only one of `unfreeze_every`"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WBConfig(**kwargs)


def test_normalisation():
    c = WBConfig(optimizer=" LAMB ", head_init="Xavier_Uniform", layers_pattern="")
    assert (c.optimizer, c.head_init, c.layers_pattern) == ("lamb", "xavier_uniform", None)


def test_hf_argument_parser_cli_and_dict():
    parser = HfArgumentParser(WBConfig)
    (c,) = parser.parse_args_into_dataclasses(
        ["--top_layers", "2", "--top_lr_multiplier", "10", "--freeze_embeddings", "false", "--head_lr_multiplier", "3"]
    )
    assert (c.top_layers, c.top_lr_multiplier, c.freeze_embeddings, c.head_lr_multiplier) == (2, 10.0, False, 3.0)
    (d,) = parser.parse_dict({"layer_lr_decay": 0.9, "optimizer": "lamb"})
    assert d.layer_lr_decay == 0.9 and d.optimizer == "lamb"
    with pytest.raises(ValueError, match="not used by the HfArgumentParser"):
        parser.parse_dict({"top_layer": 2})


def test_yaml_and_json_files(tmp_path):
    parser = HfArgumentParser(WBConfig)
    (tmp_path / "r.yaml").write_text("top_layers: 4\ntop_lr_multiplier: 8\n")
    (tmp_path / "r.json").write_text(json.dumps({"top_layers": 1}))
    assert parser.parse_yaml_file(str(tmp_path / "r.yaml"))[0].top_lr_multiplier == 8.0
    assert parser.parse_json_file(str(tmp_path / "r.json"))[0].top_layers == 1


def test_save_and_load_round_trip(tmp_path):
    c = WBConfig(top_layers=2, top_lr_multiplier=10, layer_lr_decay=0.8, head_init="xavier_normal")
    path = c.save_pretrained(tmp_path / "recipe")
    data = json.loads(open(path).read())
    assert data["hf_wb_version"] == __version__
    assert list(data) == sorted(data)
    assert WBConfig.from_pretrained(tmp_path / "recipe") == c
    assert WBConfig.from_pretrained(path) == c


def test_newer_keys_dropped_with_warning(tmp_path, caplog):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"top_layers": 2, "quantum_mode": True, "hf_wb_version": "9.0"}))
    with caplog.at_level(logging.WARNING):
        c = WBConfig.from_pretrained(tmp_path)
    assert c.top_layers == 2
    assert "quantum_mode" in caplog.text


def test_load_errors_name_the_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="holds no hf_wb_config.json"):
        WBConfig.from_pretrained(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        WBConfig.from_pretrained(bad)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="suggest|Pass the path of a local folder"):
        WBConfig.from_pretrained("someone/some-recipe")


def test_hub_download_path_reads_json_only(tmp_path, monkeypatch):
    """The Hub branch: hf_hub_download replaced by a local stand-in that serves a folder."""
    import huggingface_hub

    served = tmp_path / "hub" / "user__recipe"
    WBConfig(top_layers=1).save_pretrained(served)
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(tmp_path / "hub" / repo_id.replace("/", "__") / filename)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert WBConfig.from_pretrained("user/recipe").top_layers == 1
    assert calls == [("user/recipe", CONFIG_NAME)]


def test_push_to_hub_uploads_the_recipe(tmp_path, monkeypatch):
    """push_to_hub through PushToHubMixin, with the Hub API replaced by a local stand-in."""
    import transformers.utils.hub as hub

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def create_commit(self, repo_id, operations, **kwargs):
            for op in operations:
                uploaded[op.path_in_repo] = open(op.path_or_fileobj, encoding="utf-8").read()
            return "commit-url"

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: _Card())
    WBConfig(top_layers=4).push_to_hub("user/recipe")
    assert json.loads(uploaded[CONFIG_NAME])["top_layers"] == 4


class _Card:
    def save(self, path):
        open(path, "w").write("# recipe\n")
