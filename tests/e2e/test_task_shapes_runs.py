"""Each task shape through the real CLI on a tiny model (issue 25): sentence pairs, scores (regression) and many
named classes, each trained, recorded (results.json in the task's metric) and predicted on; a float label column
without data.problem_type=regression refused in one line; GLUE presets trained on a stubbed loader."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from lora_exp.commands import predict
from lora_exp.config.schema import register_configs
from lora_exp.data import glue
from tests.helpers.configs import make_cfg
from tests.helpers.glue import NAMES, stub_load_dataset
from tests.helpers.processes import cli

RUN = ["model=tiny_bert", "logger=none", "trainer.max_steps=3", "trainer.device=cpu", "trainer.batch_size=16"]
CLASSES = ["anger", "fear", "joy", "love", "sadness"]
WORDS = ["good", "great", "fun", "bad", "dull", "boring", "film", "story", "plot", "acting", "love", "hate"]


def write_tables(tmp: Path) -> dict[str, Path]:
    """A pair table (csv), a score table (jsonl, float scores 0.0 / 1.0 / 2.0) and a five-class table (parquet)."""
    n = 80
    pairs = pd.DataFrame(
        {
            "question": [f"{WORDS[i % 12]} {WORDS[(i * 7) % 12]} q{i}" for i in range(n)],
            "answer": [f"{WORDS[i % 12] if i % 2 else WORDS[(i + 5) % 12]} a{i}" for i in range(n)],
            "match": ["yes" if i % 2 else "no" for i in range(n)],
        }
    )
    scores = pd.DataFrame(
        {"review": [f"{WORDS[i % 12]} film {i}" for i in range(n)], "stars": [float(i % 3) for i in range(n)]}
    )
    classes = pd.DataFrame(
        {"text": [f"{WORDS[i % 12]} story {i}" for i in range(n)], "emotion": [CLASSES[i % 5] for i in range(n)]}
    )
    out = {"pairs": tmp / "pairs.csv", "scores": tmp / "scores.jsonl", "classes": tmp / "classes.parquet"}
    pairs.to_csv(out["pairs"], index=False)
    scores.to_json(out["scores"], orient="records", lines=True)
    classes.to_parquet(out["classes"])
    return out


SHAPES = {
    "pairs": ["data.text_column=question", "data.text_pair_column=answer", "data.label_column=match"],
    "scores": ["data.text_column=review", "data.label_column=stars", "data.problem_type=regression"],
    "classes": ["data.label_column=emotion", "trainer.monitor=val/mcc"],
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict, str]]:
    """Each shape trained once through the CLI: its run dir, results.json and stdout."""
    tmp = tmp_path_factory.mktemp("shapes")
    tables, out = write_tables(tmp), {}
    for name, options in SHAPES.items():
        run = tmp / f"run_{name}"
        args = ["data=files", f"data.path={tables[name]}", f"data.cache_dir={tmp / 'hf'}", *options, *RUN]
        proc = cli([*args, f"hydra.run.dir={run}"], tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = (run, json.loads((run / "results.json").read_text()), proc.stdout)
    out["tables"] = tables  # type: ignore[assignment]
    return out


def test_pairs_train_and_predict_from_a_table(shapes: dict, capsys: pytest.CaptureFixture) -> None:
    run, r, _ = shapes["pairs"]
    assert (r["problem_type"], r["num_labels"], r["class_names"]) == ("single_label_classification", 2, ["no", "yes"])
    assert r["train_examples"] == 64 and r["monitor"] == "val/acc" and -1 <= r["test_mcc"] <= 1
    assert predict.main(f"adapter={run}", f"file={shapes['tables']['pairs']}") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 80 and all(line.split("\t")[0] in ("no", "yes") for line in lines)
    assert lines[0].split("\t")[2:] == ["good good q0", "boring a0"]  # label, probability, text, second text
    assert predict.main(f"adapter={run}", "text=good film", "text_pair=good") == 0
    assert capsys.readouterr().out.split("\t")[0] in ("no", "yes")


def test_scores_train_report_and_predict_a_score(shapes: dict, capsys: pytest.CaptureFixture) -> None:
    from lora_exp.analysis import report

    run, r, stdout = shapes["scores"]
    assert (r["problem_type"], r["num_labels"], r["class_names"], r["monitor"]) == (
        "regression",
        1,
        None,
        "val/pearson",
    )
    assert {"best_val_pearson", "test_pearson", "test_spearman", "test_mse"} <= set(r) and "test_acc" not in r
    assert r["test_mse"] == pytest.approx(r["test_loss"], rel=1e-4)  # the loss is the MSE
    assert "val_pearson" in r["history"][-1] and "best val pearson" in stdout and "test acc" not in stdout
    written = report.write_report(run.parent / "run_scores", run.parent / "report_scores")
    assert "test Pearson" in written["summary.md"].read_text() and "accuracy_vs_params.png" in written
    assert predict.main(f"adapter={run}", "text=good film 3") == 0
    label, value, text = capsys.readouterr().out.rstrip("\n").split("\t")
    assert (label, text) == ("score", "good film 3") and float(value) == pytest.approx(float(value))


def test_many_classes_are_inferred_named_and_predicted(shapes: dict, capsys: pytest.CaptureFixture) -> None:
    run, r, stdout = shapes["classes"]
    assert (r["num_labels"], r["class_names"], r["monitor"]) == (5, CLASSES, "val/mcc")
    assert len(r["test_pred_counts"]) == 5 and "best val mcc" in stdout
    meta = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert meta["id2label"] == {str(i): c for i, c in enumerate(CLASSES)} and meta["num_labels"] == 5
    assert predict.main(f"adapter={run}", "text=love story") == 0
    assert capsys.readouterr().out.split("\t")[0] in CLASSES


def test_a_float_label_column_without_regression_is_one_line(shapes: dict, tmp_path: Path) -> None:
    args = [
        "data=files",
        f"data.path={shapes['tables']['scores']}",
        "data.text_column=review",
        "data.label_column=stars",
    ]
    proc = cli([*args, *RUN, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: data.label_column='stars' holds decimal numbers (3 distinct: 0, 1, 2); for a score per row set "
        "data.problem_type=regression, for classes write integers 0..N-1 or names"
    ]


# One task per shape (single text + MCC, pairs + F1, three classes + matched validation, a score); all eight load
# from the stub in tests/unit/data/test_glue.py and compose in tests/unit/config/test_task_shapes_config.py.
TRAINED = ("cola", "mrpc", "mnli", "stsb")


@pytest.mark.parametrize("task", TRAINED)
def test_glue_presets_train_on_the_stub(task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GLUE task trains end to end (in process: the stub replaces the Hub) and records its own metric."""
    from lora_exp.training.loop import train

    monkeypatch.setattr(datasets, "load_dataset", stub_load_dataset())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    register_configs()
    cfg = make_cfg(["data=glue", f"data.task={task}", f"data.cache_dir={tmp_path / 'hf'}", *RUN, "trainer.max_steps=1"])
    r = train(cfg, tmp_path / "run")
    key = cfg.trainer.monitor.split("/")[1]
    assert r["status"] == "ok" and r["data"] == f"glue_{task}" and isinstance(r[f"test_{key}"], float | None)
    assert r["num_labels"] == (len(NAMES[task]) if NAMES[task] else 1) and r["monitor"] == glue.TASKS[task].monitor
