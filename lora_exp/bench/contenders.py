"""The two contenders of ``lora-exp bench`` (our loop; HF Trainer + PEFT) and the timing window both share.

Timing window: from the end of optimizer step ``warmup`` to the end of step ``warmup + steps``, so model
loading, tokenisation, the first steps (allocator growth, kernel selection) and our end-of-run evaluation
are outside. Our loop is timed with a global optimizer step post-hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``; with fp16 at ``GradScaler.update``, as the
scaler skips the optimizer on overflowing steps), HF Trainer with a ``TrainerCallback`` at ``on_step_end``;
on CUDA both synchronise at the two window edges only. Samples and tokens (real and padded) are counted in
each side's collate function, the same wrapper for both.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from lora_exp.device import pick_device, pick_precision
from lora_exp.errors import LoraExpError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from lora_exp.config.schema import Config

PAD_MULTIPLE = 8  # our loader pads to a multiple of 8 (data.text.make_loaders); HF's collator gets the same


METHODS = ("lora", "full", "frozen")


# Peak dense (no sparsity) FLOP/s per GPU model and the precision the matmuls run in, from NVIDIA's datasheets
# (their tensor-core figures are with 2:4 sparsity: halved here). Matched in order by substring of
# torch.cuda.get_device_name(): "NVIDIA H100 80GB HBM3" is the SXM5 board, "NVIDIA H200" the SXM one, so the
# NVL / PCIe names come first. fp16 runs at the bf16 rate; fp32 matmuls use TF32 tensor cores only when
# torch.backends.cuda.matmul.allow_tf32 is set (PyTorch's default: not), else the plain FP32 units.
PEAK_FLOPS = (
    ("H200 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),  # SXM
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 80GB HBM3", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),  # SXM5
    ("H100 SXM", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
)


def matmul_precision(precision: str) -> str:
    """The precision a run's matmuls use: the autocast dtype, or for fp32 TF32 when PyTorch allows it."""
    if precision != "fp32":
        return precision
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_flops(gpu_name: str | None, precision: str = "bf16") -> float | None:
    """The GPU's peak dense FLOP/s for ``precision`` (bf16 | fp16 | tf32 | fp32); None for CPUs and unknown GPUs."""
    for key, peaks in PEAK_FLOPS:
        if gpu_name and key in gpu_name:
            return peaks.get(precision)
    return None


def peak_bf16_flops(gpu_name: str | None) -> float | None:
    """``peak_flops(gpu_name, "bf16")``."""
    return peak_flops(gpu_name, "bf16")


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
        self.batches: list[tuple[int, int, int, int, str]] = []  # samples, real / padded tokens, length, digest
        self.times: list[float] = []

    def collate(self, fn: Callable[[list], dict]) -> Callable[[list], dict]:
        """``fn`` with a record per batch: samples, real tokens (attention mask), padded tokens, length, and a
        digest of its token ids and labels (both sides must train on the same batches in the same order)."""

        def counted(features: list) -> dict:
            batch = fn(features)
            mask = batch["attention_mask"]
            data = batch["input_ids"].numpy().tobytes() + batch["labels"].numpy().tobytes()
            digest = hashlib.sha256(data).hexdigest()[:16]
            self.batches.append((mask.shape[0], int(mask.sum()), mask.numel(), mask.shape[1], digest))
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
            "batch_shapes": [[b[0], b[3]] for b in inside],  # (samples, padded length): FLOPs per batch
            "batches_digest": hashlib.sha256("".join(b[4] for b in self.batches).encode()).hexdigest()[:16],
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


def _ours(cfg: DictConfig, window: StepWindow) -> dict[str, Any]:
    """Our loop via ``train()``; the window hooks every optimizer step and wraps the training collate."""
    from lora_exp.data import text as text_data
    from lora_exp.training.loop import train

    make_loaders = text_data.make_loaders

    def counted_loaders(*args: Any, **kwargs: Any) -> Any:
        loaders = make_loaders(*args, **kwargs)
        loaders.train.collate_fn = window.collate(loaders.train.collate_fn)
        return loaders

    device = pick_device(cfg.trainer.device)
    fp16 = pick_precision(cfg.trainer.precision, device) == "fp16"
    text_data.make_loaders = counted_loaders
    try:
        with tempfile.TemporaryDirectory() as tmp, step_hook(window, fp16):
            res = train(cfg, Path(tmp) / "run")
    finally:
        text_data.make_loaders = make_loaders
    return {
        "precision": res["precision"],
        "precision_flags": _flags(res["precision"]),
        "batch_size": res["batch_size"],
        "pad_to_multiple_of": PAD_MULTIPLE,
        "group_by_length": bool(cfg.trainer.group_by_length),
        "device": device_name(res["device"]),
        "trainable_params": res["trainable_params"],
        "compiled": bool(res["compile"]),
        "non_blocking": True,  # the loop copies every batch with non_blocking=True (from pinned memory on CUDA)
    }


