"""The new variants end to end on the tiny model: ``+preset=<name>`` composes, a short run trains and records
the variant, and a run interrupted mid-way resumes to exactly the straight run's weights and metrics (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_exp.training.loop import train
from tests.helpers.interrupts import train_until_update

NEW_VARIANTS = ["lora_fa", "vera", "adalora"]  # eva, lora_ga: test_data_init_runs_once_...
H, LAYERS, R = 32, 2, 8  # tiny_bert, the presets' r on q,v


def run(tiny_cfg, variant: str, run_dir: Path, die_at: int | None = None, resume: bool = False, *extra: str) -> dict:
    cfg = tiny_cfg(
        f"+preset={variant}", "trainer.max_steps=6", "trainer.checkpoint_every=1", "lora.dropout=0.1", *extra
    )
    if die_at is None:
        return train(cfg, run_dir, resume=resume)
    train_until_update(cfg, run_dir, die_at)
    return {}


@pytest.mark.parametrize("variant", NEW_VARIANTS)
def test_run_records_variant_and_resumes_exactly(variant: str, tiny_cfg, tmp_path: Path) -> None:
    straight = run(tiny_cfg, variant, tmp_path / "straight")
    assert straight["status"] == "ok" and straight["variant"] == variant and straight["steps"] == 6
    run(tiny_cfg, variant, tmp_path / "resumed", die_at=4)
    assert (tmp_path / "resumed" / "checkpoint").is_dir()
    resumed = run(tiny_cfg, variant, tmp_path / "resumed", resume=True)
    assert resumed["resumed"] is True
    for key in ("best_val_acc", "best_step", "test_acc", "test_loss", "steps", "config_hash"):
        assert resumed[key] == straight[key], key
    wa, wb = (load_file(str(tmp_path / d / "adapter" / "adapter.safetensors")) for d in ("resumed", "straight"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_fa_run_trains_b_only(tiny_cfg, tmp_path: Path) -> None:
    """B only: adapter count r x out per layer; Adam state for B and the head alone; A saved, as initialised."""
    res = run(tiny_cfg, "lora_fa", tmp_path / "fa")
    assert res["adapter_params"] == LAYERS * 2 * R * H  # q, v: out = hidden
    assert res["mem_optimizer_bytes"] == 2 * 4 * res["trainable_params"]  # exp_avg + exp_avg_sq, fp32
    saved = load_file(str(tmp_path / "fa" / "adapter" / "adapter.safetensors"))
    a_keys = [k for k in saved if ".lora_A." in k]
    assert len(a_keys) == LAYERS * 2 and all(saved[k].shape == (R, H) for k in a_keys)


def test_vera_run_counts_vectors(tiny_cfg, tmp_path: Path) -> None:
    """VeRA at the preset's r=256 on q, v: (r + out) trained per layer; the adapter holds the shared pair once."""
    res = run(tiny_cfg, "vera", tmp_path / "vera")
    assert res["adapter_params"] == res["vera_vector_params"] == LAYERS * 2 * (256 + H)
    saved = load_file(str(tmp_path / "vera" / "adapter" / "adapter.safetensors"))
    shapes = {k.rpartition(".")[2]: tuple(v.shape) for k, v in saved.items() if k.endswith((".vera_A", ".vera_B"))}
    assert shapes == {"vera_A": (256, H), "vera_B": (H, 256)}


