"""Metrics for ``evaluate`` (classes: accuracy, macro-F1, ROC-AUC, Matthews; scores: Pearson, Spearman, MSE)
and the selection rule behind ``trainer.monitor``.

Each comes from scikit-learn or scipy, none is written here. ROC-AUC (``roc_auc_score`` on the positive-class
probability) is defined for binary tasks with both classes present, else ``nan``; a correlation is ``nan`` when
the predictions or the labels are constant.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef, mean_squared_error, roc_auc_score
from tqdm.auto import tqdm

from lora_exp.errors import LoraExpError

HIGHER_IS_BETTER = {
    "val/acc": True,
    "val/f1": True,
    "val/auc": True,
    "val/mcc": True,
    "val/pearson": True,
    "val/spearman": True,
    "val/mse": False,
    "val/loss": False,
}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``acc``, macro ``f1`` (over the classes of the logits) and ``auc`` (binary only; ``nan`` otherwise or
    when ``labels`` hold one class) from raw logits (N, C) and integer labels (N,)."""
    logits, y = logits.detach().float().cpu(), labels.detach().cpu().numpy()
    pred = logits.argmax(-1).numpy()
    n_cls = logits.shape[-1]
    out = {
        "acc": float((pred == y).mean()),
        "f1": float(f1_score(y, pred, labels=list(range(n_cls)), average="macro", zero_division=0)),
        "auc": math.nan,
        "mcc": float(matthews_corrcoef(y, pred)),
    }
    if n_cls == 2 and len(np.unique(y)) == 2:
        out["auc"] = float(roc_auc_score(y, torch.softmax(logits, -1)[:, 1].numpy()))
    return out


def regression_metrics(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``pearson`` and ``spearman`` correlation (scipy; ``nan`` when either side is constant) and ``mse``
    (scikit-learn) of predicted scores (N,) or (N, 1) against the true scores (N,)."""
    p = predictions.detach().float().cpu().reshape(-1).numpy()
    y = labels.detach().float().cpu().reshape(-1).numpy()
    constant = np.ptp(p) == 0 or np.ptp(y) == 0
    return {
        "pearson": math.nan if constant else float(pearsonr(p, y).statistic),
        "spearman": math.nan if constant else float(spearmanr(p, y).statistic),
        "mse": float(mean_squared_error(y, p)),
    }


def monitor_key(monitor: str) -> str:
    """``val/auc`` -> ``auc``: the key in an ``evaluate`` dict (and ``best_val_<key>`` / ``test_<key>`` in
    results.json)."""
    if monitor not in HIGHER_IS_BETTER:
        raise LoraExpError(f"trainer.monitor={monitor!r} is not one of {', '.join(HIGHER_IS_BETTER)}")
    return monitor.split("/", 1)[1]


def is_better(monitor: str, new: float | None, best: float | None) -> bool:
    """Whether ``new`` beats ``best`` for ``monitor`` (higher for acc/f1/auc/mcc/pearson/spearman, lower for
    mse/loss).

    A missing / NaN ``new`` never wins; anything finite beats a missing / NaN ``best``; ties keep the old.
    """
    higher = HIGHER_IS_BETTER.get(monitor)
    if higher is None:
        raise LoraExpError(f"trainer.monitor={monitor!r} is not one of {', '.join(HIGHER_IS_BETTER)}")
    if new is None or math.isnan(new):
        return False
    if best is None or math.isnan(best):
        return True
    return new > best if higher else new < best


def is_nan(value: Any) -> bool:
    """A float NaN (an AUC of a one-class split)."""
    return isinstance(value, float) and math.isnan(value)


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, amp: Any, desc: str = "eval"
) -> dict:
    """Over a loader: accuracy, macro-F1, ROC-AUC (binary), Matthews correlation, the mean loss and the predicted /
    true class counts; for a regression model (one output) Pearson, Spearman, MSE and the mean loss.

    A progress bar named ``desc`` (stderr) shows while it runs and is cleared when done.
    """
    model.eval()
    logits, labels, loss_sum = [], [], torch.zeros((), device=device)
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, mininterval=1.0):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with amp():
            out = model(**batch)
        loss_sum += out.loss.float() * len(batch["labels"])
        logits.append(out.logits.float())
        labels.append(batch["labels"])
    model.train()
    z, y = torch.cat(logits), torch.cat(labels)
    n_classes = z.shape[-1]
    if y.is_floating_point():  # scores (data.problem_type=regression): one output per example
        return {**regression_metrics(z, y), "loss": (loss_sum / len(y)).item()}
    return {
        **classification_metrics(z, y),
        "loss": (loss_sum / len(y)).item(),
        "pred_counts": torch.bincount(z.argmax(-1), minlength=n_classes).tolist(),  # all one class: a flag
        "label_counts": torch.bincount(y, minlength=n_classes).tolist(),  # the majority-class baseline
    }
