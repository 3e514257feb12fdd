"""``lora-exp bench``: our loop against HF Trainer (+ PEFT for LoRA) on the same work, in one process.

Both contenders get the same composed config: model (any type; PEFT's ``target_modules`` are the module
paths our resolver ``resolve_targets`` picks, ``modules_to_save`` our head list), tokenised training
examples, batch size, padding (to the batch's longest, rounded up to a multiple of 8), length grouping
(``trainer.group_by_length``), device, precision (``bf16`` / ``fp16`` / ``fp32`` as our run picks it), AdamW
over the trainable parameters with the same groups, lr, weight decay, schedule and gradient clipping, and the
same logging interval (the loss is read on the host every ``trainer.log_every`` steps on both sides).
The timing window: ``lora_exp.bench.contenders``. Contenders alternate (ours, hf, ours, hf, ...)
over ``--reps`` >= 3 repetitions; medians and min/max are reported, and ``speedup`` per method is the ratio
of the median samples/s (ours / hf). On a GPU, MFU is the FLOPs of one training step (forward + backward,
counted by ``torch.utils.flop_counter.FlopCounterMode`` on a batch of the window's mean padded length) per
second against the GPU's peak dense bf16 FLOP/s.
Needs ``peft`` (a dev extra) for the PEFT contender.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from lora_exp.bench.contenders import (
    CONTENDERS,
    METHODS,
    StepWindow,
    matmul_precision,
    peak_bf16_flops,
    peak_flops,
)
from lora_exp.config.checks import validate
from lora_exp.device import AMP_DTYPES, pick_device, pick_precision
from lora_exp.errors import LoraExpError
from lora_exp.training.job import CHECKED_UPDATES


def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    from lora_exp.config.schema import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


def job_config(method: str, warmup: int, steps: int, batch: int, overrides: list[str]) -> Any:
    """The config both contenders run: the user's overrides, then what the bench fixes (one epoch of
    exactly ``warmup + steps`` full batches, no mid-run evaluation or checkpoint, no W&B, no weights)."""
    n = warmup + steps
    return _compose(
        [
            "data.eval_limit=64",
            *overrides,
            f"method={method}",
            f"data.limit={n * batch}",
            "trainer.epochs=1",
            f"trainer.max_steps={n}",
            f"trainer.batch_size={batch}",
            "trainer.grad_accum=1",
            "trainer.eval_every=0",
            "trainer.checkpoint_every=0",
            "logger=none",
            "save_weights=false",
            # the same work on both sides: our frozen-encoder cache would skip the encoder HF runs every step
            "trainer.feature_cache=false",
            "trainer.memory_probe=false",  # HF samples no step's memory either
        ]
    )


def effective_warmup(warmup: int) -> int:
    """The untimed updates before the window: at least our loop's one-off checks (``CHECKED_UPDATES``: the
    gradient checks of updates 1 and 10), so the window holds none of them."""
    return max(warmup, CHECKED_UPDATES)


def flops_per_step(cfg: Any, seq_len: int | list[int]) -> int | list[int]:
    """FLOPs of one training step (forward + backward) of our model for ``cfg`` on a batch of
    ``trainer.batch_size`` x ``seq_len`` tokens (a list: one count per length, one model built), counted by
    ``FlopCounterMode`` (the optimizer is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lora_exp.config.schema import typed_config
    from lora_exp.training.job import build_model_for

    device = pick_device(cfg.trainer.device)
    dtype = AMP_DTYPES.get(pick_precision(cfg.trainer.precision, device))
    _, model, _, _ = build_model_for(typed_config(cfg))
    model.to(device).train()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    counts = []
    for length in [seq_len] if isinstance(seq_len, int) else seq_len:
        shape = (cfg.trainer.batch_size, length)
        batch = {
            "input_ids": torch.randint(5, vocab, shape, generator=gen).to(device),
            "attention_mask": torch.ones(shape, dtype=torch.long, device=device),
            "labels": torch.zeros(shape[0], dtype=torch.long, device=device),
        }
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = model(**batch).loss
            loss.backward()
        counts.append(int(counter.get_total_flops()))
        model.zero_grad(set_to_none=True)
        del batch, loss
    del model
    _free(device)
    return counts[0] if isinstance(seq_len, int) else counts


CURVE_LENGTHS = (8, 16, 24)


def flops_curve(cfg: Any) -> list[Fraction]:
    """``[c0, c1, c2]``: a training step's FLOPs on ``trainer.batch_size`` x L tokens is ``c0 + c1 L + c2 L^2``
    exactly (matmuls: projections and FFN linear in L, attention scores and values quadratic, the head on one
    token constant), solved from the counts at three lengths."""
    counts = flops_per_step(cfg, list(CURVE_LENGTHS))
    a, b, c = (Fraction(n) for n in CURVE_LENGTHS)
    (fa, fb, fc) = (Fraction(n) for n in counts)
    c2 = ((fc - fa) / (c - a) - (fb - fa) / (b - a)) / (c - b)
    c1 = (fb - fa) / (b - a) - c2 * (a + b)
    return [fa - c1 * a - c2 * a * a, c1, c2]


def window_flops(curve: list[Fraction], batch_size: int, shapes: list[list[int]]) -> int:
    """FLOPs of the timed window: each batch at its own padded length (and size, linear: FLOPs per example)."""
    total = sum(Fraction(n, batch_size) * (curve[0] + curve[1] * length + curve[2] * length**2) for n, length in shapes)
    return round(total)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


COMPILE_MODES = {"off": (False,), "on": (True,), "both": (False, True)}


def run(
    methods: list[str],
    warmup: int,
    steps: int,
    batch: int,
    reps: int,
    overrides: list[str],
    compile_modes: tuple[bool, ...] = (False,),
) -> dict[str, Any]:
    """Every method (and compile setting: ``trainer.compile`` for ours, ``torch_compile`` for HF): ``reps``
    alternated repetitions (ours, hf, ours, hf, ...), then medians and speedups."""
    rows, flops = [], {}
    device, requested, warmup = None, warmup, effective_warmup(warmup)
    if warmup != requested:
        print(f"[bench] --warmup={requested} raised to {warmup}: our one-off gradient checks run in updates 1 and 10")
    for method in methods:
        for compiled in compile_modes:
            cfg = job_config(method, warmup, steps, batch, [*overrides, f"trainer.compile={str(compiled).lower()}"])
            device = pick_device(cfg.trainer.device)
            for rep in range(reps):
                for name, contender in CONTENDERS.items():
                    window = StepWindow(warmup, steps, device)
                    info = contender(cfg, window)
                    row = {"method": method, "compile": compiled, "contender": name, "rep": rep, **info}
                    row.update(warmup_steps=warmup, **window.result())
                    rows.append(row)
                    _free(device)
                    keys = ("method", "compile", "contender", "rep", "samples_per_s")
                    print(json.dumps({k: row[k] for k in keys}), flush=True)
        curve = flops_curve(cfg)
        mine = [r for r in rows if r["method"] == method]
        for r in mine:  # every batch of the window at its own length
            r["flops"] = window_flops(curve, batch, r["batch_shapes"])
        flops[method] = {
            "curve": [float(c) for c in curve],
            "curve_lengths": list(CURVE_LENGTHS),
            "flops_per_step": statistics.mean(r["flops"] / r["steps_timed"] for r in mine),
        }
    gpu = torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None
    for r in rows:
        r["matmul_precision"] = matmul_precision(r["precision"])
        peak = peak_flops(gpu, r["matmul_precision"])
        r["peak_flops"] = peak
        r["mfu"] = r["flops"] / r["seconds"] / peak if peak else None
    peak = peak_flops(gpu, rows[0]["matmul_precision"]) if rows else None
    return {
        "settings": {
            "methods": methods,
            "compile": list(compile_modes),
            "warmup_steps": warmup,
            "warmup_requested": requested,
            "steps": steps,
            "batch": batch,
            "reps": reps,
        },
        "overrides": overrides,
        "device": str(device),
        "gpu_name": gpu,
        "peak_flops": peak,
        "peak_bf16_flops": peak_bf16_flops(gpu),
        "flops": flops,
        "versions": _versions(),
        "rows": rows,
        **summarise(rows),
    }


def _versions() -> dict[str, str | None]:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft_version}


