"""``train(cfg, run_dir) -> results``: the one training loop, in execution order.

seed -> data -> model -> method -> optimizer over trainable params -> autocast -> loop (log, eval, keep
best) -> test with the best weights -> save adapter / weights -> results.json + W&B summary.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers import get_scheduler

from lora_exp import adapter, checkpoint, data, models, tracking
from lora_exp.config import config_hash, resolved_dict, validate
from lora_exp.errors import LoraExpError, TrainingFailure

SUB_SEEDS = ("model", "head", "lora", "data", "dropout")


def sub_seeds(seed: int) -> dict[str, int]:
    """Independent seeds for each random stream, derived from ``trainer.seed`` (recorded in results)."""
    states = np.random.SeedSequence(seed).generate_state(len(SUB_SEEDS))
    return {k: int(s) for k, s in zip(SUB_SEEDS, states)}


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an explicit CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LoraExpError(f"trainer.device={name} but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def pick_precision(requested: str, device: torch.device) -> str:
    """bf16 where the GPU computes it natively (capability >= 8.0), fp16 + GradScaler below, fp32 on CPU."""
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
    if requested == "auto":
        return "fp32" if device.type != "cuda" else ("bf16" if major >= 8 else "fp16")
    if requested == "bf16" and device.type == "cuda" and major < 8:
        raise LoraExpError(
            f"trainer.precision=bf16 needs compute capability >= 8.0 (this GPU: {major}.x); use fp16 or auto"
        )
    if requested == "fp16" and device.type != "cuda":
        raise LoraExpError("trainer.precision=fp16 needs CUDA; on CPU use fp32 (auto) or bf16")
    return requested


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, amp: Any
) -> dict[str, float]:
    """Accuracy, macro-F1 and mean loss over a loader."""
    model.eval()
    preds, labels, loss_sum = [], [], torch.zeros((), device=device)
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with amp():
            out = model(**batch)
        loss_sum += out.loss.float() * len(batch["labels"])
        preds.append(out.logits.argmax(-1))
        labels.append(batch["labels"])
    model.train()
    p, y = torch.cat(preds), torch.cat(labels)
    f1s = []
    for c in range(out.logits.shape[-1]):
        tp = ((p == c) & (y == c)).sum()
        denom = (p == c).sum() + (y == c).sum()
        f1s.append(2 * tp / denom if denom > 0 else torch.zeros((), device=device))
    return {
        "acc": (p == y).float().mean().item(),
        "f1": torch.stack(f1s).mean().item(),
        "loss": (loss_sum / len(y)).item(),
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
    lr 0); ``check_lora_moving`` covers it a few steps later. A non-finite loss or gradient is ``nan``.
    """
    check_finite(named, 0, None if allow_inf else loss)
    if not allow_inf:  # fp16: an overflowing step is skipped by the scaler, not a broken graph
        inf = [n for n, p in named if p.grad is not None and not torch.isfinite(p.grad).all()]
        if inf:
            raise TrainingFailure(
                "nan", f"{len(inf)} trainable tensors have a non-finite gradient: {', '.join(inf[:4])}"
            )
    bad = []
    for name, p in named:
        if ".lora_A." in name:
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


def build_model(cfg: DictConfig, id2label: dict[int, str] | None = None) -> tuple[Any, torch.nn.Module, list, list]:
    """Tokenizer, model with the method applied, head and LoRA module paths; deterministic per seed.

    The head is re-initialised from its own sub-seed so every method of one seed starts from the same
    head (a paired comparison); LoRA A from another, so adding LoRA does not shift the head's init.
    """
    seeds = sub_seeds(cfg.trainer.seed)
    torch.manual_seed(seeds["model"])  # random-init (tiny) models and anything from_pretrained draws
    tokenizer, model, head = models.build(cfg.model, cfg.data.num_labels, id2label)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.data.max_length > max_pos:
        raise LoraExpError(f"data.max_length={cfg.data.max_length} exceeds the model's maximum of {max_pos}")
    torch.manual_seed(seeds["head"])
    for name in head:
        model.get_submodule(name).apply(model._init_weights)
    torch.manual_seed(seeds["lora"])
    adapted = models.apply_method(model, cfg.method.name, head, cfg.lora)
    return tokenizer, model, head, adapted


