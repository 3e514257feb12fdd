"""AUC from scikit-learn on fixed inputs, accuracy / macro-F1, and the monitor's selection rule."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from lora_exp.errors import LoraExpError
from lora_exp.training.metrics import classification_metrics, is_better, monitor_key

LOGITS = torch.tensor([[2.0, 0.1], [0.3, 0.2], [0.0, 1.5], [1.0, 1.2], [0.5, -0.5], [-1.0, 0.4]])
LABELS = torch.tensor([0, 1, 1, 0, 0, 1])


def test_auc_acc_f1_equal_scikit_learn() -> None:
    m = classification_metrics(LOGITS, LABELS)
    p1 = torch.softmax(LOGITS, -1)[:, 1].numpy()
    pred = LOGITS.argmax(-1).numpy()
    assert m["auc"] == pytest.approx(roc_auc_score(LABELS.numpy(), p1))
    assert m["auc"] == pytest.approx(8 / 9)  # by hand: 8 of the 9 (positive, negative) pairs ordered right
    assert m["acc"] == pytest.approx((pred == LABELS.numpy()).mean())
    assert m["f1"] == pytest.approx(f1_score(LABELS.numpy(), pred, average="macro"))


def test_auc_is_nan_for_one_class_or_multiclass() -> None:
    assert math.isnan(classification_metrics(LOGITS, torch.zeros(6, dtype=torch.long))["auc"])
    three = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    m = classification_metrics(three, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert math.isnan(m["auc"]) and 0 <= m["f1"] <= 1


@pytest.mark.parametrize(
    ("monitor", "new", "best", "expected"),
    [
        ("val/auc", 0.9, 0.8, True),
        ("val/auc", 0.8, 0.9, False),
        ("val/acc", 0.8, 0.8, False),  # a tie keeps the earlier step
        ("val/f1", 0.7, None, True),
        ("val/loss", 0.2, 0.3, True),
        ("val/loss", 0.4, 0.3, False),
        ("val/auc", math.nan, 0.5, False),  # a NaN (one-class validation) never wins
        ("val/auc", 0.5, math.nan, True),
        ("val/loss", 5.0, None, True),
        ("val/auc", 0.0, None, True),
    ],
)
def test_is_better_per_monitor(monitor: str, new: float, best: float, expected: bool) -> None:
    assert is_better(monitor, new, best) is expected


def test_unknown_monitor_is_an_error() -> None:
    with pytest.raises(LoraExpError, match=r"trainer.monitor='val/precision' is not one of"):
        is_better("val/precision", 1.0, 0.0)
    assert monitor_key("val/auc") == "auc"


def test_evaluate_shows_a_progress_bar_named_after_the_split(capsys: pytest.CaptureFixture) -> None:
    """The final test evaluation (tens of seconds on a real model) shows a bar on stderr, cleared when done,
    and returns the same metrics as the logits it saw."""
    from contextlib import nullcontext

    from lora_exp.training.metrics import evaluate

    class Fixed(torch.nn.Module):  # returns LOGITS rows by index, with a cross-entropy loss
        def forward(self, idx: torch.Tensor, labels: torch.Tensor):  # noqa: ANN201
            logits = LOGITS[idx]
            return type("Out", (), {"logits": logits, "loss": torch.nn.functional.cross_entropy(logits, labels)})

    loader = [{"idx": torch.arange(i, i + 2), "labels": LABELS[i : i + 2]} for i in (0, 2, 4)]
    m = evaluate(Fixed(), loader, torch.device("cpu"), nullcontext, desc="test")
    err = capsys.readouterr().err
    assert "test:" in err and "batch" in err  # tqdm's line: "test:   0%| | 0/3 [... batch/s]"
    assert m["acc"] == classification_metrics(LOGITS, LABELS)["acc"] and m["label_counts"] == [3, 3]


def test_mcc_and_regression_metrics_equal_scikit_learn_and_scipy() -> None:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import matthews_corrcoef, mean_squared_error

    from lora_exp.training.metrics import regression_metrics

    pred = LOGITS.argmax(-1).numpy()
    assert classification_metrics(LOGITS, LABELS)["mcc"] == pytest.approx(matthews_corrcoef(LABELS.numpy(), pred))
    p, y = torch.tensor([[0.1], [0.9], [0.4], [2.0]]), torch.tensor([0.0, 1.0, 1.0, 2.0])
    m = regression_metrics(p, y)
    assert m["pearson"] == pytest.approx(pearsonr(p.reshape(-1).numpy(), y.numpy()).statistic)
    assert m["spearman"] == pytest.approx(spearmanr(p.reshape(-1).numpy(), y.numpy()).statistic)
    assert m["mse"] == pytest.approx(mean_squared_error(y.numpy(), p.reshape(-1).numpy()))
    assert m["mse"] == pytest.approx((0.01 + 0.01 + 0.36 + 0.0) / 4)  # by hand
    constant = regression_metrics(torch.ones(4, 1), y)  # a collapsed regressor: no correlation, but an MSE
    assert math.isnan(constant["pearson"]) and math.isnan(constant["spearman"]) and constant["mse"] > 0


@pytest.mark.parametrize(
    ("monitor", "new", "best", "expected"),
    [("val/mcc", 0.3, 0.2, True), ("val/pearson", 0.5, 0.6, False), ("val/spearman", 0.7, None, True)]
    + [("val/mse", 0.2, 0.3, True), ("val/mse", 0.4, 0.3, False)],
)
def test_is_better_for_the_new_monitors(monitor: str, new: float, best: float, expected: bool) -> None:
    assert is_better(monitor, new, best) is expected


def test_evaluate_of_a_regression_model_gives_score_metrics() -> None:
    """A model with one output and float labels: Pearson / Spearman / MSE and the loss, no class counts."""
    from contextlib import nullcontext

    from lora_exp.training.metrics import evaluate

    class Scores(torch.nn.Module):
        def forward(self, x: torch.Tensor, labels: torch.Tensor):  # noqa: ANN201
            out = x.unsqueeze(-1)
            return type("Out", (), {"logits": out, "loss": torch.nn.functional.mse_loss(out.squeeze(-1), labels)})

    x, y = torch.tensor([0.0, 1.0, 3.0, 2.0]), torch.tensor([0.0, 1.0, 2.0, 3.0])
    m = evaluate(
        Scores(), [{"x": x[:2], "labels": y[:2]}, {"x": x[2:], "labels": y[2:]}], torch.device("cpu"), nullcontext
    )
    assert set(m) == {"pearson", "spearman", "mse", "loss"}
    assert m["mse"] == pytest.approx(0.5) and m["loss"] == pytest.approx(0.5) and m["spearman"] == pytest.approx(0.8)