@pytest.mark.parametrize(("init", "computes"), [("eva", "eva_components"), ("lora_ga", "estimate_gradients")])
def test_data_init_runs_once_records_its_cost_and_keeps_the_data_order(
    init: str, computes: str, tiny_cfg, tmp_path: Path, monkeypatch
) -> None:
    """EVA / LoRA-GA: batches, tokens, seconds, ranks in results.json, init/ saved; a resume restores it without
    computing it again; the training data order equals plain LoRA's (paired design); a reload rebuilds the
    layers (EVA's ranks, LoRA-GA's residual W0) and reproduces the test loss."""
    import importlib

    from lora_exp.adapters.targets import lora_layers
    from lora_exp.data import text as text_data
    from lora_exp.inference import load_trained, run_config
    from lora_exp.training import metrics

    fast = ("lora.eva.tau=0.9", "trainer.precision=fp32")  # EVA: fewer batches on this tiny corpus
    lora = run(tiny_cfg, "lora", tmp_path / "lora", None, False, *fast)
    straight = run(tiny_cfg, init, tmp_path / init, None, False, *fast)
    rec = straight["data_init"]
    assert rec["init"] == init and rec["batches"] >= 3 and rec["tokens"] > 0 and rec["seconds"] > 0
    assert rec["restored"] is False and sum(rec["ranks"].values()) == LAYERS * 2 * R
    assert straight["data_init_seconds"] == rec["seconds"] and straight["variant"] == init
    assert straight["data_order_digest"] == lora["data_order_digest"]
    assert (tmp_path / init / "init" / "init.safetensors").is_file()
    run(tiny_cfg, init, tmp_path / "resumed", 4, False, *fast)

    def no_rerun(*_: object, **__: object) -> None:
        raise AssertionError(f"{init} ran again on resume")

    monkeypatch.setattr(importlib.import_module(f"lora_exp.adapters.{init}"), computes, no_rerun)
    resumed = run(tiny_cfg, init, tmp_path / "resumed", None, True, *fast)
    assert resumed["data_init"]["restored"] is True and resumed["test_loss"] == straight["test_loss"]
    wa, wb = (load_file(str(tmp_path / d / "adapter" / "adapter.safetensors")) for d in ("resumed", init))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    tokenizer, model = load_trained(tmp_path / init, merge=False)
    assert {n: m.r for n, m in lora_layers(model)} == {n: r for n, r in rec["ranks"].items() if r}
    cfg = run_config(tmp_path / init)
    encoded = text_data.tokenize(text_data.load_splits(cfg.data), tokenizer, cfg.data.max_length)
    loaders = text_data.make_loaders(encoded, tokenizer, 16, cfg.trainer.eval_batch_size, True, torch.Generator())
    loss = metrics.evaluate(model, loaders.test, torch.device("cpu"), torch.no_grad)["loss"]
    assert loss == pytest.approx(straight["test_loss"], rel=1e-5)


def test_eva_with_the_feature_cache(tiny_cfg, tmp_path: Path) -> None:
    """LoRA on the top block only: EVA runs on the full model first, then the frozen bottom is cached."""
    res = run(tiny_cfg, "eva", tmp_path / "eva_top", None, False, "lora.layers=[1]", "lora.eva.tau=0.9")
    assert res["status"] == "ok" and res["feature_cache"] is True and res["lora_layers"] == 2


def test_adalora_run_records_ranks_and_the_report_draws_them(tiny_cfg, tmp_path: Path) -> None:
    """AdaLoRA from r=12 to an average of 8 on q, v: the final ranks (in results.json) meet the budget, the
    adapter counts r x (in + out + 1) per layer, and the report draws the ranks."""
    from lora_exp.analysis import report
    from lora_exp.analysis.variant_figures import adalora_rank_table

    res = run(tiny_cfg, "adalora", tmp_path / "runs" / "ada")
    ranks = res["adalora_ranks"]
    assert len(ranks) == LAYERS * 2 and sum(ranks.values()) == 8 * LAYERS * 2 and all(r <= 12 for r in ranks.values())
    assert res["adapter_params"] == LAYERS * 2 * 12 * (H + H + 1) and res["adalora_e_params"] == LAYERS * 2 * 12
    written = report.write_report(tmp_path / "runs", tmp_path / "report")
    assert "adalora_ranks.png" in written and written["adalora_ranks.png"].stat().st_size > 0
    runs = report.load_runs(tmp_path / "runs").assign(config="adalora")
    assert adalora_rank_table(runs).to_dict("records")[0] == {
        f"{i}.{m}": ranks[f"bert.encoder.layer.{i}.attention.self.{m}"]
        for i in range(LAYERS)
        for m in ("query", "value")
    }
