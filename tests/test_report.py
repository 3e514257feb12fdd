"""The report: one row per configuration with the right counts, readable figures, failures listed; the notebook."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from lora_exp import models, report
from lora_exp.cli import CONF_DIR

from .conftest import make_cfg
from .test_sweeps import methods_sweep  # noqa: F401  (module fixture: one tiny sweep)


@pytest.fixture(scope="module")
def written(methods_sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    return report.write_report(methods_sweep, tmp_path_factory.mktemp("report"))


def test_summary_rows_and_counts_match_the_models(written: dict[str, Path]) -> None:
    import pandas as pd

    summary = pd.read_csv(written["summary.csv"])
    assert sorted(summary["method"]) == ["frozen", "full", "lora"]
    for method in ("full", "frozen", "lora"):
        cfg = make_cfg(["model=tiny_bert", f"method={method}"])
        _, model, head = models.build(cfg.model, 2)
        models.apply_method(model, method, head, cfg.lora)
        expected = models.count_parameters(model, head)["trainable"]
        assert summary.loc[summary.method == method, "trainable_params"].item() == expected
    assert summary["test_acc"].between(0, 1).all()


def test_markdown_table(written: dict[str, Path]) -> None:
    md = written["summary.md"].read_text()
    assert md.startswith("| config")
    assert md.count("\n|") == 4  # header rule + 3 configurations
    assert "n/a (CPU)" in md


@pytest.mark.parametrize("name", ["accuracy_vs_params.png", "memory.png", "validation_curves.png"])
def test_figures_are_non_trivial_images(written: dict[str, Path], name: str) -> None:
    img = mpimg.imread(written[name])
    assert img.shape[0] > 300 and img.shape[1] > 500
    assert img[..., :3].std() > 0.05  # not a blank canvas


def _result(tmp: Path, name: str, **fields) -> None:
    base = {
        "status": "ok",
        "method": "lora",
        "targets": "q+v",
        "rslora": False,
        "lr": 1e-3,
        "seed": 1,
        "trainable_params": 100,
        "trainable_pct": 1.0,
        "peak_vram_bytes": None,
        "peak_host_rss_bytes": 2**30,
        "train_seconds": 10.0,
        "samples_per_s": 5.0,
        "best_val_acc": 0.8,
        "test_acc": 0.8,
        "history": [],
    }
    (tmp / name).mkdir(parents=True)
    (tmp / name / "results.json").write_text(json.dumps({**base, **fields}))


def test_seeds_give_mean_and_ci_and_rank_figures(tmp_path: Path) -> None:
    for r in (2, 4):
        for alpha in (r, 2 * r, 16):
            for seed, acc in ((1, 0.80), (2, 0.82), (3, 0.84)):
                _result(tmp_path, f"r{r}a{alpha}s{seed}", r=r, alpha=alpha, seed=seed, test_acc=acc + r / 100)
    _result(tmp_path, "broken", status="failed", failure="nan", reason="train loss is nan at step 7", r=4, alpha=4)
    written = report.write_report(tmp_path)
    summary = report.summarize(report.load_runs(tmp_path))
    assert len(summary) == 6 and (summary["seeds"] == 3).all()
    row = summary[(summary.r == 4) & (summary.alpha == 16)].iloc[0]
    assert row.test_acc == pytest.approx(0.86)
    assert row.test_acc_ci95 == pytest.approx(4.303 * 0.02 / 3**0.5, rel=1e-3)  # t(0.975, 2) * sd / sqrt(n)
    assert "accuracy_vs_rank.png" in written and "rank_alpha_heatmap.png" in written
    md = written["summary.md"].read_text()
    assert "± 0.0497" in md
    assert "Failed jobs:" in md and "train loss is nan at step 7" in md


def test_empty_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no results.json under"):
        report.load_runs(tmp_path)


def test_notebook_executes_on_a_sweep(methods_sweep: Path, tmp_path: Path) -> None:  # noqa: F811
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(Path(CONF_DIR).parent / "notebooks" / "analysis.ipynb", as_version=4)
    os.environ.update(LORA_EXP_RUNS=str(methods_sweep), LORA_EXP_REPORT_OUT=str(tmp_path / "nb_report"))
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        os.environ.pop("LORA_EXP_RUNS")
        os.environ.pop("LORA_EXP_REPORT_OUT")
    records = json.loads(nb.cells[-1].outputs[0]["text"])
    assert sorted(r["method"] for r in records) == ["frozen", "full", "lora"]
    assert all(r["trainable_params"] > 0 for r in records)
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3
    assert (tmp_path / "nb_report" / "summary.csv").is_file()


def test_fair_protocol_picks_lr_on_validation_and_pairs_seeds(tmp_path: Path) -> None:
    # full: lr 1e-4 wins on validation although 5e-5 has the better test accuracy (no peeking at test).
    grid = {"full": {5e-5: (0.80, 0.90), 1e-4: (0.85, 0.80)}, "lora": {1e-3: (0.70, 0.70), 2e-3: (0.84, 0.82)}}
    for method, lrs in grid.items():
        for lr, (val, test) in lrs.items():
            for seed in (1, 2, 3):
                _result(
                    tmp_path,
                    f"{method}{lr}s{seed}",
                    method=method,
                    lr=lr,
                    seed=seed,
                    best_val_acc=val,
                    test_acc=test + seed / 100,
                    r=8 if method == "lora" else None,
                    alpha=16 if method == "lora" else None,
                    targets="q+v" if method == "lora" else None,
                    adapter_params=10,
                    head_params=5,
                    other_trainable_params=0,
                )
    table, paired = report.fair_comparison(report.load_runs(tmp_path))
    chosen = dict(zip(table.method, table.lr))
    assert chosen == {"full": 1e-4, "lora": 2e-3}
    assert table.set_index("method").loc["full", "test_acc"] == pytest.approx(0.82)
    assert paired.iloc[0]["diff_vs_full"] == pytest.approx(0.02)  # 0.82+s - (0.80+s) on each seed
    assert paired.iloc[0]["diff_ci95"] == pytest.approx(0.0, abs=1e-12)
    md = report.fair_markdown(table, paired)
    assert "Paired difference to full fine-tuning" in md and "+0.0200" in md
