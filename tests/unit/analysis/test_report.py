"""The report: one row per configuration with the right counts, readable figures, failures listed, on
hand-written results (the report on a real sweep and the notebook: tests/e2e/test_report_runs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from lora_exp.analysis import fair, figures, report
from tests.helpers.results import write_result


def test_seeds_give_mean_and_ci_and_rank_figures(tmp_path: Path) -> None:
    for r in (2, 4):
        for alpha in (r, 2 * r, 16):
            for seed, acc in ((1, 0.80), (2, 0.82), (3, 0.84)):
                write_result(tmp_path, f"r{r}a{alpha}s{seed}", r=r, alpha=alpha, seed=seed, test_acc=acc + r / 100)
    write_result(tmp_path, "broken", status="failed", failure="nan", reason="train loss is nan at step 7", r=4, alpha=4)
    written = report.write_report(tmp_path)
    summary = report.summarize(report.load_runs(tmp_path))
    assert len(summary) == 6 and (summary["seeds"] == 3).all()
    row = summary[(summary.r == 4) & (summary.alpha == 16)].iloc[0]
    assert row.test_acc == pytest.approx(0.86)
    assert row.test_acc_ci95 == pytest.approx(4.303 * 0.02 / 3**0.5, rel=1e-3)  # t(0.975, 2) * sd / sqrt(n)
    assert "accuracy_vs_rank.png" in written and "rank_alpha_heatmap.png" in written
    md = written["summary.md"].read_text()
    assert "± 0.0497" in md
    assert "Failed jobs:" in md and "train loss is nan at step 7" in md


def test_empty_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no results.json under"):
        report.load_runs(tmp_path)


def test_fair_protocol_picks_lr_on_validation_and_pairs_seeds(tmp_path: Path) -> None:
    # full: lr 1e-4 wins on validation although 5e-5 has the better test accuracy (no peeking at test).
    grid = {"full": {5e-5: (0.80, 0.90), 1e-4: (0.85, 0.80)}, "lora": {1e-3: (0.70, 0.70), 2e-3: (0.84, 0.82)}}
    for method, lrs in grid.items():
        for lr, (val, test) in lrs.items():
            for seed in (1, 2, 3):
                write_result(
                    tmp_path,
                    f"{method}{lr}s{seed}",
                    method=method,
                    lr=lr,
                    seed=seed,
                    best_val_acc=val,
                    test_acc=test + seed / 100,
                    r=8 if method == "lora" else None,
                    alpha=16 if method == "lora" else None,
                    targets="q+v" if method == "lora" else None,
                    adapter_params=10,
                    head_params=5,
                    other_trainable_params=0,
                )
    table, paired = report.fair_comparison(report.load_runs(tmp_path))
    chosen = dict(zip(table.method, table.lr))
    assert chosen == {"full": 1e-4, "lora": 2e-3}
    assert table.set_index("method").loc["full", "test_acc"] == pytest.approx(0.82)
    assert paired.iloc[0]["reference"] == "full fine-tuning"
    assert paired.iloc[0]["diff"] == pytest.approx(0.02)  # 0.82+s - (0.80+s) on each seed
    assert paired.iloc[0]["diff_ci95"] == pytest.approx(0.0, abs=1e-12)
    md = fair.markdown(table, paired)
    assert "Paired difference to full fine-tuning" in md and "+0.0200" in md


def test_two_models_on_two_csvs_give_four_rows_and_seeds_still_pool(tmp_path: Path) -> None:
    # Same method, lr and labels everywhere: only model and data tell the runs apart (the pooling bug).
    for model in ("local-bert", "minilm"):
        for data in ("reviews", "tweets"):
            for seed, acc in ((1, 0.7), (2, 0.8)):
                write_result(
                    tmp_path,
                    f"{model}-{data}-{seed}",
                    model=model,
                    data=data,
                    seed=seed,
                    test_acc=acc,
                    r=8,
                    alpha=16,
                    group_hash=f"{model}{data}".ljust(16, "0"),
                    arm_hash=f"{model}{data}".ljust(16, "1"),
                )
    summary = report.summarize(report.load_runs(tmp_path))
    assert len(summary) == 4 and (summary["seeds"] == 2).all()
    assert summary["test_acc"].tolist() == pytest.approx([0.75] * 4)
    assert summary["config"].nunique() == 4
    assert all(f"{m}/{d}" in c for c, m, d in zip(summary.config, summary.model, summary.data))


def test_group_hash_splits_what_config_keys_cannot_see(tmp_path: Path) -> None:
    # Two epochs settings: the same CONFIG_KEYS, different group_hash -> two rows, distinct labels.
    for epochs in (1, 3):
        for seed in (1, 2):
            write_result(
                tmp_path, f"e{epochs}s{seed}", r=8, alpha=16, seed=seed, epochs=epochs, group_hash=f"g{epochs}"
            )
    summary = report.summarize(report.load_runs(tmp_path))
    assert len(summary) == 2 and (summary["seeds"] == 2).all()
    assert summary["config"].nunique() == 2 and all(" #" in c for c in summary["config"])


def test_majority_baseline_one_class_flag_and_small_trainable_share(tmp_path: Path) -> None:
    common = {"method": "frozen", "r": None, "alpha": None, "targets": None, "majority_baseline_acc": 0.6}
    write_result(tmp_path, "s1", seed=1, trainable_pct=0.00339, test_pred_counts=[0, 128], test_acc=0.6, **common)
    write_result(tmp_path, "s2", seed=2, trainable_pct=0.00339, test_pred_counts=[40, 88], test_acc=0.7, **common)
    written = report.write_report(tmp_path)
    md = written["summary.md"].read_text()
    assert "Majority-class baseline (always the test split's most frequent class): 0.6000" in md
    assert "| all one class" in md and "1 of 2 runs" in md
    assert "Runs whose test predictions are all one class" in md and "`s1`" in md and "`s2`" not in md
    assert "(0.0034%)" in md
    assert report.pct(100.0) == "100%" and report.pct(0.328) == "0.33%" and report.pct(1.5) == "1.5%"
    assert "fair.md" not in written


def test_fair_md_written_for_an_lr_grid(tmp_path: Path) -> None:
    for lr in (1e-3, 2e-3):
        for seed in (1, 2):
            write_result(tmp_path, f"{lr}s{seed}", r=8, alpha=16, lr=lr, seed=seed, best_val_acc=0.7 + lr * 10)
    written = report.write_report(tmp_path)
    assert "fair.md" in written and "0.001, 0.002" in written["fair.md"].read_text()


def test_legend_and_annotation_text_at_least_8_pt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for r in (2, 4):
        for seed in (1, 2):
            write_result(
                tmp_path,
                f"r{r}s{seed}",
                r=r,
                alpha=2 * r,
                seed=seed,
                majority_baseline_acc=0.55,
                history=[{"epoch": 1, "time_s": 1.0, "val_acc": 0.7}],
                mem_params_bytes=1e6,
            )
    sizes: list[float] = []
    save = figures._save

    def spy(fig, path):  # noqa: ANN001, ANN202
        for ax in fig.axes:
            legend = ax.get_legend()
            sizes.extend(t.get_fontsize() for t in (legend.get_texts() if legend else []))
            sizes.extend(t.get_fontsize() for t in ax.texts)
        return save(fig, path)

    monkeypatch.setattr(figures, "_save", spy)
    written = report.write_report(tmp_path)
    assert {"accuracy_vs_rank.png", "cost.png", "memory_breakdown.png"} <= set(written)
    assert sizes and min(sizes) >= 8


def test_memory_figures_use_measured_gpu_peak_else_predicted() -> None:
    import pandas as pd

    from lora_exp.analysis import figures

    cpu = pd.DataFrame(
        {"peak_vram_gib": [float("nan")] * 2, "predicted_peak_gib": [1.5, 0.5], "peak_host_rss_gib": [9, 9]}
    )
    values, label = figures.peak_memory(cpu)
    assert list(values) == [1.5, 0.5] and "predicted" in label and "CPU" in label
    gpu = cpu.assign(peak_vram_gib=[2.0, 1.0])
    values, label = figures.peak_memory(gpu)
    assert list(values) == [2.0, 1.0] and "measured" in label


def test_variants_pair_with_plain_lora_of_the_same_shape(tmp_path: Path) -> None:
    """DoRA is compared with LoRA at the same r and targets on the same seeds (and both with full FT)."""
    accs = {
        ("full", "full", None): 0.80,
        ("lora", "lora", 8): 0.82,
        ("lora", "dora", 8): 0.85,
        ("lora", "lora", 32): 0.9,
    }
    for (method, variant, r), acc in accs.items():
        for lr in (1e-3, 2e-3):
            for seed in (1, 2):
                name = f"{variant}{r}{lr}s{seed}"
                fields = dict(method=method, variant=variant, lr=lr, seed=seed, r=r, alpha=16 if r else None)
                fields.update(test_acc=acc + seed / 100, best_val_acc=acc, targets="q+v" if r else None)
                write_result(tmp_path, name, **fields)
    _, paired = report.fair_comparison(report.load_runs(tmp_path))
    vs_lora = paired[paired.reference == "LoRA"].set_index("config")["diff"]
    assert len(vs_lora) == 1 and vs_lora.iloc[0] == pytest.approx(0.03)  # dora r=8 - lora r=8; r=32 has no twin
    assert "dora" in vs_lora.index[0]
    assert (paired.reference == "full fine-tuning").sum() == 3


def test_auc_monitor_gives_auc_columns_and_auc_curves(tmp_path: Path) -> None:
    """Runs that selected their best step by val/auc (the detector) show AUC in the table and the figures."""
    from lora_exp.analysis import figures

    for seed in (1, 2):
        history = [{"step": s, "epoch": s, "time_s": 2.0 * s, "val_acc": 0.5, "val_auc": 0.7 + s / 10} for s in (1, 2)]
        write_result(
            tmp_path,
            f"s{seed}",
            seed=seed,
            monitor="val/auc",
            best_val_auc=0.9,
            test_auc=0.88 + seed / 100,
            history=history,
            r=8,
            alpha=16,
        )
    write_result(tmp_path, "text", method="full", seed=1, best_val_auc=None, test_auc=None, lr=5e-5)
    df = report.load_runs(tmp_path)
    md = report.to_markdown(report.summarize(df), df)
    assert "test AUC" in md and "0.8950 ± " in md  # mean of 0.89 and 0.90 over two seeds
    ok = df[df.status == "ok"].assign(config="x")
    assert figures.monitored(ok[ok.monitor == "val/auc"]) == "auc" and figures.monitored(ok) == "acc"
    figures.plot_validation_curves(ok[ok.monitor == "val/auc"], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_truncated_results_json_is_a_failed_job_not_a_nan_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for seed in (1, 2):
        write_result(tmp_path, f"s{seed}", r=8, alpha=16, seed=seed)
    whole = json.dumps({"status": "ok", "method": "lora", "seed": 3, "test_acc": 0.9})
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "results.json").write_text(whole[: len(whole) // 2])  # a write cut short
    df = report.load_runs(tmp_path)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].endswith("); listed under failed jobs")
    assert printed[0].startswith(
        f"[lora-exp] report: {tmp_path / 'cut' / 'results.json'} is unreadable (JSONDecodeError"
    )
    failed = df[df["status"] != "ok"]
    assert list(failed["job_dir"]) == [str(tmp_path / "cut")]
    assert failed["reason"].item().startswith("results.json unreadable (JSONDecodeError: ")
    summary = report.summarize(df)
    assert len(summary) == 1 and summary["seeds"].item() == 2  # the cut job is no third seed
    md = report.to_markdown(summary, df)
    assert "nan" not in md.lower()
    assert "- `cut` (-): error: results.json unreadable (JSONDecodeError: " in md
    # the cut row has no seed, so pandas holds the seeds as floats: labels still read s1, s2
    assert df["seed"].dtype == float
    labels = report.run_labels(df, summary)
    assert sorted(labels[df.status == "ok"].str.rsplit(" ", n=1).str[1]) == ["s1", "s2"]
    assert labels[df.status != "ok"].item().endswith(" s-")


def test_figures_keep_titles_and_labels_inside_the_image(tmp_path: Path) -> None:
    """One configuration (the narrowest figures) and four with long labels (the shortest axes), with the long CPU
    memory label: every PNG keeps a blank margin on all four sides, so no title, axis label or legend is cut."""
    parts = dict(mem_params_bytes=1e5, mem_grads_bytes=1e5, mem_optimizer_bytes=2e5, mem_activations_bytes=3e5)
    history = [{"epoch": e, "time_s": 2.0 * e, "val_acc": 0.6 + e / 20} for e in (1, 2, 3)]
    write_result(tmp_path / "one", "lora", r=8, alpha=16, mem_predicted_peak_bytes=7e5, history=history, **parts)
    for r in (4, 8, 16, 32):
        fields = dict(r=r, alpha=2 * r, targets="q+k+v+o+ffn", mem_predicted_peak_bytes=7e5, history=history)
        write_result(tmp_path / "four", f"r{r}", **fields, **parts)
    written = report.write_report(tmp_path / "one", tmp_path / "report1")
    written = {**{f"1-{k}": v for k, v in written.items()}, **report.write_report(tmp_path / "four")}
    assert {"memory.png", "memory_breakdown.png", "1-memory.png", "1-memory_breakdown.png"} <= set(written)
    for name, path in written.items():
        if not name.endswith(".png"):
            continue
        rgb = mpimg.imread(path)[..., :3]
        border = [rgb[:3], rgb[-3:], rgb[:, :3], rgb[:, -3:]]  # 3 px along each edge
        assert all((edge > 0.99).all() for edge in border), f"{name}: ink touches the image border (clipped)"


def test_validation_curves_draw_the_validation_majority_baseline(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    history = [{"epoch": e, "time_s": 2.0 * e, "val_acc": 0.7} for e in (1, 2)]
    for seed in (1, 2):
        write_result(
            tmp_path, f"s{seed}", r=8, alpha=16, seed=seed, history=history, data="reviews",
            majority_baseline_acc=0.5, majority_baseline_val_acc=0.58,
        )  # fmt: skip
    lines: dict[str, list[float]] = {}
    save = figures._save

    def spy(fig, path):  # noqa: ANN001, ANN202
        lines[Path(path).name] = [
            ln.get_ydata()[0] for ax in fig.axes for ln in ax.get_lines() if ln.get_label().startswith("majority")
        ]
        return save(fig, path)

    monkeypatch.setattr(figures, "_save", spy)
    report.write_report(tmp_path)
    assert lines["validation_curves.png"] == [0.58, 0.58]  # both panels: the validation split's baseline
    assert lines["accuracy_vs_params.png"] == [0.5]  # test accuracy figures keep the test baseline


def test_fair_table_under_an_auc_monitor_reports_test_auc_and_pairs_it(tmp_path: Path) -> None:
    """The detector selects by validation AUC: its fair table and paired differences are in test AUC, not in the
    test accuracy that a collapsed threshold can pin at 0.5 (here LoRA's accuracy is constant; its AUC is not)."""
    for method, lrs, auc in (("full", (5e-5, 1e-4), 0.90), ("lora", (1e-3, 2e-3), 0.92)):
        for lr in lrs:
            for seed in (1, 2, 3):
                shape = {"r": 8, "alpha": 16, "train_seconds": 40.0} if method == "lora" else {"train_seconds": 100.0}
                scores = {"best_val_auc": auc + lr, "best_val_acc": 0.9 - lr}  # the higher lr wins by AUC, not by acc
                tests = {"test_auc": auc + seed / 100, "test_acc": 0.5 if method == "lora" else 0.7 + seed / 100}
                name = f"{method}{lr}s{seed}"
                write_result(
                    tmp_path, name, method=method, lr=lr, seed=seed, monitor="val/auc", **shape, **scores, **tests
                )
    table, paired = report.fair_comparison(report.load_runs(tmp_path))
    assert dict(zip(table.method, table.lr)) == {"full": 1e-4, "lora": 2e-3}
    assert table.set_index("method").loc["lora", "headline"] == pytest.approx(0.94)  # mean AUC of seeds 1-3
    assert paired.iloc[0]["diff"] == pytest.approx(0.02)  # 0.92+s - (0.90+s), in AUC; accuracy would give -0.22
    md = fair.markdown(table, paired)
    assert "test AUC (mean ± 95% CI)" in md and "test AUC − full fine-tuning" in md and "+0.0200" in md
    assert "test acc" not in md and "train time (s)" in md
    assert table.set_index("method")["train_s"].to_dict() == {"full": 100.0, "lora": 40.0}


def test_vera_and_adalora_pair_with_plain_lora_at_their_own_rank_meaning(tmp_path: Path) -> None:
    """VeRA's r is its shared projections' rank (any plain LoRA of the same targets is its twin); AdaLoRA pairs at
    the mean of its final ranks (its budget); a LoRA-FA of another r finds no twin."""
    final_ranks = {"layer.0.query": 9, "layer.0.value": 7, "layer.1.query": 10, "layer.1.value": 6}  # mean 8
    arms = [("lora", 8, 0.80, {}), ("vera", 256, 0.70, {}), ("adalora", 12, 0.75, {"adalora_ranks": final_ranks})]
    arms.append(("lora_fa", 16, 0.78, {}))
    for variant, r, acc, extra in arms:
        for lr in (1e-3, 2e-3):
            for seed in (1, 2, 3):
                fields = dict(method="lora", variant=variant, lr=lr, seed=seed, r=r, alpha=16, targets="q+v", **extra)
                write_result(
                    tmp_path, f"{variant}{lr}s{seed}", test_acc=acc + seed / 100, best_val_acc=acc + lr, **fields
                )
    _, paired = report.fair_comparison(report.load_runs(tmp_path))
    vs_lora = paired[paired.reference == "LoRA"]
    diffs = {c.split()[0]: (d, n) for c, d, n in zip(vs_lora.config, vs_lora["diff"], vs_lora.pairs)}
    assert set(diffs) == {"vera", "adalora"}  # lora_fa r=16 has no plain LoRA r=16 here
    assert diffs["vera"] == (pytest.approx(-0.10), 3) and diffs["adalora"] == (pytest.approx(-0.05), 3)


def test_chosen_curves_plot_each_arm_at_its_chosen_lr_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """validation_curves_chosen.png: the seed's two figures without the lrs the protocol did not choose."""
    for method, lrs in (("full", (5e-5, 1e-4)), ("frozen", (1e-2, 3e-2))):
        for lr in lrs:
            for seed in (1, 2):
                history = [{"step": s, "epoch": s, "time_s": 2.0 * s, "val_acc": 0.6 + lr} for s in (1, 2)]
                fields = dict(method=method, lr=lr, seed=seed, best_val_acc=0.6 + lr, history=history)
                write_result(tmp_path / "runs", f"{method}{lr}s{seed}", **fields)
    plotted: dict[str, set] = {}
    real = figures.plot_validation_curves

    def spy(runs, path):
        plotted[Path(path).name] = set(zip(runs["method"], runs["lr"]))
        return real(runs, path)

    monkeypatch.setattr(figures, "plot_validation_curves", spy)
    written = report.write_report(tmp_path / "runs", tmp_path / "out")
    assert written["validation_curves_chosen.png"].stat().st_size > 0
    assert plotted["validation_curves_chosen.png"] == {("full", 1e-4), ("frozen", 3e-2)}
    assert len(plotted["validation_curves.png"]) == 4  # the plain figure keeps every lr


def test_regression_runs_report_in_pearson(tmp_path: Path) -> None:
    """Scores (data.problem_type=regression) have no accuracy: the summary, the fair table and its paired
    differences and the figures are in the monitored Pearson correlation, with CIs."""
    for method, lrs, base in (("full", (5e-5, 1e-4), 0.60), ("lora", (1e-3, 2e-3), 0.62)):
        for lr in lrs:
            for seed in (1, 2, 3):
                shape = {"r": 8, "alpha": 16} if method == "lora" else {}
                scores = {"best_val_pearson": base + lr, "best_val_mse": 0.1, "best_val_loss": 0.1}
                tests = {"test_pearson": base + seed / 100, "test_spearman": 0.5, "test_mse": 0.2}
                write_result(
                    tmp_path, f"{method}{lr}s{seed}", method=method, lr=lr, seed=seed, monitor="val/pearson",
                    problem_type="regression", best_val_acc=None, test_acc=None, test_pred_counts=None,
                    majority_baseline_acc=None, **shape, **scores, **tests,
                )  # fmt: skip
    df = report.load_runs(tmp_path)
    summary = report.summarize(df)
    assert set(summary["headline_name"]) == {"test Pearson"}
    md = report.to_markdown(summary, df)
    assert "test Pearson" in md and "best val Pearson" in md and "test acc" not in md and "0.6400 ± " in md
    table, paired = report.fair_comparison(df)
    assert dict(zip(table.method, table.lr)) == {"full": 1e-4, "lora": 2e-3}
    assert table.set_index("method").loc["lora", "headline"] == pytest.approx(0.64)
    assert paired.iloc[0]["diff"] == pytest.approx(0.02) and paired.iloc[0]["metric"] == "test Pearson"
    assert "test Pearson − full fine-tuning" in fair.markdown(table, paired)
    written = report.write_report(tmp_path, tmp_path / "out")
    assert {"accuracy_vs_params.png", "pareto.png", "fair.md"} <= set(written)


def test_quantised_bases_get_their_rows_and_their_peak_against_lora_on_a_16_bit_base(tmp_path: Path) -> None:
    peaks = {"bf16": 400, "nf4": 300, "int8": 500, "fp32": 800}  # MiB, predicted (CPU runs)
    for base, peak in peaks.items():
        for seed in (1, 2):
            write_result(
                tmp_path,
                f"{base}s{seed}",
                seed=seed,
                base_dtype=base,
                group_hash=f"g-{base}",
                model="minilm",
                data="rt",
                precision="bf16",
                variant="lora",
                r=8,
                alpha=16,
                mem_predicted_peak_bytes=peak * 2**20,
            )
    write_result(
        tmp_path,
        "frozen",
        method="frozen",
        base_dtype="nf4",
        group_hash="g-frozen",
        model="minilm",
        data="rt",
        precision="bf16",
        mem_predicted_peak_bytes=100 * 2**20,
    )
    summary = report.summarize(report.load_runs(tmp_path))
    assert len(summary) == 5  # each base dtype its own row
    ratio = dict(zip(summary["base_dtype"] + summary["method"], figures.peak_vs_lora(summary)))
    # against the 16-bit base, not fp32: QLoRA saves a quarter here, int8 costs more
    assert ratio == pytest.approx(
        {"bf16lora": 1.0, "nf4lora": 0.75, "int8lora": 1.25, "fp32lora": 2.0, "nf4frozen": 0.25}
    )
    md = report.to_markdown(summary, report.load_runs(tmp_path))
    assert "peak / LoRA 16/32-bit base" in md and "0.75x" in md and "1.25x" in md
    assert (tmp_path / "out").mkdir() is None and figures.plot_pareto(summary, tmp_path / "out" / "p.png").is_file()
    no_ref = summary[summary["base_dtype"] != "bf16"].reset_index(drop=True)  # fp32 becomes the reference
    got = dict(zip(no_ref["base_dtype"] + no_ref["method"], figures.peak_vs_lora(no_ref)))
    assert got == pytest.approx({"nf4lora": 0.375, "int8lora": 0.625, "fp32lora": 1.0, "nf4frozen": 0.125})


def test_fair_protocol_pairs_qlora_with_lora_on_an_unquantised_base(tmp_path: Path) -> None:
    for base, shift in (("fp32", 0.0), ("nf4", -0.02)):
        for lr, val in ((2e-3, 0.80), (4e-3, 0.82)):
            for seed in (1, 2, 3):
                write_result(
                    tmp_path, f"{base}{lr}s{seed}", base_dtype=base, lr=lr, seed=seed, best_val_acc=val,
                    test_acc=0.8 + seed / 100 + shift, group_hash=f"g{base}{lr}", arm_hash=f"a{base}",
                    model="minilm", data="rt", variant="lora", r=8, alpha=16,
                )  # fmt: skip
    _, paired = report.fair_comparison(report.load_runs(tmp_path))
    row = paired[paired["reference"] == "LoRA on a 16/32-bit base"].iloc[0]
    assert row["pairs"] == 3 and row["diff"] == pytest.approx(-0.02) and "nf4" in row["config"]


def test_packed_jobs_report_as_their_solo_runs(tmp_path: Path) -> None:
    """A packed job's results.json adds ``packed_with``, ``pack_size`` and the pack's memory fields (issue 28): the
    report's rows, fair table and paired differences are those of the same jobs run solo, and a sweep with some
    jobs packed and some solo pools them as one arm (they are the same configuration)."""

    def sweep(root: Path, packed: set[int]) -> None:
        for i, (lr, seed) in enumerate((lr, s) for lr in (1e-3, 2e-3) for s in (1, 2, 3)):
            extra = {}
            if i in packed:
                extra = {"packed_with": [f"job{j}" for j in packed if j != i], "pack_size": len(packed)}
                extra |= {"mem_pack_predicted_peak_bytes": 3 * 2**30, "mem_solo_predicted_peak_bytes": 2**30}
            acc = 0.7 + lr * 50 + seed / 100
            write_result(root, f"job{i}", lr=lr, seed=seed, r=8, alpha=16, best_val_acc=acc, test_acc=acc, **extra)

    sweep(tmp_path / "solo", set())
    sweep(tmp_path / "packed", {0, 1, 2, 3, 4, 5})
    sweep(tmp_path / "mixed", {0, 2, 4})
    runs = {name: report.load_runs(tmp_path / name) for name in ("solo", "packed", "mixed")}
    summaries = {name: report.summarize(df) for name, df in runs.items()}
    cols = ["lr", "seeds", "test_acc", "test_acc_ci95"]
    for name in ("packed", "mixed"):
        assert summaries[name][cols].equals(summaries["solo"][cols]), name
        table, paired = report.fair_comparison(runs[name])
        solo_table, solo_paired = report.fair_comparison(runs["solo"])
        assert table[["method", "lr", "test_acc"]].equals(solo_table[["method", "lr", "test_acc"]])
    assert list(summaries["mixed"]["seeds"]) == [3, 3]  # packed and solo seeds pool in one arm per lr
