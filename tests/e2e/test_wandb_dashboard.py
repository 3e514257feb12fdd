"""W&B as the dashboard, read back from the offline run files with wandb's own record schema: the axes and best
summaries a training run declares, its adapter as an artifact with the config, and ``lora-exp report --wandb``
(tables and figures in one ``job_type=report`` run of the sweep's group)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from lora_exp.training import loop
from tests.helpers import wandb_file
from tests.helpers.processes import cli
from tests.helpers.results import write_result


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, reviews: Path) -> tuple[Path, dict]:
    from tests.helpers.configs import make_cfg

    root = tmp_path_factory.mktemp("dash")
    overrides = ["model=tiny_bert", f"data.path={reviews}", f"data.cache_dir={root / 'hf'}", "logger=wandb"]
    overrides += ["trainer.epochs=3", "trainer.batch_size=16", "trainer.device=cpu", "optimizer.lr=3e-3"]
    results = loop.train(make_cfg(overrides), root / "run")
    return root / "run", results


def test_validation_metrics_plot_against_epoch_and_training_time_with_best_summaries(lora_run) -> None:  # noqa: ANN001
    run_dir, res = lora_run
    f = wandb_file.finished_run_file(run_dir / "wandb")
    metrics = {m.name or m.glob_name: m for r in wandb_file.records(f) if (m := r.metric).ByteSize()}
    for name, best in (("acc", "max"), ("f1", "max"), ("auc", "max"), ("loss", "min")):
        for prefix, axis in (("val", "epoch"), ("val_vs_time", "time/train_s")):
            declared = metrics[f"{prefix}/{name}"]
            assert declared.step_metric == axis, (prefix, name)
            assert getattr(declared.summary, best) and not getattr(declared.summary, {"max": "min"}.get(best, "max"))
    rows = [r for r in wandb_file.history(f) if "val/acc" in r]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r[f"val_vs_time/{k}"] == r[f"val/{k}"] for r in rows for k in ("acc", "loss"))
    times = [r["time/train_s"] for r in rows]
    assert times == sorted(times) and times[0] > 0
    summary = wandb_file.summary(f)
    assert summary["val/acc"] == {"max": max(r["val/acc"] for r in rows)} == {"max": res["best_val_acc"]}
    assert summary["val/loss"] == {"min": min(r["val/loss"] for r in rows)}
    assert summary["val_vs_time/acc"] == summary["val/acc"]


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_adapter_is_a_wandb_artifact_with_the_runs_config(lora_run) -> None:  # noqa: ANN001
    run_dir, res = lora_run
    (artifact,) = wandb_file.artifacts(wandb_file.finished_run_file(run_dir / "wandb"))
    assert artifact.name == f"adapter-{res['wandb_id']}" and artifact.type == "model"
    files = sorted((run_dir / "adapter").iterdir())
    contents = sorted(artifact.manifest.contents, key=lambda c: c.path)
    assert [c.path for c in contents] == [p.name for p in files]
    assert [(c.size, c.digest) for c in contents] == [(p.stat().st_size, md5_b64(p)) for p in files]  # these bytes
    meta = json.loads(artifact.metadata)
    config = {k: v for k, v in meta["config"].items() if k != "derived"}
    assert config == OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    assert meta["config"]["derived"]["params"]["trainable"] == res["trainable_params"]
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert meta["adapter"]["base_fingerprint"] == saved["base_fingerprint"] and meta["adapter"]["r"] == saved["r"]


def report_run(out: Path) -> tuple[Path, dict, dict]:
    """The report's run file, its run record and the logged row."""
    f = wandb_file.finished_run_file(out / "wandb")
    run = next(r.run for r in wandb_file.records(f) if r.WhichOneof("record_type") == "run")
    (row,) = wandb_file.history(f)
    return f, run, row


def table(f: Path, row: dict, key: str) -> pd.DataFrame:
    assert row[f"{key}/_type"] == "table-file"
    logged = json.loads(wandb_file.media(f, row, key).read_text())
    return pd.DataFrame(logged["data"], columns=logged["columns"])


def test_report_logs_tables_and_figures_to_one_report_run_in_the_sweeps_group(
    methods_sweep: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "report"
    proc = cli(["report", str(methods_sweep), "--out", str(out), "--wandb"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    f, run, row = report_run(out)
    job = wandb_file.run_file(next(methods_sweep.glob("*/wandb")))
    group = next(r.run for r in wandb_file.records(job) if r.WhichOneof("record_type") == "run").run_group
    assert run.job_type == "report" and run.run_group == group == f"methods-{methods_sweep.name}"
    assert proc.stdout.splitlines()[-1] == (
        f"W&B report run {run.run_id} (offline, project 'lora-exp', group {group!r}); upload with: wandb sync "
        f"{f.parent}"
    )
    summary, logged = pd.read_csv(out / "summary.csv"), table(f, row, "report/summary")
    assert list(logged["config"]) == list(summary["config"]) and len(logged) == 3
    assert list(logged["test_acc"]) == pytest.approx(list(summary["test_acc"]))
    assert list(logged["trainable_params"]) == list(summary["trainable_params"])
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 4
    for png in pngs:
        key = f"figures/{png.stem}"
        assert row[f"{key}/_type"] == "image-file"
        assert row[f"{key}/sha256"] == hashlib.sha256(png.read_bytes()).hexdigest()  # the report's own PNG
        assert wandb_file.media(f, row, key).read_bytes() == png.read_bytes()
    assert not any(k.startswith(("report/fair", "report/paired")) for k in row)  # no lr grid in this sweep


def test_report_of_an_lr_grid_logs_the_fair_and_paired_tables(tmp_path: Path) -> None:
    from lora_exp.analysis import report
    from lora_exp.commands.report import main as _report

    for method, lrs in {"full": (5e-5, 1e-4), "lora": (1e-3, 2e-3)}.items():
        for lr in lrs:
            for seed in (1, 2):
                val = 0.8 + (lr in (1e-4, 2e-3)) / 20
                fields = dict(method=method, lr=lr, seed=seed, best_val_acc=val, test_acc=val - seed / 100)
                fields.update(r=8 if method == "lora" else None, alpha=16 if method == "lora" else None)
                write_result(tmp_path / "runs", f"{method}{lr}s{seed}", **fields)
    assert _report(str(tmp_path / "runs"), "--wandb") == 0
    f, run, row = report_run(tmp_path / "runs" / "report")
    assert run.job_type == "report" and run.run_group == ""  # results without a recorded W&B group
    fair, paired = report.fair_comparison(report.load_runs(tmp_path / "runs"))
    logged = table(f, row, "report/fair")
    assert list(logged["config"]) == list(fair["config"]) and list(logged["lr"]) == [1e-4, 2e-3]  # chosen on val
    assert list(table(f, row, "report/paired")["diff"]) == pytest.approx(list(paired["diff"]))