def _adamw(model: torch.nn.Module, cfg: Config, device: torch.device, total_steps: int) -> tuple[Any, Any]:
    """AdamW and schedule exactly as our loop builds them (``train.make_optimizer``: the same groups, LoRA+
    included, as PEFT's parameter names hold ``lora_A`` / ``lora_B`` too)."""
    from transformers import get_scheduler

    from lora_exp.training.job import make_optimizer

    o = cfg.optimizer
    opt = make_optimizer(model, o, device)
    sched = get_scheduler(
        o.scheduler, opt, num_warmup_steps=int(o.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    return opt, sched


def _hf_model(cfg: Config) -> tuple[Any, torch.nn.Module]:
    """The same base model (same seed) with PEFT's LoRA on our resolved targets, or our frozen/full set."""
    from lora_exp.adapters.targets import resolve_targets
    from lora_exp.models import text
    from lora_exp.models.build import sub_seeds
    from lora_exp.models.methods import apply_method, store_frozen_in

    torch.manual_seed(sub_seeds(cfg.trainer.seed)["model"])
    from lora_exp.training.job import configured_labels

    labels = configured_labels(cfg)  # data.num_labels, 2 when null (taken from the data: ours reads it there)
    tokenizer, model, head = text.build(cfg.model, labels.num_labels, labels.id2label)
    model.config.problem_type = labels.problem_type
    method = cfg.method.name
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = resolve_targets(model, list(cfg.lora.targets), protected=head)
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
        apply_method(model, "frozen", head)
    store_frozen_in(model, cfg.model.base_dtype)  # as ours: trainable weights fp32
    return tokenizer, model


class SameOrder(torch.utils.data.Sampler):
    """Our loop's training sampler handed to HF Trainer: the same batches in the same order (its own
    ``LengthGroupedSampler`` draws from the global RNG; a plain ``RandomSampler`` accelerate would re-seed)."""

    def __init__(self, inner: torch.utils.data.Sampler):
        self.inner = inner

    def __iter__(self) -> Iterator[int]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def our_sampler(cfg: Config, encoded: Any, tokenizer: Any) -> torch.utils.data.Sampler:
    """The sampler our loop trains with: built by our loaders from a generator seeded as the job seeds it."""
    from lora_exp.data import text as text_data
    from lora_exp.models.build import sub_seeds

    t, generator = cfg.trainer, torch.Generator().manual_seed(sub_seeds(cfg.trainer.seed)["data"])
    return text_data.make_loaders(
        encoded, tokenizer, t.batch_size, t.eval_batch_size, t.group_by_length, generator
    ).train.sampler


def _hf_arguments(cfg: Config, precision: str, device: torch.device, total: int, out: str) -> Any:
    """HF's TrainingArguments for the same work: batch, steps, precision, clipping, logging interval, compile,
    and non-blocking host-to-device copies from pinned batches (as our loop copies them)."""
    from transformers import TrainingArguments

    from lora_exp.training.job import COMPILE_BACKEND

    t = cfg.trainer
    return TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=1,
        max_steps=total,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        max_grad_norm=t.max_grad_norm,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",  # replaced by SameOrder
        logging_strategy="steps",
        logging_steps=t.log_every,  # the loss reaches the host as often as in our loop
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=device.type == "cuda",
        accelerator_config={"non_blocking": True},
        seed=t.seed,
        use_cpu=device.type == "cpu",
        torch_compile=t.compile,  # as ours: trainer.compile, with our backend
        torch_compile_backend=COMPILE_BACKEND if t.compile else None,
    )


def _hf(composed: DictConfig, window: StepWindow) -> dict[str, Any]:
    """HF Trainer (+ PEFT) on the same work and the same batch order, timed by a ``TrainerCallback`` at
    ``on_step_end`` (``composed``: the job's config, read as the schema's dataclasses)."""
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from lora_exp.config.schema import typed_config
    from lora_exp.data import text as text_data

    cfg = typed_config(composed)
    t = cfg.trainer
    device = pick_device(t.device)
    precision = pick_precision(t.precision, device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # HF/accelerate place the model on the current CUDA device
    tokenizer, model = _hf_model(cfg)
    model.to(device)
    encoded = text_data.tokenize(text_data.load_splits(cfg.data), tokenizer, cfg.data.max_length)
    train_set = encoded["train"].select_columns(["input_ids", "attention_mask", "labels", "length"]).with_format(None)
    sampler, total = SameOrder(our_sampler(cfg, encoded, tokenizer)), window.warmup + window.steps

    class Timing(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            window.step()

    class OurOrder(Trainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
            return sampler

    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=PAD_MULTIPLE, return_tensors="pt")
    with tempfile.TemporaryDirectory() as tmp:
        args = _hf_arguments(cfg, precision, device, total, tmp)
        trainer = OurOrder(
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
        "compiled": bool(args.torch_compile),
        "non_blocking": bool(trainer.accelerator.dataloader_config.non_blocking),
    }


CONTENDERS: dict[str, Callable[[Any, StepWindow], dict[str, Any]]] = {"lora_exp": _ours, "hf_trainer": _hf}