def _spread(values: list[float | None]) -> dict[str, float | None]:
    if any(v is None for v in values):
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def speedup_key(method: str, compiled: bool) -> str:
    """``lora`` (compile off) or ``lora+compile``: the key of a method's speedup."""
    return f"{method}+compile" if compiled else method


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and min/max per method, compile setting and contender; ``speedup`` = median samples/s of ours /
    of HF, keyed ``method`` (compile off) and ``method+compile``."""
    summary, speedup = [], {}
    for method, compiled in dict.fromkeys((r["method"], r.get("compile", False)) for r in rows):
        for name in CONTENDERS:
            mine = [
                r for r in rows if (r["method"], r.get("compile", False), r["contender"]) == (method, compiled, name)
            ]
            summary.append(
                {
                    "method": method,
                    "compile": compiled,
                    "contender": name,
                    "reps": len(mine),
                    **{k: _spread([r[k] for r in mine]) for k in ("samples_per_s", "tokens_per_s", "mfu")},
                }
            )
        ours, hf = summary[-2]["samples_per_s"]["median"], summary[-1]["samples_per_s"]["median"]
        speedup[speedup_key(method, compiled)] = ours / hf
    return {"summary": summary, "speedup": speedup}


def table(result: dict[str, Any]) -> str:
    """Markdown: median samples/s and tokens/s with [min, max], MFU, and the speedup per method."""
    lines = [
        "| method | compile | contender | samples/s median [min, max] | tokens/s median | MFU | speedup (ours / HF) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        sps, tps, mfu = s["samples_per_s"], s["tokens_per_s"], s["mfu"]["median"]
        key = speedup_key(s["method"], s.get("compile", False))
        ratio = f"{result['speedup'][key]:.2f}x" if s["contender"] == "lora_exp" else ""
        lines.append(
            f"| {s['method']} | {'on' if s.get('compile') else 'off'} | {s['contender']} | "
            f"{sps['median']:.1f} [{sps['min']:.1f}, {sps['max']:.1f}] | "
            f"{tps['median']:,.0f} | {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | {ratio} |"
        )
    return "\n".join(lines)


def _check_args(ns: argparse.Namespace) -> list[str]:
    methods = [m for m in ns.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise LoraExpError(f"bench: --methods={ns.methods!r}: each must be one of {', '.join(METHODS)}")
    for option, value, low in (("--steps", ns.steps, 1), ("--warmup", ns.warmup, 1), ("--batch", ns.batch, 1)):
        if value < low:
            raise LoraExpError(f"bench: {option}={value} must be >= {low}")
    if ns.reps < 3:
        raise LoraExpError(f"bench: --reps={ns.reps} must be >= 3 (median and spread of alternated repetitions)")
    if ns.compile not in COMPILE_MODES:
        raise LoraExpError(f"bench: --compile={ns.compile!r} is not one of {', '.join(COMPILE_MODES)}")
    if ns.out and ns.out.exists():
        raise LoraExpError(f"bench: --out={str(ns.out)!r} already exists; give a new file")
    if "lora" in methods:
        try:
            import peft  # noqa: F401
        except ImportError as err:
            raise LoraExpError("bench: the HF + PEFT contender needs peft (pip install -e '.[dev]')") from err
    return methods


def _latency(ns: argparse.Namespace) -> int:
    """``--latency``: ``bench.latency`` on the composed config, its table printed, its JSON to ``--out``."""
    from lora_exp.bench import latency

    if ns.reps < 3 or ns.warmup < 1:
        raise LoraExpError(f"bench --latency: --reps={ns.reps} must be >= 3 and --warmup={ns.warmup} >= 1")
    cfg = _compose(["logger=none", *ns.overrides])
    validate(cfg)
    if ns.out and ns.out.exists():
        raise LoraExpError(f"bench --latency: --out={str(ns.out)!r} already exists; give a new file")
    result = latency.run(cfg, ns.reps, ns.warmup)
    print(latency.table(result))
    if ns.out:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {ns.out}")
    return 0


def main(*args: str) -> int:
    """Entry for ``lora-exp bench``."""
    parser = argparse.ArgumentParser(prog="lora-exp bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run (default 30)")
    parser.add_argument(
        "--warmup", type=int, default=10, help="untimed steps before them (>= 10 is used; --latency: forwards)"
    )
    parser.add_argument("--reps", type=int, default=None, help="alternated repetitions (>= 3; default 3, --latency 30)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--methods", default="lora,full,frozen")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result to this file")
    parser.add_argument(
        "--latency", action="store_true", help="inference instead: batch 1 and 32, base / LoRA unmerged / merged"
    )
    parser.add_argument(
        "--compile",
        default="off",
        help="torch.compile on both sides (ours: trainer.compile; HF: torch_compile): off | on | both (default off)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both contenders, e.g. model=tiny_bert")
    ns = parser.parse_args(args)
    ns.reps = ns.reps if ns.reps is not None else (30 if ns.latency else 3)
    if ns.latency:
        return _latency(ns)
    methods = _check_args(ns)
    result = run(methods, ns.warmup, ns.steps, ns.batch, ns.reps, ns.overrides, COMPILE_MODES[ns.compile])
    print(table(result))
    if ns.out:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0
