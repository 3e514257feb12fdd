"""``lora-exp report DIR [DIR ...] [--out D] [--wandb]``: summary.csv / summary.md / fair.md / figures from the
results under the DIRs (several sweep dirs merge into one table; a run copied into two counts once)."""

from __future__ import annotations

from pathlib import Path

from lora_exp.errors import LoraExpError


def main(*args: str) -> int:
    """Write the report of every results.json under DIR, print its table (and the sweeps that widen an lr grid
    whose edge was chosen), and with ``--wandb`` log it to a W&B run."""
    import argparse

    from lora_exp.analysis.fair import widen_commands
    from lora_exp.analysis.report import fair_comparison, load_runs, write_report

    parser = argparse.ArgumentParser(prog="lora-exp report", description="Table + figures from a (multi)run dir")
    parser.add_argument("dirs", type=Path, nargs="+", help="run or multirun dirs (every results.json below them)")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write (default: DIR/report; several DIRs: DIR/report-merged)"
    )
    parser.add_argument("--wandb", action="store_true", help="also log tables + figures to a W&B run (job_type=report)")
    ns = parser.parse_args(args)
    for folder in ns.dirs:
        if not folder.is_dir():
            raise LoraExpError(f"report: {str(folder)!r} is not a folder")
    ns.dir = ns.dirs[0]  # where the fair comparison's widening sweeps and the W&B report are written
    written = write_report(ns.dirs, ns.out)
    print(written["summary.md"].read_text())  # the runs are read once (an unreadable one is reported once)
    if "fair.md" in written:  # a chosen lr at the edge of its grid: the sweep that looks beyond it
        df = load_runs(ns.dirs)
        print("\n".join(widen_commands(df, fair_comparison(df)[0], ns.dir)))
    print("\n".join(f"wrote {p}" for p in written.values()))
    if ns.wandb:
        from lora_exp.analysis.report import report_tables
        from lora_exp.analysis.wandb_report import log_report

        out = written["summary.md"].parent
        df = load_runs(ns.dirs)
        df = df[~df["job_dir"].str.startswith(str(out))]
        figures = {name: path for name, path in written.items() if name.endswith(".png")}
        print(log_report(ns.dir, out, df, report_tables(df), figures))
    return 0
