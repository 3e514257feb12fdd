"""Classification metrics for ``evaluate`` and the selection rule behind ``trainer.monitor``.

ROC-AUC comes from scikit-learn (``roc_auc_score`` on the positive-class probability), not written here;
it is defined for binary tasks with both classes present, else ``nan``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score
from tqdm.auto import tqdm

from lora_exp.errors import LoraExpError

HIGHER_IS_BETTER = {"val/acc": True, "val/f1": True, "val/auc": True, "val/loss": False}


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
    }
    if n_cls == 2 and len(np.unique(y)) == 2:
        out["auc"] = float(roc_auc_score(y, torch.softmax(logits, -1)[:, 1].numpy()))
    return out


def monitor_key(monitor: str) -> str:
    """``val/auc`` -> ``auc``: the key in an ``evaluate`` dict."""
    if monitor not in HIGHER_IS_BETTER:
        raise LoraExpError(f"trainer.monitor={monitor!r} is not one of {', '.join(HIGHER_IS_BETTER)}")
    return monitor.split("/", 1)[1]


def is_better(monitor: str, new: float | None, best: float | None) -> bool:
    """Whether ``new`` beats ``best`` for ``monitor`` (higher for acc/f1/auc, lower for loss).

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
    """Accuracy, macro-F1, ROC-AUC (binary), mean loss and the predicted / true class counts over a loader.

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
    return {
        **classification_metrics(z, y),
        "loss": (loss_sum / len(y)).item(),
        "pred_counts": torch.bincount(z.argmax(-1), minlength=n_classes).tolist(),  # all one class: a flag
        "label_counts": torch.bincount(y, minlength=n_classes).tolist(),  # the majority-class baseline
    }
