"""The fair protocol's choices: each arm's learning rate by the metric its runs monitored, a chosen lr at the
edge of its grid, and the sweep command that widens that grid. Used by ``report.fair_comparison``."""

from __future__ import annotations

import hashlib
import math
import shlex
from pathlib import Path

import pandas as pd
import yaml

from lora_exp.analysis.stats import count, rate

# trainer.monitor -> the results.json column of the best step's value; val/loss is the one lower-is-better
MONITOR_COLUMNS = {
    "val/acc": "best_val_acc",
    "val/f1": "best_val_f1",
    "val/auc": "best_val_auc",
    "val/mcc": "best_val_mcc",
    "val/pearson": "best_val_pearson",
    "val/spearman": "best_val_spearman",
    "val/mse": "best_val_mse",
    "val/loss": "best_val_loss",
}
LOWER_IS_BETTER = ("val/mse", "val/loss")
EDGE_MARKS = {"high": "▲ highest tried", "low": "▼ lowest tried"}
# a job's own overrides that the widening command replaces
GRID_KEYS = ("lr_index", "trainer.seed", "method.lr_grid", "optimizer.lr", "method.lr")


# the test column a fair table reports for the metric its runs selected by (selected by the loss: accuracy for
# classes, Pearson for scores)
TEST_COLUMNS = {
    "val/acc": ("test_acc", "test acc"),
    "val/f1": ("test_f1", "test F1"),
    "val/auc": ("test_auc", "test AUC"),
    "val/mcc": ("test_mcc", "test MCC"),
    "val/pearson": ("test_pearson", "test Pearson"),
    "val/spearman": ("test_spearman", "test Spearman"),
    "val/mse": ("test_mse", "test MSE"),
    "val/loss": ("test_acc", "test acc"),
}


def headline(runs: pd.DataFrame) -> tuple[str, str]:
    """The test column and its label that the summary, a fair table and its paired differences report: the test
    value of the metric every run monitored (AUC for a detector selected by validation AUC, Pearson for scores
    selected by it), else accuracy (classes) or Pearson (scores: regression runs have no accuracy) when the runs
    selected by different metrics or by the loss, or when the column is missing."""
    monitors = {m if m in MONITOR_COLUMNS else "val/acc" for m in runs.get("monitor", pd.Series(["val/acc"]))}
    tried = [TEST_COLUMNS[monitors.pop()]] if len(monitors) == 1 else []
    tried += [TEST_COLUMNS["val/acc"], TEST_COLUMNS["val/pearson"]]
    return next((c for c in tried if c[0] in runs and runs[c[0]].notna().any()), TEST_COLUMNS["val/acc"])


def lora_twin_rank(runs: pd.DataFrame) -> pd.Series:
    """The rank of the plain LoRA each run is compared with: its own ``r``; for AdaLoRA the mean of its final
    per-layer ranks (the budget, ``lora.adalora.target_r``, that it prunes its initial ``r`` to); for VeRA none
    (NaN), since its ``r`` is the rank of the random projections all layers share: plain LoRA of any rank with
    the same targets, alpha and dropout pairs with it."""
    finals = runs["adalora_ranks"] if "adalora_ranks" in runs else pd.Series(None, index=runs.index)
    ranks = []
    for variant, r, final in zip(runs["variant"], runs["r"], finals):
        if variant == "vera":
            ranks.append(float("nan"))
        elif variant == "adalora" and isinstance(final, dict) and final:
            ranks.append(float(round(sum(final.values()) / len(final))))
        else:
            ranks.append(float(r))
    return pd.Series(ranks, index=runs.index)


def monitor_of(runs: pd.DataFrame) -> str:
    """The metric an arm's runs selected their best step by (``trainer.monitor``; val/acc for older results)."""
    known = [m for m in runs.get("monitor", pd.Series(dtype=object)).dropna() if m in MONITOR_COLUMNS]
    return known[0] if known else "val/acc"


