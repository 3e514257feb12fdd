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

# One configuration; seeds repeat it. Model and data too: runs of two models are never averaged together.
CONFIG_KEYS = ["model", "data", "method", "targets", "r", "alpha", "rslora", "lr"]
ARM_KEYS = [k for k in CONFIG_KEYS if k != "lr"]  # an arm of the fair comparison: its lr is chosen on validation
MEMORY_PARTS = ["mem_params_bytes", "mem_grads_bytes", "mem_optimizer_bytes", "mem_activations_bytes"]
METHOD_COLORS = {"full": "tab:red", "frozen": "tab:gray", "lora": "tab:blue"}
# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; beyond, the normal 1.96 is close enough.
# fmt: off
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
# fmt: on


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
    for col in [
        *CONFIG_KEYS,
        "status",
        "reason",
        "seed",
        "test_acc",
        "history",
        "config_hash",
        "adapter_params",
        "head_params",
        "other_trainable_params",
    ]:
        if col not in df:
            df[col] = None
    # A rerun (`lora-exp rerun`) repeats a job, it is not another seed: keep one finished row per job identity.
    done = df["status"] == "ok"
    twice = done & df["config_hash"].notna() & df.duplicated(["config_hash", "seed"], keep="first")
    return df[~twice].reset_index(drop=True)


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
    ok = _filled(df, CONFIG_KEYS)
    if ok.empty:
        return pd.DataFrame()
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
            **{c: (c, "mean") for c in MEMORY_PARTS if c in ok},
        )
        .reset_index()
    )
    labels = agg.apply(_config_label, axis=1)
    if (agg.groupby(labels)["lr"].nunique() > 1).any():  # lr varies within a config: say which point is which
        labels = [f"{c} lr={lr:g}" for c, lr in zip(labels, agg["lr"])]
    agg.insert(0, "config", labels)
    return agg.sort_values(["method", "trainable_params", "lr"], kind="stable").reset_index(drop=True)


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
    runs = df[df["status"] == "ok"]
    by_method = len(runs) > 8  # many runs: one legend entry per method, not per run
    seen: set[str] = set()
    for _, row in runs.iterrows():
        hist = pd.DataFrame(row["history"] or [])
        if hist.empty:
            continue
        label = str(row["method"]) if by_method else f"{_config_label(row)} s{row['seed']}"
        if label in seen:
            label = "_" + label  # matplotlib leaves "_"-labels out of the legend
        else:
            seen.add(label)

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


def _filled(df: pd.DataFrame, keys: list[str], finished: bool = True) -> pd.DataFrame:
    """Finished (or failed) runs with missing key values as "-" (pandas drops NaN keys from groups)."""
    part = df[(df["status"] == "ok") == finished].copy()
    part[keys] = part[keys].astype(object).where(part[keys].notna(), "-")
    return part


