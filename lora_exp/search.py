"""``hydra/sweeper=lora_optuna`` (conf/hydra/sweeper/lora_optuna.yaml, used by ``hparams_search=lora_optuna``): a
small Hydra sweeper that drives a current Optuna (ask / tell) with the study in the sweep dir.

Each trial is one job of the launcher in use (basic, joblib or ``hydra/launcher=slurm``). Its search space is
``hydra.sweeper.params`` plus sweep overrides on the command line, in Hydra's override syntax (``choice(2, 4)``,
``interval(1e-4, 1e-2)``, ``tag(log, interval(...))``, ``range(...)``). The job reports the monitored validation
curve (``trainer.monitor``) to its trial after every validation (``lora_exp/training/pruning.py``, through
``hydra.job.env_set``) and stops as ``pruned`` when the pruner says so. The objective is the job's best
``trainer.monitor`` value from its ``results.json``. Running the same command with the same ``hydra.sweep.dir``
continues the study until it holds ``n_trials`` finished trials.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lora_exp.errors import LoraExpError
from lora_exp.training.pruning import ENV_PRUNER, ENV_STORAGE, ENV_STUDY, ENV_TRIAL
from lora_exp.training.rundir import read_json


def search_space(params: dict[str, str], arguments: Sequence[str]) -> tuple[dict[str, Override], list[str]]:
    """The swept options (``params``, then sweeps given on the command line) and the fixed overrides."""
    parser = OverridesParser.create()
    swept: dict[str, Override] = {}
    fixed: list[str] = []
    for override in parser.parse_overrides([f"{k}={v}" for k, v in params.items()]) + parser.parse_overrides(
        list(arguments)
    ):
        if override.is_sweep_override():
            swept[override.get_key_element()] = override
        else:
            fixed.append(override.input_line)
    return swept, fixed


def suggest(trial: Any, name: str, override: Override) -> Any:
    """The trial's value for one swept option."""
    value = override.value()
    if isinstance(value, ChoiceSweep | RangeSweep):
        choices = list(override.sweep_iterator())
        return trial.suggest_categorical(name, choices)
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return trial.suggest_int(name, value.start, value.end, log=log)
        return trial.suggest_float(name, float(value.start), float(value.end), log=log)
    raise LoraExpError(f"hydra.sweeper.params.{name}: {override.input_line!r} is not choice / range / interval")


def objective(results: dict[str, Any]) -> float:
    """The job's best value of its monitored metric (``trainer.monitor``), NaN when it did not finish."""
    if results.get("status") != "ok":
        return math.nan
    key = str(results.get("monitor") or "val/acc").split("/", 1)[-1]
    value = results.get(f"best_val_{key}")
    return math.nan if value is None else float(value)


def job_dir(ret: Any) -> Path:
    """The job dir a launcher's JobReturn names."""
    if ret.hydra_cfg is not None:
        return Path(str(ret.hydra_cfg.hydra.runtime.output_dir))
    return Path(str(ret.working_dir))


def _built(node: Any) -> Any:
    """A sampler / pruner: Hydra has usually built it already from its ``_target_``; a config node is built here."""
    return instantiate(node) if isinstance(node, DictConfig | dict) else node


class OptunaSweeper(Sweeper):
    """Optuna ask / tell over a launcher's jobs (see the module's docstring)."""

    def __init__(
        self,
        direction: str = "maximize",
        study_name: str | None = None,
        storage: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        sampler: Any = None,
        pruner: Any = None,
        params: Any = None,
    ) -> None:
        if direction not in ("maximize", "minimize"):
            raise LoraExpError(f"hydra.sweeper.direction={direction!r}: use maximize or minimize")
        if int(n_trials) < 1 or int(n_jobs) < 1:
            raise LoraExpError(f"hydra.sweeper: n_trials={n_trials} and n_jobs={n_jobs} must be at least 1")
        self.direction, self.study_name, self.storage = direction, study_name, storage
        self.n_trials, self.n_jobs = int(n_trials), int(n_jobs)
        self.sampler, self.pruner = sampler, pruner
        self.params = {str(k): str(v) for k, v in (OmegaConf.to_container(params) if params else {}).items()}

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        """Hydra's hook: the launcher that runs the trials."""
        self.config = config
        pruner = config.hydra.sweeper.get("pruner")
        self.pruner_spec = json.dumps(OmegaConf.to_container(pruner, resolve=True) if pruner is not None else None)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        """Ask, launch a batch of ``n_jobs`` trials, tell their results; until the study holds ``n_trials``."""
        import optuna

        swept, fixed = search_space(self.params, arguments)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=_built(self.sampler),
            pruner=_built(self.pruner),
            direction=self.direction,
            load_if_exists=True,
        )
        finished = {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL}
        while (left := self.n_trials - sum(t.state in finished for t in study.trials)) > 0:
            trials = [study.ask() for _ in range(min(self.n_jobs, left))]
            batch = [self._overrides(study, trial, swept, fixed) for trial in trials]
            for trial, ret in zip(trials, self.launcher.launch(batch, initial_job_idx=len(study.trials) - len(trials))):
                self._tell(study, trial, job_dir(ret))
        self._summary(study)

    def _overrides(self, study: Any, trial: Any, swept: dict[str, Override], fixed: list[str]) -> list[str]:
        chosen = [f"{name}={suggest(trial, name, override)}" for name, override in swept.items()]
        trial_env = {ENV_STORAGE: self.storage or "", ENV_STUDY: study.study_name, ENV_TRIAL: str(trial._trial_id)}
        trial_env[ENV_PRUNER] = self.pruner_spec
        return [*fixed, *chosen, *(f"+hydra.job.env_set.{k}='{v}'" for k, v in trial_env.items())]

    @staticmethod
    def _tell(study: Any, trial: Any, run_dir: Path) -> None:
        import optuna

        results = read_json(run_dir / "results.json")
        value = objective(results)
        if results.get("failure") == "pruned":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif math.isnan(value):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, value)

    def _summary(self, study: Any) -> None:
        """Print the best trial and write ``optimization_results.yaml`` into the sweep dir."""
        import optuna

        counts = {s.name.lower(): sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
        done = {k: v for k, v in counts.items() if v}
        out = Path(str(self.config.hydra.sweep.dir)) / "optimization_results.yaml"
        try:
            best = study.best_trial
        except ValueError:  # no trial completed
            print(f"Optuna study {study.study_name}: no completed trial ({done})")
            return
        print(f"Optuna study {study.study_name}: {done}; Best parameters: {best.params}, best value: {best.value}")
        OmegaConf.save({"name": "optuna", "best_params": best.params, "best_value": best.value, "trials": done}, out)
