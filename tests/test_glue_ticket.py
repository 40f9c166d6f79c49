"""`hf-wb ticket` (hf_wb.glue.ticket) end to end on real MRPC rows and a 4-block hidden-32 BERT: the files it writes,
the ticket's sparsity, reloading the masks and the saved model, `inspect` and `report` of what it wrote, and its
argument errors."""

from __future__ import annotations

import json

import pytest
from conftest import REPO
from test_tune import tiny_model_dir  # noqa: F401  (a fixture)

from hf_wb.cli import main


def ticket_argv(out, model_dir, glue_dir, *extra):
    return [
        "ticket", str(REPO / "configs" / "glue" / "mrpc.yaml"), "--rounds", "2", "--rate", "0.5",
        "--output-dir", str(out),
        "--model_name_or_path", str(model_dir), "--data_dir", str(glue_dir),
        "--max_train_samples", "40", "--max_eval_samples", "20", "--per_device_train_batch_size", "16",
        "--num_train_epochs", "1", "--histogram_steps", "1", "--no_diagnostics", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ticket_run(tmp_path_factory, tiny_model_dir):  # noqa: F811
    from conftest import GLUE_DIR

    if not (GLUE_DIR / "MRPC" / "train.tsv").exists():
        pytest.skip(f"GLUE data not found at {GLUE_DIR} (set GLUE_DIR)")
    import contextlib
    import io

    out = tmp_path_factory.mktemp("ticket") / "mrpc-ticket"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(ticket_argv(out, tiny_model_dir, GLUE_DIR)) == 0
    return out, printed.getvalue()


def test_ticket_writes_rounds_ticket_model_and_records(ticket_run):
    out, printed = ticket_run
    written = ["hf_wb_ticket.safetensors", "hf_wb_ticket.json", "model.safetensors", "config.json", "tokenizer.json"]
    written += ["hf_wb_config.json", "hf_wb_summary.json", "rounds.jsonl", "results.json"]
    for name in written:
        assert (out / name).is_file(), name
    for r in range(3):
        assert (out / f"round_{r}" / "hf_wb_ticket.safetensors").is_file()
        assert (out / f"round_{r}" / "hf_wb_summary.json").is_file()  # the round's trainer wrote there
    assert not list(out.rglob("checkpoint-*"))  # no checkpoints per round
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["sparsity"] for r in rounds] == pytest.approx([0.0, 0.5, 0.75], abs=1e-3)
    assert [r["prefix_cache"] for r in rounds] == ["fill", "reuse", "reuse"]  # mrpc.yaml: cache_frozen_prefix auto
    for r in rounds:
        # 20 dev rows: accuracy and F1 on them, the score their mean x100
        assert r["dev_score"] == pytest.approx(50 * (r["metrics"]["eval_accuracy"] + r["metrics"]["eval_f1"]))
        assert r["metrics"]["eval_samples_per_second"] > 0 and r["cpu_seconds"] > 0
        assert len(r["layer_sparsity"]) == 18  # 6 matrices in each of the 3 blocks mrpc.yaml trains
    results = json.loads((out / "results.json").read_text())
    assert results["sparsity"] == pytest.approx(0.75, abs=1e-3) and results["history"] == rounds
    assert results["train_rows"] == 40 and results["dev_rows"] == {"validation": 20}
    # the table printed as rounds finish
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["round", "sparsity", "dev"])
    assert [line.split()[:2] for line in lines[header + 1 : header + 4]] == [["0", "0.0%"], ["1", "50.0%"],
                                                                            ["2", "75.0%"]]  # fmt: skip
    assert lines[header + 2].split()[-1] == "reuse"
    assert f"ticket after 2 rounds: sparsity 75.0%, dev {results['dev_score']:.2f}" in printed


