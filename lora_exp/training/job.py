"""``setup(cfg) -> Job``: seed -> data -> model -> method -> optimizer over trainable parameters -> schedule
-> feature cache -> checkpoint; each a named step. ``Job`` is what one training job holds while it runs."""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import get_scheduler

from lora_exp import device as devices
from lora_exp.adapters import lora_fa
from lora_exp.adapters.layer import scaling
from lora_exp.adapters.params import layer_rank, optimizer_groups
from lora_exp.adapters.targets import lora_layers
from lora_exp.config.checks import validate
from lora_exp.config.identity import config_hash, resolved_dict
from lora_exp.config.schema import Config, OptimizerConfig, typed_config
from lora_exp.data import audio as audio_data
from lora_exp.data import audio_files
from lora_exp.data import labels as task_labels
from lora_exp.data import text as text_data
from lora_exp.errors import LoraExpError
from lora_exp.measure import memory
from lora_exp.measure.timing import PhaseTimer, RssPeak, reserved, reset_memory
from lora_exp.models.build import build_model, sub_seeds
from lora_exp.models.methods import count_parameters, model_facts
from lora_exp.training import adalora_hooks, checkpoint, data_init, feature_cache

ReadSplits = Callable[[Any], tuple[Any, dict[str, int]]]  # data options -> (raw splits, rows dropped by reason)
CHECKED_UPDATES = 10  # the gradient checks run in the first update and in this one (LoRA moving)


