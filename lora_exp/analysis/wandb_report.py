"""``lora-exp report DIR --wandb``: the report's tables (``wandb.Table``) and figures (``wandb.Image``) logged to
one W&B run of ``job_type=report`` in the runs' group, so the comparison sits next to the runs it compares.

The run takes the W&B settings the runs recorded (``config.yaml``: project, entity, group, mode; offline unless
they ran online) and writes into ``<out>/wandb``.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf


def logger_settings(job_dirs: list[str]) -> dict[str, Any]:
    """Project, entity, mode and group for the report run, from the runs' recorded ``logger`` settings: the most
    common project / entity / mode (disabled runs: offline), the group when all the runs share one."""
    seen: dict[str, Counter] = {k: Counter() for k in ("project", "entity", "mode", "group")}
    for job in job_dirs:
        path = Path(job) / "config.yaml"
        logger = OmegaConf.load(path).get("logger", {}) if path.is_file() else {}
        for key, counts in seen.items():
            counts[logger.get(key)] += 1
    mode = next((m for m, _ in seen["mode"].most_common() if m in ("offline", "online")), "offline")
    groups = [g for g in seen["group"] if g]
    return {
        "project": next((p for p, _ in seen["project"].most_common() if p), "lora-exp"),
        "entity": next((e for e, _ in seen["entity"].most_common() if e), None),
        "mode": mode,
        "group": groups[0] if len(groups) == 1 and None not in seen["group"] else None,
        "groups": sorted(groups),
    }


def as_table(frame: pd.DataFrame) -> Any:
    """A ``wandb.Table`` of ``frame`` without the internal ``_``-columns (lists become text)."""
    import wandb

    frame = frame[[c for c in frame.columns if not str(c).startswith("_")]].copy()
    for col in frame.columns:
        if frame[col].map(lambda v: isinstance(v, list | dict)).any():
            frame[col] = frame[col].map(str)
    return wandb.Table(dataframe=frame.reset_index(drop=True), allow_mixed_types=True)


def log_report(
    root: Path,
    out: Path,
    runs: pd.DataFrame,
    tables: dict[str, pd.DataFrame],
    figures: dict[str, Path],
) -> str:
    """One W&B run (``job_type=report``) holding ``tables`` (name -> frame, as ``report/<name>``) and the
    ``figures`` (file name -> PNG, as ``figures/<stem>``); returns the line that says where it went."""
    import wandb

    settings = logger_settings(list(runs["job_dir"]))
    os.environ.setdefault("WANDB_SILENT", "true")
    finished = int((runs["status"] == "ok").sum())
    run = wandb.init(
        mode=settings["mode"],
        project=settings["project"],
        entity=settings["entity"],
        group=settings["group"],
        job_type="report",
        name=f"report-{settings['group'] or Path(root).resolve().name}",
        dir=str(out),
        config={"runs_dir": str(Path(root).resolve()), "runs": len(runs), "finished": finished},
        reinit="create_new",
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )
    files = Path(run.dir).parent  # <out>/wandb/<offline-run-...>: what `wandb sync` takes
    try:
        run.log(
            {
                **{f"report/{name}": as_table(frame) for name, frame in tables.items() if not frame.empty},
                **{f"figures/{Path(name).stem}": wandb.Image(str(path)) for name, path in figures.items()},
            }
        )
        run.summary.update({"runs": len(runs), "finished": finished, "failed": len(runs) - finished})
    finally:
        run.finish()
    where = f"group {settings['group']!r}"
    if not settings["group"]:
        where = f"no group: the runs are in {', '.join(settings['groups'])}" if settings["groups"] else "no group"
    sync = f"; upload with: wandb sync {files}" if settings["mode"] == "offline" else ""
    return f"W&B report run {run.id} ({settings['mode']}, project {settings['project']!r}, {where}){sync}"
