"""Packs of 1, 4, 16 LoRA jobs on one base (issue 28): samples/s per job, MFU and peak memory per pack size.

``python -m lora_exp.bench.pack_bench --sizes 1,4,16 --steps 30 --out packs.json [overrides...]`` composes K
LoRA jobs that differ on the adapter side only (lr spread over a decade, r alternating 4 / 8, same seed: one base),
trains them with ``training.pack.train_pack`` for ``--steps`` updates each (W&B off, no weights saved) and writes one
row per pack size. The GPU stage of ``scripts/gpu_acceptance.sh`` (``--packs``) runs it on MiniLM and on the
DistilBERT-size random model; on a CPU it runs the same code (the tests use the tiny model).

MFU counts the frozen base's matmuls only, ``4 x base parameters x padded tokens`` per step (forward 2 and the
backward's input gradients 2; no weight gradients in a frozen base; attention scores and the adapters left out),
against the GPU's peak at the run's precision (``bench.contenders.peak_flops``); None on a CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def pack_configs(k: int, steps: int, overrides: list[str]) -> list[Any]:
    """K composed job configs: lr 1e-4 .. 1e-3 (log-spaced), r 4 / 8 alternating, everything else shared."""
    from hydra import compose, initialize_config_dir

    from lora_exp.config.schema import CONF_DIR, register_configs

    register_configs()
    lrs = [1e-4 * 10 ** (i / max(k - 1, 1)) for i in range(k)]
    common = ["logger=none", "save_weights=false", "trainer.memory_probe=false", f"trainer.max_steps={steps}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return [
            compose("config", [*common, *overrides, f"optimizer.lr={lr:.6g}", f"lora.r={4 if i % 2 == 0 else 8}"])
            for i, lr in enumerate(lrs)
        ]


def one_pack(k: int, steps: int, overrides: list[str], tmp: Path) -> dict[str, Any]:
    """Train one pack of ``k`` jobs; its row: wall time, samples/s per job, padded tokens/s, peak memory, MFU."""
    from lora_exp.bench.contenders import peak_flops
    from lora_exp.training.pack import train_pack

    cfgs = pack_configs(k, steps, overrides)
    dirs = [tmp / f"k{k}_{i}" for i in range(k)]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = train_pack(cfgs, dirs, [False] * k)
    wall = time.perf_counter() - start
    ok = [r for r in out if isinstance(r, dict)]
    row: dict[str, Any] = {"pack": k, "ok": len(ok), "wall_s": round(wall, 2)}
    if not ok:
        row["error"] = str(out[0])
        return row
    first = ok[0]
    padded_per_s = sum(r["tokens_per_s"] / r["padding_efficiency"] for r in ok if r.get("tokens_per_s"))
    base_params = first["model_facts"]["num_params"]
    gpu = first.get("gpu_name") if isinstance(first.get("gpu_name"), str) else None
    peak = peak_flops(gpu or (torch.cuda.get_device_name() if torch.cuda.is_available() else None), first["precision"])
    row.update(
        samples_per_s_per_job=round(sum(r["samples_per_s"] for r in ok) / len(ok), 2),
        samples_per_s_total=round(sum(r["samples_per_s"] for r in ok), 2),
        train_seconds=round(first["train_seconds"], 2),
        padded_tokens_per_s=round(padded_per_s, 1),
        mfu=round(4 * base_params * padded_per_s / peak, 4) if peak else None,
        peak_vram_gib=round(first["peak_vram_bytes"] / 2**30, 3) if first.get("peak_vram_bytes") else None,
        peak_host_rss_gib=round(first["peak_host_rss_bytes"] / 2**30, 3),
        predicted_pack_peak_gib=round(first["mem_pack_predicted_peak_bytes"] / 2**30, 3),
        predicted_solo_peak_gib=round(first["mem_solo_predicted_peak_bytes"] / 2**30, 3),
        precision=first["precision"],
    )
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the pack sizes and write the JSON rows (after each size: a run cut off keeps what finished)."""
    parser = argparse.ArgumentParser(prog="python -m lora_exp.bench.pack_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,16", help="pack sizes, comma-separated (default 1,4,16)")
    parser.add_argument("--steps", type=int, default=30, help="updates per job (default 30)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("overrides", nargs="*", help="config overrides shared by every job (model, data, batch)")
    ns = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="packs-") as tmp:
        for k in (int(s) for s in ns.sizes.split(",") if s):
            rows.append(one_pack(k, ns.steps, ns.overrides, Path(tmp)))
            ns.out.write_text(json.dumps({"overrides": ns.overrides, "steps": ns.steps, "rows": rows}, indent=1) + "\n")
            print(f"[pack_bench] {rows[-1]}", flush=True)
    return 0 if all(r["ok"] == r["pack"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
