"""A job that is a trial of ``hydra/sweeper=lora_optuna`` (``lora_exp/search.py``) reports its monitored
validation curve to that trial and stops when the study's pruner says so.

The sweeper names the trial through ``hydra.job.env_set`` (these environment variables), so any launcher carries it
to the job; outside a study ``from_env`` is None and nothing here imports Optuna.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from typing import Any

ENV_STORAGE, ENV_STUDY, ENV_TRIAL = "LORA_EXP_OPTUNA_STORAGE", "LORA_EXP_OPTUNA_STUDY", "LORA_EXP_OPTUNA_TRIAL"
ENV_PRUNER = "LORA_EXP_OPTUNA_PRUNER"  # the pruner's config as JSON ({"_target_": ..., kwargs}): the storage has none


class TrialReporter:
    """One Optuna trial, seen from the job: ``report`` a validation value, True when the trial should stop."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial

    def report(self, value: float, step: int) -> bool:
        """Record ``value`` at ``step`` (a NaN is not recorded); whether the pruner stops the trial here."""
        if value is None or math.isnan(value):
            return False
        self.trial.report(float(value), step)
        return bool(self.trial.should_prune())


def from_env() -> TrialReporter | None:
    """The trial this job runs for, or None outside an Optuna study."""
    trial_id = os.environ.get(ENV_TRIAL)
    if not trial_id or not os.environ.get(ENV_STORAGE):
        return None
    import optuna

    spec = json.loads(os.environ.get(ENV_PRUNER) or "null") or {}
    pruner = None
    if spec.get("_target_"):
        module, name = spec.pop("_target_").rsplit(".", 1)
        pruner = getattr(importlib.import_module(module), name)(**spec)
    study = optuna.load_study(study_name=os.environ[ENV_STUDY], storage=os.environ[ENV_STORAGE], pruner=pruner)
    return TrialReporter(optuna.trial.Trial(study, int(trial_id)))
