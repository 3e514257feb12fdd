"""The report on a real tiny sweep (one row per configuration, readable figures), the notebook executed on it and
through the README's nbconvert command, two tiny models on two corpora, the report CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from lora_exp.analysis import report
from lora_exp.cli import CONF_DIR
from lora_exp.config.schema import typed_config
from lora_exp.models import methods as model_methods
from lora_exp.models import text as text_models
from tests.helpers.configs import make_cfg, write_reviews
from tests.helpers.results import write_result


@pytest.fixture(scope="module")
def written(methods_sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    return report.write_report(methods_sweep, tmp_path_factory.mktemp("report"))


def test_summary_rows_and_counts_match_the_models(written: dict[str, Path]) -> None:
    import pandas as pd

    summary = pd.read_csv(written["summary.csv"])
    assert sorted(summary["method"]) == ["frozen", "full", "lora"]
    for method in ("full", "frozen", "lora"):
        cfg = typed_config(make_cfg(["model=tiny_bert", f"method={method}"]))
        _, model, head = text_models.build(cfg.model, 2)
        model_methods.apply_method(model, method, head, cfg.lora)
        expected = model_methods.count_parameters(model, head)["trainable"]
        assert summary.loc[summary.method == method, "trainable_params"].item() == expected
    assert summary["test_acc"].between(0, 1).all()


def test_markdown_table(written: dict[str, Path]) -> None:
    md = written["summary.md"].read_text()
    assert md.startswith("| config")
    assert md.count("\n|") == 4  # header rule + 3 configurations
    assert "n/a (CPU)" in md


def test_no_fair_md_without_an_lr_grid(written: dict[str, Path]) -> None:
    assert "fair.md" not in written and not (written["summary.md"].parent / "fair.md").exists()


@pytest.mark.parametrize("name", ["accuracy_vs_params.png", "memory.png", "validation_curves.png", "cost.png"])
def test_figures_are_non_trivial_images(written: dict[str, Path], name: str) -> None:
    img = mpimg.imread(written[name])
    assert img.shape[0] > 300 and img.shape[1] > 500
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_notebook_executes_on_a_sweep(methods_sweep: Path, tmp_path: Path) -> None:
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


def test_readme_nbconvert_command_executes_the_notebook(tmp_path: Path) -> None:
    """The README's headless command, as written, with only the dev extra installed (nbconvert brings `jupyter`)."""
    import subprocess
    import sys

    for seed in (1, 2):
        write_result(tmp_path / "runs", f"s{seed}", r=8, alpha=16, seed=seed, history=[])
    root = Path(CONF_DIR).parent
    env = {**os.environ, "LORA_EXP_RUNS": str(tmp_path / "runs"), "LORA_EXP_REPORT_OUT": str(tmp_path / "nb_report")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))  # the kernel: this checkout
    command = "jupyter nbconvert --to notebook --execute notebooks/analysis.ipynb --output-dir"
    jupyter = Path(sys.executable).with_name("jupyter")
    jupyter = str(jupyter) if jupyter.exists() else "jupyter"
    proc = subprocess.run(
        [jupyter, *command.split()[1:], str(tmp_path / "out")], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import nbformat

    executed = nbformat.read(tmp_path / "out" / "analysis.ipynb", as_version=4)
    records = json.loads(executed.cells[-1].outputs[0]["text"])
    assert [r["method"] for r in records] == ["lora"] and (tmp_path / "nb_report" / "summary.csv").is_file()


def test_two_tiny_models_on_two_csvs_end_to_end(tiny_cfg, tmp_path: Path) -> None:  # noqa: ANN001
    from lora_exp.training.loop import train

    files = [write_reviews(tmp_path / f"{name}.csv.bz2", n=60, seed=i) for i, name in enumerate(("films", "books"))]
    for model in ("tiny_bert", "tiny_distilbert"):
        for path in files:
            cfg = tiny_cfg(
                f"model={model}", f"data.path={path}", "trainer.max_steps=2", "trainer.epochs=1", "save_weights=false"
            )
            res = train(cfg, tmp_path / "runs" / f"{model}-{path.stem}")
            assert res["model"] == model and res["data"] == path.name.removesuffix(".csv.bz2")
            assert 0.5 <= res["majority_baseline_acc"] <= 1 and sum(res["test_pred_counts"]) > 0
    summary = report.summarize(report.load_runs(tmp_path / "runs"))
    assert len(summary) == 4 and summary["group_hash"].nunique() == 4
    assert sorted(zip(summary.model, summary.data)) == sorted(
        (m, d) for m in ("tiny_bert", "tiny_distilbert") for d in ("films", "books")
    )


def test_report_cli_names_an_unreadable_results_json_once(tmp_path: Path) -> None:
    from tests.helpers.processes import cli

    write_result(tmp_path / "sweep", "s1", r=8, alpha=16, seed=1)
    (tmp_path / "sweep" / "cut").mkdir()
    (tmp_path / "sweep" / "cut" / "results.json").write_text('{"status": "ok", "method": "lo')
    proc = cli(["report", str(tmp_path / "sweep")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [line for line in proc.stdout.splitlines() if "is unreadable" in line]
    assert said == [
        f"[lora-exp] report: {tmp_path / 'sweep' / 'cut' / 'results.json'} is unreadable (JSONDecodeError: "
        "Unterminated string starting at: line 1 column 28 (char 27)); listed under failed jobs"
    ]
    assert "- `cut` (-): error: results.json unreadable (JSONDecodeError: " in proc.stdout
