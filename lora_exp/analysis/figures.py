"""The report's matplotlib figures, drawn from the tables of ``lora_exp.report`` (files only, headless).

Every function takes the summary (one row per configuration) or the runs (one row per job, with a
``config`` label column) and a path, and returns the path (``None`` where the figure does not apply).
The quality figures show the summary's headline metric (``headline``: the task's, accuracy for classes, MCC
for CoLA, Pearson for scores; named by ``headline_name``); accuracy figures draw the majority-class baseline.
Legend and annotation text is at least 8 pt.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lora_exp.analysis.variant_figures import plot_adalora_ranks  # noqa: E402

METHOD_COLORS = {"full": "tab:red", "frozen": "tab:gray", "lora": "tab:blue"}
MEMORY_PARTS = [
    "mem_params_bytes",
    "mem_grads_bytes",
    "mem_optimizer_bytes",
    "mem_activations_bytes",
    "mem_autocast_copies_bytes",
]


def peak_memory(summary: pd.DataFrame) -> tuple[pd.Series, str]:
    """The memory a figure shows, one quantity for every row: the measured GPU peak (allocated) when every run
    was on a GPU; else the predicted peak (parameters, gradients, optimizer state counted; activations measured
    on the longest batch), which every device gives, so a figure never sets a measured GPU bar next to a
    predicted CPU one; old CPU results without a prediction fall back to host RSS. Returns the values (GiB) and
    the axis label."""
    if summary["peak_vram_gib"].notna().all():
        return summary["peak_vram_gib"], "peak GPU memory allocated (GiB), measured"
    if "predicted_peak_gib" in summary and summary["predicted_peak_gib"].notna().any():
        where = "CPU runs" if summary["peak_vram_gib"].isna().all() else "every device"
        return summary["predicted_peak_gib"], f"predicted peak training memory (GiB), {where}"
    return summary["peak_host_rss_gib"], "peak host RSS (GiB), CPU runs"


QUANT_BASES = ("nf4", "fp4", "int8")  # model.base_dtype values that quantise the base (lora_exp.device.QUANT_DTYPES)
REFERENCE_BASES = ("bf16", "fp16", "fp32")  # LoRA's reference base: a 16-bit one first, else fp32
SAME_ARM = ("model", "data", "precision", "variant", "r", "alpha", "targets")


def _same(frame: pd.DataFrame, row: pd.Series, keys: list[str]) -> pd.DataFrame:
    """The rows of ``frame`` equal to ``row`` on ``keys`` (missing equals missing)."""
    mask = pd.Series(True, index=frame.index)
    for k in keys:
        mask &= (frame[k] == row[k]) | (frame[k].isna() & pd.isna(row[k]))
    return frame[mask]


def peak_vs_lora(summary: pd.DataFrame) -> pd.Series:
    """Each row's peak (``peak_memory``) over that of the LoRA row with a 16-bit base (fp32 where the table has
    none) of the same model, data, precision and, for a LoRA row, adapter shape: below 1 a quantised base saves
    memory, above 1 it costs more. NaN where the table has no such LoRA row."""
    mem, _ = peak_memory(summary)
    out = pd.Series(float("nan"), index=summary.index)
    lora = summary[(summary["method"] == "lora") & summary["base_dtype"].isin(REFERENCE_BASES)]
    for i, row in summary.iterrows():
        keys = [k for k in (SAME_ARM if row["method"] == "lora" else SAME_ARM[:3]) if k in summary]
        same = _same(lora, row, keys)
        for base in REFERENCE_BASES:
            ref = same.index[same["base_dtype"] == base]
            if len(ref) and mem[ref[0]] > 0:
                out[i] = mem[i] / mem[ref[0]]
                break
    return out


TEXT_PT = 8  # smallest legend / annotation text


def _save(fig: plt.Figure, path: Path) -> Path:
    """Write and close the figure; the saved area grows to hold every title, label and outside legend."""
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return path


def _colors(frame: pd.DataFrame) -> list[str]:
    return [METHOD_COLORS.get(m, "k") for m in frame["method"]]


def _metric(summary: pd.DataFrame) -> tuple[pd.Series, pd.Series, str]:
    """The summary's headline metric: test means, CI half-widths (0 where none) and the axis label."""
    if "headline" not in summary:  # a summary of older code: accuracy
        return summary["test_acc"], summary["test_acc_ci95"].fillna(0), "test accuracy"
    name = str(summary["headline_name"].iloc[0])
    return summary["headline"], summary["headline_ci95"].fillna(0), "test accuracy" if name == "test acc" else name


