"""What a wheel ships: every subpackage of lora_exp (pyproject.toml lists them, since conf/ and sweeps/ are mapped
into the package), and the configs from where they live (the installed package, else the clone's top)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_exp.config.schema import CONF_DIR, SWEEPS_DIR

REPO = Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def test_pyproject_lists_every_package_and_maps_conf_and_sweeps() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    inits = [*(REPO / "lora_exp").rglob("__init__.py"), *(REPO / "hydra_plugins").rglob("__init__.py")]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in inits}  # hydra_plugins: a namespace package
    assert set(setuptools["packages"]) == on_disk | {"lora_exp.conf", "lora_exp.sweeps"}
    assert setuptools["package-dir"] == {"lora_exp.conf": "conf", "lora_exp.sweeps": "sweeps"}
    data = setuptools["package-data"]["lora_exp.conf"]
    shipped = {p for pattern in data for p in (REPO / "conf").glob(pattern)}
    assert shipped == set((REPO / "conf").rglob("*.yaml")) and len(shipped) > 30


def test_a_clone_reads_conf_and_sweeps_at_its_top() -> None:
    assert Path(CONF_DIR) == REPO / "conf" and SWEEPS_DIR == REPO / "sweeps"
    assert not (REPO / "conf" / "sweep").exists()  # sweeps/ is the only copy