def train(cfg: DictConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train one job described by ``cfg``, writing everything into ``run_dir``; returns the results.

    With ``resume`` it continues from the checkpoint in ``run_dir`` (same data order, RNG and W&B run).
    """
    with tracking.RssPeak() as rss:  # this job's own host-memory peak
        return _train(cfg, run_dir, resume, rss)


def _train(cfg: DictConfig, run_dir: Path, resume: bool, rss: tracking.RssPeak) -> dict[str, Any]:
    validate(cfg)
    t = cfg.trainer
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".write_test").touch()
        (run_dir / ".write_test").unlink()
    except OSError as err:
        raise LoraExpError(f"output dir {str(run_dir)!r} is not writable ({err.strerror or err})") from err
    config = resolved_dict(cfg)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    device = pick_device(t.device)
    precision = pick_precision(t.precision, device)
    seeds = sub_seeds(t.seed)
    baseline = tracking.reset_memory(device)  # clean state before anything of this job is allocated

    # Data (raw splits; tokenised after the model's limits are known).
    splits = data.load_splits(cfg.data)
    names = getattr(splits["train"].features["label"], "names", None)

    id2label = dict(enumerate(names)) if names and not names[0].isdigit() else None

    tokenizer, model, head, adapted = build_model(cfg, id2label)
    counts = models.count_parameters(model, head)
    model.to(device)
    tok = data.tokenize(splits, tokenizer, cfg.data.max_length)
    generator = torch.Generator().manual_seed(seeds["data"])
    loaders = data.make_loaders(tok, tokenizer, t.batch_size, t.eval_batch_size, t.group_by_length, generator)

    # Optimizer over trainable parameters only; weight decay on >= 2-D weights only.
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    o = cfg.optimizer
    groups = [
        {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups,
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        fused=device.type == "cuda",
        foreach=None if device.type == "cuda" else True,
    )
    steps_per_epoch = math.ceil(len(loaders.train) / t.grad_accum)
    total_steps = min(t.epochs * steps_per_epoch, t.max_steps or 10**12)
    scheduler = get_scheduler(
        o.scheduler,
        optimizer,
        num_warmup_steps=int(o.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    amp_dtype = AMP_DTYPES.get(precision)

    def amp():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    probe_step = min(10, total_steps)  # when LoRA must be seen moving

    print(
        f"[lora-exp] {cfg.method.name} on {cfg.model.name}/{cfg.data.name}: {counts['trainable']:,} of "
        f"{counts['total']:,} parameters trainable ({counts['trainable_pct']:.2f}%), "
        f"{len(adapted)} LoRA layers, head {'+'.join(head)} (newly initialised, trained in full), "
        f"{len(tok['train'])} train examples, {total_steps} steps, {device} {precision}"
    )
    config["derived"] = {
        "params": counts,
        "lora_scaling": _scaling(cfg),
        "adapted_modules": adapted,
        "head_modules": head,
        "sub_seeds": seeds,
        "total_steps": total_steps,
        "precision": precision,
    }
    timer = tracking.PhaseTimer(device, every=t.profile_every)
    pg, best_state = checkpoint.Progress(config_hash=config_hash(config)), {}

    if resume:
        pg, best_state, generator_state = checkpoint.load(run_dir, model, optimizer, scheduler, scaler)
        generator.set_state(generator_state)
        print(f"[lora-exp] resuming {run_dir} at step {pg.step} (epoch {pg.epoch}, batch {pg.batches_done})")
    else:
        torch.manual_seed(seeds["dropout"])
    order = hashlib.sha256() if pg.step == 0 else None  # fingerprint of the first batches (paired design)
    with tracking.wandb_run(cfg, run_dir, config, resume_id=pg.wandb_id) as run, tracking.sigterm_flag() as stop:
        pg.wandb_id = tracking.wandb_ref(run)["wandb_id"]
        running, n_running = torch.zeros((), device=device), 0
        model.train()
        bar = tqdm(
            total=total_steps, initial=pg.step, desc=cfg.method.name, unit="step", mininterval=1.0, dynamic_ncols=True
        )

        def validate_now(epoch: float) -> None:
            nonlocal best_state
            m = evaluate(model, loaders.validation, device, amp)
            row = {
                "step": pg.step,
                "epoch": round(epoch, 3),
                "time_s": round(pg.train_seconds, 3),
                **{f"val_{k}": v for k, v in m.items()},
            }
            pg.history.append(row)
            run.log(
                {
                    "val/acc": m["acc"],
                    "val/f1": m["f1"],
                    "val/loss": m["loss"],
                    "epoch": epoch,
                    "time/train_s": pg.train_seconds,
                },
                step=pg.step,
            )
            if m["acc"] > pg.best["acc"]:  # one selection metric; every metric reported at that step
                pg.best = {**m, "step": pg.step, "epoch": epoch}
                best_state = adapter.trainable_state(model)

        def save_checkpoint(epoch_state: torch.Tensor) -> None:
            # never overwrite the last good checkpoint with a diverged one
            if (n_running and not math.isfinite(running.item())) or not all(
                torch.isfinite(p).all() for _, p in trainable
            ):
                raise TrainingFailure("nan", f"train loss or weights are not finite at step {pg.step}")
            checkpoint.save(run_dir, model, best_state, optimizer, scheduler, scaler, epoch_state, pg)

        try:
            now = tracking.clock(device)  # CUDA: synchronise first, so queued work is charged to training
            t0 = now()
            for epoch in range(pg.epoch, t.epochs):
                if pg.step >= total_steps:  # resumed from the final checkpoint of a max_steps run
                    break

                pg.epoch = epoch
                epoch_state = generator.get_state()  # this epoch's batch order is drawn from here
                for i, batch in enumerate(loaders.train):
                    if i < pg.batches_done:  # resumed mid-epoch: already trained on
                        continue
                    mask = batch["attention_mask"]
                    pg.real_tokens += int(mask.sum())  # on the CPU batch: no device sync
                    pg.padded_tokens += mask.numel()
                    pg.samples += len(mask)
                    if order is not None and pg.step < 3:
                        order.update(batch["input_ids"].numpy().tobytes() + batch["labels"].numpy().tobytes())
                        pg.order_digest = order.hexdigest()[:16]
                    last_micro = (i + 1) % t.grad_accum == 0 or i + 1 == len(loaders.train)
                    timed = last_micro and timer.wants(pg.step)
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    if timed:
                        timer.mark()
                    # the last group of an epoch may hold fewer micro-batches: weight them by its real size
                    group = min(t.grad_accum, len(loaders.train) - i // t.grad_accum * t.grad_accum)
                    with amp():
                        loss = model(**batch).loss / group
                    if timed:
                        timer.mark()
                    (scaler.scale(loss) if scaler else loss).backward()
                    if timed:
                        timer.mark()
                    running += loss.detach()
                    n_running += 1
                    pg.batches_done = i + 1
                    if not last_micro:
                        continue
                    if scaler:
                        scaler.unscale_(optimizer)
                    if pg.step == 0:  # the first update: catches frozen heads, detached graphs, wrong targets
                        check_gradients(trainable, allow_inf=scaler is not None, loss=running)
                    elif pg.step == probe_step - 1 and any(".lora_" in n for n, _ in trainable):
                        check_lora_moving(trainable, pg.step, loss=running)
                    if t.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], t.max_grad_norm)
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if timed:
                        timer.mark()
                    pg.step += 1
                    bar.update()
                    if pg.step % t.log_every == 0 or pg.step == total_steps:  # the only host sync of the loop
                        value = running.item() / n_running * group
                        if not math.isfinite(value):
                            raise TrainingFailure("nan", f"train loss is {value} at step {pg.step}")
                        run.log(
                            {
                                "train/loss": value,
                                "train/lr": scheduler.get_last_lr()[0],
                                "epoch": epoch + (i + 1) / len(loaders.train),
                            },
                            step=pg.step,
                        )
                        bar.set_postfix(loss=f"{value:.4f}")
                        running.zero_()
                        n_running = 0
                    if t.eval_every and pg.step % t.eval_every == 0:
                        pg.train_seconds += now() - t0
                        validate_now(epoch + (i + 1) / len(loaders.train))
                        t0 = now()
                    if (t.checkpoint_every and pg.step % t.checkpoint_every == 0) or stop.is_set():
                        pg.train_seconds += now() - t0
                        save_checkpoint(epoch_state)
                        t0 = now()
                        if stop.is_set():
                            raise TrainingFailure(
                                "preempted",
                                f"SIGTERM at step {pg.step}: checkpoint saved; "
                                f"continue with: lora-exp resume={run_dir}",
                            )
                    if pg.step >= total_steps:
                        break
                pg.train_seconds += now() - t0
                if not pg.history or pg.history[-1]["step"] != pg.step:  # always evaluate the last step
                    validate_now(epoch + pg.batches_done / len(loaders.train))
                pg.epoch, pg.batches_done = epoch + 1, 0
                save_checkpoint(generator.get_state())  # the next epoch's order is drawn from here
                t0 = now()
                if pg.step >= total_steps:
                    break
        finally:
            bar.close()

        adapter.load_into(model, best_state, "best checkpoint")
        best, step, history = pg.best, pg.step, pg.history
        test = evaluate(model, loaders.test, device, amp)
        memory = tracking.peak_memory(device, baseline, rss)

        memory.update(tracking.memory_breakdown(model, optimizer, memory["peak_vram_bytes"], baseline))
        results: dict[str, Any] = {
            "status": "ok",
            "method": cfg.method.name,
            "model": cfg.model.name,
            "data": cfg.data.name,
            "r": cfg.lora.r if cfg.method.name == "lora" else None,
            "alpha": cfg.lora.alpha if cfg.method.name == "lora" else None,
            "rslora": cfg.lora.rslora if cfg.method.name == "lora" else None,
            "targets": "+".join(cfg.lora.targets) if cfg.method.name == "lora" else None,
            "lora_scaling": _scaling(cfg),
            "lora_layers": len(adapted),
            "lr": o.lr,
            "trainable_params": counts["trainable"],
            "total_params": counts["total"],
            "trainable_pct": counts["trainable_pct"],
            "adapter_params": counts["adapter"],
            "head_params": counts["head"],
            "other_trainable_params": counts["other"],
            "best_val_acc": best["acc"],
            "best_val_f1": best["f1"],
            "best_val_loss": best["loss"],
            "best_step": best["step"],
            "best_epoch": best["epoch"],
            "test_acc": test["acc"],
            "test_f1": test["f1"],
            "test_loss": test["loss"],
            **memory,
            "train_seconds": pg.train_seconds,
            "samples_per_s": pg.samples / pg.train_seconds,
            "tokens_per_s": pg.real_tokens / pg.train_seconds,
            "padding_efficiency": pg.real_tokens / pg.padded_tokens,
            **timer.summary(),
            "data_order_digest": pg.order_digest or None,
            "resumed": resume,
            "steps": step,
            "epochs": t.epochs,
            "batch_size": t.batch_size,
            "train_examples": len(tok["train"]),
            "config_hash": config_hash(config),
            "seed": t.seed,
            "sub_seeds": seeds,
            "precision": precision,
            **tracking.environment(device),
            **tracking.git_info(diff_to=run_dir / "git.diff"),
            **tracking.wandb_ref(run),
            "history": history,
        }
        if cfg.save_weights:
            results.update(_save_weights(cfg, model, tokenizer, run_dir, head, id2label))
        run.summary.update({k: v for k, v in results.items() if isinstance(v, int | float | str) or v is None})
        tracking.write_json(run_dir / "results.json", results)
    if not t.keep_checkpoint:  # finished: results and weights are written; optimizer state is not needed
        shutil.rmtree(run_dir / checkpoint.FOLDER, ignore_errors=True)
    _print_summary(results, run_dir)
    return results


def _scaling(cfg: DictConfig) -> float | None:
    if cfg.method.name != "lora":
        return None
    r, alpha = cfg.lora.r, cfg.lora.alpha
    return alpha / math.sqrt(r) if cfg.lora.rslora else alpha / r


def _save_weights(
    cfg: DictConfig, model: torch.nn.Module, tokenizer: Any, run_dir: Path, head: list[str], id2label: dict | None
) -> dict[str, Any]:
    """LoRA / frozen: the adapter alone (A/B + head); full: the whole model + tokenizer in safetensors."""
    if cfg.method.name == "full":
        model.save_pretrained(run_dir / "model")
        tokenizer.save_pretrained(run_dir / "model")
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
        "head_modules": head,
        "num_labels": cfg.data.num_labels,
        "id2label": id2label,
    }
    sizes = adapter.save_adapter(model, run_dir / "adapter", meta)
    return {"weights_dir": str(run_dir / "adapter"), "weights_bytes": sizes["adapter_bytes"]}


def _print_summary(r: dict[str, Any], run_dir: Path) -> None:
    vram = f"{r['peak_vram_bytes'] / 2**30:.2f} GiB" if r["peak_vram_bytes"] else "n/a (CPU)"
    rows = [
        ("method", r["method"]),
        ("trainable params", f"{r['trainable_params']:,} ({r['trainable_pct']:.2f}%)"),
        ("best val acc", f"{r['best_val_acc']:.4f} (step {r['best_step']})"),
        ("test acc", f"{r['test_acc']:.4f}"),
        ("train time", f"{r['train_seconds']:.1f} s ({r['samples_per_s']:.1f} samples/s)"),
        ("peak VRAM", vram),
        ("peak host RSS", f"{r['peak_host_rss_bytes'] / 2**30:.2f} GiB"),
        ("run dir", str(run_dir)),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
