"""Time per epoch of two checkouts side by side: each method trained by each checkout's own `lora-exp`, in turn
(method by method, old then new), into one cache, and the per-epoch training seconds read from results.json.

  python scripts/epoch_times.py --old ../old-checkout --new . --out /tmp/epochs \
      --old-set model.source=local model.path=DIR model.name=whisper_tiny_en \
      -- experiment=gw_whisper_offline data.gw.n_train=200 data.gw.n_validation=100 data.gw.n_test=100 \
         trainer.epochs=2 trainer.num_threads=1 logger=none

Epoch k's time is the growth of `train_seconds` between the validations at the ends of epochs k-1 and k
(`history[].time_s`; trainer.eval_every=0); a frozen run's one pass of the encoder over the training split is
in epoch 1. `wall` is the whole job (load, one-off feature computation, evaluation, test, saving).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def run(code: Path, run_dir: Path, overrides: list[str]) -> tuple[dict, float, str]:
    """One job of the checkout ``code`` (its own package first on the path): results, wall seconds, output."""
    env = {**os.environ, "PYTHONPATH": str(code.resolve())}
    cmd = [sys.executable, "-m", "lora_exp", *overrides, f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "results.json").read_text()), wall, proc.stdout + proc.stderr


def epochs(results: dict) -> list[float]:
    """Training seconds of each epoch, from the cumulative ``time_s`` of the epoch-end validations."""
    times = [h["time_s"] for h in results["history"]]
    return [b - a for a, b in zip([0.0, *times], times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="the checkout measured first (before)")
    parser.add_argument("--new", type=Path, required=True, help="the checkout measured second (after)")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the run dirs")
    parser.add_argument("--methods", nargs="+", default=["full", "frozen", "lora"])
    parser.add_argument("--old-set", nargs="*", default=[], help="overrides for the old checkout only")
    parser.add_argument("--new-set", nargs="*", default=[], help="overrides for the new checkout only")
    parser.add_argument("overrides", nargs="*", help="overrides for both (after --)")
    ns = parser.parse_args()
    if ns.out.exists():
        raise SystemExit(f"--out {ns.out} exists; give a new folder")
    rows = []
    for method in ns.methods:
        for label, code, extra in (("old", ns.old, ns.old_set), ("new", ns.new, ns.new_set)):
            res, wall, out = run(code, ns.out / f"{method}-{label}", [*ns.overrides, *extra, f"method={method}"])
            feat = re.search(r"audio features .* computed once in ([\d.]+) s", out)
            per_epoch = epochs(res)
            rows.append((method, label, per_epoch, feat.group(1) if feat else "-", wall, res))
            shown = ", ".join(f"{e:.1f}" for e in per_epoch)
            print(f"{method:<7} {label}: epochs [{shown}] s, wall {wall:.1f} s", flush=True)
    head = ("method", "code", "epoch 1 (s)", "epoch 2 (s)", "features once (s)", "wall (s)", "best val AUC", "order")
    print("\n| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for method, label, per_epoch, feat, wall, res in rows:
        e = [f"{x:.1f}" for x in per_epoch] + ["-"] * (2 - len(per_epoch))
        auc = res.get("best_val_auc")
        print(
            f"| {method} | {label} | {e[0]} | {e[1]} | {feat} | {wall:.1f} | "
            f"{'-' if auc is None else f'{auc:.4f}'} | {res.get('data_order_digest')} |"
        )


if __name__ == "__main__":
    main()
