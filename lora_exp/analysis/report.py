"""Runs -> one pandas DataFrame -> the summary table (CSV + Markdown) and the fair comparison (statistics).

The same functions serve ``lora-exp report DIR`` and ``notebooks/analysis.ipynb``; the figures are drawn
by ``lora_exp.figures``. A configuration is a ``group_hash`` that each run records (every setting that
changes what it computes, except the seed): seeds of one configuration pool into a mean and a 95%
t-interval, runs of two models, data sets, epochs, limits, ... never do. Results written before runs
recorded ``group_hash`` are grouped by ``CONFIG_KEYS``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from lora_exp.analysis import fair, figures
from lora_exp.analysis.stats import ci95, mean_ci, pct, rate
from lora_exp.errors import LoraExpError

# The fallback identity of a configuration for results without group_hash / arm_hash.
CONFIG_KEYS = ["model", "data", "method", "variant", "targets", "r", "alpha", "rslora", "lr"]
ARM_KEYS = [k for k in CONFIG_KEYS if k != "lr"]  # an arm of the fair comparison: its lr is chosen on validation
# A lora/frozen arm is paired with the full fine-tuning runs that share these (and the seed): every setting
# outside the method that changes results, device and precision as resolved (results.json records them so).
PAIR_KEYS = [
    "model",
    "data",
    "epochs",
    "batch_size",
    "train_examples",
    "max_length",
    "scheduler",
    "warmup_ratio",
    "device_type",
    "gpu_name",
    "precision",
    "base_dtype",
]
# Full fine-tuning freezes nothing, so it has no base dtype to match; plain LoRA, the variants' reference,
# must have the variant's shape: rank, alpha, targets, dropout (its init is LoRA's default: variant "lora").
FULL_REFERENCE_KEYS = [k for k in PAIR_KEYS if k != "base_dtype"]
LORA_REFERENCE_KEYS = [*PAIR_KEYS, "r", "alpha", "targets", "lora_dropout"]
MEMORY_PARTS = figures.MEMORY_PARTS
COLUMNS = [
    *CONFIG_KEYS,
    *PAIR_KEYS,
    "status",
    "reason",
    "seed",
    "test_acc",
    "history",
    "config_hash",
    "group_hash",
    "arm_hash",
    "majority_baseline_acc",
    "majority_baseline_val_acc",
    "test_pred_counts",
    "adapter_params",
    "head_params",
    "other_trainable_params",
    "mem_predicted_peak_bytes",
    "monitor",
    "precision",
    "base_dtype",
    "best_val_auc",
    "test_auc",
    "peak_vram_bytes",
    "peak_vram_reserved_bytes",
    "peak_host_rss_bytes",
    "steady_samples_per_s",
    "lora_dropout",
    "lora_init",
    "best_val_f1",
    "best_val_loss",
    "problem_type",
]
# Every metric a run may report (classes or scores), as best_val_<m> and test_<m>: numeric columns of the table.
METRICS = ("acc", "f1", "auc", "mcc", "pearson", "spearman", "mse", "loss")
METRIC_COLUMNS = [f"{where}_{m}" for m in METRICS for where in ("best_val", "test")]


def load_runs(roots: Path | Sequence[Path]) -> pd.DataFrame:
    """Every ``results.json`` below ``roots`` (one dir, or several sweep dirs merged) as one row (failed jobs
    included, ``status`` says which). Set-aside attempts (``results.failed-N.json``) are never read, and a run
    found twice (a job folder copied into a second sweep dir) is one row, by its run id.

    Adds ``_group`` / ``_arm`` (the recorded hashes, else the CONFIG_KEYS / ARM_KEYS values) and
    ``one_class`` (the run predicted a single class on the whole test split).
    """
    roots = [Path(roots)] if isinstance(roots, str | Path) else [Path(r) for r in roots]
    found = {p.resolve(): p for root in roots for p in sorted(root.rglob("results.json"))}  # a dir given twice: once
    paths = list(found.values())  # in the order of the dirs given: a copied run keeps its first dir's row
    rows = [{**_read_result(path), "job_dir": str(path.parent)} for path in paths]
    if not rows:
        where = " or ".join(repr(str(r)) for r in roots)
        raise LoraExpError(f"report: no results.json under {where} (is it a run or multirun dir?)")
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df:
            df[col] = None
    for col in METRIC_COLUMNS:  # null (an undefined AUC, a metric of the other task kind) as NaN
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else math.nan
    df = df[~df.assign(_run=run_ids(df)).duplicated("_run", keep="first")].reset_index(drop=True)
    df["_group"] = _identity(df, "group_hash", CONFIG_KEYS)
    df["_arm"] = _identity(df, "arm_hash", ARM_KEYS)
    df["one_class"] = [is_one_class(c) for c in df["test_pred_counts"]]
    # A rerun (`lora-exp rerun`) repeats a job, it is not another seed: keep one finished row per job identity.
    done = df["status"] == "ok"
    job = df["group_hash"].where(df["group_hash"].notna(), df["config_hash"])
    twice = done & job.notna() & df.assign(_job=job).duplicated(["_job", "seed"], keep="first")
    return df[~twice].reset_index(drop=True)


def run_ids(df: pd.DataFrame) -> pd.Series:
    """Each row's run id: its W&B run id (a resumed run keeps it), else what a copy of the same results.json
    shares and a rerun does not (config hash, seed, training time); a row without either is its own run."""
    cols = [c for c in ("config_hash", "seed", "train_seconds") if c in df]
    fallback = pd.Series(["|".join(map(str, row)) for row in df[cols].itertuples(index=False)], index=df.index)
    has_own = df["config_hash"].notna() & df.get("train_seconds", pd.Series(None, index=df.index)).notna()
    fallback = fallback.where(has_own, "row:" + df["job_dir"])
    wandb_id = df["wandb_id"] if "wandb_id" in df else pd.Series(None, index=df.index)
    return ("wandb:" + wandb_id.astype(str)).where(wandb_id.notna(), fallback)


def _read_result(path: Path) -> dict:
    """One results.json; a truncated or otherwise unreadable one becomes a failed job saying so (one line printed),
    never a run with an unknown method."""
    try:
        row = json.loads(path.read_text())
        if isinstance(row, dict):
            return row
        why = f"a JSON {type(row).__name__}, not an object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        why = f"{type(err).__name__}: {err}"
    print(f"[lora-exp] report: {path} is unreadable ({why}); listed under failed jobs")
    return {"status": "failed", "failure": "error", "reason": f"results.json unreadable ({why})"}


def _identity(df: pd.DataFrame, hash_col: str, keys: list[str]) -> pd.Series:
    legacy = df[keys].astype(object).where(df[keys].notna(), "-").astype(str).agg("|".join, axis=1)
    return df[hash_col].where(df[hash_col].notna(), "keys:" + legacy).astype(str)


def is_one_class(counts: object) -> bool:
    """True when a run's test predictions (``test_pred_counts``) all fall into one class."""
    if not isinstance(counts, list) or not counts or sum(counts) == 0:
        return False
    return sum(c > 0 for c in counts) == 1