def fair_comparison(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The protocol: per arm, the lr with the best mean validation accuracy over seeds; test accuracy at
    that lr (mean, 95% CI); and the paired difference to full fine-tuning on the same seeds."""
    ok = _filled(df, CONFIG_KEYS)
    if ok.empty:
        return pd.DataFrame(), pd.DataFrame()
    by_lr = ok.groupby(ARM_KEYS + ["lr"], sort=False).agg(val=("best_val_acc", "mean")).reset_index()
    # An lr whose seeds partly failed (diverged) must not win on its survivors: each failure costs 1.0.
    n_failed = _filled(df, CONFIG_KEYS, finished=False).groupby(ARM_KEYS + ["lr"], sort=False).size()
    by_lr["score"] = by_lr["val"] - [
        n_failed.get(tuple(k), 0) for k in by_lr[ARM_KEYS + ["lr"]].itertuples(index=False)
    ]
    tried = by_lr.groupby(ARM_KEYS, sort=False)["lr"].apply(lambda s: ", ".join(f"{v:g}" for v in sorted(s)))
    best = by_lr.loc[by_lr.groupby(ARM_KEYS, sort=False)["score"].idxmax(), ARM_KEYS + ["lr"]]
    chosen = ok.merge(best, on=ARM_KEYS + ["lr"])
    table = (
        chosen.groupby(ARM_KEYS + ["lr"], sort=False)
        .agg(
            seeds=("seed", "nunique"),
            val_acc=("best_val_acc", "mean"),
            test_acc=("test_acc", "mean"),
            test_acc_ci95=("test_acc", ci95),
            trainable_params=("trainable_params", "first"),
            adapter_params=("adapter_params", "first"),
            head_params=("head_params", "first"),
            other_params=("other_trainable_params", "first"),
        )
        .reset_index()
    )
    table["lrs_tried"] = [tried[tuple(row)] for row in table[ARM_KEYS].itertuples(index=False)]
    table.insert(0, "config", table.apply(_config_label, axis=1))
    full = chosen[chosen.method == "full"][["model", "data", "seed", "test_acc"]]
    full = full.rename(columns={"test_acc": "full_acc"})
    rows = []
    for _, arm in chosen[chosen.method != "full"].groupby(ARM_KEYS, sort=False):
        pairs = arm.merge(full, on=["model", "data", "seed"])

        if pairs.empty:
            continue
        diff = pairs["test_acc"] - pairs["full_acc"]
        rows.append(
            {
                "config": _config_label(arm.iloc[0]),
                "pairs": len(diff),
                "diff_vs_full": diff.mean(),
                "diff_ci95": ci95(diff),
            }
        )
    return table, pd.DataFrame(rows)


def _count(n: float | None) -> str:
    return "n/a" if n is None or pd.isna(n) else f"{n:,.0f}"


def fair_markdown(table: pd.DataFrame, paired: pd.DataFrame) -> str:
    """The fair comparison as Markdown: chosen lr, test mean ± CI, trainable breakdown, paired differences."""
    if table.empty:
        return "No finished runs.\n"
    show = pd.DataFrame(
        {
            "config": table["config"],
            "lrs tried": table["lrs_tried"],
            "chosen lr (val)": table["lr"].map("{:g}".format),
            "val acc": table["val_acc"].map("{:.4f}".format),
            "test acc (mean ± 95% CI)": [
                f"{m:.4f}" + ("" if pd.isna(c) else f" ± {c:.4f}") for m, c in zip(table.test_acc, table.test_acc_ci95)
            ],
            "seeds": table["seeds"],
            "trainable (adapter / head / other)": [
                f"{_count(t)} ({_count(a)} / {_count(h)} / {_count(o)})"
                for t, a, h, o in zip(
                    table.trainable_params, table.adapter_params, table.head_params, table.other_params
                )
            ],
        }
    )
    text = show.to_markdown(index=False) + "\n"
    if not paired.empty:
        diffs = pd.DataFrame(
            {
                "config": paired["config"],
                "paired seeds": paired["pairs"],
                "test acc − full FT (mean ± 95% CI)": [
                    f"{m:+.4f}" + ("" if pd.isna(c) else f" ± {c:.4f}")
                    for m, c in zip(paired.diff_vs_full, paired.diff_ci95)
                ],
            }
        )
        text += "\nPaired difference to full fine-tuning (same seed):\n\n" + diffs.to_markdown(index=False) + "\n"
    return text


def plot_pareto(summary: pd.DataFrame, path: Path) -> Path:
    """Test accuracy (CI bars) against peak memory and against trainable parameters, one point per config."""
    gpu = summary["peak_vram_gib"].notna().any()
    mem = summary["peak_vram_gib"] if gpu else summary["peak_host_rss_gib"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for x, ax, label in (
        (mem, axes[0], "peak GPU memory (GiB)" if gpu else "peak host RSS (GiB), CPU runs"),
        (summary["trainable_params"], axes[1], "trainable parameters (log scale)"),
    ):
        for xv, (_, row) in zip(x, summary.iterrows()):
            ax.errorbar(
                xv,
                row.test_acc,
                yerr=0 if pd.isna(row.test_acc_ci95) else row.test_acc_ci95,
                fmt="o",
                capsize=3,
                color=METHOD_COLORS.get(row.method, "k"),
                label=row.config,
            )
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title("Accuracy vs memory")
    axes[1].set_title("Accuracy vs trainable parameters")
    axes[1].legend(fontsize=7)
    return _save(fig, path)


def plot_memory_breakdown(summary: pd.DataFrame, path: Path) -> Path | None:
    """Stacked bars: parameters, gradients, optimizer state, activations (GPU runs) per configuration."""
    parts = [c for c in MEMORY_PARTS if c in summary and summary[c].notna().any()]
    if not parts:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(summary) + 2), 4.2))
    bottom = pd.Series(0.0, index=summary.index)
    for part in parts:
        values = summary[part].fillna(0) / 2**30
        ax.bar(summary["config"], values, bottom=bottom, label=part.removeprefix("mem_").removesuffix("_bytes"))
        bottom += values
    ax.set_ylabel("GiB")
    gpu = "mem_activations_bytes" in parts
    ax.set_title(
        "Memory breakdown" + ("" if gpu else "\n(CPU runs: parameters, gradients, optimizer state only)"), fontsize=10
    )

    ax.legend()
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    for lbl in ax.get_xticklabels():
        lbl.set_horizontalalignment("right")
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
    written["pareto.png"] = plot_pareto(summary, out / "pareto.png")
    table, paired = fair_comparison(df)
    (out / "fair.md").write_text(fair_markdown(table, paired))
    written["fair.md"] = out / "fair.md"
    for name, fn in (
        ("accuracy_vs_rank.png", plot_accuracy_vs_rank),
        ("rank_alpha_heatmap.png", plot_rank_alpha_heatmap),
        ("memory_breakdown.png", plot_memory_breakdown),
    ):
        if (p := fn(summary, out / name)) is not None:
            written[name] = p
    return written
