"""An adapter records a fingerprint of the base it was trained on; loading it onto other weights of the same
shapes is refused in one line naming both bases, and ``--force`` loads it anyway."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_exp import inference
from lora_exp.config.schema import typed_config
from lora_exp.errors import LoraExpError
from lora_exp.training import loop
from lora_exp.training.job import build_model_for
from tests.helpers import tiny_checkpoints as tc
from tests.helpers.configs import make_cfg
from tests.helpers.processes import cli


def save_base(folder: Path, seed: int) -> Path:
    """A tiny BERT checkpoint of fixed shapes whose weights depend on ``seed`` (another seed: another base)."""
    torch.manual_seed(seed)
    return tc.save("bert", folder)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, reviews: Path) -> tuple[Path, Path]:
    """A LoRA run on a local checkpoint folder (seed 0); returns (run dir, checkpoint folder)."""
    root = tmp_path_factory.mktemp("base")
    base = save_base(root / "my-bert", seed=0)
    cfg = make_cfg(
        [
            "model.source=local",
            f"model.path={base}",
            "model.name=my-bert",
            f"data.path={reviews}",
            f"data.cache_dir={root / 'hf'}",
            "logger=none",
            "trainer.max_steps=2",
            "trainer.epochs=1",
            "trainer.device=cpu",
            "data.max_length=32",
        ]
    )
    loop.train(cfg, root / "run")
    return root / "run", base


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error", "warning"))]


def test_same_base_loads_and_the_fingerprint_is_recorded(trained: tuple[Path, Path]) -> None:
    run, _ = trained
    meta = json.loads((run / "adapter" / "adapter_config.json").read_text())
    results = json.loads((run / "results.json").read_text())
    _, model = inference.load_trained(run)  # the same base: no refusal
    assert len(meta["base_fingerprint"]) == 64 and meta["base_fingerprint"] == results["base_fingerprint"]
    assert model.base_fingerprint == meta["base_fingerprint"]


def test_another_base_of_the_same_shapes_is_refused_in_one_line_and_force_loads(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    run, base = trained
    recorded = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_fingerprint"]
    original = {p.name: p.read_bytes() for p in base.iterdir()}
    try:
        save_base(base, seed=1)  # the folder now holds another model of the same shapes
        with pytest.raises(LoraExpError) as err:
            inference.load_trained(run)
        now = inference.load_trained(run, force=True)[1].base_fingerprint
        assert now != recorded
        line = (
            f"adapter={str(run / 'adapter')!r} was trained on base {str(base)!r} (fingerprint {recorded[:12]}) but "
            f"the base loaded now, {str(base)!r}, has fingerprint {now[:12]}: other weights of the same shapes"
        )
        assert str(err.value) == f"{line}; pass --force to load it anyway"
        refused = cli(["predict", f"adapter={run}", "text=good great film"], tmp_path)
        assert refused.returncode == 2 and refused.stdout == ""
        assert errors(refused.stderr) == [f"error: {line}; pass --force to load it anyway"]
        forced = cli(["predict", f"adapter={run}", "text=good great film", "--force"], tmp_path)
        assert forced.returncode == 0, forced.stderr[-2000:]
        assert errors(forced.stderr) == [f"warning: {line}; loading anyway (--force)"]
        assert forced.stdout.count("\t") == 2  # label, probability, text
    finally:
        for name, data in original.items():
            (base / name).write_bytes(data)


def test_adapter_bank_refuses_an_adapter_of_another_seed(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """The bank's base is another seed's checkpoint of the same shapes, built with the run's own settings."""
    from lora_exp.training.rundir import recorded_config

    run, base = trained
    cfg = typed_config(recorded_config(run))
    cfg.model.path = str(save_base(tmp_path / "other-bert", seed=1))
    _, model, _, _ = build_model_for(cfg)
    bank = inference.AdapterBank(model)
    with pytest.raises(LoraExpError) as err:
        bank.add("theirs", run / "adapter")
    assert str(err.value).startswith(
        f"adapter 'theirs' ({str(run / 'adapter')!r}) was trained on base {str(base)!r} (fingerprint "
    )
    assert f"the base loaded now, {str(tmp_path / 'other-bert')!r}, has fingerprint" in str(err.value)
    assert "\n" not in str(err.value) and not bank.adapters
    bank.add("theirs", run / "adapter", force=True)
    assert list(bank.adapters) == ["theirs"]


def test_pissa_run_reloads_on_its_own_base(tiny_cfg, tmp_path: Path) -> None:  # noqa: ANN001
    """Reloading re-injects with PiSSA on the pristine base: the recorded fingerprint matches, nothing refused."""
    cfg = tiny_cfg("lora.init=pissa", "trainer.max_steps=2", "trainer.epochs=1")
    loop.train(cfg, tmp_path / "run")
    _, model = inference.load_trained(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert model.base_fingerprint == meta["base_fingerprint"]
    labels = [label for label, _ in inference.predict(tmp_path / "run", ["good fun", "bad dull"], progress=False)]
    assert len(labels) == 2 and set(labels) <= {"fresh", "rotten"}