def _config_label(row: pd.Series) -> str:
    if row["method"] != "lora":
        return str(row["method"])
    variant = row.get("variant")
    if not isinstance(variant, str) or variant in ("", "-"):  # results written before variants existed
        variant = "lora rs" if row.get("rslora") is True else "lora"
    return f"{variant} r={row['r']:g} a={row['alpha']:g} {row['targets']}"


def _short(key: str) -> str:
    return key[:6] if not key.startswith("keys:") else hashlib.sha256(key.encode()).hexdigest()[:6]


def _labels(table: pd.DataFrame, key: str, with_lr: bool = True) -> list[str]:
    """Readable, distinct labels: method and LoRA settings; model / data where they vary in the table;
    the lr where it varies within a label; a short hash where two configurations would still look alike."""
    labels = table.apply(_config_label, axis=1)
    names = table[["model", "data"]].astype(object).fillna("-").astype(str)
    varying = [c for c in names if names[c].nunique() > 1]
    if varying:
        labels = labels + " · " + names[varying].agg("/".join, axis=1)
    for col in ("precision", "base_dtype"):  # cost settings a comparison varies on purpose: say which is which
        if col in table and table[col].nunique(dropna=True) > 1:
            labels = labels + [f" {v}" if isinstance(v, str) else "" for v in table[col]]
    if with_lr and (table.groupby(labels)["lr"].nunique() > 1).any():
        labels = labels + [f" lr={lr:g}" for lr in table["lr"]]
    twins = labels.duplicated(keep=False)
    return [f"{lbl} #{_short(k)}" if twin else lbl for lbl, k, twin in zip(labels, table[key], twins)]


