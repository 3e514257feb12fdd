"""Options of the task shapes (issue 25): pairs, scores, inferred classes, GLUE tasks and the LoRA paper's
preset compose as documented; every bad combination is one line naming the option before anything loads."""

from __future__ import annotations

import pytest

from lora_exp.config.checks import validate
from lora_exp.config.identity import config_hash, resolved_dict
from lora_exp.config.schema import typed_config
from lora_exp.data import glue
from lora_exp.errors import LoraExpError
from tests.helpers.configs import make_cfg

BAD = [
    ("data.problem_type=ordinal", "data.problem_type='ordinal' is not one of single_label_classification, regression"),
    (
        "data.problem_type=regression data.num_labels=3",
        "data.num_labels=3 does not apply to data.problem_type=regression",
    ),
    ("data.num_labels=1", r"data.num_labels=1 must be >= 2 or null \(taken from the training split\)"),
    ("data.text_pair_column=text", "data.text_pair_column='text' is data.text_column too"),
    (
        "data.problem_type=regression trainer.monitor=val/acc",
        "trainer.monitor=val/acc is a classification metric; data.problem_type=regression takes val/pearson, "
        "val/spearman, val/mse, val/loss",
    ),
    ("trainer.monitor=val/pearson", "trainer.monitor=val/pearson is a score metric; set data.problem_type=regression"),
    ("trainer.monitor=val/r2", "trainer.monitor='val/r2' is not one of val/acc, val/f1, val/auc, val/mcc, val/pearson"),
    ("data=glue", "data.task is required with data=glue: one of cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte"),
    ("data=glue data.task=wnli", "data.task='wnli' is not one of cola, sst2"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_task_options_are_one_line(overrides: str, message: str) -> None:
    with pytest.raises(LoraExpError, match=f"^{message}") as err:
        validate(make_cfg(overrides.split()))
    assert "\n" not in str(err.value)


def test_monitor_follows_the_task_unless_given() -> None:
    assert make_cfg([]).trainer.monitor == "val/acc"
    assert make_cfg(["data.problem_type=regression"]).trainer.monitor == "val/pearson"
    assert make_cfg(["data.problem_type=regression", "trainer.monitor=val/mse"]).trainer.monitor == "val/mse"
    validate(make_cfg(["data.problem_type=regression", "data.text_pair_column=plot"]))


def test_new_options_at_their_defaults_keep_every_job_hash() -> None:
    """A sweep started before these options resumes: null / the defaults hash as the old num_labels=2 config."""
    cfg = make_cfg([])
    old = resolved_dict(make_cfg(["data.num_labels=2"]))  # as a run before them recorded it
    for key in ("text_pair_column", "problem_type", "task"):
        old["data"].pop(key)
    assert config_hash(cfg) == config_hash(old)
    assert config_hash(make_cfg(["data.num_labels=3"])) != config_hash(cfg)


TABLE = {  # the table: columns, label kind, monitor; the paper's lr / epochs (Hu et al. 2021, Table 9)
    "mnli": ("premise", "hypothesis", "single_label_classification", "val/acc", 5e-4, 30),
    "sst2": ("sentence", None, "single_label_classification", "val/acc", 5e-4, 60),
    "mrpc": ("sentence1", "sentence2", "single_label_classification", "val/f1", 4e-4, 30),
    "cola": ("sentence", None, "single_label_classification", "val/mcc", 4e-4, 80),
    "qnli": ("question", "sentence", "single_label_classification", "val/acc", 4e-4, 25),
    "qqp": ("question1", "question2", "single_label_classification", "val/f1", 5e-4, 25),
    "rte": ("sentence1", "sentence2", "single_label_classification", "val/acc", 5e-4, 80),
    "stsb": ("sentence1", "sentence2", "regression", "val/pearson", 4e-4, 40),
}


@pytest.mark.parametrize("task", sorted(TABLE))
def test_glue_tasks_and_the_paper_preset_compose(task: str) -> None:
    text, pair, problem, monitor, lr, epochs = TABLE[task]
    cfg = make_cfg(["data=glue", f"data.task={task}"])
    validate(cfg)
    c = typed_config(cfg)
    assert (c.data.text_column, c.data.text_pair_column, c.data.problem_type) == (text, pair, problem)
    assert (c.data.source, c.data.path, c.data.name, c.trainer.monitor) == (
        "glue",
        "nyu-mll/glue",
        f"glue_{task}",
        monitor,
    )
    paper = typed_config(make_cfg(["experiment=lora_paper_roberta_base", f"data.task={task}"]))
    assert (paper.optimizer.lr, paper.trainer.epochs, paper.trainer.monitor) == (lr, epochs, monitor)
    assert (paper.lora.r, paper.lora.alpha, paper.lora.targets) == (8, 8.0, ["q", "v"])
    assert (paper.trainer.batch_size, paper.optimizer.warmup_ratio, paper.data.max_length) == (16, 0.06, 512)
    assert (paper.model.path, paper.method.name, paper.data.text_column) == ("roberta-base", "lora", text)
    assert sorted(glue.PAPER_LORA_ROBERTA_BASE) == sorted(TABLE)
