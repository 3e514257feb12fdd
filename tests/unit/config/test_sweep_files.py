"""Sweep files (Hydra basic-sweeper grids, W&B sweep YAML): each documents its command, each grid composes and
validates, the fair grid uses each method's own learning rates. Nothing runs."""

from __future__ import annotations

import pytest

from lora_exp.cli import CONF_DIR
from lora_exp.config.checks import validate
from lora_exp.config.schema import SWEEPS_DIR
from tests.helpers.configs import make_cfg
from tests.helpers.sweeps import expand

SWEEPS = SWEEPS_DIR


def test_sweep_files_document_their_command() -> None:
    for path in SWEEPS.glob("*.yaml"):
        head = path.read_text().splitlines()
        assert head[0] == "# @package _global_", path
        assert any(f"lora-exp -m +sweep={path.stem}" in line for line in head if line.startswith("#")), path


@pytest.mark.parametrize(
    ("name", "jobs"),
    [("methods", 3), ("quick", 3), ("rank_alpha", 42), ("targets", 6), ("seeds", 9), ("qlora", 27)],
)
def test_sweep_grids_compose_and_validate(name: str, jobs: int) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hydra_cfg = compose("config", overrides=[f"+sweep={name}"], return_hydra_config=True)
    grid = expand(dict(hydra_cfg.hydra.sweeper.params))
    assert len(grid) == jobs
    for overrides in grid[:: max(1, len(grid) // 7)]:
        cfg = make_cfg([f"+sweep={name}", *overrides])
        validate(cfg)
        assert cfg.sweep_name == name
        if name == "rank_alpha":
            alpha = dict(o.split("=", 1) for o in overrides)["lora.alpha"]
            r = cfg.lora.r
            assert cfg.lora.alpha == {"'${lora.r}'": r, "'${mul:${lora.r},2}'": 2 * r}.get(alpha, 16)


def test_qlora_grid_is_each_base_dtype_at_loras_lrs() -> None:
    grid = list(make_cfg(["method=lora"]).method.lr_grid)
    for base in ("fp32", "nf4", "int8"):
        got = [make_cfg(["+sweep=qlora", f"model.base_dtype={base}", f"lr_index={i}"]) for i in range(3)]
        assert [c.optimizer.lr for c in got] == grid and {c.model.base_dtype for c in got} == {base}
        assert {c.method.name for c in got} == {"lora"}


def test_fair_grid_uses_each_methods_own_lrs() -> None:
    for method in ("full", "frozen", "lora"):
        grid = list(make_cfg([f"method={method}"]).method.lr_grid)
        got = [make_cfg(["+sweep=fair", f"method={method}", f"lr_index={i}"]).optimizer.lr for i in range(3)]
        assert got == grid
