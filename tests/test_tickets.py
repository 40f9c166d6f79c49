"""Winning tickets: which weights are pruned, exact magnitude masks, masks that hold through training and resume,
IMP with rewind end to end, and a ticket that reloads onto the pre-trained model with the same sparsity."""

import json
from pathlib import Path

import pytest
import torch
from conftest import cpu_args, tiny_model
from test_trainer import make_dataset
from torch import nn
from transformers import TrainerCallback

from hf_wb import WBConfig, WBTrainer
from hf_wb.tickets import (
    apply_masks,
    current_masks,
    find_ticket,
    load_masks,
    load_ticket,
    magnitude_masks,
    make_permanent,
    prunable_modules,
    sparsity,
)

QUIET = dict(histogram_steps=0, diagnostics=False, bias_prior=False)
CONFIG = WBConfig(top_layers=2, **QUIET)


def _model(seed=0):
    return tiny_model("bert", 4, seed=seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_prunable_modules_are_the_trained_blocks_matrices():
    model = _model()
    names = list(prunable_modules(model, CONFIG))
    assert names and all(n.startswith(("bert.encoder.layer.2.", "bert.encoder.layer.3.")) for n in names)
    assert "bert.encoder.layer.3.attention.self.query" in names and "bert.encoder.layer.3.output.dense" in names
    assert not any("LayerNorm" in n or "embeddings" in n or "classifier" in n for n in names)
    with_head = prunable_modules(model, CONFIG, include_head=True)
    assert set(with_head) - set(names) == {"bert.pooler.dense", "classifier"}


def test_magnitude_masks_prune_exactly_the_smallest_survivors():
    a, b = nn.Linear(4, 3), nn.Linear(2, 5)
    with torch.no_grad():
        a.weight.copy_(torch.arange(1.0, 13.0).view(3, 4))
        b.weight.copy_(-torch.arange(0.5, 10.5).view(5, 2))  # magnitudes 0.5 .. 9.5
    modules = {"a": a, "b": b}
    first = magnitude_masks(modules, 0.25)  # 22 weights -> 6 pruned globally: 0.5, 1, 1.5, 2, 2.5, 3
    assert int(sum((~m).sum() for m in first.values())) == 6
    assert (~first["a"]).sum() == 3 and (~first["b"]).sum() == 3
    assert first["a"].flatten()[:3].tolist() == [False] * 3 and first["b"].flatten()[:3].tolist() == [False] * 3
    apply_masks(nn.ModuleDict(modules), first)
    second = magnitude_masks(modules, 0.5)  # half of the 16 survivors; the 6 dead stay dead
    assert sparsity(second)["total"] == pytest.approx(14 / 22)
    assert all(((~first[n]) <= (~second[n])).all() for n in modules)
    per_layer = magnitude_masks({"a": nn.Linear(4, 3), "b": nn.Linear(2, 5)}, 0.5, scope="layer")
    assert (~per_layer["a"]).sum() == 6 and (~per_layer["b"]).sum() == 5
    with pytest.raises(ValueError, match="`rate` must be in"):
        magnitude_masks(modules, 1.0)


def _trainer(tmp_path, model, **args):
    defaults = dict(max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2, weight_decay=0.1)
    return WBTrainer(
        model=model,
        args=cpu_args(tmp_path / "out", **{**defaults, **args}),
        train_dataset=make_dataset(96),
        eval_dataset=make_dataset(32, seed=1),
        wb_config=CONFIG,
    )


def _half_masks(model):
    modules = prunable_modules(model, CONFIG)
    return magnitude_masks(modules, 0.5)


def test_masks_hold_through_training_with_adamw_and_weight_decay(tmp_path):
    model = _model()
    masks = _half_masks(model)
    apply_masks(model, masks)
    modules = prunable_modules(model, CONFIG)
    before = {n: m.weight.detach().clone() for n, m in modules.items()}
    _trainer(tmp_path, model).train()
    for name, module in modules.items():
        weight = module.weight.detach()
        assert torch.equal(module.weight_mask.bool(), masks[name]), name  # the mask itself is not trained
        assert (weight[~masks[name]] == 0).all(), name  # no update leaks into a pruned weight
        assert not torch.equal(weight[masks[name]], before[name][masks[name]]), name  # the survivors trained


def test_masked_resume_continues_exactly(tmp_path):
    args = dict(max_steps=6, save_strategy="steps", save_steps=3)
    model = _model()
    masks = _half_masks(model)
    apply_masks(model, masks)
    full = _trainer(tmp_path, model, **args)
    full.train()
    ckpt = Path(full.args.output_dir) / "checkpoint-3"
    other = _model(seed=5)
    apply_masks(other, masks)
    resumed = _trainer(tmp_path, other, **args)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
    dense = _trainer(tmp_path, _model(seed=5), **args)  # the ticket not applied: refused, not silently dense
    with pytest.raises(ValueError, match="it holds pruning masks for 12 modules but this model has masks on 0"):
        dense.train(resume_from_checkpoint=str(ckpt))


def test_find_ticket_rewinds_prunes_and_reloads(tmp_path):
    starts = []

    def model_init():
        return _model()

    def make_trainer(model):
        starts.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return _trainer(tmp_path / f"r{len(starts)}", model)

    history = find_ticket(model_init, make_trainer, rounds=2, rate=0.5, output_dir=tmp_path / "ticket")
    assert [round(h.sparsity, 3) for h in history] == [0.0, 0.5, 0.75]
    assert all("eval_loss" in h.metrics for h in history)
    # rewind: every round starts from the same weights (pruned ones are multiplied by the mask in forward)
    for name, value in starts[2].items():
        torch.testing.assert_close(value, starts[0][name.removesuffix("_orig")], msg=name)
    info = json.loads((tmp_path / "ticket" / "hf_wb_ticket.json").read_text())
    assert info["sparsity"]["total"] == pytest.approx(0.75, abs=1e-3) and len(info["history"]) == 3
    assert (tmp_path / "ticket" / "round_1" / "hf_wb_ticket.safetensors").is_file()

    # loadable onto the pre-trained model, with the same sparsity; and as a plain transformers model after folding
    fresh = load_ticket(_model(), tmp_path / "ticket")
    got = sparsity(current_masks(prunable_modules(fresh, CONFIG)))
    assert got["total"] == pytest.approx(info["sparsity"]["total"])
    make_permanent(fresh)
    fresh.save_pretrained(tmp_path / "pruned_model")
    reloaded = type(fresh).from_pretrained(tmp_path / "pruned_model")
    masks = load_masks(tmp_path / "ticket")
    zeros = sum(int((dict(reloaded.named_modules())[n].weight[~m] == 0).sum()) for n, m in masks.items())
    assert zeros == sum(int((~m).sum()) for m in masks.values())


def test_late_rewind_starts_rounds_from_step_k(tmp_path):
    at_begin, at_step_2 = [], []

    def snapshot(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    class Spy(TrainerCallback):
        def __init__(self, model):
            self.model = model

        def on_train_begin(self, args, state, control, **kwargs):
            at_begin.append(snapshot(self.model))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                at_step_2.append(snapshot(self.model))

    def make_trainer(model):
        trainer = _trainer(tmp_path / f"r{len(at_begin)}", model)
        trainer.add_callback(Spy(model))
        return trainer

    find_ticket(_model, make_trainer, rounds=1, rate=0.3, output_dir=tmp_path / "t", rewind_step=2)
    norm = "bert.encoder.layer.3.output.LayerNorm.weight"  # trainable, never pruned
    assert not torch.equal(at_step_2[0][norm], at_begin[0][norm])
    torch.testing.assert_close(at_begin[1][norm], at_step_2[0][norm])
    query = "bert.encoder.layer.3.attention.self.query.weight"  # pruned in round 1: its survivors rewound too
    torch.testing.assert_close(at_begin[1][query + "_orig"], at_step_2[0][query])


def test_recipes_that_rewrite_pruned_weights_are_refused(tmp_path):
    config = WBConfig(top_layers=2, reinit_top_layers=1, **QUIET)

    def make_trainer(model):
        return WBTrainer(model=model, args=cpu_args(tmp_path), train_dataset=make_dataset(16), wb_config=config)

    with pytest.raises(ValueError, match="`reinit_top_layers`=1 re-initialises the blocks a ticket prunes"):
        find_ticket(_model, make_trainer, rounds=1, rate=0.5, output_dir=tmp_path / "t")


def test_masks_from_another_model_are_refused():
    masks = _half_masks(_model())
    smaller = tiny_model("bert", 4, hidden_size=48, num_attention_heads=2, intermediate_size=64)
    with pytest.raises(ValueError, match="the ticket was found on another model"):
        apply_masks(smaller, masks)


@pytest.mark.parametrize("where", ["disk", "memory", "memory-unshared"])
def test_rounds_reuse_the_prefix_cache(tmp_path, where):
    folder = {"cache_dir": str(tmp_path / "cache")} if where == "disk" else {}
    config = WBConfig(top_layers=2, cache_frozen_prefix="on", **folder, **QUIET)
    calls = []

    def make_trainer(model):
        model.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda *a: calls[-1].append(1))
        calls.append([])
        return WBTrainer(
            model=model,
            args=cpu_args(tmp_path / f"r{len(calls)}", max_steps=4, per_device_train_batch_size=8),
            train_dataset=make_dataset(32).map(lambda row: {"attention_mask": [1] * len(row["input_ids"])}),
            wb_config=config,
        )

    shared = where != "memory-unshared"
    history = find_ticket(
        _model, make_trainer, rounds=2, rate=0.5, output_dir=tmp_path / "t", share_prefix_cache=shared
    )
    assert len(calls[0]) > 0  # round 0 builds the cache of the frozen blocks' output
    if shared:
        assert calls[1] == [] and calls[2] == []  # the pruned rounds never run the frozen blocks
        assert [h.prefix_cache for h in history] == ["fill", "reuse", "reuse"]
    else:
        assert len(calls[1]) > 0 and len(calls[2]) > 0  # each round builds its own cache
        assert [h.prefix_cache for h in history] == ["fill", "fill", "fill"]
    assert all(h.cpu_seconds > 0 and h.wall_seconds > 0 for h in history)
    recorded = json.loads((tmp_path / "t" / "hf_wb_ticket.json").read_text())["history"]
    assert [h["prefix_cache"] for h in recorded] == [h.prefix_cache for h in history]