def _majority(ax: plt.Axes, table: pd.DataFrame, split: str = "test") -> None:
    """A dashed horizontal line per distinct majority-class baseline of ``split`` (test, or validation for the
    validation curves), one per data set in the table; nothing where the runs did not record it, or where the
    figure shows another metric than accuracy."""
    column = "majority_baseline_acc" if split == "test" else "majority_baseline_val_acc"
    if column not in table or table.get("headline_name", pd.Series(["test acc"])).iloc[0] != "test acc":
        return
    lines = table[["data", column]].dropna().drop_duplicates("data")
    for i, (_, row) in enumerate(lines.iterrows()):
        y = row[column]
        ax.axhline(y, color="k", ls="--", lw=1, alpha=0.6, label=f"majority class ({split})" if i == 0 else None)
        if len(lines) > 1:  # which data set each line belongs to, written on the line
            ax.text(0.01, y, str(row["data"]), transform=ax.get_yaxis_transform(), va="bottom", fontsize=TEXT_PT)


def _method_legend(ax: plt.Axes, methods: set[str]) -> None:
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=c, label=m) for m, c in METHOD_COLORS.items() if m in methods
    ]
    handles += [h for h, lbl in zip(*ax.get_legend_handles_labels()) if lbl.startswith("majority")]
    ax.legend(handles=handles, title="method", fontsize=TEXT_PT, title_fontsize=TEXT_PT + 1)


def _marked(row: pd.Series) -> str:
    return row.config + (" [one class]" if row.get("one_class_runs", 0) > 0 else "")


def plot_accuracy_vs_params(summary: pd.DataFrame, path: Path) -> Path:
    """The test metric (accuracy, or the task's: mean, 95% CI) against trainable parameters on a log axis, with
    the majority baseline for accuracy."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    values, cis, label = _metric(summary)
    for (_, row), y, ci in zip(summary.iterrows(), values, cis):
        ax.errorbar(row.trainable_params, y, yerr=ci, fmt="o", capsize=3, color=METHOD_COLORS.get(row.method, "k"))
        ax.annotate(
            _marked(row),
            (row.trainable_params, y),
            fontsize=TEXT_PT,
            xytext=(4, 4),
            textcoords="offset points",
        )
    _majority(ax, summary)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(label)
    ax.set_title(f"What each method buys: {label.removeprefix('test ')} vs trainable parameters")
    ax.grid(alpha=0.3)
    _method_legend(ax, set(summary.method))
    return _save(fig, path)


def _bar_labels(ax: plt.Axes) -> None:
    ax.tick_params(axis="x", rotation=30, labelsize=TEXT_PT)
    for lbl in ax.get_xticklabels():
        lbl.set_horizontalalignment("right")


def plot_memory(summary: pd.DataFrame, path: Path) -> Path:
    """Peak GPU memory per configuration (the predicted peak when the runs were on CPU)."""
    values, label = peak_memory(summary)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(summary) + 2), 4))
    ax.bar(summary["config"], values, color=_colors(summary))
    ax.set_ylabel(label.replace(", ", ",\n", 1))  # two lines: the long CPU label fits the figure's height
    ax.set_title("What each method costs: peak memory")
    _bar_labels(ax)
    return _save(fig, path)


def plot_cost(summary: pd.DataFrame, path: Path) -> Path:
    """Training time and throughput (samples/s) per configuration, side by side."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(9, 1.4 * len(summary) + 4), 4.2))
    left.bar(summary["config"], summary["train_s"], color=_colors(summary))
    left.set_ylabel("training time (s, mean over seeds)")
    left.set_title("Training time")
    right.bar(summary["config"], summary["samples_per_s"], color=_colors(summary))
    right.set_ylabel("training samples / s")
    right.set_title("Throughput")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
        _bar_labels(ax)
    return _save(fig, path)


