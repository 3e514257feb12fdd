"""``train(cfg, run_dir) -> results``: one training job, read in execution order.

``setup`` (``job.py``) builds a ``Job``; ``fit`` runs the loop (micro-step, optimizer step, logging,
validation, checkpoints); ``finish`` (``results.py``) tests the best weights, saves the adapter / weights and
writes results.json + the W&B summary.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from lora_exp.adapters.params import variant_label
from lora_exp.adapters.store import trainable_state
from lora_exp.config.identity import recorded
from lora_exp.data import text as text_data
from lora_exp.errors import TrainingFailure
from lora_exp.measure import memory, tracking
from lora_exp.measure.timing import RssPeak, Steady, clock
from lora_exp.training import checkpoint, interrupt, metrics, pruning
from lora_exp.training.checks import check_gradients, check_lora_moving, has_adapter
from lora_exp.training.job import Job, setup
from lora_exp.training.metrics import evaluate, is_nan
from lora_exp.training.results import finish, print_summary


def train(cfg: DictConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train one job described by ``cfg``, writing everything into ``run_dir``; returns the results.

    With ``resume`` it continues from the checkpoint in ``run_dir`` (same data order, RNG and W&B run).
    """
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    with RssPeak() as rss, _restore_determinism(deterministic_before):  # this job's own host-memory peak
        job = setup(cfg, run_dir, resume, rss)
        c = job.cfg  # the schema's dataclasses from here on
        variant = variant_label(c.lora, c.method.name, c.optimizer.loraplus_lr_ratio)
        name = tracking.run_name(variant, c.method.name, c.lora, c.optimizer.lr, c.trainer.seed)
        with (
            tracking.wandb_run(c.logger, run_dir, recorded(job.config), name, variant, job.progress.wandb_id) as run,
            interrupt.stop_flag() as stop,
        ):
            job.run, job.stop, job.trial = run, stop, pruning.from_env()
            tracking.declare_axes(run, metrics.HIGHER_IS_BETTER)
            job.progress.wandb_id = tracking.wandb_ref(run)["wandb_id"]
            fit(job)
            results = finish(job)
    if not job.cfg.trainer.keep_checkpoint:  # finished: results and weights are written; optimizer state is not needed
        shutil.rmtree(run_dir / checkpoint.FOLDER, ignore_errors=True)
    print_summary(results, run_dir)
    return results