def _gib(values: pd.Series) -> float:
    """Mean in GiB (NaN when no run measured it)."""
    return values.mean() / 2**30 if values.notna().any() else math.nan


def _metric_columns(summary: pd.DataFrame) -> dict[str, list[str]]:
    """The summary's metric columns: best validation and test accuracy for classes (plus AUC when a run
    selected by it, ``_auc_columns``); for another headline metric (MCC, F1, Pearson, ...) its best validation
    and test value too, and for scores only those."""
    name = summary["headline_name"].iloc[0]
    key = name.removeprefix("test ")
    columns = {}
    if summary["test_acc"].notna().any():
        columns["best val acc"] = summary["best_val_acc"].map(lambda v: "-" if pd.isna(v) else f"{v:.4f}")
        columns["test acc"] = [mean_ci(m, c) for m, c in zip(summary.test_acc, summary.test_acc_ci95)]
    columns.update(_auc_columns(summary))
    if name not in columns and key != "AUC":
        columns[f"best val {key}"] = summary["headline_val"].map(lambda v: "-" if pd.isna(v) else f"{v:.4f}")
        columns[name] = [mean_ci(m, c) for m, c in zip(summary.headline, summary.headline_ci95)]
    return columns


def _auc_columns(summary: pd.DataFrame) -> dict[str, list[str]]:
    """Validation / test ROC-AUC columns when a run selected its best step by AUC (``trainer.monitor``)."""
    if not (summary["monitor"] == "val/auc").any():
        return {}
    return {
        "best val AUC": [("-" if pd.isna(v) else f"{v:.4f}") for v in summary.best_val_auc],
        "test AUC": [("-" if pd.isna(m) else mean_ci(m, c)) for m, c in zip(summary.test_auc, summary.test_auc_ci95)],
    }