METRIC_NAMES = {
    "acc": "accuracy",
    "f1": "macro-F1",
    "auc": "ROC-AUC",
    "mcc": "Matthews correlation",
    "pearson": "Pearson correlation",
    "spearman": "Spearman correlation",
    "mse": "mean squared error",
    "loss": "loss",
}


def monitored(runs: pd.DataFrame) -> str:
    """The metric the runs selected their best step by (``acc`` unless every run monitored another)."""
    monitors = set(runs["monitor"].fillna("val/acc")) if "monitor" in runs else set()
    return monitors.pop().split("/", 1)[1] if len(monitors) == 1 else "acc"


def plot_validation_curves(runs: pd.DataFrame, path: Path) -> Path:
    """The monitored validation metric (``trainer.monitor``: accuracy by default, AUC for the detector) per
    run against epoch and against training wall-clock time (the seed's two figures).

    ``runs`` holds one row per job with a ``config`` label; many runs get one legend entry per method.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    runs = runs[runs["status"] == "ok"]
    key = monitored(runs)
    name = METRIC_NAMES[key]
    by_method = len(runs) > 8
    seen: set[str] = set()
    for _, row in runs.iterrows():
        hist = pd.DataFrame(row["history"] or [])
        if hist.empty:
            continue
        label = str(row["method"]) if by_method else str(row["config"])
        if label in seen:
            label = "_" + label  # matplotlib leaves "_"-labels out of the legend
        else:
            seen.add(label)
        color = METHOD_COLORS.get(row["method"])
        if f"val_{key}" not in hist:
            continue
        left.plot(hist["epoch"], hist[f"val_{key}"], marker=".", color=color, alpha=0.8, label=label)
        right.plot(hist["time_s"], hist[f"val_{key}"], marker=".", color=color, alpha=0.8)
    if key == "acc":
        _majority(left, runs, "validation")
        _majority(right, runs, "validation")
    left.set_xlabel("epoch")
    right.set_xlabel("training wall-clock time (s)")
    left.set_ylabel(f"validation {name}")
    left.set_title(f"Validation {name} vs epoch")
    right.set_title(f"Validation {name} vs training time")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=TEXT_PT)
    return _save(fig, path)


def _alpha_rule(r: float, alpha: float) -> str:
    return "alpha=r" if alpha == r else "alpha=2r" if alpha == 2 * r else f"alpha={alpha:g}"


def _lora(summary: pd.DataFrame) -> pd.DataFrame:
    """LoRA rows of one model and data (rank figures of two models would mix their lines)."""
    lo = summary[summary.method == "lora"].copy()
    if lo.empty:
        return lo
    which = lo["model"].astype(object).fillna("-").astype(str) + "/" + lo["data"].astype(object).fillna("-").astype(str)
    return lo[which == which.iloc[0]]


def plot_accuracy_vs_rank(summary: pd.DataFrame, path: Path) -> Path | None:
    """LoRA's test metric (accuracy, or the task's) against rank, one line per alpha rule (None with fewer than two
    ranks)."""
    lo = _lora(summary)
    if lo.empty or lo["r"].nunique() < 2:
        return None
    lo["rule"] = [_alpha_rule(r, a) + (" rsLoRA" if rs is True else "") for r, a, rs in zip(lo.r, lo.alpha, lo.rslora)]
    values, cis, label = _metric(lo)
    lo = lo.assign(_y=values, _ci=cis)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rule, part in lo.groupby("rule"):
        part = part.sort_values("r")
        ax.errorbar(part.r.astype(float), part._y, yerr=part._ci, marker="o", capsize=3, label=rule)
    _majority(ax, lo)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank r (log2 scale)")
    ax.set_ylabel(label)
    ax.set_title(f"LoRA: {label.removeprefix('test ')} vs rank ({lo.iloc[0]['model']} on {lo.iloc[0]['data']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=TEXT_PT)
    return _save(fig, path)


def plot_rank_alpha_heatmap(summary: pd.DataFrame, path: Path) -> Path | None:
    """The mean test metric (accuracy, or the task's) over rank x alpha rule (None unless both vary)."""
    lo = _lora(summary)
    lo = lo[lo.rslora != True]  # noqa: E712 (object column)
    if lo.empty or lo["r"].nunique() < 2 or lo["alpha"].nunique() < 2:
        return None
    values, _, label = _metric(lo)
    lo = lo.assign(rule=[_alpha_rule(r, a) for r, a in zip(lo.r, lo.alpha)], _y=values)
    grid = lo.pivot_table(index="r", columns="rule", values="_y", aggfunc="mean").sort_index()
    fig, ax = plt.subplots(figsize=(1.6 * grid.shape[1] + 2.5, 0.5 * grid.shape[0] + 2))
    im = ax.imshow(grid.values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns)
    ax.set_yticks(range(grid.shape[0]), [f"{r:g}" for r in grid.index])
    for (i, j), v in pd.DataFrame(grid.values).stack().items():
        ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=TEXT_PT)
    ax.set_xlabel("alpha")
    ax.set_ylabel("rank r")
    ax.set_title(f"LoRA {label}: rank x alpha")
    fig.colorbar(im, ax=ax, label=label)
    return _save(fig, path)


