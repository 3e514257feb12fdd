"""The ordinary install works outside the clone: a wheel built from the repository, installed without ``-e`` into
a fresh venv, runs ``lora-exp --help``, composes a packaged preset and sweep, takes a user's ``--config-dir``
and trains a tiny job from another directory (its configs come from inside the installed package)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.configs import write_reviews

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "lora_exp", "conf", "sweeps", "hydra_plugins")  # what the wheel is built from


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """A fresh process without this checkout on its path (no PYTHONPATH): only the venv's install is seen."""
    drop = ("PYTHONPATH", "WANDB_SERVICE")
    env = {k: v for k, v in os.environ.items() if k not in drop} | {"WANDB_SILENT": "true"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv (system site-packages for torch & co.) with lora-exp installed from its wheel, not editable."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: the in-tree build leaves build/ and *.egg-info behind
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    wheel_cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist")]
    proc = run([*wheel_cmd, str(src)], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("lora_exp-*.whl")
    proc = run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp / "venv")], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pip = [str(tmp / "venv" / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    proc = run([*pip, "--ignore-installed", str(wheel)], tmp)  # beside, not over, a system-wide install
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "venv"


def test_the_installed_package_holds_its_configs(venv: Path, tmp_path: Path) -> None:
    code = "import lora_exp.config.schema as s; print(s.__file__); print(s.CONF_DIR); print(s.SWEEPS_DIR)"
    proc = run([str(venv / "bin" / "python"), "-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, conf, sweeps = proc.stdout.split()
    site = str(venv / "lib")
    assert module.startswith(site) and conf.startswith(site) and sweeps.startswith(site)
    assert Path(conf, "config.yaml").is_file() and len(list(Path(conf, "preset").glob("*.yaml"))) == 13
    assert {p.stem for p in Path(sweeps).glob("*.yaml")} == {p.stem for p in (REPO / "sweeps").glob("*.yaml")}
    code = "import hydra_plugins.lora_exp_plugins.slurm_launcher as m; print(m.__file__)"  # hydra/launcher=slurm
    proc = run([str(venv / "bin" / "python"), "-c", code], tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().startswith(site), proc.stderr[-3000:]


def test_help_and_packaged_presets_and_sweeps_from_another_dir(venv: Path, tmp_path: Path) -> None:
    lora_exp = str(venv / "bin" / "lora-exp")
    proc = run([lora_exp, "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lora-exp wandb-sweep NAME" in proc.stdout and "FileNotFoundError" not in proc.stderr
    groups = dict(
        line.strip().split(": ", 1) for line in proc.stdout.splitlines() if line.startswith(("preset:", "sweep:"))
    )
    assert "dora" in groups["preset"].split(", ") and "quick" in groups["sweep"].split(", ")
    proc = run([lora_exp, "+sweep=quick", "+preset=dora", "lora.r=32", "--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep_name: quick" in proc.stdout and "variant: dora" in proc.stdout and "r: 32" in proc.stdout
    proc = run([lora_exp, "wandb-sweep", "methods"], tmp_path)
    assert proc.returncode == 0 and "${args_no_hyphens}" in proc.stdout, proc.stderr[-3000:]


def test_a_users_config_dir_joins_the_packaged_one(venv: Path, tmp_path: Path) -> None:
    mine = tmp_path / "my_conf" / "model"
    mine.mkdir(parents=True)
    tiny = (REPO / "conf" / "model" / "tiny_bert.yaml").read_text().splitlines()
    (mine / "my_tiny.yaml").write_text("\n".join("name: my_tiny" if s.startswith("name:") else s for s in tiny))
    args = [str(venv / "bin" / "lora-exp"), "--config-dir", str(tmp_path / "my_conf"), "model=my_tiny"]
    proc = run([*args, "--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "name: my_tiny" in proc.stdout and "source: tiny" in proc.stdout
    proc = run([*args, "model=not_mine", "--cfg", "job"], tmp_path)  # its options join the closed check's list
    assert proc.returncode == 2 and "my_tiny" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_tiny_job_trains_from_another_dir(venv: Path, tmp_path: Path) -> None:
    reviews = write_reviews(tmp_path / "reviews.csv.bz2")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = [
        "+preset=dora",
        "lora.r=4",
        "model=tiny_bert",
        f"data.path={reviews}",
        f"data.cache_dir={tmp_path / 'hf'}",
        "logger=none",
        "trainer.max_steps=4",
        "trainer.device=cpu",
        "trainer.batch_size=16",
        "hydra.run.dir=run",
    ]
    proc = run([str(venv / "bin" / "lora-exp"), *args], elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((elsewhere / "run" / "results.json").read_text())
    assert res["status"] == "ok" and (res["method"], res["variant"], res["r"]) == ("lora", "dora", 4)
    assert res["steps"] == 4 and 0.0 <= res["test_acc"] <= 1.0 and res["trainable_params"] > 0
    assert res.get("git_commit") is None  # installed: no checkout to name
    assert (elsewhere / "run" / "adapter").is_dir()
