"""Runs -> one pandas DataFrame -> a summary table (CSV + Markdown) and matplotlib figures.

The same functions serve ``lora-exp report DIR`` and ``notebooks/analysis.ipynb``. Seeds are repeats of
one configuration: the table shows their mean and a 95% t-interval.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lora_exp.errors import LoraExpError  # noqa: E402

CONFIG_KEYS = ["method", "targets", "r", "alpha", "rslora", "lr"]  # one configuration; seeds repeat it
METHOD_COLORS = {"full": "tab:red", "frozen": "tab:gray", "lora": "tab:blue"}
# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; beyond, the normal 1.96 is close enough.
T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def load_runs(root: Path) -> pd.DataFrame:
    """Every ``results.json`` below ``root`` as one row (failed jobs included, ``status`` says which)."""
    rows = []
    for path in sorted(Path(root).rglob("results.json")):
        try:
            row = json.loads(path.read_text())
        except json.JSONDecodeError:
            row = {"status": "failed", "failure": "error", "reason": f"unreadable {path.name}"}
        row["job_dir"] = str(path.parent)
        rows.append(row)
    if not rows:
        raise LoraExpError(f"report: no results.json under {str(root)!r} (is it a run or multirun dir?)")
    df = pd.DataFrame(rows)
    for col in [*CONFIG_KEYS, "status", "reason", "seed", "test_acc", "history"]:
        if col not in df:
            df[col] = None
    return df


def ci95(values: pd.Series) -> float:
    """Half-width of the 95% t-interval of the mean (NaN for fewer than two values)."""
    v = values.dropna()
    n = len(v)
    if n < 2:
        return math.nan
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return t * v.std(ddof=1) / math.sqrt(n)


def _config_label(row: pd.Series) -> str:
    if row["method"] != "lora":
        return str(row["method"])
    rs = " rs" if row.get("rslora") is True else ""
    return f"lora r={row['r']:g} a={row['alpha']:g} {row['targets']}{rs}"


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration over its seeds: costs (params, memory, time) and accuracy (mean, CI)."""
    ok = df[df["status"] == "ok"].copy()
    if ok.empty:
        return pd.DataFrame()
    keys = ok[CONFIG_KEYS].astype(object).where(ok[CONFIG_KEYS].notna(), "-")
    ok[CONFIG_KEYS] = keys
    agg = (
        ok.groupby(CONFIG_KEYS, sort=False)
        .agg(
            seeds=("seed", "nunique"),
            trainable_params=("trainable_params", "first"),
            trainable_pct=("trainable_pct", "first"),
            peak_vram_gib=("peak_vram_bytes", lambda s: s.mean() / 2**30 if s.notna().any() else math.nan),
            peak_host_rss_gib=("peak_host_rss_bytes", lambda s: s.mean() / 2**30),
            train_s=("train_seconds", "mean"),
            samples_per_s=("samples_per_s", "mean"),
            best_val_acc=("best_val_acc", "mean"),
            test_acc=("test_acc", "mean"),
            test_acc_ci95=("test_acc", ci95),
        )
        .reset_index()
    )
    agg.insert(0, "config", agg.apply(_config_label, axis=1))
    return agg.sort_values(["method", "trainable_params"], kind="stable").reset_index(drop=True)