@contextlib.contextmanager
def _restore_determinism(before: bool) -> Iterator[None]:
    """``trainer.deterministic`` is process-wide: the next job of an in-process sweep gets the old setting."""
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def fit(job: Job) -> None:
    """The loop: micro-steps, an optimizer step every ``grad_accum``, logging, validation, checkpoints."""
    t, progress = job.cfg.trainer, job.progress
    now = clock(job.device)  # CUDA: synchronise first, so queued work is charged to training
    bar = tqdm(total=job.total_steps, initial=progress.step, desc=job.cfg.method.name, unit="step", mininterval=1.0)
    steady = Steady(start=max(job.probe_step, progress.step + 1))  # a resumed run warms up again
    job.probe_at = plan_probe(job) if job.sampled is None and t.memory_probe else None
    job.model.train()
    try:
        t0 = now()
        for epoch in range(progress.epoch, t.epochs):
            if progress.step >= job.total_steps:  # resumed from the final checkpoint of a max_steps run
                break
            progress.epoch = epoch
            epoch_state = job.generator.get_state()  # this epoch's batch order is drawn from here
            n = len(job.loaders.train)
            for i, batch in enumerate(job.loaders.train):
                if i < progress.batches_done:  # resumed mid-epoch: already trained on
                    continue
                last_micro = (i + 1) % t.grad_accum == 0 or i + 1 == n
                # the last group of an epoch may hold fewer micro-batches: weight them by its real size
                group = min(t.grad_accum, n - i // t.grad_accum * t.grad_accum)
                timed = last_micro and job.timer.wants(progress.step)
                if steady.t0 is not None and is_probe(job):  # the sampled memory step is no steady step
                    steady.end(now(), progress.samples, progress)
                micro_step(job, batch, group, timed)
                progress.batches_done = i + 1
                if not last_micro:
                    continue
                optimizer_step(job, timed)
                bar.update()
                if steady.t0 is None and progress.step >= steady.start:
                    steady.begin(now(), progress.step, progress.samples)
                position = epoch + (i + 1) / n
                if (
                    progress.step % t.log_every == 0 or progress.step == job.total_steps
                ):  # the only host sync of the loop
                    bar.set_postfix(loss=f"{log_train_loss(job, position):.4f}")
                if t.eval_every and progress.step % t.eval_every == 0:
                    t0 = pause(job, now, t0, steady)
                    validate_now(job, position)
                    t0 = resume_clock(job, now, steady)
                if (t.checkpoint_every and progress.step % t.checkpoint_every == 0) or job.stop.is_set():
                    t0 = pause(job, now, t0, steady)
                    save_checkpoint(job, epoch_state)
                    t0 = resume_clock(job, now, steady)
                    if job.stop.is_set():
                        how = f"continue with: lora-exp resume={job.run_dir}"
                        signame = getattr(job.stop, "signal_name", None) or "SIGTERM"
                        raise TrainingFailure(
                            "preempted", f"{signame} at step {progress.step}: checkpoint saved; {how}"
                        )
                if progress.step >= job.total_steps:
                    break
            t0 = pause(job, now, t0, steady)
            if not progress.history or progress.history[-1]["step"] != progress.step:  # always evaluate the last step
                validate_now(job, epoch + progress.batches_done / n)
            progress.epoch, progress.batches_done = epoch + 1, 0
            save_checkpoint(job, job.generator.get_state())  # the next epoch's order is drawn from here
            t0 = resume_clock(job, now, steady)
            if progress.step >= job.total_steps:
                break
    finally:
        bar.close()


def pause(job: Job, now: Any, t0: float, steady: Steady) -> float:
    """Charge the training stretch since ``t0`` to ``train_seconds`` (and the steady window) before a pause."""
    end = now()
    job.progress.train_seconds += end - t0
    steady.end(end, job.progress.samples, job.progress)
    return end


def resume_clock(job: Job, now: Any, steady: Steady) -> float:
    """Start a new training stretch after a pause (validation, checkpoint)."""
    start = now()
    steady.begin(start, job.progress.step, job.progress.samples)
    return start


def is_probe(job: Job) -> bool:
    """Whether the next micro-step is the one whose memory is sampled (``plan_probe``)."""
    return job.sampled is None and job.probe_at == (job.progress.epoch, job.progress.batches_done)


def plan_probe(job: Job) -> tuple[int, int] | None:
    """``(epoch, micro-batch)`` whose memory to sample: the run's longest micro-batch (most padded tokens: its
    activations are the largest), among those still to run; of equally long ones the first with optimizer state
    (after the first update), else the first. The length-grouped sampler puts the longest batch first, so a
    one-epoch run samples its first step and a longer one the first step of its second epoch. The epochs' orders
    are drawn from a copy of the data-order generator's state, which is then put back: the run is unchanged."""
    t, progress, loader = job.cfg.trainer, job.progress, job.loaders.train
    has_lengths = "length" in getattr(job.encoded["train"], "column_names", [])
    lengths = text_data.lengths(job.encoded["train"]) if has_lengths else None
    state, best, step = job.generator.get_state(), None, progress.step
    try:
        for epoch in range(progress.epoch, t.epochs):
            order, size = list(iter(loader.sampler)), loader.batch_size
            # a sampler of indices batched by the loader, or (audio: one Arrow read per batch) a BatchSampler
            batches = order if size is None else [order[k : k + size] for k in range(0, len(order), size)]
            for i, rows in enumerate(batches):
                if epoch == progress.epoch and i < progress.batches_done:
                    continue
                longest = max(lengths[r] for r in rows) if lengths else 1
                key = (len(rows) * (math.ceil(longest / 8) * 8 if lengths else 1), step > 0)
                if best is None or key > best[0]:
                    best = (key, (epoch, i))
                if (i + 1) % t.grad_accum == 0 or i + 1 == len(batches):
                    step += 1
                    if step >= job.total_steps:
                        return best[1]
    finally:
        job.generator.set_state(state)
    return best[1] if best else None


def micro_step(job: Job, batch: dict[str, torch.Tensor], group: int, timed: bool) -> None:
    """Forward and backward of one micro-batch (its loss divided by the accumulation group's size)."""
    progress = job.progress
    mask = batch.get("attention_mask")
    progress.samples += len(batch["labels"])
    if mask is not None:  # counted on the CPU batch: no device sync
        progress.real_tokens += int(mask.sum())
        progress.padded_tokens += mask.numel()
    if job.order is not None and progress.step < 3:
        inputs = batch["input_ids"] if "input_ids" in batch else batch["input_features"]
        job.order.update(inputs.numpy().tobytes() + batch["labels"].numpy().tobytes())
        progress.order_digest = job.order.hexdigest()[:16]
    batch = {k: v.to(job.device, non_blocking=True) for k, v in batch.items()}
    probe = _memory_probe(job) if is_probe(job) else None
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
        job.sampled_at = {
            "mem_sampled_update": progress.step,
            "mem_sampled_tokens": mask.numel() if mask is not None else None,
        }
    if timed:
        job.timer.mark()


def optimizer_step(job: Job, timed: bool) -> None:
    """Unscale, check (first and probe steps), clip, step, schedule, zero the gradients."""
    progress, scaler, optimizer, trainable = job.progress, job.scaler, job.optimizer, job.trainable
    if scaler:
        scaler.unscale_(optimizer)
    if progress.step == 0:  # the first update: catches frozen heads, detached graphs, wrong targets
        check_gradients(trainable, allow_inf=scaler is not None, loss=job.loss_sum)
    # fp16: the scaler starts at 2**16 and halves at each overflowing (skipped) update, so a smaller scale
    # means some of the first updates did not happen and B may legitimately still be zero
    elif (
        progress.step == job.probe_step - 1 and has_adapter(trainable) and not (scaler and scaler.get_scale() < 2.0**16)
    ):
        check_lora_moving(trainable, progress.step, loss=job.loss_sum)
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
    progress.step += 1


def log_train_loss(job: Job, epoch: float) -> float:
    """Log the mean micro-batch loss since the last log (one host sync); a non-finite loss stops the run."""
    value = job.loss_sum.item() / max(job.loss_count, 1)
    if not math.isfinite(value):
        raise TrainingFailure("nan", f"train loss is {value} at step {job.progress.step}")
    job.run.log(
        {"train/loss": value, "train/lr": job.scheduler.get_last_lr()[0], "epoch": epoch}, step=job.progress.step
    )
    job.loss_sum.zero_()
    job.loss_count = 0
    return value


def validate_now(job: Job, epoch: float) -> None:
    """Evaluate on validation, log it, and keep the trainable tensors of the best step."""
    progress = job.progress
    m = evaluate(job.model, job.loaders.validation, job.device, job.amp, desc="validation")
    progress.history.append(
        {
            "step": progress.step,
            "epoch": round(epoch, 3),
            "time_s": round(progress.train_seconds, 3),
            **{f"val_{k}": v for k, v in m.items() if not k.endswith("_counts")},
        }
    )
    logged = {k: v for k, v in m.items() if not k.endswith("_counts") and not is_nan(v)}
    job.run.log(
        {
            **{f"val/{k}": v for k, v in logged.items()},
            **{f"{tracking.VAL_VS_TIME}/{k}": v for k, v in logged.items()},  # the same, plotted against time
            "epoch": epoch,
            "time/train_s": progress.train_seconds,
        },
        step=progress.step,
    )
    monitor = job.cfg.trainer.monitor  # one selection metric; every metric reported at that step
    if metrics.is_better(monitor, m[metrics.monitor_key(monitor)], progress.best.get(metrics.monitor_key(monitor))):
        progress.best = {
            **{k: v for k, v in m.items() if not k.endswith("_counts")},
            "step": progress.step,
            "epoch": epoch,
        }
        job.best_state = trainable_state(job.model)
    value = m[metrics.monitor_key(monitor)]
    step = job.progress.step
    if job.trial is not None and job.trial.report(value, step):  # hydra/sweeper=lora_optuna: the pruner stops it
        raise TrainingFailure("pruned", f"pruned by the Optuna study at step {step} ({monitor} {value:.4f})")


def save_checkpoint(job: Job, epoch_state: torch.Tensor) -> None:
    """Write the checkpoint; never overwrite the last good one with a diverged one."""
    progress = job.progress
    if (job.loss_count and not math.isfinite(job.loss_sum.item())) or not all(
        torch.isfinite(p).all() for _, p in job.trainable
    ):
        raise TrainingFailure("nan", f"train loss or weights are not finite at step {progress.step}")
    checkpoint.save(
        job.run_dir, job.model, job.best_state, job.optimizer, job.scheduler, job.scaler, epoch_state, progress
    )


def _memory_probe(job: Job) -> memory.SampledStep:
    """Measures one micro-step: saved activations, autocast copies, and on CUDA the real peak."""
    t = job.cfg.trainer
    return memory.SampledStep(job.model, job.optimizer, job.device, job.baseline, t.grad_accum, job.baseline_reserved)
