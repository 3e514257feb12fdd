"""``finish(job) -> results``: test with the best weights, measure memory, save the adapter or the weights,
write results.json and the W&B summary; the console summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lora_exp.adapters import store
from lora_exp.adapters.params import layer_rank, variant_counts, variant_label
from lora_exp.config.identity import arm_hash, config_hash, group_hash
from lora_exp.measure import memory, tracking
from lora_exp.measure.timing import peak_memory
from lora_exp.models.location import model_location
from lora_exp.training import adalora_hooks
from lora_exp.training.job import Job, base_dtype, lora_scaling
from lora_exp.training.metrics import evaluate, is_nan


def finish(job: Job) -> dict[str, Any]:
    """Test with the best weights, measure, save weights, write results.json and the W&B summary."""
    store.load_into(job.model, job.best_state, "best checkpoint")
    test = evaluate(job.model, job.loaders.test, job.device, job.amp, desc="test")
    if job.cache is not None:
        job.cache.restore(job.model)  # the real encoder back in place before measuring and saving
    measured = peak_memory(job.device, job.baseline, job.rss)
    measured.update(_memory_summary(job, measured))
    results: dict[str, Any] = {
        "status": "ok",
        **what_trained(job),
        **scores(job, test),
        **measured,
        **speed(job),
        **identity(job),
        **tracking.environment(job.device),
        **tracking.git_info(diff_to=job.run_dir / "git.diff"),
        **tracking.wandb_ref(job.run),
        "history": job.progress.history,
    }
    if job.cfg.save_weights:
        results.update(_save_weights(job))
    job.run.summary.update({k: v for k, v in results.items() if isinstance(v, int | float | str) or v is None})
    tracking.write_json(job.run_dir / "results.json", results)
    return results


def what_trained(job: Job) -> dict[str, Any]:
    """Method, variant, model, data, the LoRA shape and the trainable-parameter counts."""
    cfg, counts = job.cfg, job.counts
    lora = cfg.method.name == "lora"
    return {
        "method": cfg.method.name,
        "variant": variant_label(cfg.lora, cfg.method.name, cfg.optimizer.loraplus_lr_ratio),
        "model": cfg.model.name,
        "data": cfg.data.name,
        "problem_type": job.labels.problem_type,  # single_label_classification | regression
        "num_labels": job.labels.num_labels,  # as used: data.num_labels, or taken from the training split
        "class_names": job.labels.names,  # in id order (null for scores)
        "r": layer_rank(cfg.lora) if lora else None,  # the layers' rank (VeRA: shared; AdaLoRA: initial)
        "alpha": cfg.lora.alpha if lora else None,
        "rslora": cfg.lora.rslora if lora else None,
        "targets": "+".join(cfg.lora.targets) if lora else None,
        "lora_scaling": lora_scaling(cfg),
        "lora_layers": len(job.adapted),
        "lora_init": cfg.lora.init if lora else None,
        "lora_dropout": cfg.lora.dropout if lora else None,
        "data_init": job.data_init,  # lora.init=eva: batches, tokens, seconds, ranks (null otherwise)
        "data_init_seconds": (job.data_init or {}).get("seconds"),  # flat, for W&B's summary and the report
        "data_init_batches": (job.data_init or {}).get("batches"),
        "adalora_ranks": adalora_hooks.final_ranks(job.model),  # lora.variant=adalora: rank per layer at the end
        "loraplus_lr_ratio": cfg.optimizer.loraplus_lr_ratio,
        **variant_counts(job.model),
        "lr": cfg.optimizer.lr,
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "trainable_pct": counts["trainable_pct"],
        "adapter_params": counts["adapter"],
        "head_params": counts["head"],
        "other_trainable_params": counts["other"],
    }


COUNTS = ("pred_counts", "label_counts")  # evaluate's class counts: not metrics


def scores(job: Job, test: dict[str, Any]) -> dict[str, Any]:
    """Validation at the best step (by ``trainer.monitor``) and test with those weights: ``best_val_<metric>``
    and ``test_<metric>`` for every metric of the task (classes: acc, f1, auc, mcc; scores: pearson, spearman,
    mse; both: loss; an undefined one as null), the class counts and majority baselines for classes."""
    best = job.progress.best
    out: dict[str, Any] = {f"best_val_{k}": _none_if_nan(v) for k, v in best.items() if k not in ("step", "epoch")}
    out.update(monitor=job.cfg.trainer.monitor, best_step=best["step"], best_epoch=best["epoch"])
    out.update({f"test_{k}": _none_if_nan(v) for k, v in test.items() if k not in COUNTS})
    if "pred_counts" in test:  # classes
        out["test_pred_counts"] = test["pred_counts"]
        out["majority_baseline_acc"] = max(test["label_counts"]) / sum(test["label_counts"])
        out["majority_baseline_val_acc"] = majority_share(job.encoded["validation"])  # the validation curves'
    else:
        out.update(test_pred_counts=None, majority_baseline_acc=None, majority_baseline_val_acc=None)
    return out


def majority_share(split: Any) -> float:
    """The share of the most frequent class in a split (its majority-class baseline accuracy)."""
    column = "labels" if "labels" in split.column_names else "label"
    labels = split.with_format(None).select_columns([column])[column]  # not the audio / token columns
    counts = np.bincount(np.asarray(list(labels), dtype=np.int64))
    return float(counts.max() / counts.sum())


def speed(job: Job) -> dict[str, Any]:
    """Training time, throughput (over the whole run: wall; and over its steady part, after the start-up, the
    gradient checks and the sampled memory step), padding and the forward / backward / optimizer split."""
    progress = job.progress
    steady = progress.steady_seconds > 0 and progress.steady_samples > 0
    return {
        "train_seconds": progress.train_seconds,
        "samples_per_s": progress.samples / progress.train_seconds,
        "steady_seconds": progress.steady_seconds if steady else None,
        "steady_samples": progress.steady_samples if steady else None,
        "steady_samples_per_s": progress.steady_samples / progress.steady_seconds if steady else None,
        "steady_from_update": job.probe_step,
        "tokens_per_s": progress.real_tokens / progress.train_seconds if progress.padded_tokens else None,
        "padding_efficiency": progress.real_tokens / progress.padded_tokens if progress.padded_tokens else None,
        **job.timer.summary(),
    }


def identity(job: Job) -> dict[str, Any]:
    """What makes the run comparable: data order, steps, hashes, seeds and the compute settings."""
    cfg, t, progress = job.cfg, job.cfg.trainer, job.progress
    return {
        "data_order_digest": progress.order_digest or None,
        "resumed": job.resumed,
        "steps": progress.step,
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "train_examples": len(job.encoded["train"]),
        "data_dropped": job.data_dropped,  # rows dropped while loading: missing_label, empty_text, duplicate
        "config_hash": config_hash(job.config),
        "group_hash": group_hash(job.config),  # the report's configuration: every setting but the seed
        "arm_hash": arm_hash(job.config),  # ... and but the lr: an arm of the fair comparison
        "model_facts": job.config["derived"]["model"],
        "base_fingerprint": job.model.base_fingerprint,
        "seed": t.seed,
        "sub_seeds": job.seeds,
        "precision": job.precision,
        "base_dtype": base_dtype(cfg),  # as it took effect (fp32 for method=full)
        "device_type": job.device.type,
        "max_length": cfg.data.max_length,
        "scheduler": cfg.optimizer.scheduler,
        "warmup_ratio": cfg.optimizer.warmup_ratio,
        "gradient_checkpointing": t.gradient_checkpointing,
        "compile": t.compile,
        "deterministic": t.deterministic,
        "feature_cache": job.cache is not None,
    }


MEMORY_KEYS = (
    "mem_activations_bytes",
    "mem_autocast_copies_bytes",
    "mem_predicted_peak_bytes",
    "mem_backward_live_bytes",
    "mem_window_predicted_bytes",
    "mem_measured_peak_bytes",
    "mem_measured_peak_reserved_bytes",
    "mem_static_bytes",
    "mem_measured_over_predicted",
    "mem_sampled_update",
    "mem_sampled_tokens",
    "mem_step_predicted_growth_bytes",
    "mem_step_rss_growth_bytes",
    "mem_rss_growth_over_predicted",
)


def _memory_summary(job: Job, measured: dict[str, Any]) -> dict[str, Any]:
    """Parameters, gradients, optimizer state (counted), activations (measured on the sampled step), the
    predicted peak, and on CUDA the measured one. Counted on ``job.model`` with any feature cache restored."""
    if job.sampled is None:  # never sampled (a single update, or resumed past it): static counts only
        return {**memory.static_bytes(job.model, job.optimizer), **dict.fromkeys(MEMORY_KEYS)}
    if measured.get("peak_vram_bytes") is not None:  # the probe reset the peak statistics: fold the earlier peak in
        peak = max(measured["peak_vram_bytes"], job.sampled.prior_peak_allocated)
        held = max(measured["peak_vram_reserved_bytes"], job.sampled.prior_peak_reserved)
        measured.update(peak_vram_bytes=peak, peak_vram_above_baseline_bytes=peak - job.baseline)
        measured.update(peak_vram_reserved_bytes=held)
    probe = job.sampled
    return {
        **probe.result(job.model),
        "mem_window_predicted_bytes": probe.window_predicted,
        "mem_measured_peak_reserved_bytes": probe.probe.peak_reserved,  # next to the allocated peak
        **job.sampled_at,
    }


def _none_if_nan(value: float | None) -> float | None:
    """NaN (AUC of a one-class split) as null in results.json."""
    return None if value is None or is_nan(value) else value


def _save_weights(job: Job) -> dict[str, Any]:
    """LoRA / frozen: the adapter alone (A/B + head); full: the whole model + tokenizer in safetensors."""
    cfg, run_dir = job.cfg, job.run_dir
    if cfg.method.name == "full":
        job.model.save_pretrained(run_dir / "model")
        job.tokenizer.save_pretrained(run_dir / "model")
        store.make_readable(run_dir / "model")
        size = sum(f.stat().st_size for f in (run_dir / "model").glob("*.safetensors"))
        return {"weights_dir": str(run_dir / "model"), "weights_bytes": size}
    meta = {
        "base_model": model_location(cfg.model),
        "model_name": cfg.model.name,
        "model_source": cfg.model.source,
        "method": cfg.method.name,
        "targets": list(cfg.lora.targets),
        "r": layer_rank(cfg.lora),
        "alpha": cfg.lora.alpha,
        "dropout": cfg.lora.dropout,
        "rslora": cfg.lora.rslora,
        "head_modules": job.head,
        "num_labels": job.labels.num_labels,
        "problem_type": job.labels.problem_type,
        "id2label": job.labels.id2label,
        "base_fingerprint": job.model.base_fingerprint,  # loading onto other weights of the same shapes is refused
    }
    sizes = store.save_adapter(job.model, run_dir / "adapter", meta)
    # a W&B artifact of the run, with the config that trained it
    tracking.log_folder(job.run, run_dir / "adapter", "adapter", "model", {"config": job.config, "adapter": meta})
    return {"weights_dir": str(run_dir / "adapter"), "weights_bytes": sizes["adapter_bytes"]}


def print_summary(r: dict[str, Any], run_dir: Path) -> None:
    """The console summary of a finished run: the monitored validation metric at the best step (and the test
    value of that metric), test accuracy, time and memory."""
    vram = f"{r['peak_vram_bytes'] / 2**30:.2f} GiB" if r["peak_vram_bytes"] else "n/a (CPU)"
    monitor = r.get("monitor") or "val/acc"
    metric = monitor.split("/", 1)[1]
    rows = [
        ("method", r["method"]),
        ("trainable params", f"{r['trainable_params']:,} ({r['trainable_pct']:.4g}%)"),
        (f"best val {metric}", f"{_fmt(r.get(f'best_val_{metric}'))} (step {r['best_step']}, by {monitor})"),
    ]
    if metric != "acc":
        rows.append((f"test {metric}", _fmt(r.get(f"test_{metric}"))))
    if "test_acc" in r:
        rows.append(("test acc", _fmt(r["test_acc"])))
    rows += [
        ("train time", f"{r['train_seconds']:.1f} s ({r['samples_per_s']:.1f} samples/s)"),
        (
            "steady samples/s",
            "n/a (too few updates)" if r.get("steady_samples_per_s") is None else f"{r['steady_samples_per_s']:.1f}",
        ),
        ("peak VRAM", vram),
        ("peak host RSS", f"{r['peak_host_rss_bytes'] / 2**30:.2f} GiB"),
        ("run dir", str(run_dir)),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))


def _fmt(value: float | None) -> str:
    """A metric to 4 decimals; n/a when it is undefined (an AUC of a one-class split)."""
    return "n/a" if value is None or is_nan(value) else f"{value:.4f}"