def to_markdown(summary: pd.DataFrame, df: pd.DataFrame) -> str:
    """The summary as a Markdown table, plus the failed jobs with their reasons."""
    if summary.empty:
        table = "No finished runs."
    else:
        show = pd.DataFrame(
            {
                "config": summary["config"],
                "trainable params": [
                    f"{n:,.0f} ({p:.2f}%)" for n, p in zip(summary.trainable_params, summary.trainable_pct)
                ],
                "peak VRAM (GiB)": summary["peak_vram_gib"].map(lambda v: "n/a (CPU)" if pd.isna(v) else f"{v:.2f}"),
                "host RSS (GiB)": summary["peak_host_rss_gib"].map("{:.2f}".format),
                "train time (s)": summary["train_s"].map("{:.0f}".format),
                "samples/s": summary["samples_per_s"].map("{:.1f}".format),
                "lr": summary["lr"].map(lambda v: f"{v:g}" if isinstance(v, float) else str(v)),
                "best val acc": summary["best_val_acc"].map("{:.4f}".format),
                "test acc": [
                    f"{m:.4f}" + ("" if pd.isna(c) else f" ± {c:.4f}")
                    for m, c in zip(summary.test_acc, summary.test_acc_ci95)
                ],
                "seeds": summary["seeds"],
            }
        )
        table = show.to_markdown(index=False)
    failed = df[df["status"] != "ok"]
    if len(failed):
        lines = [
            f"- `{Path(d).name}` ({m}): {f}: {r}"
            for d, m, f, r in zip(failed["job_dir"], failed["method"], failed.get("failure", "error"), failed["reason"])
        ]
        table += "\n\nFailed jobs:\n" + "\n".join(lines)
    return table + "\n"


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_vs_params(summary: pd.DataFrame, path: Path) -> Path:
    """Test accuracy (mean, 95% CI) against trainable parameters on a log axis."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for _, row in summary.iterrows():
        ci = 0 if pd.isna(row.test_acc_ci95) else row.test_acc_ci95
        ax.errorbar(
            row.trainable_params, row.test_acc, yerr=ci, fmt="o", capsize=3, color=METHOD_COLORS.get(row.method, "k")
        )
        ax.annotate(
            row.config, (row.trainable_params, row.test_acc), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("What each method buys: accuracy vs trainable parameters")
    ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=c, label=m)
        for m, c in METHOD_COLORS.items()
        if m in set(summary.method)
    ]
    ax.legend(handles=handles, title="method")
    return _save(fig, path)


def plot_memory(summary: pd.DataFrame, path: Path) -> Path:
    """Peak GPU memory per configuration (host peak RSS when the runs were on CPU)."""
    gpu = summary["peak_vram_gib"].notna().any()
    values = summary["peak_vram_gib"] if gpu else summary["peak_host_rss_gib"]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(summary) + 2), 4))
    ax.bar(summary["config"], values, color=[METHOD_COLORS.get(m, "k") for m in summary.method])
    ax.set_ylabel("peak GPU memory allocated (GiB)" if gpu else "peak host RSS (GiB), CPU runs")
    ax.set_title("What each method costs: peak memory")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    for lbl in ax.get_xticklabels():
        lbl.set_horizontalalignment("right")
    return _save(fig, path)


def plot_validation_curves(df: pd.DataFrame, path: Path) -> Path:
    """Validation accuracy per run against epoch and against training wall-clock time."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for _, row in df[df["status"] == "ok"].iterrows():
        hist = pd.DataFrame(row["history"] or [])
        if hist.empty:
            continue
        label = f"{_config_label(row)} s{row['seed']}"
        color = METHOD_COLORS.get(row["method"])
        left.plot(hist["epoch"], hist["val_acc"], marker=".", color=color, alpha=0.8, label=label)
        right.plot(hist["time_s"], hist["val_acc"], marker=".", color=color, alpha=0.8)
    left.set_xlabel("epoch")
    right.set_xlabel("training wall-clock time (s)")
    left.set_ylabel("validation accuracy")
    left.set_title("Validation accuracy vs epoch")
    right.set_title("Validation accuracy vs training time")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=6)
    return _save(fig, path)


def _alpha_rule(r: float, alpha: float) -> str:
    return "alpha=r" if alpha == r else "alpha=2r" if alpha == 2 * r else f"alpha={alpha:g}"


def plot_accuracy_vs_rank(summary: pd.DataFrame, path: Path) -> Path | None:
    """LoRA test accuracy against rank, one line per alpha rule (None with fewer than two ranks)."""
    lo = summary[summary.method == "lora"].copy()
    if lo["r"].nunique() < 2:
        return None
    lo["rule"] = [_alpha_rule(r, a) + (" rsLoRA" if rs is True else "") for r, a, rs in zip(lo.r, lo.alpha, lo.rslora)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rule, part in lo.groupby("rule"):
        part = part.sort_values("r")
        ax.errorbar(
            part.r.astype(float), part.test_acc, yerr=part.test_acc_ci95.fillna(0), marker="o", capsize=3, label=rule
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank r (log2 scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("LoRA: accuracy vs rank")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_rank_alpha_heatmap(summary: pd.DataFrame, path: Path) -> Path | None:
    """Mean test accuracy over rank x alpha rule (None unless both vary)."""
    lo = summary[(summary.method == "lora") & (summary.rslora != True)].copy()  # noqa: E712 (object column)
    if lo["r"].nunique() < 2 or lo["alpha"].nunique() < 2:
        return None
    lo["rule"] = [_alpha_rule(r, a) for r, a in zip(lo.r, lo.alpha)]
    grid = lo.pivot_table(index="r", columns="rule", values="test_acc", aggfunc="mean").sort_index()
    fig, ax = plt.subplots(figsize=(1.6 * grid.shape[1] + 2.5, 0.5 * grid.shape[0] + 2))
    im = ax.imshow(grid.values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns)
    ax.set_yticks(range(grid.shape[0]), [f"{r:g}" for r in grid.index])
    for (i, j), v in pd.DataFrame(grid.values).stack().items():
        ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xlabel("alpha")
    ax.set_ylabel("rank r")
    ax.set_title("LoRA test accuracy: rank x alpha")
    fig.colorbar(im, ax=ax, label="test accuracy")
    return _save(fig, path)


def write_report(root: Path, out: Path | None = None) -> dict[str, Path]:
    """Read the runs under ``root``; write summary.csv, summary.md and the figures into ``out``."""
    root = Path(root)
    out = Path(out) if out else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    df = load_runs(root)
    df = df[~df["job_dir"].str.startswith(str(out))]
    summary = summarize(df)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(to_markdown(summary, df))
    written = {"summary.csv": out / "summary.csv", "summary.md": out / "summary.md"}
    if summary.empty:
        return written
    written["accuracy_vs_params.png"] = plot_accuracy_vs_params(summary, out / "accuracy_vs_params.png")
    written["memory.png"] = plot_memory(summary, out / "memory.png")
    written["validation_curves.png"] = plot_validation_curves(df, out / "validation_curves.png")
    for name, fn in (
        ("accuracy_vs_rank.png", plot_accuracy_vs_rank),
        ("rank_alpha_heatmap.png", plot_rank_alpha_heatmap),
    ):
        if (p := fn(summary, out / name)) is not None:
            written[name] = p
    return written
