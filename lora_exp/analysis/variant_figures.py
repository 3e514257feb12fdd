"""Figures of what a variant decided during training: AdaLoRA's final rank per adapted layer."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _layer_label(path: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``3.query`` (block index and module name)."""
    m = re.search(r"\.(\d+)\.", path)
    return f"{m.group(1)}.{path.rpartition('.')[2]}" if m else path.rpartition(".")[2]


def adalora_rank_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    """Mean final rank (over seeds) per configuration (rows) and layer (columns) of the AdaLoRA runs."""
    if "adalora_ranks" not in runs:
        return None
    ada = runs[runs["adalora_ranks"].map(lambda v: isinstance(v, dict) and bool(v))]
    if ada.empty:
        return None
    rows = [{"config": c, **ranks} for c, ranks in zip(ada["config"], ada["adalora_ranks"])]
    table = pd.DataFrame(rows).groupby("config", sort=False).mean()
    return table.rename(columns=_layer_label)


def plot_adalora_ranks(runs: pd.DataFrame, path: Path) -> Path | None:
    """A heatmap of AdaLoRA's final rank per layer (columns, model order) for each AdaLoRA configuration."""
    table = adalora_rank_table(runs)
    if table is None:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * table.shape[1] + 3), 1.0 + 0.5 * len(table)))
    im = ax.imshow(table.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=90, fontsize=8)
    ax.set_yticks(range(len(table)), table.index, fontsize=8)
    ax.set_title("AdaLoRA: final rank per adapted layer (mean over seeds)", fontsize=10)
    fig.colorbar(im, ax=ax, label="rank")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