def test_ticket_reloads_with_its_sparsity_and_the_model_keeps_its_zeros(ticket_run, tiny_model_dir):  # noqa: F811
    from transformers import AutoModelForSequenceClassification

    from hf_wb.config import WBConfig
    from hf_wb.tickets import current_masks, load_masks, load_ticket, prunable_modules, sparsity

    out, _ = ticket_run
    recipe = WBConfig.from_pretrained(out)
    round_1 = json.loads((out / "round_1" / "hf_wb_ticket.json").read_text())
    assert round_1["sparsity"]["total"] == pytest.approx(0.5, abs=1e-3)  # round 1 = the rate
    for folder, expected in ((out / "round_1", 0.5), (out, 0.75)):
        fresh = load_ticket(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir), folder)
        assert sparsity(current_masks(prunable_modules(fresh, recipe)))["total"] == pytest.approx(expected, abs=1e-3)

    # the saved model: plain weights (masks folded in), zero exactly where the ticket prunes
    saved = AutoModelForSequenceClassification.from_pretrained(out)
    modules = dict(saved.named_modules())
    masks = load_masks(out)
    assert not any(hasattr(modules[n], "weight_mask") for n in masks)
    assert all(bool((modules[n].weight[~m] == 0).all()) for n, m in masks.items())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == round(0.75 * sum(m.numel() for m in masks.values()))
    # the trained weights it keeps are not the pre-trained ones (the last round trained)
    start = dict(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).named_modules())
    name, mask = next(iter(masks.items()))
    assert not bool((modules[name].weight[mask] == start[name].weight[mask]).all())


def test_inspect_and_report_show_the_sparsity(ticket_run, tiny_model_dir, capsys):  # noqa: F811
    out, _ = ticket_run
    # the ticket folder: its own model, recipe and masks, found without --ticket
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].endswith(f"ticket from {out} (75.0% sparsity)")
    assert lines[1].split()[-1] == "sparsity"
    rows = {line.split()[0]: line.split() for line in lines[3:] if line}
    for unit in ("block_01", "block_02", "block_03"):
        assert rows[unit][-1].endswith("%") and 65 < float(rows[unit][-1][:-1]) < 85, rows[unit]
    for unit in ("embeddings", "block_00", "head"):
        assert not rows[unit][-1].endswith("%"), rows[unit]  # no masks: blank
    assert lines[-1].startswith("ticket: ") and "(75.0% sparsity)" in lines[-1]
    # --ticket on the pre-trained model
    assert main(["inspect", str(tiny_model_dir), "--ticket", str(out / "round_1")]) == 0
    assert "(50.0% sparsity)" in capsys.readouterr().out.splitlines()[0]

    # the report of a round: the sparsity from its run summary, per unit
    from hf_wb.report import build_figure, load_run
    from hf_wb.report import main as report_main

    data = load_run(out / "round_2")
    assert set(data.sparsity) == {"block_01", "block_02", "block_03"} and data.sparsity_total == pytest.approx(0.75)
    titles = [ax.get_title(loc="left") for ax in build_figure(data).axes]
    assert "pruned per unit (ticket, 75.0% overall)" in titles
    assert report_main([str(out / "round_2"), "--output", str(out.parent / "r2.png")]) == 0
    assert "Ticket sparsity 75.0% (block_01 " in capsys.readouterr().out
    # round 0 trained dense: no panel
    titles = [ax.get_title(loc="left") for ax in build_figure(load_run(out / "round_0")).axes]
    assert not any(t.startswith("pruned per unit") for t in titles)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rounds", "0", "--rate", "0.2"], "--rounds must be >= 1"),
        (["--rounds", "2", "--rate", "1"], r"--rate must be in \(0, 1\)"),
        (["--rounds", "2", "--rate", "0"], r"--rate must be in \(0, 1\)"),
        (["--rounds", "2", "--rate", "0.2", "--rewind-step", "-1"], "--rewind-step must be >= 0"),
    ],
)
def test_argument_errors(extra, message):
    with pytest.raises(SystemExit, match=message):
        main(["ticket", str(REPO / "configs" / "glue" / "mrpc.yaml"), *extra])


def test_ticket_glue_checks_its_arguments_too(tmp_path):
    from hf_wb.glue.ticket import ticket_glue

    with pytest.raises(ValueError, match="`rounds` must be >= 1, got 0"):
        ticket_glue(None, tmp_path, rounds=0, rate=0.2)
    with pytest.raises(ValueError, match=r"`rate` must be in \(0, 1\)"):
        ticket_glue(None, tmp_path, rounds=1, rate=1.5)
