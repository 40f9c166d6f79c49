"""PEFT composition (issue #10, What to build #3): the recipe sees through `get_peft_model(...)`."""

import pytest
import torch
from conftest import cpu_args, tiny_model
from datasets import Dataset

from hf_wb import WBConfig, WBTrainer, build_param_groups, freeze, is_eval_pinned, layer_map, unfreeze
from hf_wb.heads import find_output_layer

peft = pytest.importorskip("peft")

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
BLOCKS = {"bert": "bert.encoder.layer", "llama": "model.layers"}
HEAD = {"bert": "classifier", "llama": "score"}


def lora_model(arch):
    model = tiny_model(arch, num_layers=4)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=TARGETS[arch])
    return peft.get_peft_model(model, config)


def names(model):
    """Parameter names as the layer map gives them: those of the transformers model inside the PEFT wrapper."""
    return {n.removeprefix("base_model.model."): p for n, p in model.named_parameters()}


def block_of(arch, name):
    prefix = BLOCKS[arch] + "."
    return int(name[len(prefix) :].split(".")[0]) if name.startswith(prefix) else None


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_layer_map_sees_through_peft(arch):
    model = lora_model(arch)
    lmap = layer_map(model)
    assert set(lmap.params) == set(names(model))
    assert [s.module_name for s in lmap.stacks.values()] == [BLOCKS[arch]]
    for name, info in lmap.params.items():
        if "lora_" in name:
            assert (info.role, info.depth) == ("block", block_of(arch, name)), name
        if name.startswith(HEAD[arch] + "."):
            assert info.role == "head", name
    assert find_output_layer(model)[0] == f"{HEAD[arch]}.modules_to_save.default"


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_groups_top_adapters_and_head_frozen_below(arch):
    model = lora_model(arch)
    peft_frozen = {n for n, p in names(model).items() if not p.requires_grad}
    config = WBConfig(top_layers=2)
    freeze(model, config)
    groups = build_param_groups(model, config, lr=1.0)
    in_groups = {n: g["lr"] for g in groups for n in g["param_names"]}
    expected = {
        n: 5.0
        for n in names(model)
        if ("lora_" in n and block_of(arch, n) >= 2) or n.startswith(f"{HEAD[arch]}.modules_to_save.")
    }
    assert in_groups == expected
    params = names(model)
    assert all(not params[n].requires_grad for n in peft_frozen)  # base weights PEFT froze stay frozen
    assert all(not p.requires_grad for n, p in params.items() if "lora_" in n and block_of(arch, n) < 2)
    model.train()
    blocks = model.get_submodule(f"base_model.model.{BLOCKS[arch]}")
    assert is_eval_pinned(blocks[0]) and not blocks[0].training and blocks[3].training


def test_adapters_below_the_top_decay():
    model = lora_model("bert")
    config = WBConfig(top_layers=2, freeze_layers=0, layer_lr_decay=0.5)
    freeze(model, config)
    groups = build_param_groups(model, config, lr=1.0)
    lrs = {n: g["lr"] for g in groups for n in g["param_names"]}
    for name in names(model):
        if "lora_" in name:
            assert lrs[name] == {0: 0.25, 1: 0.5, 2: 5.0, 3: 5.0}[block_of("bert", name)], name
    assert not any("base_layer" in n or "original_module" in n or "embeddings" in n for n in lrs)


def test_unfreeze_keeps_what_peft_froze():
    model = lora_model("bert")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    freeze(model, WBConfig(top_layers=2))
    unfreeze(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_trainer_with_peft_model(arch, tmp_path):
    model = lora_model(arch)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (32, 10), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] > 50).long().tolist()})
    before = {n: p.detach().clone() for n, p in names(model).items()}
    config = WBConfig(top_layers=2, histogram_steps=0, diagnostics=False)
    args = cpu_args(tmp_path / "out", max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2)
    trainer = WBTrainer(model=model, args=args, train_dataset=data, wb_config=config)
    trainer.train()
    group_lrs = {n: g["lr"] / g["lr_multiplier"] for g in trainer.optimizer.param_groups for n in g["param_names"]}
    assert set(group_lrs) == {n for n, p in names(model).items() if p.requires_grad}
    for name, p in names(model).items():
        trains = ("lora_B" in name and block_of(arch, name) >= 2) or name.startswith(f"{HEAD[arch]}.modules_to_save.")
        if not p.requires_grad:
            assert torch.equal(p, before[name]), name
        elif trains:
            assert not torch.equal(p, before[name]), name
    trainer.save_model(str(tmp_path / "saved"))
    saved = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "hf_wb_config.json"} <= saved
    assert "model.safetensors" not in saved
    reloaded = peft.PeftModel.from_pretrained(tiny_model(arch, num_layers=4), str(tmp_path / "saved"))
    for name, p in names(reloaded).items():
        if "lora_" in name or "modules_to_save" in name:
            torch.testing.assert_close(p, names(model)[name], msg=name)


def test_head_recipe_writes_the_copy_that_trains():
    """modules_to_save keeps a frozen `original_module` beside the trained copy: the bias prior goes to the copy."""
    from hf_wb.heads import apply_head_recipe

    model = lora_model("bert")
    original = model.base_model.model.classifier.original_module.bias.detach().clone()
    apply_head_recipe(model, WBConfig(bias_prior=True), [0, 0, 0, 1])
    trained = model.base_model.model.classifier.modules_to_save["default"].bias
    torch.testing.assert_close(trained[1] - trained[0], torch.log(torch.tensor(1 / 3)))
    assert torch.equal(model.base_model.model.classifier.original_module.bias, original)
