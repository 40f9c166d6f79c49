import pytest
import torch
from conftest import ARCHS, stack_sizes, tiny_model

from hf_wb import WBConfig, build_param_groups, freeze, layer_map, lr_multipliers
from hf_wb.param_groups import NO_DECAY_SUFFIX


def _by_name(groups):
    return {g["name"]: g for g in groups}


@pytest.mark.parametrize("arch", ARCHS)
def test_headline_recipe_rates(arch):
    model = tiny_model(arch, num_layers=4)
    config = WBConfig(top_layers=2, top_lr_multiplier=5.0)
    freeze(model, config)
    groups = build_param_groups(model, config, lr=1e-3, weight_decay=0.01)
    lmap = layer_map(model)
    expected_units = []
    for label, n in zip(lmap.stacks, stack_sizes(arch), strict=True):
        prefix = f"{label}/" if label else ""
        expected_units += [f"{prefix}block_{i:02d}" for i in range(n - 2, n)] + [f"{prefix}head"]
    names = {g["name"].removesuffix(NO_DECAY_SUFFIX) for g in groups}
    assert names == {u for u in expected_units if lmap.params_of(*_parse(u, lmap))}
    for g in groups:
        assert g["lr"] == pytest.approx(5e-3)
        assert g["params"], "no empty groups"
        assert all(p.requires_grad for p in g["params"])
    # every trainable param in exactly one group; frozen ones in none
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}


def _parse(unit, lmap):
    stack, _, rest = unit.rpartition("/")
    if rest.startswith("block_"):
        return stack, "block", int(rest[6:])
    return stack, rest, None


def test_layer_decay_and_embeddings_rate_exact():
    model = tiny_model("bert", num_layers=6)
    config = WBConfig(
        top_layers=2,
        top_lr_multiplier=10.0,
        head_lr_multiplier=2.0,
        layer_lr_decay=0.5,
        freeze_layers=0,
        freeze_embeddings=False,
    )
    lrs = {g["name"]: g["lr"] for g in build_param_groups(model, config, lr=1.0)}
    assert lrs["block_05"] == lrs["block_04"] == 10.0
    assert lrs["block_03"] == 0.5 and lrs["block_02"] == 0.25 and lrs["block_01"] == 0.125
    assert lrs["block_00"] == 0.0625
    assert lrs["embeddings"] == 0.03125  # block 0's rate decayed once more
    assert lrs["head"] == 2.0 and lrs["head/no_decay"] == 2.0


def test_head_multiplier_defaults_to_top():
    lmap = layer_map(tiny_model("bert"))
    assert lr_multipliers(lmap, WBConfig(top_lr_multiplier=7.0))["head"] == 7.0


def test_baseline_is_plain_fine_tuning():
    model = tiny_model("bert")
    freeze(model, WBConfig.baseline())
    groups = build_param_groups(model, WBConfig.baseline(), lr=2e-5, weight_decay=0.1)
    assert {g["lr"] for g in groups} == {2e-5}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("arch", ARCHS)
def test_no_weight_decay_on_biases_and_norms(arch):
    model = tiny_model(arch)
    groups = build_param_groups(model, WBConfig.baseline(), lr=1.0, weight_decay=0.1)
    modules = dict(model.named_modules())
    for g in groups:
        for name in g["param_names"]:
            owner = modules[name.rsplit(".", 1)[0]]
            is_norm = "norm" in type(owner).__name__.lower() or "norm" in name.lower() or "ln_" in name
            if "bias" in name or is_norm:  # the Trainer's rule: any name with "bias"
                assert g["weight_decay"] == 0.0, name
                assert g["name"].endswith(NO_DECAY_SUFFIX)
            elif name.endswith("weight") and g["params"][g["param_names"].index(name)].dim() >= 2:
                assert g["weight_decay"] == 0.1, name


def test_groups_work_in_torch_optimizers_and_schedulers():
    from transformers import get_linear_schedule_with_warmup

    model = tiny_model("bert", num_layers=4)
    config = WBConfig(top_layers=2, layer_lr_decay=0.5, freeze_layers=1)
    freeze(model, config)
    groups = build_param_groups(model, config, lr=1e-3, weight_decay=0.01)
    opt = torch.optim.AdamW(groups)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10)
    before = {g["name"]: g["lr"] for g in opt.param_groups}
    assert before == {g["name"]: 0.0 for g in groups}  # warmup starts at 0 for every group
    opt.step()
    sched.step()
    after = {g["name"]: g["lr"] for g in opt.param_groups}
    for g in groups:
        assert after[g["name"]] == pytest.approx(0.5 * 1e-3 * g["lr_multiplier"])
    assert after["block_01"] == pytest.approx(0.5 * 1e-3 * 0.5)