def aggregations(runs: pd.DataFrame) -> dict[str, tuple]:
    """How the runs of one configuration (summary) or of one arm at its chosen lr (fair table) become a row:
    one spec for both tables, so they report the same columns the same way."""
    return {
        **{k: (k, "first") for k in CONFIG_KEYS},
        "group_hash": ("group_hash", "first"),
        "seeds": ("seed", "nunique"),
        "runs": ("seed", "size"),
        "trainable_params": ("trainable_params", "first"),
        "trainable_pct": ("trainable_pct", "first"),
        "adapter_params": ("adapter_params", "first"),
        "head_params": ("head_params", "first"),
        "other_trainable_params": ("other_trainable_params", "first"),
        "peak_vram_gib": ("peak_vram_bytes", _gib),
        "peak_vram_reserved_gib": ("peak_vram_reserved_bytes", _gib),
        "peak_host_rss_gib": ("peak_host_rss_bytes", _gib),
        "predicted_peak_gib": ("mem_predicted_peak_bytes", _gib),
        "train_s": ("train_seconds", "mean"),
        "samples_per_s": ("samples_per_s", "mean"),
        "steady_samples_per_s": ("steady_samples_per_s", "mean"),
        **{c: (c, "mean") for c in METRIC_COLUMNS if c in runs},
        **{f"{c}_ci95": (c, ci95) for c in METRIC_COLUMNS if c.startswith("test_") and c in runs},
        "monitor": ("monitor", "first"),
        "precision": ("precision", "first"),
        "base_dtype": ("base_dtype", "first"),
        "majority_baseline_acc": ("majority_baseline_acc", "mean"),
        "one_class_runs": ("one_class", "sum"),
        **{c: (c, "mean") for c in MEMORY_PARTS if c in runs},
    }


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (``group_hash``) over its seeds: costs (params, memory, time), every metric
    (mean; test: with its CI), the headline metric (``fair.headline``: the task's, e.g. accuracy, MCC or Pearson)
    as ``headline`` / ``headline_ci95`` / ``headline_val`` named by ``headline_name``, the majority-class
    baseline and how many runs predicted a single class."""
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame()
    agg = ok.groupby("_group", sort=False).agg(**aggregations(ok)).reset_index()
    agg.insert(0, "config", _labels(agg, "_group"))
    column, name = fair.headline(ok)  # the task's metric: what the markdown table and the figures show
    agg["headline"], agg["headline_ci95"], agg["headline_name"] = agg[column], agg[f"{column}_ci95"], name
    agg["headline_val"] = agg[column.replace("test_", "best_val_", 1)]
    return agg.sort_values(["model", "data", "method", "trainable_params", "lr"], kind="stable").reset_index(drop=True)


def run_labels(df: pd.DataFrame, summary: pd.DataFrame) -> pd.Series:
    """Each run's configuration label (as in the summary) plus its seed, for per-run figures."""
    by_group = dict(zip(summary["_group"], summary["config"])) if not summary.empty else {}
    return pd.Series(
        [f"{by_group.get(g, _short(g))} s{_seed(s)}" for g, s in zip(df["_group"], df["seed"])],
        index=df.index,
        dtype=object,
    )


def _seed(seed: object) -> str:
    """A seed as written: 1, not 1.0 (pandas stores a column of ints with a gap as floats); "-" when unknown."""
    if seed is None or (isinstance(seed, float) and math.isnan(seed)):
        return "-"
    return f"{int(seed)}" if isinstance(seed, float) and seed.is_integer() else str(seed)


def to_markdown(summary: pd.DataFrame, df: pd.DataFrame) -> str:
    """The summary as a Markdown table, the majority-class baseline, runs that predict a single class and
    the failed jobs with their reasons."""
    if summary.empty:
        table = "No finished runs."
    else:
        show = pd.DataFrame(
            {
                "config": summary["config"],
                "trainable params": [
                    f"{n:,.0f} ({pct(p)})" for n, p in zip(summary.trainable_params, summary.trainable_pct)
                ],
                "peak VRAM (GiB)": [
                    "n/a (CPU)" if pd.isna(a) else f"{a:.2f}" + ("" if pd.isna(r) else f" ({r:.2f} reserved)")
                    for a, r in zip(summary["peak_vram_gib"], summary["peak_vram_reserved_gib"])
                ],
                "predicted peak (GiB)": summary["predicted_peak_gib"].map(lambda v: "-" if pd.isna(v) else f"{v:.2f}"),
                "host RSS (GiB)": summary["peak_host_rss_gib"].map("{:.2f}".format),
                "train time (s)": summary["train_s"].map("{:.0f}".format),
                "samples/s": summary["samples_per_s"].map("{:.1f}".format),
                "steady samples/s": summary["steady_samples_per_s"].map(rate),
                "lr": summary["lr"].map(lambda v: f"{v:g}" if isinstance(v, float) else str(v)),
                **_metric_columns(summary),
                "seeds": summary["seeds"],
            }
        )
        if summary["base_dtype"].isin(figures.QUANT_BASES).any():  # QLoRA rows: where a quantised base saves memory
            show.insert(4, "peak / LoRA 16/32-bit base", figures.peak_vs_lora(summary).map(_times))
        baselines = summary["majority_baseline_acc"].dropna().round(6).unique()
        if len(baselines) > 1:  # several data sets: each row its own
            show["majority baseline"] = summary["majority_baseline_acc"].map(
                lambda v: "n/a" if pd.isna(v) else f"{v:.4f}"
            )
        if summary["one_class_runs"].gt(0).any():
            show["all one class"] = [
                f"{k} of {n} runs" if k else "" for k, n in zip(summary.one_class_runs.astype(int), summary.runs)
            ]
        table = show.to_markdown(index=False, disable_numparse=True)
        if len(baselines) == 1:
            table += f"\n\nMajority-class baseline (always the test split's most frequent class): {baselines[0]:.4f}"
        flagged = df[(df["status"] == "ok") & df["one_class"]]
        if len(flagged):
            labels = run_labels(flagged, summary)
            table += "\n\nRuns whose test predictions are all one class (no better than a constant):\n" + "\n".join(
                f"- `{Path(d).name}` ({lbl}): test acc {a:.4f}"
                for d, lbl, a in zip(flagged["job_dir"], labels, flagged["test_acc"])
            )
    failed = df[df["status"] != "ok"]
    if len(failed):
        lines = [
            f"- `{Path(d).name}` ({m if isinstance(m, str) else '-'}): {f}: {r}"
            for d, m, f, r in zip(failed["job_dir"], failed["method"], failed.get("failure", "error"), failed["reason"])
        ]
        table += "\n\nFailed jobs:\n" + "\n".join(lines)
    return table + "\n"


def _times(v: float) -> str:
    return "-" if pd.isna(v) else f"{v:.2f}x"


def lr_grid_swept(df: pd.DataFrame) -> bool:
    """True when some arm (``arm_hash``) ran at more than one learning rate: the fair protocol applies."""
    runs = df[df["lr"].notna()]
    return bool(len(runs)) and bool((runs.groupby("_arm")["lr"].nunique() > 1).any())


def _filled(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Missing key values as "-" (pandas drops NaN keys from groups and merges)."""
    frame = frame.copy()
    frame[keys] = frame[keys].astype(object).where(frame[keys].notna(), "-")
    return frame


def fair_comparison(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The protocol: per arm (``arm_hash``), the lr with the best mean validation value of the metric its runs
    monitored (``trainer.monitor``: accuracy, F1, AUC, or the loss, lower being better) over seeds; the test
    value of that metric at that lr (``fair.headline``: AUC under val/auc, accuracy under the loss; mean, 95% CI),
    ``lr_edge`` when that lr is the highest / lowest tried; and the paired differences of the same test metric
    (same seeds) to the reference arms: full fine-tuning, plain LoRA (``variant`` lora) of the same rank,
    alpha, targets and dropout when the dir holds it, and for LoRA on a quantised base (nf4 / fp4 / int8) that
    LoRA on an unquantised base. A run pairs at most once with each reference
    arm; two reference arms of one method (e.g. two full fine-tunings that differ in weight decay) give one row
    each, named after the reference arm."""
    ok = _filled(df[df["status"] == "ok"], PAIR_KEYS)
    if ok.empty:
        return pd.DataFrame(), pd.DataFrame()
    metric, metric_name = fair.headline(ok)
    by_lr = fair.lr_scores(ok, df[df["status"] != "ok"])
    tried = fair.tried_lrs(df)
    best = by_lr.loc[by_lr.groupby("_arm", sort=False)["score"].idxmax(), ["_arm", "lr", "monitor", "val"]]
    chosen = ok.merge(best[["_arm", "lr"]], on=["_arm", "lr"])
    table = chosen.groupby("_arm", sort=False).agg(**aggregations(chosen)).reset_index()
    table = table.drop(columns="monitor").merge(best[["_arm", "monitor", "val"]], on="_arm")
    table["headline"], table["headline_ci95"] = table[metric], table[f"{metric}_ci95"]
    table["headline_name"] = metric_name
    table["lrs_tried"] = [", ".join(f"{v:g}" for v in tried.get(a, [])) for a in table["_arm"]]
    table["lr_edge"] = [fair.grid_edge(lr, tried.get(a, [])) for a, lr in zip(table["_arm"], table["lr"])]
    table.insert(0, "config", _labels(table, "_arm", with_lr=False))
    label = dict(zip(table["_arm"], table["config"]))
    full, lora = chosen["method"].eq("full"), chosen["method"].eq("lora")
    references = [("full fine-tuning", full, ~full, FULL_REFERENCE_KEYS)]
    plain = chosen["variant"].eq("lora") & lora
    if plain.any():  # LoRA of the same shape: what each variant claims to beat
        references.append(("LoRA", plain, lora & ~plain, LORA_REFERENCE_KEYS))
    quant = chosen["base_dtype"].isin(figures.QUANT_BASES)
    if (plain & ~quant).any() and (lora & quant).any():  # QLoRA: against LoRA of the same shape on an unquantised base
        keys = [k for k in LORA_REFERENCE_KEYS if k != "base_dtype"]
        references.append(("LoRA on a 16/32-bit base", plain & ~quant, lora & quant, keys))
    rows = []
    for ref_name, is_ref, compared, keys in references:
        ref_arms = list(chosen[is_ref].groupby("_arm", sort=False))
        for arm, runs in chosen[compared].groupby("_arm", sort=False):
            matches, arm_keys = [], keys
            if ref_name == "LoRA":  # the rank a variant is compared at (AdaLoRA: its budget; VeRA: any)
                runs = runs.assign(r=fair.lora_twin_rank(runs))
                arm_keys = keys if runs["r"].notna().all() else [k for k in keys if k != "r"]
            for ref_arm, ref in ref_arms:
                ref = _filled(ref.assign(r=ref["r"].astype(float)), arm_keys).drop_duplicates([*arm_keys, "seed"])
                ref = ref[[*arm_keys, "seed", metric]].rename(columns={metric: "ref"})
                pairs = _filled(runs, arm_keys).merge(ref, on=[*arm_keys, "seed"])
                if len(pairs):
                    matches.append((ref_arm, pairs[metric] - pairs["ref"]))
            for ref_arm, diff in matches:
                name = ref_name if len(matches) == 1 else f"{ref_name} ({label[ref_arm]})"
                rows.append(
                    {
                        "config": label[arm],
                        "reference": name,
                        "pairs": len(diff),
                        "metric": metric_name,
                        "diff": diff.mean(),
                        "diff_ci95": ci95(diff),
                    }
                )
    return table, pd.DataFrame(rows)


def report_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The report's tables by name: ``summary`` (one row per configuration) and, when an lr grid was swept,
    ``fair`` (each arm at its validation-chosen lr) and ``paired`` (paired differences to the references)."""
    tables = {"summary": summarize(df)}
    if lr_grid_swept(df):
        tables["fair"], tables["paired"] = fair_comparison(df)
    return tables


def write_report(roots: Path | Sequence[Path], out: Path | None = None) -> dict[str, Path]:
    """Read the runs under ``roots`` (one dir, or several merged); write summary.csv, summary.md, the figures and,
    when an lr grid was swept, fair.md into ``out`` (default ``<dir>/report``; several: ``<first>/report-merged``)."""
    roots = [Path(roots)] if isinstance(roots, str | Path) else [Path(r) for r in roots]
    out = Path(out) if out else roots[0] / ("report" if len(roots) == 1 else "report-merged")
    out.mkdir(parents=True, exist_ok=True)
    df = load_runs(roots)
    df = df[~df["job_dir"].str.startswith(str(out))]
    summary = summarize(df)
    summary.drop(columns=["_group"], errors="ignore").to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(to_markdown(summary, df))
    written = {"summary.csv": out / "summary.csv", "summary.md": out / "summary.md"}
    if summary.empty:
        return written
    written.update(figures.write_figures(summary, df.assign(config=run_labels(df, summary)), out))
    if lr_grid_swept(df):
        table, paired = fair_comparison(df)
        (out / "fair.md").write_text(fair.markdown(table, paired))
        written["fair.md"] = out / "fair.md"
        if not table.empty:  # the seed's curves once more, each arm at its chosen lr only
            chosen = df[df["status"] == "ok"].merge(table[["_arm", "lr"]], on=["_arm", "lr"])
            path = out / "validation_curves_chosen.png"
            written[path.name] = figures.plot_validation_curves(chosen.assign(config=run_labels(chosen, summary)), path)
    return written