def plot_pareto(summary: pd.DataFrame, path: Path) -> Path:
    """The test metric (accuracy, or the task's; CI bars) against peak memory and against trainable parameters,
    one point per config."""
    mem, mem_label = peak_memory(summary)
    values, cis, metric = _metric(summary)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for x, ax, label in (
        (mem, axes[0], mem_label),
        (summary["trainable_params"], axes[1], "trainable parameters (log scale)"),
    ):
        for xv, (_, row), y, ci in zip(x, summary.iterrows(), values, cis):
            ax.errorbar(
                xv,
                y,
                yerr=ci,
                fmt="o",
                capsize=3,
                color=METHOD_COLORS.get(row.method, "k"),
                label=_marked(row),
            )
        _majority(ax, summary)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    quantised = "base_dtype" in summary and summary["base_dtype"].isin(QUANT_BASES).any()
    if quantised:  # where QLoRA saves memory, or not
        ratio = peak_vs_lora(summary)
        for xv, y, (i, row) in zip(mem, values, summary.iterrows()):
            if row.base_dtype in QUANT_BASES and pd.notna(ratio[i]):
                axes[0].annotate(
                    f"{row.base_dtype} {ratio[i]:.2f}x",
                    (xv, y),
                    xytext=(4, 4),
                    textcoords="offset points",
                    fontsize=TEXT_PT,
                )
    axes[1].set_xscale("log")
    axes[0].set_ylabel(metric)
    short = metric.removeprefix("test ")
    short = short[:1].upper() + short[1:]
    axes[0].set_title(f"{short} vs memory" + (" (Nx: peak / LoRA's on a 16/32-bit base)" if quantised else ""))
    axes[1].set_title(f"{short} vs trainable parameters")
    axes[1].legend(fontsize=TEXT_PT)
    return _save(fig, path)


def plot_memory_breakdown(summary: pd.DataFrame, path: Path) -> Path | None:
    """Stacked bars: parameters, gradients, optimizer state, activations, autocast copies per configuration."""
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
    ax.set_title("Memory breakdown\n(activations measured on a sampled step)", fontsize=10)
    ax.legend(fontsize=TEXT_PT, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    _bar_labels(ax)
    return _save(fig, path)


def write_figures(summary: pd.DataFrame, runs: pd.DataFrame, out: Path) -> dict[str, Path]:
    """Every figure that applies, into ``out``; returns file name -> path."""
    out = Path(out)
    written = {
        "accuracy_vs_params.png": plot_accuracy_vs_params(summary, out / "accuracy_vs_params.png"),
        "memory.png": plot_memory(summary, out / "memory.png"),
        "cost.png": plot_cost(summary, out / "cost.png"),
        "validation_curves.png": plot_validation_curves(runs, out / "validation_curves.png"),
        "pareto.png": plot_pareto(summary, out / "pareto.png"),
    }
    for name, fn in (
        ("accuracy_vs_rank.png", plot_accuracy_vs_rank),
        ("rank_alpha_heatmap.png", plot_rank_alpha_heatmap),
        ("memory_breakdown.png", plot_memory_breakdown),
    ):
        if (p := fn(summary, out / name)) is not None:
            written[name] = p
    if (p := plot_adalora_ranks(runs, out / "adalora_ranks.png")) is not None:  # AdaLoRA runs only
        written["adalora_ranks.png"] = p
    return written
