"""``lora-exp bench``: our loop against HF Trainer (+ PEFT for LoRA) on the same work, in one process.

Both contenders get the same composed config: model (any type; PEFT's ``target_modules`` are the module
paths our resolver ``lora.resolve_targets`` picks, ``modules_to_save`` our head list), tokenised training
examples, batch size, padding (to the batch's longest, rounded up to a multiple of 8), length grouping
(``trainer.group_by_length``), device, precision (``bf16`` / ``fp16`` / ``fp32`` as our run picks it), AdamW
over the trainable parameters with the same groups, lr, weight decay, schedule and gradient clipping, and the
same logging interval (the loss is read on the host every ``trainer.log_every`` steps on both sides).

Timing window: from the end of optimizer step ``warmup`` to the end of step ``warmup + steps``, so model
loading, tokenisation, the first steps (allocator growth, kernel selection) and our end-of-run evaluation
are outside. Our loop is timed with a global optimizer step post-hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``; with fp16 at ``GradScaler.update``, as the
scaler skips the optimizer on overflowing steps), HF Trainer with a ``TrainerCallback`` at ``on_step_end``;
on CUDA both synchronise at the two window edges only. Samples and tokens (real and padded) are counted in
each side's collate function, the same wrapper for both. Contenders alternate (ours, hf, ours, hf, ...)
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
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from lora_exp.errors import LoraExpError

PAD_MULTIPLE = 8  # our loader pads to a multiple of 8 (data.make_loaders); HF's collator gets the same
METHODS = ("lora", "full", "frozen")
BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Peak dense (no sparsity) bf16 tensor-core FLOP/s, matched by substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 80GB HBM3", 989e12),  # H100 SXM
    ("H100 SXM", 989e12),
    ("A100", 312e12),
)


def peak_bf16_flops(gpu_name: str | None) -> float | None:
    """The GPU's peak dense bf16 FLOP/s from a small table; None for CPUs and unknown GPUs."""
    for key, peak in PEAK_BF16_FLOPS:
        if gpu_name and key in gpu_name:
            return peak
    return None


class StepWindow:
    """Times optimizer steps ``warmup+1 .. warmup+steps`` and counts the samples/tokens of their batches.

    ``collate(fn)`` wraps a collate function and records each batch's size on the CPU batch (no device
    sync); ``step()`` is called after every optimizer step. With one batch per step, consumed in the order
    collated, step k trains on the k-th recorded batch, whatever a loader prefetches (accelerate's loader
    collates one batch ahead), so the window's batches are records ``warmup .. warmup+steps-1``.
    """

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.done = 0
        self.batches: list[tuple[int, int, int, int]] = []  # samples, real tokens, padded tokens, length
        self.times: list[float] = []

    def collate(self, fn: Callable[[list], dict]) -> Callable[[list], dict]:
        """``fn`` with a record per batch: samples, real tokens (attention mask), padded tokens, length."""

        def counted(features: list) -> dict:
            batch = fn(features)
            mask = batch["attention_mask"]
            self.batches.append((mask.shape[0], int(mask.sum()), mask.numel(), mask.shape[1]))
            return batch

        return counted

    def step(self) -> None:
        """After each optimizer step: at the window's two edges, synchronise and read the clock."""
        self.done += 1
        if self.done in (self.warmup, self.warmup + self.steps):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times.append(time.perf_counter())

    def result(self) -> dict[str, Any]:
        """Seconds, samples/s, tokens/s (real tokens) and the padding seen inside the window."""
        if len(self.times) != 2 or len(self.batches) < self.warmup + self.steps:
            raise LoraExpError(f"bench: the run made {self.done} optimizer steps, fewer than warmup + steps")
        seconds = self.times[1] - self.times[0]
        inside = self.batches[self.warmup : self.warmup + self.steps]
        samples, real, padded = (sum(b[i] for b in inside) for i in range(3))
        return {
            "steps_timed": self.steps,
            "seconds": seconds,
            "samples": samples,
            "real_tokens": real,
            "padded_tokens": padded,
            "samples_per_s": samples / seconds,
            "tokens_per_s": real / seconds,
            "padding_efficiency": real / padded,
            "padded_length_gcd": math.gcd(*(b[3] for b in inside)),  # a multiple of PAD_MULTIPLE when padded so
        }


