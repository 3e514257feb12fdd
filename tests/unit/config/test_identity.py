"""What pools and what pairs: hashes of the resolved device and precision, the pair keys, the lr chosen by the
monitored metric, and a chosen lr at the edge of its grid."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser

from lora_exp import device as devices
from lora_exp.analysis import fair, report
from lora_exp.commands import report as report_command
from lora_exp.config.identity import arm_hash, group_hash
from tests.helpers.configs import make_cfg
from tests.helpers.results import write_result

CPU_BF16 = devices.compute_identity(torch.device("cpu"), "bf16", "fp32")
CPU_FP32 = devices.compute_identity(torch.device("cpu"), "fp32", "fp32")
H200 = {"device": "cuda", "gpu": "NVIDIA H200", "precision": "bf16", "base_dtype": "fp32"}
H100 = {**H200, "gpu": "NVIDIA H100 80GB HBM3"}


def test_resolved_compute_decides_the_group_not_the_configured_strings() -> None:
    auto = make_cfg(["model=tiny_bert", "data.path=/x.csv.bz2"])  # trainer.device=auto, trainer.precision=auto
    explicit = make_cfg(["model=tiny_bert", "data.path=/x.csv.bz2", "trainer.device=cpu", "trainer.precision=bf16"])
    assert group_hash(auto, CPU_BF16) == group_hash(explicit, CPU_BF16)
    assert arm_hash(auto, CPU_BF16) == arm_hash(explicit, CPU_BF16)
    hashes = {group_hash(auto, c) for c in (CPU_BF16, CPU_FP32, H200, H100)}
    assert len(hashes) == 4  # an AVX2 CPU (fp32), an AVX512-BF16 CPU, and two GPU models never pool
    bf16_base = make_cfg(["model=tiny_bert", "data.path=/x.csv.bz2", "model.base_dtype=bf16"])
    assert group_hash(bf16_base, {**CPU_BF16, "base_dtype": "bf16"}) != group_hash(auto, CPU_BF16)


def test_resolve_compute_records_full_with_a_bf16_base_as_fp32() -> None:
    cfg = make_cfg(["method=full", "model.base_dtype=bf16", "trainer.device=cpu", "trainer.precision=fp32"])
    assert devices.resolve_compute(cfg.trainer, cfg.model, "full") == CPU_FP32
    lora = make_cfg(["model.base_dtype=bf16", "trainer.device=cpu", "trainer.precision=bf16"])
    assert devices.resolve_compute(lora.trainer, lora.model, "lora")["base_dtype"] == "bf16"


def _result(tmp: Path, name: str, overrides: list[str] | None = None, **fields) -> None:
    """``test_report``'s results.json with the identity fields these tests pair on, and the job's overrides."""
    identity = dict(variant="lora", model="m", data="d", r=8, alpha=16, lora_dropout=0.0, precision="bf16")
    write_result(tmp, name, **{**identity, "device_type": "cpu", **fields})
    if overrides is not None:
        (tmp / name / ".hydra").mkdir()
        (tmp / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def test_a_cpu_and_a_gpu_run_of_one_seed_are_both_kept_and_never_paired(tmp_path: Path) -> None:
    cfg = make_cfg(["model=tiny_bert", "data.path=/x.csv.bz2"])
    full = make_cfg(["model=tiny_bert", "data.path=/x.csv.bz2", "method=full"])
    for where, compute, gpu in (("cpu", CPU_BF16, None), ("gpu", H200, H200["gpu"])):
        for method, c in (("lora", cfg), ("full", full)):
            _result(
                tmp_path,
                f"{where}-{method}",
                method=method,
                variant=method,
                lr=1e-3 if method == "lora" else 1e-4,
                device_type=compute["device"],
                gpu_name=gpu,
                group_hash=group_hash(c, compute),
                arm_hash=arm_hash(c, compute),
                test_acc=0.8 if where == "cpu" else 0.9,
            )
    _result(tmp_path, "gpu-lora-lr2", lr=2e-3, device_type="cuda", gpu_name=H200["gpu"], arm_hash=arm_hash(cfg, H200))
    df = report.load_runs(tmp_path)
    assert len(df) == 5 and df["_group"].nunique() == 5
    table, paired = report.fair_comparison(df)
    assert len(table) == 4  # lora and full, on the CPU and on the GPU
    assert sorted(paired["pairs"]) == [1, 1] and (paired["diff"] == 0).all()  # each device's own full run


def test_plain_lora_reference_matches_alpha_and_dropout(tmp_path: Path) -> None:
    for seed in (1, 2):
        _result(tmp_path, f"dora{seed}", variant="dora", seed=seed, arm_hash="dora", test_acc=0.85)
        _result(tmp_path, f"lora-a32-{seed}", seed=seed, alpha=32, arm_hash="lora_a32", test_acc=0.5)
        _result(tmp_path, f"lora-drop-{seed}", seed=seed, lora_dropout=0.1, arm_hash="lora_drop", test_acc=0.6)
    _, paired = report.fair_comparison(report.load_runs(tmp_path))
    assert paired.empty or not (paired["reference"] == "LoRA").any()  # neither is DoRA's shape
    _result(tmp_path, "lora-same-1", seed=1, arm_hash="lora_same", test_acc=0.80)
    _result(tmp_path, "lora-same-2", seed=2, arm_hash="lora_same", test_acc=0.80)
    _, paired = report.fair_comparison(report.load_runs(tmp_path))
    row = paired[(paired["reference"] == "LoRA") & paired["config"].str.startswith("dora")].iloc[0]
    assert row["pairs"] == 2 and row["diff"] == pytest.approx(0.05)


def test_two_full_arms_in_one_dir_pair_once_each(tmp_path: Path) -> None:
    for seed in (1, 2, 3):
        _result(tmp_path, f"lora{seed}", seed=seed, arm_hash="lora", test_acc=0.8)
        for wd, acc in ((0.0, 0.7), (0.01, 0.75)):
            _result(
                tmp_path,
                f"full{wd}s{seed}",
                method="full",
                variant="full",
                r=None,
                alpha=None,
                targets=None,
                lr=1e-4,
                seed=seed,
                arm_hash=f"{wd}-full",
                test_acc=acc,
            )
    _, paired = report.fair_comparison(report.load_runs(tmp_path))
    lora = paired[paired["config"].str.startswith("lora")]
    assert sorted(lora["pairs"]) == [3, 3]  # never 6: one row per reference arm, one pair per seed
    assert sorted(lora["diff"].round(6)) == [0.05, 0.1]
    assert lora["reference"].nunique() == 2 and all(r.startswith("full fine-tuning (") for r in lora["reference"])


def test_lr_is_chosen_by_the_monitored_metric(tmp_path: Path) -> None:
    # 1e-3 has the better accuracy, 2e-3 the better AUC (and, for the loss arm, 5e-4 the lower loss)
    for seed in (1, 2):
        for lr, acc, auc in ((1e-3, 0.9, 0.70), (2e-3, 0.8, 0.95)):
            _result(
                tmp_path,
                f"auc{lr}s{seed}",
                lr=lr,
                seed=seed,
                arm_hash="auc",
                monitor="val/auc",
                best_val_acc=acc,
                best_val_auc=auc,
            )
        for lr, loss in ((5e-4, 0.2), (1e-3, 0.5)):
            _result(
                tmp_path,
                f"loss{lr}s{seed}",
                lr=lr,
                seed=seed,
                alpha=32,
                arm_hash="loss",
                monitor="val/loss",
                best_val_loss=loss,
                best_val_acc=0.9 if lr == 1e-3 else 0.6,
            )
    table, _ = report.fair_comparison(report.load_runs(tmp_path))
    chosen = table.set_index("_arm")
    assert chosen.loc["auc", "lr"] == 2e-3 and chosen.loc["auc", "val"] == pytest.approx(0.95)
    assert chosen.loc["loss", "lr"] == 5e-4 and chosen.loc["loss", "monitor"] == "val/loss"
    md = fair.markdown(*report.fair_comparison(report.load_runs(tmp_path)))
    assert "0.9500 auc" in md and "0.2000 loss" in md


@pytest.mark.e2e  # composes a whole sweep's jobs (>5 s): the full tier
def test_a_chosen_lr_at_the_edge_is_flagged_and_report_prints_the_widening_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    grid = (1e-3, 2e-3, 4e-3)
    for i, lr in enumerate(grid):
        for seed in (1, 2):
            overrides = ["+sweep=fair", "method=lora", f"lr_index={i}", f"trainer.seed={seed}", "data.limit=200"]
            _result(tmp_path, f"lora{i}s{seed}", overrides, lr=lr, seed=seed, arm_hash="top", best_val_acc=0.7 + lr)
            _result(
                tmp_path, f"mid{i}s{seed}", lr=lr, seed=seed, alpha=8, arm_hash="mid", best_val_acc=0.8 - abs(i - 1)
            )
    table, _ = report.fair_comparison(report.load_runs(tmp_path))
    assert dict(zip(table["_arm"], table["lr_edge"].fillna("-"))) == {"top": "high", "mid": "-"}
    written = report.write_report(tmp_path)
    md = written["fair.md"].read_text()
    assert md.count(fair.EDGE_MARKS["high"]) == 1 and "widens the grid" in md
    assert report_command.main(str(tmp_path)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "widen:" in line]
    assert len(lines) == 1 and "lr 0.004 is the highest tried" in lines[0]
    command = shlex.split(lines[0].split("widen: ", 1)[1])
    assert command[:3] == ["lora-exp", "-m", "+sweep=fair"]
    assert "method.lr_grid=[0.008,0.016]" in command and "lr_index=0,1" in command
    assert "trainer.seed=1,2" in command and "data.limit=200" in command and "method=lora" in command
    assert not any(c.startswith("lr_index=2") for c in command)
    parsed = OverridesParser.create().parse_overrides(command[2:])  # Hydra accepts every override
    assert len(parsed) == len(command) - 2


def test_widened_grid_goes_beyond_the_edge_in_the_grid_ratio() -> None:
    assert fair.widened(4e-3, [1e-3, 2e-3, 4e-3], "high") == [8e-3, 1.6e-2]
    assert fair.widened(1e-4, [1e-4, 3e-4, 9e-4], "low") == pytest.approx([1.11e-5, 3.33e-5])
    assert fair.grid_edge(2e-3, [1e-3, 2e-3, 4e-3]) is None and fair.grid_edge(1e-3, [1e-3]) is None


def test_a_second_widening_goes_to_a_new_folder(tmp_path: Path) -> None:
    """Widening twice (the lr still at the top) must not send the new grid into the first widening's job dirs."""
    import pandas as pd

    runs = pd.DataFrame({"seed": [1, 2], "job_dir": [str(tmp_path / "a"), str(tmp_path / "b")], "method": "lora"})
    first = fair.widen_command("arm", runs, 4e-3, [1e-3, 2e-3, 4e-3], "high", tmp_path)
    second = fair.widen_command("arm", runs, 1.6e-2, [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], "high", tmp_path)
    dirs = [next(c for c in shlex.split(cmd) if c.startswith("hydra.sweep.dir=")) for cmd in (first, second)]
    assert dirs[0] != dirs[1] and all(d.startswith(f"hydra.sweep.dir={tmp_path}/widen_high_") for d in dirs)
    assert "method.lr_grid=[0.032,0.064]" in shlex.split(second) or "optimizer.lr=0.032,0.064" in shlex.split(second)
