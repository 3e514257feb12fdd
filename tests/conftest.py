"""Fixtures: configs composed through Hydra's Compose API, shrunk for CPU, a small review corpus, one tiny sweep;
and the tiers: every test under ``tests/e2e/`` is marked ``e2e`` (left out of a plain ``pytest``, run by
``.ci/run``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from tests.helpers import tiny_checkpoints as tc
from tests.helpers.configs import make_cfg, tiny_run, tiny_sweep, write_reviews
from tests.helpers.processes import cli

E2E = Path(__file__).parent / "e2e"

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: the workers share the cores, so one thread each, in
    os.environ["OMP_NUM_THREADS"] = "1"  # this process and in the CLI / training processes it starts
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection, so that -m "not e2e" sees the mark
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under ``tests/e2e/`` as ``e2e``."""
    for item in items:
        if E2E in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reviews(tmp_path_factory.mktemp("data") / "reviews.csv.bz2")


@pytest.fixture
def lora_exp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The harness's own cache (LORA_EXP_CACHE: generated data, audio features, converted models) in ``tmp_path``."""
    monkeypatch.setenv("LORA_EXP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_cfg(reviews: Path, tmp_path: Path):
    """Compose a config shrunk to seconds on CPU: tiny model, the small corpus, no W&B."""

    def build(*overrides: str) -> DictConfig:
        shrink = ("logger=none", "trainer.epochs=2", "trainer.log_every=2", "optimizer.warmup_ratio=0.0")
        return make_cfg(tiny_run(reviews, tmp_path, *shrink, *overrides))

    return build


@pytest.fixture(scope="module")
def methods_sweep(tmp_path_factory: pytest.TempPathFactory, reviews: Path) -> Path:
    """`lora-exp -m +sweep=methods` on the tiny model, W&B offline (once per module that uses it)."""
    tmp = tmp_path_factory.mktemp("methods")
    proc = cli(tiny_sweep(reviews, tmp, tmp / "sweep", "+sweep=methods"), tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "sweep"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """``checkpoint(arch)``: a saved tiny checkpoint (``tests.helpers.tiny_checkpoints``) with its head (built once per
    module and arch)."""
    root, made = tmp_path_factory.mktemp("ckpt"), {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = tc.save(arch, root / arch)
        return made[arch]

    return get
