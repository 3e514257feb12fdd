"""``train(cfg, run_dir) -> results``: one training job, read in execution order.

``setup`` (seed -> data -> model -> method -> optimizer over trainable params -> autocast) builds a ``Job``;
``fit`` runs the loop (micro-step, optimizer step, logging, validation, checkpoints); ``finish`` tests the best
weights, saves the adapter / weights and writes results.json + the W&B summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers import get_scheduler

from lora_exp import adapter, checkpoint, data, features, memory, metrics, models, tracking, variants
from lora_exp.config import arm_hash, config_hash, group_hash, model_facts, recorded, resolved_dict, validate
from lora_exp.errors import LoraExpError, TrainingFailure
from lora_exp.models import build_model, sub_seeds  # noqa: F401  (build_model: the public entry)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an explicit CUDA request without CUDA is an error.

    ``cuda:N`` also becomes the current device, so streams, events and the allocator statistics that the
    loop reads without an explicit index refer to that GPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LoraExpError(f"trainer.device={name} but no CUDA device is available; use auto or cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LoraExpError(
                f"trainer.device={name}: only {torch.cuda.device_count()} CUDA device(s) are visible (cuda:0..)"
            )
        torch.cuda.set_device(device)
    return device


def cpu_computes_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX), not emulated."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def pick_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware computes it natively (GPUs with compute capability >= 8.0; CPUs with
    AVX512-BF16 / AMX, where a seeded methods sweep gave test accuracy within noise of fp32 at 1.7x the
    samples/s: README), fp16 + GradScaler on older GPUs, fp32 on other CPUs."""
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
    if requested == "auto":
        if device.type != "cuda":
            return "bf16" if cpu_computes_bf16() else "fp32"
        return "bf16" if major >= 8 else "fp16"
    if requested == "bf16" and device.type == "cuda" and major < 8:
        raise LoraExpError(
            f"trainer.precision=bf16 needs compute capability >= 8.0 (this GPU: {major}.x); use fp16 or auto"
        )
    if requested == "fp16" and device.type != "cuda":
        raise LoraExpError("trainer.precision=fp16 needs CUDA; on CPU use bf16 or fp32")
    return requested


