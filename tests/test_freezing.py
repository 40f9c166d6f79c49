import copy
import os
import pickle
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import ARCHS, REPO, tiny_model

from hf_wb import WBConfig, freeze, is_eval_pinned, layer_map, plan_freeze, unfreeze
from hf_wb.freezing import pinnable_modules, unfreeze_units


@pytest.mark.parametrize("arch", ARCHS)
def test_default_freezes_all_below_top(arch):
    model = tiny_model(arch, num_layers=4)
    plan = freeze(model, WBConfig(top_layers=2))
    lmap = layer_map(model)
    for name, p in model.named_parameters():
        info = lmap.params[name]
        n = lmap.stacks[info.stack].num_blocks
        should_freeze = info.role == "embeddings" or (info.role == "block" and info.depth < n - 2)
        assert p.requires_grad is not should_freeze, name
    assert plan.any_frozen


@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_modules_stay_in_eval_after_model_train(arch):
    model = tiny_model(arch, num_layers=4)
    freeze(model, WBConfig(top_layers=2))
    model.train()  # what the Trainer does every step
    pinned = pinnable_modules(model, layer_map(model))
    assert pinned
    for _, module in pinned:
        assert is_eval_pinned(module)
        assert all(not m.training for m in module.modules())
    trainable_modules = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    assert all(m.training for m in trainable_modules)


def test_frozen_block_has_no_dropout_effect():
    model = tiny_model("bert", num_layers=4, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    freeze(model, WBConfig(top_layers=2))
    model.train()
    x = torch.randint(1, 100, (2, 8))
    emb = model.bert.embeddings
    h1 = model.bert.encoder.layer[0](emb(x))[0] if isinstance(model.bert.encoder.layer[0](emb(x)), tuple) else None
    out_a = model.bert.encoder.layer[1](model.bert.encoder.layer[0](emb(x)))
    out_b = model.bert.encoder.layer[1](model.bert.encoder.layer[0](emb(x)))
    del h1
    a = out_a[0] if isinstance(out_a, tuple) else out_a
    b = out_b[0] if isinstance(out_b, tuple) else out_b
    torch.testing.assert_close(a, b)  # deterministic: no dropout in the frozen prefix
    top_a = model.bert.encoder.layer[3](a)
    top_b = model.bert.encoder.layer[3](a)
    top_a = top_a[0] if isinstance(top_a, tuple) else top_a
    top_b = top_b[0] if isinstance(top_b, tuple) else top_b
    assert not torch.equal(top_a, top_b)  # dropout still runs where weights learn


def test_gpt2_embedding_dropout_pinned_with_embeddings():
    model = tiny_model("gpt2")
    freeze(model, WBConfig(top_layers=2))
    model.train()
    assert not model.transformer.drop.training


def test_unfreeze_is_inverse():
    model = tiny_model("bert")
    freeze(model, WBConfig(top_layers=1))
    unfreeze(model)
    model.train()
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert not any(is_eval_pinned(m) for m in model.modules())


def test_unfreeze_units_releases_one_block():
    model = tiny_model("bert", num_layers=4)
    freeze(model, WBConfig(top_layers=1))
    lmap = layer_map(model)
    released = unfreeze_units(model, ["block_02"], lmap)
    assert len(released) == len(lmap.params_of("", "block", 2))
    model.train()
    assert model.bert.encoder.layer[2].training and not model.bert.encoder.layer[1].training
    assert all(p.requires_grad for p in model.bert.encoder.layer[2].parameters())


def test_explicit_freeze_layers_and_embeddings():
    model = tiny_model("bert", num_layers=4)
    plan = freeze(model, WBConfig(top_layers=1, freeze_layers=1, freeze_embeddings=False))
    assert plan.frozen_units == ["block_00"]
    assert model.bert.embeddings.word_embeddings.weight.requires_grad


def test_embeddings_only():
    model = tiny_model("bert", num_layers=4)
    plan = freeze(model, WBConfig(freeze_layers=0, freeze_embeddings=True))
    assert plan.frozen_units == ["embeddings"]


def test_nothing_frozen_when_no_blocks_frozen():
    plan = plan_freeze(tiny_model("bert"), WBConfig(freeze_layers=0))
    assert plan.frozen_units == []


def test_freeze_layers_deeper_than_stack_refused():
    with pytest.raises(ValueError, match="`freeze_layers`=9 but the stack 'bert.encoder.layer' has only 4 blocks"):
        freeze(tiny_model("bert"), WBConfig(freeze_layers=9))


def test_freeze_layers_overlapping_top_refused():
    with pytest.raises(ValueError, match="`freeze_layers`=3 would freeze blocks that `top_layers`=3"):
        freeze(tiny_model("bert"), WBConfig(freeze_layers=3))


def test_nothing_trainable_refused_by_param_groups():
    from hf_wb import build_param_groups

    model = tiny_model("bert")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="No trainable parameter is left"):
        build_param_groups(model, WBConfig())