@dataclass
class Job:
    """Everything one training job holds while it runs: built by ``setup``, advanced by ``fit``."""

    cfg: Config  # the schema's dataclasses (``typed_config``), read by every step below
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
    encoded: Any  # tokenised (text) or featurized (audio) splits
    loaders: text_data.Loaders
    generator: torch.Generator  # the training data order
    trainable: list[tuple[str, torch.nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    total_steps: int
    timer: PhaseTimer
    baseline: int  # allocated bytes before this job (CUDA)
    rss: RssPeak
    labels: task_labels.Labels  # classes (their number and names) or scores, as the data gave them
    data_dropped: dict[str, int]  # rows dropped while loading, by reason (results.json)
    progress: checkpoint.Progress
    baseline_reserved: int = 0  # reserved bytes before this job (CUDA)
    resumed: bool = False
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    order: Any = None  # sha256 of the first batches (paired design), None once resumed past them
    cache: feature_cache.FeatureCache | None = None
    data_init: dict[str, Any] | None = None  # lora.init=eva: what the init used and cost (results.json)
    sampled: memory.SampledStep | None = None  # the step whose memory was measured
    probe_at: tuple[int, int] | None = None  # (epoch, micro-batch) to sample: the longest (loop.plan_probe)
    sampled_at: dict[str, Any] = field(default_factory=dict)  # which update it was, and its padded tokens
    run: Any = None  # the W&B run
    stop: threading.Event = field(default_factory=threading.Event)  # set by SIGINT / SIGTERM (training/interrupt.py)
    trial: Any = None  # an Optuna trial's reporter (training/pruning.py) when the job is one, else None
    loss_sum: torch.Tensor | None = None  # running train loss on the device (the host syncs only to log)
    loss_count: int = 0

    def amp(self) -> AbstractContextManager:
        """Autocast in the run's precision (a null context for fp32)."""
        return _amp(self.device, self.precision)()

    @property
    def probe_step(self) -> int:
        """The update after which LoRA must be seen moving (the last one-off check: ``CHECKED_UPDATES``)."""
        return min(CHECKED_UPDATES, self.total_steps)


def _amp(device: torch.device, precision: str) -> Any:
    """A factory of autocast contexts in ``precision`` (null contexts for fp32)."""
    dtype = devices.AMP_DTYPES.get(precision)
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext


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


def make_optimizer(model: torch.nn.Module, o: OptimizerConfig, device: torch.device) -> Any:
    """AdamW over trainable parameters only (groups from ``optimizer_groups``: weight decay on >= 2-D
    weights; with ``optimizer.loraplus_lr_ratio`` PEFT's LoRA+ groups); fused on CUDA. LoRA-FA layers get
    PEFT's LoRA-FA optimizer (``adapters.lora_fa``) instead."""
    if lora_fa.has_layers(model):
        return lora_fa.make_optimizer(model, o.lr, o.weight_decay, tuple(o.betas), o.eps)
    groups = optimizer_groups(model, o.lr, o.weight_decay, o.loraplus_lr_ratio)
    cuda = device.type == "cuda"
    return torch.optim.AdamW(
        groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=cuda, foreach=None if cuda else True
    )


def setup(composed: DictConfig, run_dir: Path, resume: bool, rss: RssPeak, read: ReadSplits | None = None) -> Job:
    """Validate, record the resolved config, turn it into the schema's dataclasses (the one conversion: every
    step below reads ``Config``), then seed -> data -> model -> method -> optimizer -> schedule -> feature cache;
    restore a checkpoint when resuming. ``read``: how the raw splits are read (``load_data``)."""
    validate(composed)
    config = _prepare_run_dir(composed, run_dir)
    cfg = typed_config(composed)
    t = cfg.trainer
    device, precision = choose_device(cfg)
    seeds = sub_seeds(t.seed)
    baseline = reset_memory(device)  # clean state before anything of this job is allocated
    baseline_reserved = reserved(device)
    splits, labels, dropped = load_data(cfg, read)
    tokenizer, model, head, adapted = build_model_for(cfg, labels, precision)
    counts = count_parameters(model, head)
    place_model(model, device, t.gradient_checkpointing)
    generator = torch.Generator().manual_seed(seeds["data"])
    encoded, loaders = make_loaders(cfg, splits, tokenizer, generator, device)
    amp = _amp(device, precision)
    init_record = data_init.prepare(cfg, model, loaders.train, generator, amp, run_dir, resume)
    if init_record is not None:  # ranks redistributed (EVA): other layers, other counts
        adapted, counts = [n for n, _ in lora_layers(model)], count_parameters(model, head)
    optimizer, scheduler, total_steps = make_schedule(model, cfg, device, len(loaders.train))
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
        encoded=encoded,
        loaders=loaders,
        generator=generator,
        trainable=[(n, p) for n, p in model.named_parameters() if p.requires_grad],
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None,
        total_steps=total_steps,
        timer=PhaseTimer(device, every=t.profile_every),
        baseline=baseline,
        baseline_reserved=baseline_reserved,
        rss=rss,
        labels=labels,
        data_dropped=dropped,
        progress=checkpoint.Progress(),
        resumed=resume,
        loss_sum=torch.zeros((), device=device),
        data_init=init_record,
    )
    job.cache = cache_features(job)  # a frozen encoder runs once per example, not once per epoch
    if t.compile:
        compile_model(model)
    _print_banner(job)
    config["derived"] = derived_facts(job)
    job.progress.config_hash = config_hash(config)
    restore_or_seed(job)
    adalora_hooks.attach(cfg, model, optimizer, total_steps, lambda: job.progress.step)  # after restore: its step
    return job


def choose_device(cfg: Config) -> tuple[torch.device, str]:
    """Threads, device, the precision ``auto`` resolves to, deterministic kernels when asked."""
    t = cfg.trainer
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    device = devices.pick_device(t.device)
    precision = devices.pick_precision(t.precision, device)
    devices.check_base_dtype(base_dtype(cfg), precision)
    if t.deterministic:
        devices.make_deterministic(device)
    return device, precision


def base_dtype(cfg: Config) -> str:
    """The frozen base's dtype as it takes effect (``model.base_dtype``; fp32 for ``method=full``, which
    freezes nothing: the banner says so)."""
    return devices.effective_base_dtype(cfg.model.base_dtype, cfg.method.name)


def configured_labels(cfg: Config) -> task_labels.Labels:
    """The labels as the config alone says them (``data.problem_type``, ``data.num_labels``; 2 classes when it is
    null): what a model is built for before any data is read."""
    if cfg.data.problem_type == task_labels.REGRESSION:
        return task_labels.Labels(task_labels.REGRESSION, 1)
    return task_labels.Labels(task_labels.CLASSIFICATION, cfg.data.num_labels or 2)


def build_model_for(
    cfg: Config, labels: task_labels.Labels | None = None, precision: str = "fp32"
) -> tuple[Any, torch.nn.Module, list, list]:
    """``models.build.build_model`` with this config's slices: tokenizer, model with the method applied, head and
    LoRA module paths. ``labels``: the task's (``load_data``; default ``configured_labels``); ``precision``
    (resolved) is a quantised base's compute dtype."""
    labels = labels or configured_labels(cfg)
    return build_model(
        cfg.model,
        cfg.method.name,
        cfg.lora,
        num_labels=labels.num_labels,
        max_length=cfg.data.max_length,
        seed=cfg.trainer.seed,
        id2label=labels.id2label,
        problem_type=labels.problem_type,
        clip_seconds=cfg.data.max_seconds if cfg.data.source != "gw" else None,
        precision=precision,
    )


def load_data(cfg: Config, read: ReadSplits | None = None) -> tuple[Any, task_labels.Labels, dict[str, int]]:
    """Raw splits (tokenised once the model's limits are known), the task's labels (classes with their number and
    names, inferred from the training split unless ``data.num_labels`` is set, or scores) and the rows dropped by
    reason (missing label, empty text, duplicate). One line when the labels cannot feed ``trainer.monitor``.
    ``read``: reads the splits and the drop counts from ``cfg.data`` (default ``text.load_splits_counted``; a pack
    passes one that reads them once for all its jobs)."""
    splits, dropped = (read or text_data.load_splits_counted)(cfg.data)
    labels = task_labels.describe(splits["train"].features["label"])
    if cfg.trainer.monitor == "val/auc" and labels.num_labels != 2:
        raise LoraExpError(
            f"trainer.monitor=val/auc needs a binary task; data.label_column={cfg.data.label_column!r} has "
            f"{labels.num_labels} classes; use val/f1 or val/mcc"
        )
    return splits, labels, dropped


def place_model(model: torch.nn.Module, device: torch.device, gradient_checkpointing: bool) -> None:
    """The model on its device, with activation checkpointing when asked."""
    model.to(device)
    if gradient_checkpointing:
        memory.enable_gradient_checkpointing(model)


def make_loaders(
    cfg: Config, splits: Any, tokenizer: Any, generator: torch.Generator, device: torch.device
) -> tuple[Any, text_data.Loaders]:
    """Tokenised splits and loaders (audio: each clip's features computed once into the cache, fixed length,
    no length grouping)."""
    t = cfg.trainer
    if cfg.model.task == "audio":
        rate, reader = cfg.data.gw.sample_rate, None
        if cfg.data.source != "gw":  # the researcher's clips: read, resampled to the extractor's rate, cut / padded
            rate = tokenizer.sampling_rate
            reader = audio_files.ClipReader(rate, cfg.data.max_seconds)
        encoded = text_data.number_rows(audio_data.featurize(splits, tokenizer, rate, reader=reader))
        loaders = audio_data.make_loaders(encoded, t.batch_size, t.eval_batch_size, generator)
    else:
        encoded = text_data.number_rows(text_data.tokenize(splits, tokenizer, cfg.data.max_length))
        loaders = text_data.make_loaders(
            encoded, tokenizer, t.batch_size, t.eval_batch_size, t.group_by_length, generator
        )
    if device.type == "cuda":
        text_data.pin_memory(loaders)
    return encoded, loaders


def make_schedule(model: torch.nn.Module, cfg: Config, device: torch.device, batches: int) -> tuple[Any, Any, int]:
    """The optimizer over trainable parameters, the lr schedule and the number of updates."""
    t = cfg.trainer
    optimizer = make_optimizer(model, cfg.optimizer, device)
    total_steps = min(t.epochs * math.ceil(batches / t.grad_accum), t.max_steps or 10**12)
    scheduler = get_scheduler(
        cfg.optimizer.scheduler,
        optimizer,
        num_warmup_steps=int(cfg.optimizer.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    return optimizer, scheduler, total_steps


def cache_features(job: Job) -> feature_cache.FeatureCache | None:
    """The frozen-feature cache (``trainer.feature_cache``) for a frozen base or a frozen bottom of it, kept on
    the host; the loaders then bring each batch's stored outputs along (``FeatureCache.feed``)."""
    t = job.cfg.trainer
    cache = feature_cache.maybe_cache(
        job.model,
        job.encoded,
        job.tokenizer,
        enabled=t.feature_cache and job.cfg.method.name != "full",
        max_gib=float(t.feature_cache_max_gib),
        batch_size=t.eval_batch_size,
        device=job.device,
        amp=job.amp,
    )
    if cache is not None:
        cache.feed(job.loaders.collate, job.model)
    return cache


COMPILE_BACKEND = "inductor"


def compile_model(model: torch.nn.Module) -> None:
    """``trainer.compile``: compile the model in place (``nn.Module.compile``), so its parameters keep their own
    paths (no ``_orig_mod.``): checkpoints, adapters, resume and export see the eager model's names. The first
    steps (and the first evaluation) compile; ``Steady`` leaves them out of the steady window."""
    model.compile(backend=COMPILE_BACKEND)


def lora_scaling(cfg: Config) -> float | None:
    """The effective LoRA scale (alpha / r, or alpha / sqrt(r) with rsLoRA) for a LoRA run."""
    if cfg.method.name != "lora":
        return None
    return scaling(layer_rank(cfg.lora), cfg.lora.alpha, cfg.lora.rslora)


def derived_facts(job: Job) -> dict[str, Any]:
    """What the run computed from its config: counts, LoRA scale, module paths, seeds, steps, precision."""
    return {
        "params": job.counts,
        "lora_scaling": lora_scaling(job.cfg),
        "adapted_modules": job.adapted,
        "head_modules": job.head,
        "sub_seeds": job.seeds,
        "total_steps": job.total_steps,
        "precision": job.precision,
        "compute": devices.compute_identity(job.device, job.precision, base_dtype(job.cfg)),
        "feature_cache": job.cache is not None,
        "model": model_facts(job.model),
        "labels": {"problem_type": job.labels.problem_type, "num_labels": job.labels.num_labels},
    }


def restore_or_seed(job: Job) -> None:
    """Resume: progress, best weights, optimizer, schedule, scaler and data order from the checkpoint;
    otherwise seed dropout. The feature cache's encoding of the training split is training cost, charged once:
    a resumed run's checkpoint already holds it (encoding again after a restart, like the steps lost since the
    last checkpoint, is the interruption's cost, not the configuration's)."""
    if job.resumed:
        job.progress, job.best_state, generator_state = checkpoint.load(
            job.run_dir, job.model, job.optimizer, job.scheduler, job.scaler
        )
        job.generator.set_state(generator_state)
        progress = job.progress
        at = f"step {progress.step} (epoch {progress.epoch}, batch {progress.batches_done})"
        print(f"[lora-exp] resuming {job.run_dir} at {at}")
    else:
        torch.manual_seed(job.seeds["dropout"])
    if job.cache is not None and not job.resumed:
        job.progress.train_seconds += job.cache.seconds
    job.order = hashlib.sha256() if job.progress.step == 0 else None


def _print_banner(job: Job) -> None:
    cfg, c = job.cfg, job.counts
    stored = cfg.model.base_dtype
    print(
        f"[lora-exp] {cfg.method.name} on {cfg.model.name}/{cfg.data.name}: {c['trainable']:,} of "
        f"{c['total']:,} parameters trainable ({c['trainable_pct']:.4g}%), "
        f"{len(job.adapted)} LoRA layers, head {'+'.join(job.head)} (trained in full), "
        f"{len(job.encoded['train'])} train examples, {job.total_steps} steps, {job.device} {job.precision}"
        + (f", frozen weights in {stored}" if base_dtype(cfg) != "fp32" else "")
    )
    if stored != base_dtype(cfg):
        print(
            f"[lora-exp] model.base_dtype={stored} has no effect with method=full: nothing is frozen, every "
            "parameter trains in fp32 (recorded as base_dtype fp32)"
        )