def make_deterministic(device: torch.device) -> None:
    """Deterministic kernels (``trainer.deterministic``): reruns on CUDA give bit-identical results."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs a fixed workspace for it
    torch.use_deterministic_algorithms(True, warn_only=False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, amp: Any) -> dict:
    """Accuracy, macro-F1, ROC-AUC (binary), mean loss and the predicted / true class counts over a loader."""
    model.eval()
    logits, labels, loss_sum = [], [], torch.zeros((), device=device)
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with amp():
            out = model(**batch)
        loss_sum += out.loss.float() * len(batch["labels"])
        logits.append(out.logits.float())
        labels.append(batch["labels"])
    model.train()
    z, y = torch.cat(logits), torch.cat(labels)
    n_classes = z.shape[-1]
    return {
        **metrics.classification_metrics(z, y),
        "loss": (loss_sum / len(y)).item(),
        "pred_counts": torch.bincount(z.argmax(-1), minlength=n_classes).tolist(),  # all one class: a flag
        "label_counts": torch.bincount(y, minlength=n_classes).tolist(),  # the majority-class baseline
    }


def check_finite(named: list[tuple[str, torch.nn.Parameter]], step: int, loss: torch.Tensor | None = None) -> None:
    """A diverged run is reported as ``nan`` before any other check can call it untrained."""
    bad = ["loss"] if loss is not None and not torch.isfinite(loss).all() else []
    bad += [n for n, p in named if not torch.isfinite(p).all()]
    if bad:
        more = " ..." if len(bad) > 4 else ""
        raise TrainingFailure("nan", f"train loss or weights are not finite at step {step}: {', '.join(bad[:4])}{more}")


def check_gradients(
    named: list[tuple[str, torch.nn.Parameter]], allow_inf: bool = False, loss: torch.Tensor | None = None
) -> None:
    """After the first update every trainable tensor must have a finite, non-zero gradient.

    LoRA A is exempt here: its gradient is exactly zero while B = 0 (B still is after a warm-up step at
    lr 0); ``check_lora_moving`` covers it a few steps later. A bias whose weight gets a gradient is exempt
    too: its gradient is the sum of the output gradients, exactly zero when a fresh head gives every example
    the same probabilities (bf16 rounds them to 0.5) on a class-balanced batch. Non-finite is ``nan``.
    """
    check_finite(named, 0, None if allow_inf else loss)
    if not allow_inf:  # fp16: an overflowing step is skipped by the scaler, not a broken graph
        inf = [n for n, p in named if p.grad is not None and not torch.isfinite(p.grad).all()]
        if inf:
            raise TrainingFailure(
                "nan", f"{len(inf)} trainable tensors have a non-finite gradient: {', '.join(inf[:4])}"
            )
    moving = {n for n, p in named if p.grad is not None and p.grad.abs().sum() > 0}
    bad = []
    for name, p in named:
        if ".lora_A." in name or (name.endswith(".bias") and name.removesuffix(".bias") + ".weight" in moving):
            continue
        if p.grad is None:
            bad.append(f"{name} (no grad)")
        elif torch.isfinite(p.grad).all() and not p.grad.abs().sum() > 0:
            bad.append(f"{name} (zero grad)")
    _fail_if(bad, "trainable tensors get no usable gradient")


def check_lora_moving(named: list[tuple[str, torch.nn.Parameter]], step: int, loss: torch.Tensor | None = None) -> None:
    """After a few updates every LoRA B has left zero and every LoRA A gets a non-zero gradient (weights and
    loss finite first: a diverged run is ``nan``, not untrained)."""
    check_finite(named, step, loss)
    bad = [f"{n} (still zero)" for n, p in named if ".lora_B." in n and not p.abs().sum() > 0]
    bad += [f"{n} (zero grad)" for n, p in named if ".lora_A." in n and (p.grad is None or not p.grad.abs().sum() > 0)]
    _fail_if(bad, f"LoRA tensors are not training after {step} steps")


def _fail_if(bad: list[str], what: str) -> None:
    if bad:
        raise TrainingFailure(
            "untrained", f"{len(bad)} {what}: " + ", ".join(bad[:4]) + (" ..." if len(bad) > 4 else "")
        )


@dataclass
class Job:
    """Everything one training job holds while it runs: built by ``setup``, advanced by ``fit``."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    precision: str
    seeds: dict[str, int]
    config: dict[str, Any]  # resolved config + derived facts: W&B config and the config hash
    tokenizer: Any
    model: torch.nn.Module
    head: list[str]
    adapted: list[str]
    counts: dict[str, Any]
    tok: Any  # tokenised splits
    loaders: data.Loaders
    generator: torch.Generator  # the training data order
    trainable: list[tuple[str, torch.nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    total_steps: int
    timer: tracking.PhaseTimer
    baseline: int  # allocated bytes before this job (CUDA)
    rss: tracking.RssPeak
    id2label: dict[int, str] | None
    pg: checkpoint.Progress
    resumed: bool = False
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    order: Any = None  # sha256 of the first batches (paired design), None once resumed past them
    cache: features.FeatureCache | None = None
    sampled: memory.SampledStep | None = None  # the step whose memory was measured
    run: Any = None  # the W&B run
    stop: threading.Event = field(default_factory=threading.Event)  # set by SIGTERM
    loss_sum: torch.Tensor | None = None  # running train loss on the device (the host syncs only to log)
    loss_count: int = 0

    def amp(self) -> AbstractContextManager:
        """Autocast in the run's precision (a null context for fp32)."""
        dtype = AMP_DTYPES.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()

    @property
    def probe_step(self) -> int:
        """The update after which LoRA must be seen moving."""
        return min(10, self.total_steps)


def train(cfg: DictConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train one job described by ``cfg``, writing everything into ``run_dir``; returns the results.

    With ``resume`` it continues from the checkpoint in ``run_dir`` (same data order, RNG and W&B run).
    """
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    with tracking.RssPeak() as rss, _restore_determinism(deterministic_before):  # this job's own host-memory peak
        job = setup(cfg, run_dir, resume, rss)
        with (
            tracking.wandb_run(cfg, run_dir, recorded(job.config), resume_id=job.pg.wandb_id) as run,
            tracking.sigterm_flag() as stop,
        ):
            job.run, job.stop = run, stop
            job.pg.wandb_id = tracking.wandb_ref(run)["wandb_id"]
            fit(job)
            results = finish(job)
    if not cfg.trainer.keep_checkpoint:  # finished: results and weights are written; optimizer state is not needed
        shutil.rmtree(run_dir / checkpoint.FOLDER, ignore_errors=True)
    _print_summary(results, run_dir)
    return results


@contextlib.contextmanager
def _restore_determinism(before: bool) -> Iterator[None]:
    """``trainer.deterministic`` is process-wide: the next job of an in-process sweep gets the old setting."""
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _prepare_run_dir(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".write_test").touch()
        (run_dir / ".write_test").unlink()
    except OSError as err:
        raise LoraExpError(f"output dir {str(run_dir)!r} is not writable ({err.strerror or err})") from err
    config = resolved_dict(cfg)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
    return config


def make_optimizer(model: torch.nn.Module, o: DictConfig, device: torch.device) -> Any:
    """AdamW over trainable parameters only (groups from ``variants.optimizer_groups``: weight decay on >= 2-D
    weights; with ``optimizer.loraplus_lr_ratio`` PEFT's LoRA+ groups); fused on CUDA."""
    groups = variants.optimizer_groups(model, o.lr, o.weight_decay, o.get("loraplus_lr_ratio"))
    cuda = device.type == "cuda"
    return torch.optim.AdamW(
        groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=cuda, foreach=None if cuda else True
    )


def setup(cfg: DictConfig, run_dir: Path, resume: bool, rss: tracking.RssPeak) -> Job:
    """Validate, then seed -> data -> model -> method -> optimizer -> schedule; restore a checkpoint."""
    validate(cfg)
    t = cfg.trainer
    config = _prepare_run_dir(cfg, run_dir)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    device = pick_device(t.device)
    precision = pick_precision(t.precision, device)
    models.check_base_dtype(cfg.model.get("base_dtype", "fp32"), precision)
    if t.get("deterministic"):
        make_deterministic(device)
    seeds = sub_seeds(t.seed)
    baseline = tracking.reset_memory(device)  # clean state before anything of this job is allocated

    splits = data.load_splits(cfg.data)  # raw splits; tokenised once the model's limits are known
    names = getattr(splits["train"].features["label"], "names", None)
    id2label = dict(enumerate(names)) if names and not names[0].isdigit() else None
    tokenizer, model, head, adapted = build_model(cfg, id2label)
    counts = models.count_parameters(model, head)
    model.to(device)
    if t.get("gradient_checkpointing"):
        memory.enable_gradient_checkpointing(model)
    generator = torch.Generator().manual_seed(seeds["data"])
    if cfg.model.get("task", "text") == "audio":  # fixed-length clips: features per batch, no length grouping
        from lora_exp import audio

        tok = splits
        loaders = audio.make_loaders(
            splits, tokenizer, cfg.data.gw.sample_rate, t.batch_size, t.eval_batch_size, generator
        )
    else:
        tok = data.tokenize(splits, tokenizer, cfg.data.max_length)
        loaders = data.make_loaders(tok, tokenizer, t.batch_size, t.eval_batch_size, t.group_by_length, generator)
    if device.type == "cuda":
        data.pin_memory(loaders)

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(model, cfg.optimizer, device)
    steps_per_epoch = math.ceil(len(loaders.train) / t.grad_accum)
    total_steps = min(t.epochs * steps_per_epoch, t.max_steps or 10**12)
    scheduler = get_scheduler(
        cfg.optimizer.scheduler,
        optimizer,
        num_warmup_steps=int(cfg.optimizer.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    job = Job(
        cfg=cfg,
        run_dir=run_dir,
        device=device,
        precision=precision,
        seeds=seeds,
        config=config,
        tokenizer=tokenizer,
        model=model,
        head=head,
        adapted=adapted,
        counts=counts,
        tok=tok,
        loaders=loaders,
        generator=generator,
        trainable=trainable,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None,
        total_steps=total_steps,
        timer=tracking.PhaseTimer(device, every=t.profile_every),
        baseline=baseline,
        rss=rss,
        id2label=id2label,
        pg=checkpoint.Progress(),
        resumed=resume,
        loss_sum=torch.zeros((), device=device),
    )
    job.cache = features.maybe_cache(job)  # a frozen encoder runs once per example, not once per epoch
    _print_banner(job)
    config["derived"] = {
        "params": counts,
        "lora_scaling": _scaling(cfg),
        "adapted_modules": adapted,
        "head_modules": head,
        "sub_seeds": seeds,
        "total_steps": total_steps,
        "precision": precision,
        "feature_cache": job.cache is not None,
        "model": model_facts(model),
    }
    job.pg.config_hash = config_hash(config)
    if resume:
        job.pg, job.best_state, generator_state = checkpoint.load(run_dir, model, optimizer, job.scheduler, job.scaler)
        generator.set_state(generator_state)
        pg = job.pg
        print(f"[lora-exp] resuming {run_dir} at step {pg.step} (epoch {pg.epoch}, batch {pg.batches_done})")
    else:
        torch.manual_seed(seeds["dropout"])
    if job.cache is not None:  # running the encoder once over the training split is part of the training cost
        job.pg.train_seconds += job.cache.seconds
    job.order = hashlib.sha256() if job.pg.step == 0 else None
    return job


def _print_banner(job: Job) -> None:
    cfg, c = job.cfg, job.counts
    print(
        f"[lora-exp] {cfg.method.name} on {cfg.model.name}/{cfg.data.name}: {c['trainable']:,} of "
        f"{c['total']:,} parameters trainable ({c['trainable_pct']:.4g}%), "
        f"{len(job.adapted)} LoRA layers, head {'+'.join(job.head)} (trained in full), "
        f"{len(job.tok['train'])} train examples, {job.total_steps} steps, {job.device} {job.precision}"
        + (f", frozen weights in {cfg.model.base_dtype}" if cfg.model.get("base_dtype", "fp32") != "fp32" else "")
    )


def fit(job: Job) -> None:
    """The loop: micro-steps, an optimizer step every ``grad_accum``, logging, validation, checkpoints."""
    t, pg = job.cfg.trainer, job.pg
    now = tracking.clock(job.device)  # CUDA: synchronise first, so queued work is charged to training
    bar = tqdm(total=job.total_steps, initial=pg.step, desc=job.cfg.method.name, unit="step", mininterval=1.0)
    job.model.train()
    try:
        t0 = now()
        for epoch in range(pg.epoch, t.epochs):
            if pg.step >= job.total_steps:  # resumed from the final checkpoint of a max_steps run
                break
            pg.epoch = epoch
            epoch_state = job.generator.get_state()  # this epoch's batch order is drawn from here
            n = len(job.loaders.train)
            for i, batch in enumerate(job.loaders.train):
                if i < pg.batches_done:  # resumed mid-epoch: already trained on
                    continue
                last_micro = (i + 1) % t.grad_accum == 0 or i + 1 == n
                # the last group of an epoch may hold fewer micro-batches: weight them by its real size
                group = min(t.grad_accum, n - i // t.grad_accum * t.grad_accum)
                timed = last_micro and job.timer.wants(pg.step)
                micro_step(job, batch, group, timed)
                pg.batches_done = i + 1
                if not last_micro:
                    continue
                optimizer_step(job, timed)
                bar.update()
                position = epoch + (i + 1) / n
                if pg.step % t.log_every == 0 or pg.step == job.total_steps:  # the only host sync of the loop
                    bar.set_postfix(loss=f"{log_train_loss(job, position):.4f}")
                if t.eval_every and pg.step % t.eval_every == 0:
                    pg.train_seconds += now() - t0
                    validate_now(job, position)
                    t0 = now()
                if (t.checkpoint_every and pg.step % t.checkpoint_every == 0) or job.stop.is_set():
                    pg.train_seconds += now() - t0
                    save_checkpoint(job, epoch_state)
                    t0 = now()
                    if job.stop.is_set():
                        how = f"continue with: lora-exp resume={job.run_dir}"
                        raise TrainingFailure("preempted", f"SIGTERM at step {pg.step}: checkpoint saved; {how}")
                if pg.step >= job.total_steps:
                    break
            pg.train_seconds += now() - t0
            if not pg.history or pg.history[-1]["step"] != pg.step:  # always evaluate the last step
                validate_now(job, epoch + pg.batches_done / n)
            pg.epoch, pg.batches_done = epoch + 1, 0
            save_checkpoint(job, job.generator.get_state())  # the next epoch's order is drawn from here
            t0 = now()
            if pg.step >= job.total_steps:
                break
    finally:
        bar.close()


def micro_step(job: Job, batch: dict[str, torch.Tensor], group: int, timed: bool) -> None:
    """Forward and backward of one micro-batch (its loss divided by the accumulation group's size)."""
    pg = job.pg
    mask = batch.get("attention_mask")
    pg.samples += len(batch["labels"])
    if mask is not None:  # counted on the CPU batch: no device sync
        pg.real_tokens += int(mask.sum())
        pg.padded_tokens += mask.numel()
    if job.order is not None and pg.step < 3:
        inputs = batch["input_ids"] if "input_ids" in batch else batch["input_features"]
        job.order.update(inputs.numpy().tobytes() + batch["labels"].numpy().tobytes())
        pg.order_digest = job.order.hexdigest()[:16]
    batch = {k: v.to(job.device, non_blocking=True) for k, v in batch.items()}
    probe = _memory_probe(job) if job.sampled is None and pg.step == min(1, job.total_steps - 1) else None
    if timed:
        job.timer.mark()
    with probe or nullcontext(), job.amp():
        loss = job.model(**batch).loss
    if timed:
        job.timer.mark()
    job.loss_sum += loss.detach().float()  # the mean of micro-batch losses is what gets logged
    job.loss_count += 1
    scaled = loss / group
    (job.scaler.scale(scaled) if job.scaler else scaled).backward()
    if probe is not None:
        probe.result()  # ends the measurement right after the backward; finish() reads it again
        job.sampled = probe
    if timed:
        job.timer.mark()


def optimizer_step(job: Job, timed: bool) -> None:
    """Unscale, check (first and probe steps), clip, step, schedule, zero the gradients."""
    pg, scaler, optimizer, trainable = job.pg, job.scaler, job.optimizer, job.trainable
    if scaler:
        scaler.unscale_(optimizer)
    if pg.step == 0:  # the first update: catches frozen heads, detached graphs, wrong targets
        check_gradients(trainable, allow_inf=scaler is not None, loss=job.loss_sum)
    # fp16: the scaler starts at 2**16 and halves at each overflowing (skipped) update, so a smaller scale
    # means some of the first updates did not happen and B may legitimately still be zero
    elif (
        pg.step == job.probe_step - 1
        and any(".lora_" in n for n, _ in trainable)
        and not (scaler and scaler.get_scale() < 2.0**16)
    ):
        check_lora_moving(trainable, pg.step, loss=job.loss_sum)
    if job.cfg.trainer.max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], job.cfg.trainer.max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    job.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if timed:
        job.timer.mark()
    pg.step += 1


def log_train_loss(job: Job, epoch: float) -> float:
    """Log the mean micro-batch loss since the last log (one host sync); a non-finite loss stops the run."""
    value = job.loss_sum.item() / max(job.loss_count, 1)
    if not math.isfinite(value):
        raise TrainingFailure("nan", f"train loss is {value} at step {job.pg.step}")
    job.run.log({"train/loss": value, "train/lr": job.scheduler.get_last_lr()[0], "epoch": epoch}, step=job.pg.step)
    job.loss_sum.zero_()
    job.loss_count = 0
    return value


def validate_now(job: Job, epoch: float) -> None:
    """Evaluate on validation, log it, and keep the trainable tensors of the best step."""
    pg = job.pg
    m = evaluate(job.model, job.loaders.validation, job.device, job.amp)
    pg.history.append(
        {
            "step": pg.step,
            "epoch": round(epoch, 3),
            "time_s": round(pg.train_seconds, 3),
            **{f"val_{k}": v for k, v in m.items() if not k.endswith("_counts")},
        }
    )
    job.run.log(
        {
            **{f"val/{k}": v for k, v in m.items() if not k.endswith("_counts") and not _is_nan(v)},
            "epoch": epoch,
            "time/train_s": pg.train_seconds,
        },
        step=pg.step,
    )
    monitor = job.cfg.trainer.get("monitor", "val/acc")  # one selection metric; every metric reported at that step
    if metrics.is_better(monitor, m[metrics.monitor_key(monitor)], pg.best.get(metrics.monitor_key(monitor))):
        pg.best = {**{k: v for k, v in m.items() if not k.endswith("_counts")}, "step": pg.step, "epoch": epoch}
        job.best_state = adapter.trainable_state(job.model)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def save_checkpoint(job: Job, epoch_state: torch.Tensor) -> None:
    """Write the checkpoint; never overwrite the last good one with a diverged one."""
    pg = job.pg
    if (job.loss_count and not math.isfinite(job.loss_sum.item())) or not all(
        torch.isfinite(p).all() for _, p in job.trainable
    ):
        raise TrainingFailure("nan", f"train loss or weights are not finite at step {pg.step}")
    checkpoint.save(job.run_dir, job.model, job.best_state, job.optimizer, job.scheduler, job.scaler, epoch_state, pg)


def finish(job: Job) -> dict[str, Any]:
    """Test with the best weights, measure, save weights, write results.json and the W&B summary."""
    cfg, t, pg, counts = job.cfg, job.cfg.trainer, job.pg, job.counts
    adapter.load_into(job.model, job.best_state, "best checkpoint")
    test = evaluate(job.model, job.loaders.test, job.device, job.amp)
    if job.cache is not None:
        job.cache.restore(job.model)  # the real encoder back in place before measuring and saving
    memory = tracking.peak_memory(job.device, job.baseline, job.rss)
    memory.update(_memory_summary(job, memory))
    lora = cfg.method.name == "lora"
    results: dict[str, Any] = {
        "status": "ok",
        "method": cfg.method.name,
        "variant": variants.variant_label(cfg.lora, cfg.method.name, cfg.optimizer.get("loraplus_lr_ratio")),
        "model": cfg.model.name,
        "data": cfg.data.name,
        "r": cfg.lora.r if lora else None,
        "alpha": cfg.lora.alpha if lora else None,
        "rslora": cfg.lora.rslora if lora else None,
        "targets": "+".join(cfg.lora.targets) if lora else None,
        "lora_scaling": _scaling(cfg),
        "lora_layers": len(job.adapted),
        "lora_init": cfg.lora.get("init", "default") if lora else None,
        "loraplus_lr_ratio": cfg.optimizer.get("loraplus_lr_ratio"),
        **variants.variant_counts(job.model),
        "lr": cfg.optimizer.lr,
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "trainable_pct": counts["trainable_pct"],
        "adapter_params": counts["adapter"],
        "head_params": counts["head"],
        "other_trainable_params": counts["other"],
        "best_val_acc": pg.best["acc"],
        "best_val_f1": pg.best["f1"],
        "best_val_loss": pg.best["loss"],
        "best_val_auc": _none_if_nan(pg.best.get("auc")),
        "monitor": t.get("monitor", "val/acc"),
        "best_step": pg.best["step"],
        "best_epoch": pg.best["epoch"],
        "test_acc": test["acc"],
        "test_f1": test["f1"],
        "test_loss": test["loss"],
        "test_auc": _none_if_nan(test.get("auc")),
        "test_pred_counts": test["pred_counts"],
        **memory,
        "train_seconds": pg.train_seconds,
        "samples_per_s": pg.samples / pg.train_seconds,
        "tokens_per_s": pg.real_tokens / pg.train_seconds if pg.padded_tokens else None,
        "padding_efficiency": pg.real_tokens / pg.padded_tokens if pg.padded_tokens else None,
        **job.timer.summary(),
        "data_order_digest": pg.order_digest or None,
        "resumed": job.resumed,
        "steps": pg.step,
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "train_examples": len(job.tok["train"]),
        "config_hash": config_hash(job.config),
        "group_hash": group_hash(job.config),  # the report's configuration: every setting but the seed
        "arm_hash": arm_hash(job.config),  # ... and but the lr: an arm of the fair comparison
        "majority_baseline_acc": max(test["label_counts"]) / sum(test["label_counts"]),
        "model_facts": job.config["derived"]["model"],
        "seed": t.seed,
        "sub_seeds": job.seeds,
        "precision": job.precision,
        "base_dtype": cfg.model.get("base_dtype", "fp32"),
        "gradient_checkpointing": bool(t.get("gradient_checkpointing")),
        "deterministic": bool(t.get("deterministic")),
        "feature_cache": job.cache is not None,
        **tracking.environment(job.device),
        **tracking.git_info(diff_to=job.run_dir / "git.diff"),
        **tracking.wandb_ref(job.run),
        "history": pg.history,
    }
    if cfg.save_weights:
        results.update(_save_weights(job))
    job.run.summary.update({k: v for k, v in results.items() if isinstance(v, int | float | str) or v is None})
    tracking.write_json(job.run_dir / "results.json", results)
    return results


def _memory_probe(job: Job) -> memory.SampledStep:
    """Measures one micro-step: saved activations, autocast copies, and on CUDA the real peak."""
    return memory.SampledStep(job.model, job.optimizer, job.device, job.baseline, job.cfg.trainer.grad_accum)


MEMORY_KEYS = (
    "mem_activations_bytes",
    "mem_autocast_copies_bytes",
    "mem_predicted_peak_bytes",
    "mem_backward_live_bytes",
    "mem_measured_peak_bytes",
    "mem_static_bytes",
    "mem_measured_over_predicted",
)


def _memory_summary(job: Job, measured: dict[str, Any]) -> dict[str, Any]:
    """Parameters, gradients, optimizer state (counted), activations (measured on the sampled step), the
    predicted peak, and on CUDA the measured one. Counted on ``job.model`` with any feature cache restored."""
    if job.sampled is None:  # never sampled (a single update, or resumed past it): static counts only
        return {**memory.static_bytes(job.model, job.optimizer), **dict.fromkeys(MEMORY_KEYS)}
    if measured.get("peak_vram_bytes") is not None:  # the probe reset the peak statistics: fold the earlier peak in
        peak = max(measured["peak_vram_bytes"], job.sampled.prior_peak_allocated)
        measured.update(peak_vram_bytes=peak, peak_vram_above_baseline_bytes=peak - job.baseline)
    return job.sampled.result(job.model)


def _none_if_nan(value: float | None) -> float | None:
    """NaN (AUC of a one-class split) as null in results.json."""
    return None if value is None or _is_nan(value) else value


def _scaling(cfg: DictConfig) -> float | None:
    if cfg.method.name != "lora":
        return None
    r, alpha = cfg.lora.r, cfg.lora.alpha
    return alpha / math.sqrt(r) if cfg.lora.rslora else alpha / r


def _save_weights(job: Job) -> dict[str, Any]:
    """LoRA / frozen: the adapter alone (A/B + head); full: the whole model + tokenizer in safetensors."""
    cfg, run_dir = job.cfg, job.run_dir
    if cfg.method.name == "full":
        job.model.save_pretrained(run_dir / "model")
        job.tokenizer.save_pretrained(run_dir / "model")
        adapter.make_readable(run_dir / "model")
        size = sum(f.stat().st_size for f in (run_dir / "model").glob("*.safetensors"))
        return {"weights_dir": str(run_dir / "model"), "weights_bytes": size}
    meta = {
        "base_model": models.model_location(cfg.model),
        "model_name": cfg.model.name,
        "model_source": cfg.model.source,
        "method": cfg.method.name,
        "targets": list(cfg.lora.targets),
        "r": cfg.lora.r,
        "alpha": cfg.lora.alpha,
        "dropout": cfg.lora.dropout,
        "rslora": cfg.lora.rslora,
        "head_modules": job.head,
        "num_labels": cfg.data.num_labels,
        "id2label": job.id2label,
    }
    sizes = adapter.save_adapter(job.model, run_dir / "adapter", meta)
    return {"weights_dir": str(run_dir / "adapter"), "weights_bytes": sizes["adapter_bytes"]}


def _print_summary(r: dict[str, Any], run_dir: Path) -> None:
    vram = f"{r['peak_vram_bytes'] / 2**30:.2f} GiB" if r["peak_vram_bytes"] else "n/a (CPU)"
    rows = [
        ("method", r["method"]),
        ("trainable params", f"{r['trainable_params']:,} ({r['trainable_pct']:.4g}%)"),
        ("best val acc", f"{r['best_val_acc']:.4f} (step {r['best_step']})"),
        ("test acc", f"{r['test_acc']:.4f}"),
        ("train time", f"{r['train_seconds']:.1f} s ({r['samples_per_s']:.1f} samples/s)"),
        ("peak VRAM", vram),
        ("peak host RSS", f"{r['peak_host_rss_bytes'] / 2**30:.2f} GiB"),
        ("run dir", str(run_dir)),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
