"""The GLUE benchmark (``data=glue data.task=...``): each task's columns, label kind and metric, and its splits.

GLUE's test labels are hidden (-1), so a task's test split here is its validation split (MNLI: validation
matched), and a validation split is carved from train (stratified, ``data.val_size``, ``data.split_seed``).
``conf/data/glue.yaml`` reads the table below through the ``glue`` resolver (``glue_option``), so a composed
config shows each task's real columns; ``lora-exp`` loads the Hub's ``nyu-mll/glue`` with the task as its config.

The paper numbers (Hu et al. 2021, LoRA, Table 2: RoBERTa-base, 125M) are given for comparison in README.md;
``conf/experiment/lora_paper_roberta_base.yaml`` carries the paper's per-task learning rates and epochs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its text column(s), whether it is a regression, its metric (``trainer.monitor``), the
    split used as test, and the paper's RoBERTa-base LoRA learning rate / epochs (Hu et al. 2021, Table 9)."""

    text: str
    pair: str | None
    monitor: str
    paper_lr: float
    paper_epochs: int
    regression: bool = False
    test_split: str = "validation"


TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("sentence", None, "val/mcc", 4e-4, 80),
    "sst2": GlueTask("sentence", None, "val/acc", 5e-4, 60),
    "mrpc": GlueTask("sentence1", "sentence2", "val/f1", 4e-4, 30),
    "qqp": GlueTask("question1", "question2", "val/f1", 5e-4, 25),
    "stsb": GlueTask("sentence1", "sentence2", "val/pearson", 4e-4, 40, regression=True),
    "mnli": GlueTask("premise", "hypothesis", "val/acc", 5e-4, 30, test_split="validation_matched"),
    "qnli": GlueTask("question", "sentence", "val/acc", 4e-4, 25),
    "rte": GlueTask("sentence1", "sentence2", "val/acc", 5e-4, 80),
}
# LoRA on RoBERTa-base, Hu et al. 2021 Table 2 (MRPC / QQP accuracy, CoLA Matthews, STS-B Pearson, else accuracy)
PAPER_LORA_ROBERTA_BASE = {
    "mnli": 87.5,
    "sst2": 95.1,
    "mrpc": 89.7,
    "cola": 63.4,
    "qnli": 93.3,
    "qqp": 90.8,
    "rte": 86.6,
    "stsb": 91.5,
}


def glue_option(task: str | None, option: str) -> str | float | int | None:
    """``${glue:${data.task},OPTION}`` in the config: a task's ``text_column``, ``text_pair_column``,
    ``problem_type``, ``monitor``, ``lr`` or ``epochs``. An unknown task gives the option's plain default (the
    config check then names ``data.task`` in one line) so that composing never fails on it."""
    t = TASKS.get(str(task))
    if option == "text_column":
        return t.text if t else "text"
    if option == "text_pair_column":
        return t.pair if t else None
    if option == "problem_type":
        return "regression" if t and t.regression else "single_label_classification"
    if option == "monitor":
        return t.monitor if t else "val/acc"
    if option == "lr":
        return t.paper_lr if t else 5e-4
    if option == "epochs":
        return t.paper_epochs if t else 3
    raise ValueError(f"glue resolver: unknown option {option!r}")


def task_monitor(source: str, problem_type: str, task: str | None) -> str:
    """``trainer.monitor``'s default: a GLUE task's own metric (``data=glue``), else ``val/pearson`` for
    scores and ``val/acc`` for classes."""
    if source == "glue" and task in TASKS:
        return TASKS[task].monitor
    return "val/pearson" if problem_type == "regression" else "val/acc"


def used_splits(raw: dict, task: str) -> dict:
    """The Hub's GLUE splits as this harness uses them: ``train``, and the task's labelled validation split
    (MNLI: validation_matched) as ``test``; the hidden-label test splits are dropped."""
    return {"train": raw["train"], "test": raw[TASKS[task].test_split]}
