"""End-to-end on the tiny model: each method trains, writes results.json + an offline W&B run we read back.

The checks that need no run are in tests/unit/training/test_checks.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lora_exp import inference
from lora_exp.config.schema import typed_config
from lora_exp.data import text as text_data
from lora_exp.errors import TrainingFailure
from lora_exp.training import loop, metrics
from lora_exp.training.job import build_model_for
from tests.helpers import wandb_file
from tests.helpers.processes import cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, reviews: Path) -> dict[str, tuple[Path, dict]]:
    """One finished run per method, W&B offline, sharing a seed (module-scoped: trained once)."""
    from tests.helpers.configs import make_cfg

    out = {}
    root = tmp_path_factory.mktemp("runs")
    for method in ("full", "frozen", "lora"):
        cfg = make_cfg(
            [
                "model=tiny_bert",
                f"data.path={reviews}",
                f"data.cache_dir={root / 'hf'}",
                "logger=wandb",
                f"method={method}",
                "trainer.epochs=6",
                "trainer.batch_size=16",
                "trainer.log_every=2",
                "trainer.device=cpu",
                "optimizer.warmup_ratio=0.0",
                "lora.targets=[q,v,ffn]",
                "optimizer.lr=3e-3",
            ]
        )
        run_dir = root / method
        out[method] = (run_dir, loop.train(cfg, run_dir))
    return out


@pytest.mark.parametrize("method", ["full", "frozen", "lora"])
def test_results_json_is_complete(runs, method: str) -> None:
    run_dir, returned = runs[method]
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["status"] == "ok" and saved["method"] == method
    assert saved["test_acc"] == returned["test_acc"]
    for key in (
        "trainable_params",
        "total_params",
        "trainable_pct",
        "best_val_acc",
        "test_acc",
        "train_seconds",
        "samples_per_s",
        "peak_host_rss_bytes",
        "seed",
        "git_commit",
        "history",
        "wandb_id",
    ):
        assert key in saved, key
    assert saved["peak_vram_bytes"] is None  # CPU: no VRAM figure rather than a wrong one
    assert 0 < saved["padding_efficiency"] <= 1
    assert saved["steps"] == 6 * 8  # 128 examples / 16 per batch * 6 epochs
    assert [h["step"] for h in saved["history"]] == [8, 16, 24, 32, 40, 48]  # validation each epoch
    assert saved["best_val_acc"] == max(h["val_acc"] for h in saved["history"])
    assert (run_dir / "config.yaml").is_file()


def test_majority_baselines_come_from_their_own_splits(runs) -> None:
    """The validation curves' baseline is the validation split's majority share, the test tables' the test's."""
    run_dir, res = runs["lora"]
    splits = text_data.load_splits(inference.run_config(run_dir).data)
    for split, key in (("validation", "majority_baseline_val_acc"), ("test", "majority_baseline_acc")):
        counts = torch.bincount(torch.tensor(splits[split]["label"]))
        assert res[key] == pytest.approx(counts.max().item() / counts.sum().item()), key


def test_validation_baseline_follows_an_unbalanced_validation_split(tiny_cfg, tmp_path: Path, monkeypatch) -> None:
    """Validation kept to 2 rows of class 0 and 6 of class 1 (a source's own split can be skewed): the validation
    baseline is 0.75 while the test baseline stays the test split's."""
    real = text_data.load_splits_counted  # what the job's data step calls

    def skewed(cfg):  # noqa: ANN001, ANN202
        splits, dropped = real(cfg)
        labels = splits["validation"]["label"]
        keep = [i for i, y in enumerate(labels) if y == 0][:2] + [i for i, y in enumerate(labels) if y == 1][:6]
        splits["validation"] = splits["validation"].select(sorted(keep))
        return splits, dropped

    monkeypatch.setattr(text_data, "load_splits_counted", skewed)
    res = loop.train(tiny_cfg("trainer.max_steps=2", "trainer.epochs=1", "save_weights=false"), tmp_path / "run")
    test = real(inference.run_config(tmp_path / "run").data)[0]["test"]
    counts = torch.bincount(torch.tensor(test["label"]))
    assert res["majority_baseline_val_acc"] == 0.75
    assert res["majority_baseline_acc"] == pytest.approx(counts.max().item() / counts.sum().item()) != 0.75


def test_trainable_counts_per_method(runs) -> None:
    full, frozen, lora = (runs[m][1] for m in ("full", "frozen", "lora"))
    head = 32 * 2 + 2  # classifier of tiny BERT (hidden 32, 2 labels)
    per_layer = 8 * (32 + 32) * 2 + 2 * 8 * (32 + 64)  # r=8: q, v, and ffn's two Linears
    assert frozen["trainable_params"] == frozen["head_params"] == head
    assert lora["adapter_params"] == 2 * per_layer and lora["head_params"] == head
    assert lora["trainable_params"] == 2 * per_layer + head
    assert full["trainable_params"] == full["total_params"] == frozen["total_params"]
    assert lora["total_params"] == frozen["total_params"] + lora["adapter_params"]


def test_training_makes_progress(runs) -> None:
    """Full FT solves the toy task (5/5 seeds did at this lr/epochs); every method's logged loss falls
    (a random tiny encoder gives frozen and LoRA little to work with, so their accuracy is not asserted)."""
    assert runs["full"][1]["test_acc"] >= 0.9
    for method in ("full", "frozen", "lora"):
        losses = [
            r["train/loss"]
            for r in wandb_file.history(wandb_file.run_file(runs[method][0] / "wandb"))
            if "train/loss" in r
        ]
        assert sum(losses[-3:]) < sum(losses[:3]), method


@pytest.mark.parametrize("method", ["full", "frozen", "lora"])
def test_wandb_offline_run_holds_the_metrics(runs, method: str) -> None:
    run_dir, res = runs[method]
    f = wandb_file.run_file(run_dir / "wandb")
    assert res["wandb_id"] in f.name
    rows = wandb_file.history(f)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 48 // 2 and all(v > 0 for v in losses)
    assert [r["_step"] for r in rows if "val/acc" in r] == [8, 16, 24, 32, 40, 48]
    summary = wandb_file.summary(f)
    assert summary["test_acc"] == pytest.approx(res["test_acc"])
    assert summary["trainable_params"] == res["trainable_params"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_reload_reproduces_test_accuracy(runs, method: str) -> None:
    run_dir, res = runs[method]
    tokenizer, model = inference.load_trained(run_dir)
    again_tok, again = inference.load_trained(run_dir)
    ids = tokenizer(["good great fun", "bad boring dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, again(**ids).logits)  # two reloads agree
    cfg = inference.run_config(run_dir)
    encoded = text_data.tokenize(text_data.load_splits(cfg.data), tokenizer, cfg.data.max_length)
    loaders = text_data.make_loaders(encoded, tokenizer, 16, 64, True, torch.Generator().manual_seed(0))
    acc = metrics.evaluate(model, loaders.test, torch.device("cpu"), lambda: torch.no_grad())["acc"]
    assert acc == pytest.approx(res["test_acc"])  # head and adapter both came back


def test_adapter_is_small_and_holds_the_head(runs) -> None:
    run_dir, res = runs["lora"]
    meta = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert "classifier.weight" in meta["keys"] and meta["r"] == 8 and meta["num_labels"] == 2
    assert res["weights_bytes"] < runs["full"][1]["weights_bytes"] / 3


def test_nan_loss_stops_the_run(tiny_cfg, tmp_path: Path) -> None:
    cfg = tiny_cfg("method=full", "optimizer.lr=inf", "trainer.max_grad_norm=0", "trainer.log_every=1")
    with pytest.raises(TrainingFailure, match=r"train loss is nan at step \d+") as err:
        loop.train(cfg, tmp_path / "run")
    assert err.value.kind == "nan"


def test_cli_bad_value_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = cli(["lora.r=0", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: lora.r=0 must be an integer >= 1 (and <= min(out, in) of each target)"]
    assert not (tmp_path / "run").exists()  # refused before Hydra creates the run dir


def test_paired_design_same_data_order_across_methods(runs) -> None:
    digests = {m: runs[m][1]["data_order_digest"] for m in ("full", "frozen", "lora")}
    assert len(set(digests.values())) == 1, digests
    assert all(runs[m][1]["sub_seeds"] == runs["full"][1]["sub_seeds"] for m in ("frozen", "lora"))


@pytest.mark.parametrize("method", ["full", "frozen", "lora"])
def test_memory_breakdown_counts_params_grads_and_adam_state(runs, method: str) -> None:
    res = runs[method][1]
    assert res["mem_params_bytes"] == 4 * res["total_params"]  # fp32 master weights
    assert res["mem_grads_bytes"] == 4 * res["trainable_params"]
    assert res["mem_optimizer_bytes"] == 2 * 4 * res["trainable_params"]  # AdamW: exp_avg + exp_avg_sq
    assert res["mem_activations_bytes"] > 0  # measured on any device (saved-tensor hooks)
    assert res["mem_measured_peak_bytes"] is None  # CPU: no allocator peak to compare with


def test_activations_and_predicted_peak_ordered_full_lora_frozen(runs) -> None:
    res = {m: runs[m][1] for m in ("full", "lora", "frozen")}
    for key in ("mem_activations_bytes", "mem_predicted_peak_bytes"):
        assert res["full"][key] > res["lora"][key] > res["frozen"][key] > 0, key


def test_time_split_is_sampled(runs) -> None:
    res = runs["lora"][1]
    assert res["time_sampled_steps"] == 1  # 48 updates, every 25th after step 0
    assert all(res[f"time_{p}_ms"] > 0 for p in ("forward", "backward", "optimizer"))


def test_rerun_reproduces_metrics_on_cpu(runs, tmp_path: Path) -> None:
    run_dir, res = runs["lora"]
    proc = cli(["rerun", str(run_dir), "--out", str(tmp_path / "again")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    for key in ("best_val_acc", "test_acc", "test_loss", "config_hash", "data_order_digest"):
        assert again[key] == res[key], key
    assert [h["val_loss"] for h in again["history"]] == [h["val_loss"] for h in res["history"]]
    assert "identical" in proc.stdout


def test_predict_cli_prints_label_and_probability(runs, tmp_path: Path) -> None:
    run_dir, _ = runs["lora"]
    texts = tmp_path / "texts.txt"
    texts.write_text("good great fun\nbad boring dull\n")
    proc = cli(["predict", f"adapter={run_dir / 'adapter'}", f"file={texts}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert [t for _, _, t in lines] == ["good great fun", "bad boring dull"]
    assert all(label in ("rotten", "fresh") and 0.5 <= float(p) <= 1 for label, p, _ in lines)
    expected = inference.predict(run_dir, ["good great fun", "bad boring dull"])
    assert [(label, round(p, 4)) for label, p in expected] == [(label, float(p)) for label, p, _ in lines]


def test_export_peft_cli_loads_in_peft(runs, tmp_path: Path) -> None:
    from peft import PeftModel

    run_dir, _ = runs["lora"]
    proc = cli(["export-peft", str(run_dir), str(tmp_path / "peft")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]

    from lora_exp.training.rundir import recorded_config

    tokenizer, ours = inference.load_trained(run_dir, merge=False)
    # the same seeded base (tiny random weights) without LoRA: method=frozen builds exactly that
    _, base, _, _ = build_model_for(
        typed_config(OmegaConf.merge(recorded_config(run_dir), {"method": {"name": "frozen"}}))
    )
    ref = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids = tokenizer(["good great fun", "bad boring dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(ref(**ids).logits, ours(**ids).logits, atol=1e-5, rtol=1e-5)