def test_state_dict_and_class_names_unaffected_by_pinning():
    model = tiny_model("bert")
    keys = set(model.state_dict())
    names = [type(m).__name__ for m in model.modules()]
    freeze(model, WBConfig(top_layers=2))
    assert set(model.state_dict()) == keys
    assert [type(m).__name__ for m in model.modules()] == names
    assert isinstance(model.bert.embeddings, transformers.models.bert.modeling_bert.BertEmbeddings)
    assert all("train" not in m.__dict__ for m in model.modules())  # nothing bound on the instances


def _pinned_state(model):
    return {n: is_eval_pinned(m) for n, m in model.named_modules()}


def _assert_same_pinned_model(original, copy_):
    assert _pinned_state(copy_) == _pinned_state(original)
    assert any(_pinned_state(copy_).values())
    copy_.train()  # what the Trainer does every step
    assert not copy_.bert.embeddings.training and not copy_.bert.encoder.layer[0].training
    assert copy_.classifier.training and copy_.bert.encoder.layer[3].training
    assert {n: p.requires_grad for n, p in copy_.named_parameters()} == {
        n: p.requires_grad for n, p in original.named_parameters()
    }
    for a, b in zip(original.parameters(), copy_.parameters(), strict=True):
        assert torch.equal(a, b)
    unfreeze(copy_)  # the recorded plan travels with the copy
    copy_.train()
    assert all(m.training for m in copy_.modules())
    assert all(p.requires_grad for p in copy_.parameters())


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
def test_pinned_model_survives_round_trip(how, tmp_path):
    """Failure 5 of issue #10: a bound method stored on module instances broke pickling of a pinned model."""
    model = tiny_model("bert")
    freeze(model, WBConfig(top_layers=2))
    if how == "pickle":
        copy_ = pickle.loads(pickle.dumps(model))
    elif how == "deepcopy":
        copy_ = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "model.pt")
        copy_ = torch.load(tmp_path / "model.pt", weights_only=False)
    _assert_same_pinned_model(model, copy_)


def test_pinned_model_loads_in_a_fresh_process(tmp_path):
    """`torch.load` in a process that never imported hf_wb: unpickling imports it and the copy is pinned."""
    model = tiny_model("bert")
    freeze(model, WBConfig(top_layers=2))
    torch.save(model, tmp_path / "model.pt")
    code = (
        "import sys, torch; m = torch.load(sys.argv[1], weights_only=False); m.train(); "
        "print(int(m.bert.embeddings.training), int(m.bert.encoder.layer[0].training), int(m.classifier.training))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "model.pt")], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == ["0", "0", "1"]


def _requires_grad(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_freeze_only_freezes_and_unfreeze_restores_exactly():
    """Failure 3 of issue #10: freeze() first made every parameter trainable, un-freezing what the user froze."""
    model = tiny_model("bert", num_layers=4)
    model.classifier.bias.requires_grad_(False)  # frozen by the user: in the head, which the recipe trains
    model.bert.encoder.layer[3].output.dense.weight.requires_grad_(False)  # in a top block
    before = _requires_grad(model)
    plan = freeze(model, WBConfig(top_layers=2))
    after = _requires_grad(model)
    assert not after["classifier.bias"] and not after["bert.encoder.layer.3.output.dense.weight"]
    assert all(before[n] for n, g in after.items() if g)  # nothing became trainable
    assert set(plan.newly_frozen) == {n for n in before if before[n] and not after[n]}
    unfreeze(model)
    assert _requires_grad(model) == before
    model.train()
    assert all(m.training for m in model.modules()) and not any(_pinned_state(model).values())


def test_freeze_twice_gives_second_recipe_and_keeps_user_frozen():
    model = tiny_model("bert", num_layers=4)
    model.classifier.bias.requires_grad_(False)
    before = _requires_grad(model)
    freeze(model, WBConfig(top_layers=1))
    plan = freeze(model, WBConfig(top_layers=3))
    assert plan.frozen_units == ["embeddings", "block_00"]
    assert model.bert.encoder.layer[1].attention.self.query.weight.requires_grad
    assert not model.classifier.bias.requires_grad
    model.train()
    assert model.bert.encoder.layer[1].training and not model.bert.encoder.layer[0].training
    unfreeze(model, plan)
    assert _requires_grad(model) == before


def test_unfreeze_units_releases_only_what_freeze_froze():
    model = tiny_model("bert", num_layers=4)
    user_frozen = "bert.encoder.layer.1.attention.self.query.weight"
    model.get_parameter(user_frozen).requires_grad_(False)
    freeze(model, WBConfig(top_layers=2))
    lmap = layer_map(model)
    released = unfreeze_units(model, ["block_01"], lmap)
    assert len(released) == len(lmap.params_of("", "block", 1)) - 1
    assert not model.get_parameter(user_frozen).requires_grad
    assert all(p.requires_grad for n, p in model.bert.encoder.layer[1].named_parameters() if "query.weight" not in n)
