import pytest
import torch
from conftest import ARCHS, tiny_model

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


def test_deepcopy_and_state_dict_unaffected():
    import copy

    model = tiny_model("bert")
    keys = set(model.state_dict())
    freeze(model, WBConfig(top_layers=2))
    assert set(model.state_dict()) == keys
    clone = copy.deepcopy(model)
    clone.train()
    assert not clone.bert.embeddings.training and clone.classifier.training