def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    from lora_exp.config import CONF_DIR, register_configs

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
        ]
    )


def device_name(device: str | torch.device) -> str:
    """``cuda`` resolved to ``cuda:<current>``, so both sides' records compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


@contextmanager
def step_hook(window: StepWindow, fp16: bool) -> Iterator[None]:
    """Call ``window.step()`` after every optimizer step of our loop.

    A global optimizer post-hook; with fp16 the GradScaler skips ``optimizer.step()`` on overflowing steps
    (the first few, while the scale settles), so there each step is counted at ``GradScaler.update``,
    which our loop calls once per step (as HF's ``on_step_end`` fires once per step, skipped or not).
    """
    if not fp16:
        handle = register_optimizer_step_post_hook(lambda *_: window.step())
        try:
            yield
        finally:
            handle.remove()
        return
    update = torch.amp.GradScaler.update

    def counted(self: Any, *args: Any, **kwargs: Any) -> None:
        update(self, *args, **kwargs)
        window.step()

    torch.amp.GradScaler.update = counted
    try:
        yield
    finally:
        torch.amp.GradScaler.update = update


def _flags(precision: str) -> dict[str, bool]:
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _ours(cfg: Any, window: StepWindow) -> dict[str, Any]:
    """Our loop via ``train()``; the window hooks every optimizer step and wraps the training collate."""
    from lora_exp import data
    from lora_exp.train import pick_device, pick_precision, train

    make_loaders = data.make_loaders

    def counted_loaders(*args: Any, **kwargs: Any) -> Any:
        loaders = make_loaders(*args, **kwargs)
        loaders.train.collate_fn = window.collate(loaders.train.collate_fn)
        return loaders

    device = pick_device(cfg.trainer.device)
    fp16 = pick_precision(cfg.trainer.precision, device) == "fp16"
    data.make_loaders = counted_loaders
    try:
        with tempfile.TemporaryDirectory() as tmp, step_hook(window, fp16):
            res = train(cfg, Path(tmp) / "run")
    finally:
        data.make_loaders = make_loaders
    return {
        "precision": res["precision"],
        "precision_flags": _flags(res["precision"]),
        "batch_size": res["batch_size"],
        "pad_to_multiple_of": PAD_MULTIPLE,
        "group_by_length": bool(cfg.trainer.group_by_length),
        "device": device_name(res["device"]),
        "trainable_params": res["trainable_params"],
    }


def _adamw(model: torch.nn.Module, cfg: Any, device: torch.device, total_steps: int) -> tuple[Any, Any]:
    """AdamW and schedule exactly as our loop builds them (``train.make_optimizer``: the same groups, LoRA+
    included, as PEFT's parameter names hold ``lora_A`` / ``lora_B`` too)."""
    from transformers import get_scheduler

    from lora_exp.train import make_optimizer

    o = cfg.optimizer
    opt = make_optimizer(model, o, device)
    sched = get_scheduler(
        o.scheduler, opt, num_warmup_steps=int(o.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    return opt, sched


def _hf_model(cfg: Any) -> tuple[Any, torch.nn.Module]:
    """The same base model (same seed) with PEFT's LoRA on our resolved targets, or our frozen/full set."""
    from lora_exp import lora, models

    torch.manual_seed(_sub_seeds(cfg.trainer.seed)["model"])
    tokenizer, model, head = models.build(cfg.model, cfg.data.num_labels)
    method = cfg.method.name
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = lora.resolve_targets(model, list(cfg.lora.targets), protected=head)
        peft_cfg = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            use_rslora=cfg.lora.rslora,
            target_modules=targets,
            modules_to_save=list(head),
            task_type="SEQ_CLS",
        )
        model = get_peft_model(model, peft_cfg)
    elif method == "frozen":
        models.apply_method(model, "frozen", head)
    dtype = BASE_DTYPES[cfg.model.get("base_dtype", "fp32") or "fp32"]
    for p in model.parameters():
        if not p.requires_grad:  # the frozen base in model.base_dtype, trainable weights fp32 (as ours)
            p.data = p.data.to(dtype)
    return tokenizer, model


def _hf(cfg: Any, window: StepWindow) -> dict[str, Any]:
    """HF Trainer (+ PEFT) on the same work, timed by a ``TrainerCallback`` at ``on_step_end``."""
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from lora_exp import data
    from lora_exp.train import pick_device, pick_precision

    t = cfg.trainer
    device = pick_device(t.device)
    precision = pick_precision(t.precision, device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # HF/accelerate place the model on the current CUDA device
    tokenizer, model = _hf_model(cfg)
    model.to(device)
    tok = data.tokenize(data.load_splits(cfg.data), tokenizer, cfg.data.max_length)["train"]
    train_set = tok.select_columns(["input_ids", "attention_mask", "labels", "length"]).with_format(None)
    total = window.warmup + window.steps

    class Timing(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            window.step()

    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=PAD_MULTIPLE, return_tensors="pt")
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=t.batch_size,
            gradient_accumulation_steps=1,
            max_steps=total,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            max_grad_norm=t.max_grad_norm,
            train_sampling_strategy="group_by_length" if t.group_by_length else "random",
            logging_strategy="steps",
            logging_steps=t.log_every,  # the loss reaches the host as often as in our loop
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=t.seed,
            use_cpu=device.type == "cpu",
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_set,
            data_collator=window.collate(collator),
            processing_class=tokenizer,
            optimizers=_adamw(model, cfg, device, total),
            callbacks=[Timing()],
        )
        trainer.remove_callback(PrinterCallback)  # no loss dicts printed every log_every steps
        trainer.train()
    return {
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "precision_flags": {"bf16": bool(args.bf16), "fp16": bool(args.fp16)},
        "batch_size": args.per_device_train_batch_size,
        "pad_to_multiple_of": collator.pad_to_multiple_of,
        "group_by_length": args.train_sampling_strategy == "group_by_length",
        "device": device_name(next(model.parameters()).device),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def _sub_seeds(seed: int) -> dict[str, int]:
    try:
        from lora_exp.models import sub_seeds
    except ImportError:  # before build_model/sub_seeds moved to models.py
        from lora_exp.train import sub_seeds
    return sub_seeds(seed)


def flops_per_step(cfg: Any, seq_len: int) -> int:
    """FLOPs of one training step (forward + backward) of our model for ``cfg`` on a batch of
    ``trainer.batch_size`` x ``seq_len`` tokens, counted by ``FlopCounterMode`` (the optimizer is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lora_exp.train import AMP_DTYPES, pick_device, pick_precision

    try:
        from lora_exp.models import build_model
    except ImportError:
        from lora_exp.train import build_model
    device = pick_device(cfg.trainer.device)
    dtype = AMP_DTYPES.get(pick_precision(cfg.trainer.precision, device))
    _, model, _, _ = build_model(cfg)
    model.to(device).train()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.trainer.batch_size, seq_len)
    batch = {
        "input_ids": torch.randint(5, vocab, shape, generator=gen).to(device),
        "attention_mask": torch.ones(shape, dtype=torch.long, device=device),
        "labels": torch.zeros(shape[0], dtype=torch.long, device=device),
    }
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
    flops = counter.get_total_flops()
    del model, batch, loss
    _free(device)
    return int(flops)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


CONTENDERS: dict[str, Callable[[Any, StepWindow], dict[str, Any]]] = {"lora_exp": _ours, "hf_trainer": _hf}


def run(methods: list[str], warmup: int, steps: int, batch: int, reps: int, overrides: list[str]) -> dict[str, Any]:
    """Every method: ``reps`` alternated repetitions (ours, hf, ours, hf, ...), then medians and speedups."""
    from lora_exp.train import pick_device

    rows, flops = [], {}
    device = None
    for method in methods:
        cfg = job_config(method, warmup, steps, batch, overrides)
        device = pick_device(cfg.trainer.device)
        for rep in range(reps):
            for name, contender in CONTENDERS.items():
                window = StepWindow(warmup, steps, device)
                info = contender(cfg, window)
                row = {"method": method, "contender": name, "rep": rep, "warmup_steps": warmup, **info}
                row.update(window.result())
                rows.append(row)
                _free(device)
                print(json.dumps({k: row[k] for k in ("method", "contender", "rep", "samples_per_s")}), flush=True)
        mine = [r for r in rows if r["method"] == method]
        mean_len = sum(r["padded_tokens"] for r in mine) / sum(r["samples"] for r in mine)
        seq_len = math.ceil(mean_len / PAD_MULTIPLE) * PAD_MULTIPLE
        flops[method] = {"seq_len": seq_len, "flops_per_step": flops_per_step(cfg, seq_len)}
    gpu = torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None
    peak = peak_bf16_flops(gpu)
    for r in rows:
        f = flops[r["method"]]["flops_per_step"]
        r["mfu"] = f * r["steps_timed"] / r["seconds"] / peak if peak else None
    return {
        "settings": {"methods": methods, "warmup_steps": warmup, "steps": steps, "batch": batch, "reps": reps},
        "overrides": overrides,
        "device": str(device),
        "gpu_name": gpu,
        "peak_bf16_flops": peak,
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


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and min/max per method and contender; ``speedup`` = median samples/s of ours / of HF."""
    summary, speedup = [], {}
    for method in dict.fromkeys(r["method"] for r in rows):
        for name in CONTENDERS:
            mine = [r for r in rows if r["method"] == method and r["contender"] == name]
            summary.append(
                {
                    "method": method,
                    "contender": name,
                    "reps": len(mine),
                    **{k: _spread([r[k] for r in mine]) for k in ("samples_per_s", "tokens_per_s", "mfu")},
                }
            )
        ours, hf = summary[-2]["samples_per_s"]["median"], summary[-1]["samples_per_s"]["median"]
        speedup[method] = ours / hf
    return {"summary": summary, "speedup": speedup}


def table(result: dict[str, Any]) -> str:
    """Markdown: median samples/s and tokens/s with [min, max], MFU, and the speedup per method."""
    lines = [
        "| method | contender | samples/s median [min, max] | tokens/s median | MFU | speedup (ours / HF) |",
        "|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        sps, tps, mfu = s["samples_per_s"], s["tokens_per_s"], s["mfu"]["median"]
        ratio = f"{result['speedup'][s['method']]:.2f}x" if s["contender"] == "lora_exp" else ""
        lines.append(
            f"| {s['method']} | {s['contender']} | {sps['median']:.1f} [{sps['min']:.1f}, {sps['max']:.1f}] | "
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
    if "lora" in methods:
        try:
            import peft  # noqa: F401
        except ImportError as err:
            raise LoraExpError("bench: the HF + PEFT contender needs peft (pip install -e '.[dev]')") from err
    return methods


def main(*args: str) -> int:
    """Entry for ``lora-exp bench``."""
    parser = argparse.ArgumentParser(prog="lora-exp bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps before them (default 5)")
    parser.add_argument("--reps", type=int, default=3, help="alternated repetitions per contender (>= 3)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--methods", default="lora,full,frozen")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both contenders, e.g. model=tiny_bert")
    ns = parser.parse_args(args)
    methods = _check_args(ns)
    result = run(methods, ns.warmup, ns.steps, ns.batch, ns.reps, ns.overrides)
    print(table(result))
    if ns.out:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0