def lr_scores(ok: pd.DataFrame, failed: pd.DataFrame) -> pd.DataFrame:
    """Per arm and lr: the monitored metric's mean over seeds (``val``), the arm's ``monitor`` and a ``score``
    where higher is better (the loss negated). A failed (diverged) seed costs 1.0, so an lr whose seeds partly
    failed never wins on its survivors; an lr with no value (AUC of one-class splits) never wins."""
    rows = []
    n_failed = failed.groupby(["_arm", "lr"], sort=False).size() if len(failed) else pd.Series(dtype=int)
    for arm, runs in ok.groupby("_arm", sort=False):
        monitor = monitor_of(runs)
        column = MONITOR_COLUMNS[monitor] if MONITOR_COLUMNS[monitor] in runs else "best_val_acc"
        sign = -1.0 if monitor in LOWER_IS_BETTER else 1.0
        for lr, at_lr in runs.groupby("lr", sort=False):
            val = pd.to_numeric(at_lr[column], errors="coerce").mean()
            score = sign * val - n_failed.get((arm, lr), 0)
            rows.append({"_arm": arm, "lr": lr, "monitor": monitor, "val": val, "score": score})
    out = pd.DataFrame(rows, columns=["_arm", "lr", "monitor", "val", "score"])
    out["score"] = out["score"].fillna(-math.inf)
    return out


def tried_lrs(runs: pd.DataFrame) -> dict[str, list[float]]:
    """Every lr each arm ran at, finished or failed, sorted."""
    have = runs[runs["lr"].notna()]
    return {arm: sorted({float(v) for v in g["lr"]}) for arm, g in have.groupby("_arm", sort=False)}


def grid_edge(lr: float, tried: list[float]) -> str | None:
    """``high`` / ``low`` when the chosen ``lr`` is the largest / smallest of at least two tried, else None:
    the best lr may then lie outside the grid."""
    if len(tried) < 2:
        return None
    if lr == max(tried):
        return "high"
    if lr == min(tried):
        return "low"
    return None


def widened(lr: float, tried: list[float], edge: str) -> list[float]:
    """Two new lrs beyond the chosen one, in the grid's own ratio (2x when it has none)."""
    pair = tried[-2:] if edge == "high" else tried[:2]
    ratio = pair[1] / pair[0] if pair[0] > 0 and pair[1] > pair[0] else 2.0
    step = ratio if edge == "high" else 1 / ratio
    return sorted(float(f"{lr * step**k:.3g}") for k in (1, 2))


def job_overrides(job_dir: str | Path) -> list[str] | None:
    """The job's own Hydra overrides (``.hydra/overrides.yaml``, written by Hydra in every job dir)."""
    path = Path(job_dir) / ".hydra" / "overrides.yaml"
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return [str(o) for o in loaded] if isinstance(loaded, list) else None


def preset_spelling(overrides: list[str]) -> list[str]:
    """A job's overrides with the presets' old spelling (``+variant=dora_r32_all``, before one preset per
    variant) as today's: ``+preset=dora lora.r=32 lora.targets=[q,k,v,o,ffn]``, the same job."""
    out = []
    for o in overrides:
        key, _, name = o.partition("=")
        if key != "+variant":
            out.append(o)
            continue
        out.append(f"+preset={name.replace('_r32', '').replace('_all', '')}")
        out += ["lora.r=32"] * ("_r32" in name) + ["lora.targets=[q,k,v,o,ffn]"] * name.endswith("_all")
    return out


def widen_command(arm: str, runs: pd.DataFrame, lr: float, tried: list[float], edge: str, root: Path) -> str:
    """The sweep that runs this arm at two lrs beyond the edge of its grid, with its seeds, into a folder under
    ``root`` named by the arm and the new lrs (so ``lora-exp report ROOT`` then reads every grid: same arm hash,
    one arm; widening again goes to a new folder)."""
    new = widened(lr, tried, edge)
    seeds = ",".join(str(int(s)) for s in sorted(runs["seed"].dropna().unique()))
    overrides = next((o for o in map(job_overrides, runs["job_dir"]) if o is not None), None)
    if overrides is None:  # not a Hydra job dir: name the arm by what results.json says
        row = runs.iloc[0]
        overrides = [f"method={row['method']}"]
    keep = [o for o in preset_spelling(overrides) if o.split("=", 1)[0].lstrip("+~") not in GRID_KEYS]
    fair_sweep = any(o.split("=", 1)[0].lstrip("+") == "lr_index" for o in overrides)
    values = ",".join(f"{v:g}" for v in new)
    grid = [f"method.lr_grid=[{values}]", "lr_index=0,1"] if fair_sweep else [f"optimizer.lr={values}"]
    # one folder per arm and new grid: a second widening never lands in the first one's job dirs
    folder = Path(root) / f"widen_{edge}_{hashlib.sha256(f'{arm}|{values}'.encode()).hexdigest()[:6]}"
    return "lora-exp -m " + shlex.join([*keep, *grid, f"trainer.seed={seeds}", f"hydra.sweep.dir={folder}"])


