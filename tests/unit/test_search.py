"""hydra/sweeper=lora_optuna (lora_exp/search.py) without launching: the search space from Hydra's sweep syntax,
the objective from results.json, and a job that reports its validation curve and is pruned."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lora_exp.errors import TrainingFailure
from lora_exp.search import objective, search_space, suggest
from lora_exp.training import pruning

optuna = pytest.importorskip("optuna")


def test_search_space_from_params_and_command_line() -> None:
    swept, fixed = search_space(
        {"optimizer.lr": "tag(log, interval(1e-4, 1e-2))", "lora.r": "choice(2, 4, 8)"},
        ["lora.alpha=range(8, 33, 8)", "trainer.epochs=2"],
    )
    assert sorted(swept) == ["lora.alpha", "lora.r", "optimizer.lr"] and fixed == ["trainer.epochs=2"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        lr = suggest(trial, "optimizer.lr", swept["optimizer.lr"])
        assert 1e-4 <= lr <= 1e-2 and isinstance(lr, float)
        assert suggest(trial, "lora.r", swept["lora.r"]) in (2, 4, 8)
        assert suggest(trial, "lora.alpha", swept["lora.alpha"]) in (8, 16, 24, 32)
    assert study.trials[0].distributions["optimizer.lr"].log is True


def test_objective_is_the_best_monitored_value() -> None:
    assert objective({"status": "ok", "monitor": "val/loss", "best_val_loss": 0.3, "best_val_acc": 0.9}) == 0.3
    assert objective({"status": "ok", "best_val_acc": 0.9}) == 0.9
    assert math.isnan(objective({"status": "failed", "failure": "pruned"}))


def test_trial_reports_its_validation_curve_and_is_pruned(tiny_cfg, tmp_path: Path, monkeypatch) -> None:
    from lora_exp.training.loop import train

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()  # accuracy never reaches 2.0: the first validation prunes it
    monkeypatch.setenv(pruning.ENV_STORAGE, storage)
    monkeypatch.setenv(pruning.ENV_STUDY, "s")
    monkeypatch.setenv(pruning.ENV_TRIAL, str(trial._trial_id))
    monkeypatch.setenv(pruning.ENV_PRUNER, '{"_target_": "optuna.pruners.ThresholdPruner", "lower": 2.0}')
    with pytest.raises(TrainingFailure, match="pruned by the Optuna study at step") as err:
        train(tiny_cfg("trainer.eval_every=2"), tmp_path / "run")
    assert err.value.kind == "pruned"
    reported = optuna.load_study(study_name="s", storage=storage).trials[0].intermediate_values
    assert list(reported) == [2] and 0.0 <= reported[2] <= 1.0  # val/acc at step 2, then stopped
    monkeypatch.delenv(pruning.ENV_TRIAL)
    assert pruning.from_env() is None


def test_multirun_start_registers_the_named_sweeper_for_any_install() -> None:
    """An editable install serves hydra_plugins.lora_exp_plugins through an import hook that Hydra's namespace scan
    does not walk: the sweep callback registers the sweeper the config names before Hydra instantiates it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.plugins import Plugins

    from lora_exp.config.schema import CONF_DIR
    from lora_exp.sweep import register_plugins

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=lora_optuna"], return_hydra_config=True)
    target = cfg.hydra.sweeper._target_
    assert target == "hydra_plugins.lora_exp_plugins.optuna_sweeper.OptunaSweeper"
    Plugins.instance().class_name_to_class.pop(target, None)  # as an editable install leaves it: not scanned
    register_plugins(cfg)
    assert Plugins.instance().class_name_to_class[target].__name__ == "OptunaSweeper"
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert cfg.hydra.launcher._target_ == basic  # Hydra's own launcher: left to Hydra's scan