def widen_commands(df: pd.DataFrame, table: pd.DataFrame, root: Path) -> list[str]:
    """For each arm of ``report.fair_comparison``'s table whose chosen lr is at the edge of its grid: the sweep
    command that tries two lrs beyond."""
    out = []
    for _, row in table[table["lr_edge"].notna()].iterrows() if not table.empty else []:
        runs = df[(df["_arm"] == row["_arm"]) & (df["status"] == "ok")]
        tried = tried_lrs(df[df["_arm"] == row["_arm"]]).get(row["_arm"], [])
        command = widen_command(row["_arm"], runs, row["lr"], tried, row["lr_edge"], root)
        out.append(f"{row['config']}: lr {row['lr']:g} is the {row['lr_edge']}est tried; widen: {command}")
    return out


def markdown(table: pd.DataFrame, paired: pd.DataFrame) -> str:
    """The fair comparison as Markdown: chosen lr, test mean ± CI, trainable breakdown, paired differences."""
    if table.empty:
        return "No finished runs.\n"
    show = pd.DataFrame(
        {
            "config": table["config"],
            "lrs tried": table["lrs_tried"],
            "chosen lr (val)": [
                f"{lr:g}" + (f" {EDGE_MARKS[e]}" if isinstance(e, str) else "")
                for lr, e in zip(table["lr"], table["lr_edge"])
            ],
            "val (monitored)": [f"{v:.4f} {m.split('/')[-1]}" for v, m in zip(table["val"], table["monitor"])],
            f"{table['headline_name'].iloc[0]} (mean ± 95% CI)": [
                f"{m:.4f}" + ("" if pd.isna(c) else f" ± {c:.4f}") for m, c in zip(table.headline, table.headline_ci95)
            ],
            "seeds": table["seeds"],
            "predicted peak (GiB)": table["predicted_peak_gib"].map(lambda v: "-" if pd.isna(v) else f"{v:.2f}"),
            "train time (s)": table["train_s"].map(lambda v: "-" if pd.isna(v) else f"{v:.0f}"),
            "samples/s (steady)": [
                f"{a:.1f} ({rate(b)})" for a, b in zip(table.samples_per_s, table.steady_samples_per_s)
            ],
            "trainable (adapter / head / other)": [
                f"{count(t)} ({count(a)} / {count(h)} / {count(o)})"
                for t, a, h, o in zip(
                    table.trainable_params, table.adapter_params, table.head_params, table.other_trainable_params
                )
            ],
        }
    )
    text = show.to_markdown(index=False) + "\n"
    if table["lr_edge"].notna().any():
        text += (
            "\n▲ / ▼: the chosen lr is the highest / lowest of its grid, so a better one may lie beyond it; "
            "`lora-exp report` prints the sweep that widens the grid.\n"
        )
    for ref_name, rows in paired.groupby("reference", sort=False) if not paired.empty else []:
        diffs = pd.DataFrame(
            {
                "config": rows["config"],
                "paired seeds": rows["pairs"],
                f"{rows['metric'].iloc[0]} − {ref_name} (mean ± 95% CI)": [
                    f"{m:+.4f}" + ("" if pd.isna(c) else f" ± {c:.4f}") for m, c in zip(rows["diff"], rows.diff_ci95)
                ],
            }
        )
        text += f"\nPaired difference to {ref_name} (same seed):\n\n" + diffs.to_markdown(index=False) + "\n"
    return text
