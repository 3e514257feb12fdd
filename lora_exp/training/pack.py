"""``train_pack(cfgs, run_dirs, resumes)``: K LoRA jobs that share the frozen base, trained in one process
(issue 28, ``hydra/launcher=packed``). Each job is set up as its solo run is (``job.setup``: its data order,
seeds, adapter, head, optimizer, schedule, checkpoint), its frozen tensors then point at job 0's
(``adapters.packed.share_base``). A micro-step runs the packed model (``adapters.packed.packed_model``) once over
the K micro-batches; each job's loss is its own rows' loss, and the optimizer step, clipping, schedule, logging,
validation, best weights and checkpoints are each job's own (``loop.optimizer_step`` ... ``loop.save_checkpoint``,
under that job's RNG state). A job that fails (NaN, a failed check) leaves the pack; the others go on.

``packable(cfg)`` says why a job cannot be packed (it then runs solo); ``base_key(cfg)`` is what a pack shares.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from lora_exp.adapters import adalora
from lora_exp.adapters import packed as pk
from lora_exp.adapters.params import variant_label, variant_of
from lora_exp.adapters.targets import lora_layers
from lora_exp.config.identity import METHOD_LR_ROUTES, recorded
from lora_exp.config.schema import typed_config
from lora_exp.data import text as text_data
from lora_exp.errors import TrainingFailure
from lora_exp.measure import memory, tracking
from lora_exp.measure.timing import RssPeak
from lora_exp.training import checkpoint, interrupt, metrics, pruning
from lora_exp.training.job import Job, ReadSplits, setup
from lora_exp.training.loop import log_train_loss, optimizer_step, save_checkpoint, validate_now
from lora_exp.training.results import finish, print_summary

SOLO_INITS = ("pissa", "olora", "lora_ga")  # these rewrite W0: each job has its own base
ADAPTER_SIDE = {"lora", "optimizer", "logger", "resume", "skip_done", "sweep_name", "lr_index", "save_weights"}
TRAINER_ADAPTER_SIDE = {"seed", "max_grad_norm", "keep_checkpoint", "memory_probe", "profile_every"}


def packable(cfg: DictConfig) -> str | None:
    """Why this job cannot share a base with others (it runs solo), or None when it can."""
    t, lora = cfg.trainer, cfg.lora
    if cfg.method.name != "lora":
        return f"method={cfg.method.name} (only LoRA variants keep a shared frozen base)"
    variant = variant_of(typed_config(cfg.lora, type(typed_config(cfg).lora)))
    if variant not in pk.PACKABLE_VARIANTS:
        return f"lora.variant={variant} does not pack yet (packs: {', '.join(pk.PACKABLE_VARIANTS)})"
    if lora.init in SOLO_INITS:
        return f"lora.init={lora.init} rewrites the base weights"
    if lora.bias != "none":
        return f"lora.bias={lora.bias} trains base biases"
    if cfg.model.get("task", "text") == "audio":
        return "audio models do not pack yet"
    if t.gradient_checkpointing or t.compile:
        return "trainer.gradient_checkpointing / trainer.compile do not pack yet"
    if lora.layers is not None and t.feature_cache:
        return "lora.layers with trainer.feature_cache (a cached frozen bottom) does not pack yet"
    return None


def base_key(cfg: DictConfig) -> str:
    """The base side a pack shares: everything but the adapter side (lora, optimizer and the method's lr and lr grid
    with the fair sweep's ``lr_index``, seed, clipping, logging, whether weights are saved).
    A randomly initialised model's base is drawn from the seed: its seed is then part of the base side."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    key = {k: v for k, v in resolved.items() if k not in ADAPTER_SIDE}
    key["method"] = {k: v for k, v in key.get("method", {}).items() if k not in METHOD_LR_ROUTES}
    trainer = {k: v for k, v in key.get("trainer", {}).items() if k not in TRAINER_ADAPTER_SIDE}
    if cfg.model.get("source") == "tiny":
        trainer["seed"] = cfg.trainer.seed
    key["trainer"] = trainer
    return json.dumps(key, sort_keys=True, default=str)


class PackRun:
    """The jobs of one pack while they train: the live ones, each one's RNG state, the packed model."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        self.live = list(range(len(jobs)))
        cuda = jobs[0].device.type == "cuda"
        self.rng = {k: torch.get_rng_state() for k in self.live}  # replaced right after each setup
        self.cuda_rng: dict[int, torch.Tensor] = {k: torch.cuda.get_rng_state() for k in self.live} if cuda else {}
        self.failed: dict[int, BaseException] = {}
        self.model: torch.nn.Module | None = None
        self.rebuild()

    def rebuild(self) -> None:
        """The packed model of the live jobs (after a job left the pack)."""
        live = [self.jobs[k] for k in self.live]
        self.model = pk.packed_model([j.model for j in live], live[0].head) if live else None
        if self.model is not None:
            self.model.train()

    def pack(self, members: Sequence[int], rows: list[int], lengths: list[int]) -> pk.Pack:
        """The layout of one micro-step over ``members``."""
        cuda = [self.cuda_rng[k] for k in members] if self.cuda_rng else []
        slots = None if list(members) == self.live else [self.live.index(k) for k in members]
        return pk.Pack(rows, lengths, max(lengths), [self.rng[k] for k in members], cuda, slots)

    def keep(self, members: Sequence[int], pack: pk.Pack) -> None:
        """Store the members' RNG states after a step."""
        for i, k in enumerate(members):
            self.rng[k] = pack.rng[i]
            if self.cuda_rng:
                self.cuda_rng[k] = pack.cuda_rng[i]

    @contextlib.contextmanager
    def as_job(self, k: int) -> Iterator[None]:
        """The global RNG is job ``k``'s (checkpoints record it)."""
        pack = pk.Pack([0], [1], 1, [self.rng[k]], [self.cuda_rng[k]] if self.cuda_rng else [])
        with pk.job_rng(pack, k=0):
            yield
        self.keep([k], pack)

    def fail(self, k: int, err: BaseException) -> None:
        """Job ``k`` leaves the pack (its failure is recorded when the pack ends)."""
        self.failed[k] = err
        self.live.remove(k)
        print(f"[lora-exp] pack: {self.jobs[k].run_dir.name} failed ({err}); the other jobs go on", flush=True)
        self.rebuild()

    @contextlib.contextmanager
    def guarded(self, k: int) -> Iterator[None]:
        """Run job ``k``'s own step; a failure takes it out of the pack."""
        try:
            with self.as_job(k):
                yield
        except (TrainingFailure, FloatingPointError, RuntimeError, ValueError) as err:
            self.fail(k, err)


class PackTooLarge(Exception):
    """The pack's predicted peak exceeds the budget: at most ``fits`` of its jobs fit together."""

    def __init__(self, fits: int, predicted: int, budget: int):
        super().__init__(f"predicted peak {predicted / 2**30:.2f} GiB > budget {budget / 2**30:.2f} GiB")
        self.fits, self.predicted, self.budget = fits, predicted, budget


def activation_bytes(job: Job) -> int:
    """Bytes saved for backward by one micro-batch of ``batch_size`` x ``data.max_length`` tokens (the longest a
    batch can be) through the job's model in train mode; measured with ``memory.SavedTensorMeter`` on one forward,
    the RNG put back (the run's dropout stream is untouched)."""
    t, length = job.cfg.trainer, job.cfg.data.max_length
    ids = torch.zeros((t.batch_size, length), dtype=torch.long, device=job.device)
    devices = [job.device] if job.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), memory.SavedTensorMeter(job.model) as meter, job.amp():
        job.model.train()
        out = job.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    del out
    return meter.activations_bytes + meter.autocast_copies_bytes


def predict(jobs: Sequence[Job], activations: int) -> tuple[int, list[int]]:
    """The pack's predicted peak (one base, K adapters with their gradients and optimizer state, K micro-batches'
    activations: ``memory.predicted_peak_bytes``) and each job's solo prediction on the same terms."""
    first = jobs[0].model
    base = sum(p.numel() * p.element_size() for p in first.parameters() if not p.requires_grad)
    parts = [memory.static_bytes(j.model, j.optimizer) for j in jobs]
    accum = jobs[0].cfg.trainer.grad_accum
    solo = [
        memory.predicted_peak_bytes(
            s["mem_params_bytes"], s["mem_grads_bytes"], s["mem_optimizer_bytes"], activations, 0, accum
        )
        for s in parts
    ]
    own = sum(s["mem_params_bytes"] - base for s in parts)
    grads, optim = sum(s["mem_grads_bytes"] for s in parts), sum(s["mem_optimizer_bytes"] for s in parts)
    pack = memory.predicted_peak_bytes(base + own, grads, optim, len(jobs) * activations, 0, accum)
    return pack, solo


def budget_bytes(cfg: Any, device: torch.device) -> int | None:
    """``trainer.max_memory_gib`` and, on CUDA, the device's free memory: the smaller; None when unbounded."""
    limits = [] if cfg.trainer.max_memory_gib is None else [int(cfg.trainer.max_memory_gib * 2**30)]
    if device.type == "cuda":
        limits.append(torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device))
    return min(limits) if limits else None


def row_loss(model: torch.nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss HF's sequence classifiers compute from ``labels`` (problem type decided the same way)."""
    config = model.config
    n = logits.shape[-1]
    kind = config.problem_type
    if kind is None:
        kind = (
            "regression"
            if n == 1
            else (
                "single_label_classification"
                if labels.dtype in (torch.long, torch.int)
                else "multi_label_classification"
            )
        )
    if kind == "regression":
        return F.mse_loss(logits.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(logits, labels)
    if kind == "single_label_classification":
        return F.cross_entropy(logits.view(-1, n), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)


def _concat(batches: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """The K micro-batches as one, each padded on the right to the longest (ids with ``pad_id``, masks with 0)."""
    length = max(b["input_ids"].shape[1] for b in batches)
    out: dict[str, torch.Tensor] = {}
    for key in batches[0]:
        if key == "labels":
            continue
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.cat([F.pad(b[key], (0, length - b[key].shape[1]), value=fill) for b in batches])
    return out


def _count(job: Job, batch: dict[str, torch.Tensor]) -> None:
    """A solo micro-step's bookkeeping: samples, tokens, the data-order digest of the first updates."""
    progress, mask = job.progress, batch.get("attention_mask")
    progress.samples += len(batch["labels"])
    if mask is not None:
        progress.real_tokens += int(mask.sum())
        progress.padded_tokens += mask.numel()
    if job.order is not None and progress.step < 3:
        job.order.update(batch["input_ids"].numpy().tobytes() + batch["labels"].numpy().tobytes())
        progress.order_digest = job.order.hexdigest()[:16]


def micro_step(run: PackRun, members: list[int], batches: dict[int, dict[str, torch.Tensor]], group: int) -> None:
    """One packed forward and backward: the base once over the members' micro-batches, each job's own loss."""
    jobs = [run.jobs[k] for k in members]
    for k, job in zip(members, jobs):
        _count(job, batches[k])
    own = [batches[k] for k in members]
    pad_id = getattr(jobs[0].tokenizer, "pad_token_id", None) or 0
    inputs = {k: v.to(jobs[0].device) for k, v in _concat(own, pad_id).items()}
    pack = run.pack(members, [len(b["labels"]) for b in own], [b["input_ids"].shape[1] for b in own])
    assert run.model is not None
    with pk.active(pack), pk.attention_per_job(run.model), jobs[0].amp():
        logits = run.model(**inputs).logits
    run.keep(members, pack)
    total = None
    for (_, a, b), job, batch in zip(pack.spans(), jobs, own):
        loss = row_loss(job.model, logits[a:b].float(), batch["labels"].to(job.device))
        loss = _regularised(job, loss)
        job.loss_sum += loss.detach().float()
        job.loss_count += 1
        scaled = loss / group
        scaled = job.scaler.scale(scaled) if job.scaler else scaled
        total = scaled if total is None else total + scaled
    assert total is not None
    total.backward()


def _regularised(job: Job, loss: torch.Tensor) -> torch.Tensor:
    """AdaLoRA's loss: HF's plus ``orth_reg_weight`` x its orthogonality term over this job's layers, as the hook
    on its solo model adds it (``adapters.adalora.add_orthogonality``: inside the forward, under autocast); the
    packed forward passes no labels, so the hook adds nothing there. Other variants: the loss as it is. (The rank
    allocator needs nothing here: it is a hook on the job's own optimizer, run by its ``optimizer_step``.)"""
    layers = [m for _, m in lora_layers(job.model) if isinstance(m, adalora.AdaLoraLinear)]
    weight = float(job.cfg.lora.adalora.orth_reg_weight)
    if not layers or weight <= 0:
        return loss
    with job.amp():
        return loss + weight * adalora.orthogonality(layers)


def fit_pack(run: PackRun) -> None:
    """The solo loop (``loop.fit``) for every live job at once: one packed micro-step, then each job's update,
    log, validation and checkpoint under its own RNG; a failing job leaves the pack. Jobs resumed from different
    positions (a kill between two jobs' checkpoints) each skip what they did: a job trains in a micro-step only
    from its own epoch and batch on, and only until its last step, as its solo run does."""
    jobs = run.jobs
    t = jobs[0].cfg.trainer
    start = time.perf_counter()

    def charge() -> None:  # the pack's wall time is each job's training time (they all trained in it)
        nonlocal start
        now = time.perf_counter()
        for k in run.live:
            jobs[k].progress.train_seconds += now - start
        start = now

    def training(k: int) -> bool:
        return jobs[k].progress.step < jobs[k].total_steps

    for job in jobs:
        job.probe_at = None
        job.model.train()
    for epoch in range(min((jobs[k].progress.epoch for k in run.live), default=t.epochs), t.epochs):
        # this epoch's jobs: not yet past it, not finished (a solo run resumed from its final checkpoint stops)
        now_in = [k for k in run.live if jobs[k].progress.epoch <= epoch and training(k)]
        if not now_in:
            break
        epoch_state = {k: jobs[k].generator.get_state() for k in now_in}
        iters = {}
        for k in now_in:
            jobs[k].progress.epoch = epoch
            iters[k] = iter(jobs[k].loaders.train)
        n = len(jobs[now_in[0]].loaders.train)
        for i in range(n):
            batches = {k: next(iters[k]) for k in now_in if k in run.live and training(k)}
            members = [k for k in batches if i >= jobs[k].progress.batches_done]
            if not members:
                continue
            last_micro = (i + 1) % t.grad_accum == 0 or i + 1 == n
            group = min(t.grad_accum, n - i // t.grad_accum * t.grad_accum)
            micro_step(run, members, batches, group)
            for k in members:
                jobs[k].progress.batches_done = i + 1
            if not last_micro:
                continue
            charge()
            for k in list(members):
                with run.guarded(k):
                    _after_update(jobs[k], epoch + (i + 1) / n, epoch_state[k])
            start = time.perf_counter()
            if not any(k in run.live and training(k) for k in now_in):
                break
        charge()
        for k in [k for k in now_in if k in run.live]:
            with run.guarded(k):
                _end_epoch(jobs[k], epoch, n)
        start = time.perf_counter()


def _after_update(job: Job, position: float, epoch_state: torch.Tensor) -> None:
    """One job's part of a solo update: step, log, validate, checkpoint or stop (``loop.fit``)."""
    t, progress = job.cfg.trainer, job.progress
    optimizer_step(job, timed=False)
    if progress.step % t.log_every == 0 or progress.step == job.total_steps:
        log_train_loss(job, position)
    if t.eval_every and progress.step % t.eval_every == 0:
        validate_now(job, position)
    if (t.checkpoint_every and progress.step % t.checkpoint_every == 0) or job.stop.is_set():
        save_checkpoint(job, epoch_state)
        if job.stop.is_set():
            how = f"continue with: lora-exp resume={job.run_dir}"
            signame = getattr(job.stop, "signal_name", None) or "SIGTERM"
            raise TrainingFailure("preempted", f"{signame} at step {progress.step}: checkpoint saved; {how}")


def _end_epoch(job: Job, epoch: int, n: int) -> None:
    """One job's end of an epoch: evaluate the last step, checkpoint with the next epoch's order."""
    progress = job.progress
    if not progress.history or progress.history[-1]["step"] != progress.step:
        validate_now(job, epoch + progress.batches_done / n)
    progress.epoch, progress.batches_done = epoch + 1, 0
    save_checkpoint(job, job.generator.get_state())


def train_pack(cfgs: Sequence[DictConfig], run_dirs: Sequence[Path], resumes: Sequence[bool]) -> list[Any]:
    """Train the jobs as one pack; per job its results dict, or the exception that failed it (recorded by the
    caller as a solo failure is). The jobs must share ``base_key`` and be ``packable``."""
    names = [d.name for d in run_dirs]
    read = shared_reader()
    with RssPeak() as rss, contextlib.ExitStack() as stack:
        jobs, rng = [], []
        for cfg, run_dir, resume in zip(cfgs, run_dirs, resumes):
            jobs.append(setup(cfg, run_dir, resume, rss, read))
            rng.append(torch.get_rng_state())  # after restore_or_seed: the solo run's dropout stream
            _check_shared(jobs[0], jobs[-1])
            pk.share_base([jobs[0].model, jobs[-1].model])  # one base in memory from here on
        per_batch = activation_bytes(jobs[0])
        predicted, solo = predict(jobs, per_batch)
        budget = budget_bytes(jobs[0].cfg, jobs[0].device)
        if budget is not None and predicted > budget:
            fits = max([k for k in range(1, len(jobs)) if predict(jobs[:k], per_batch)[0] <= budget] or [1])
            raise PackTooLarge(fits, predicted, budget)
        run = PackRun(jobs)
        run.rng = dict(enumerate(rng))
        stop = stack.enter_context(interrupt.stop_flag())
        for job in jobs:
            c = job.cfg
            variant = variant_label(c.lora, c.method.name, c.optimizer.loraplus_lr_ratio)
            name = tracking.run_name(variant, c.method.name, c.lora, c.optimizer.lr, c.trainer.seed)
            cfg_rec = recorded(job.config)
            job.run = stack.enter_context(
                tracking.wandb_run(c.logger, job.run_dir, cfg_rec, name, variant, job.progress.wandb_id)
            )
            job.stop, job.trial = stop, pruning.from_env()
            tracking.declare_axes(job.run, metrics.HIGHER_IS_BETTER)
            job.progress.wandb_id = tracking.wandb_ref(job.run)["wandb_id"]
        fit_pack(run)
        out: list[Any] = []
        for k, job in enumerate(jobs):
            if k in run.failed:
                out.append(run.failed[k])
                continue
            try:
                results = finish(job)
            except Exception as err:  # recorded for this job alone
                out.append(err)
                continue
            results["packed_with"] = [n for n in names if n != job.run_dir.name]
            results["pack_size"] = len(jobs)
            results["mem_pack_predicted_peak_bytes"] = predicted  # the whole pack's, not this job's
            results["mem_solo_predicted_peak_bytes"] = solo[k]  # this job alone, on the same terms
            results["mem_pack_activations_per_batch_bytes"] = per_batch  # batch_size x max_length, measured
            results["mem_pack_measured_peak_rss_bytes"] = rss.peak  # the pack's process (peak_host_rss_bytes too)
            job.run.summary.update({"pack_size": len(jobs)})
            tracking.write_json(job.run_dir / "results.json", results)
            out.append(results)
    for job, results in zip(jobs, out):
        if isinstance(results, dict):
            if not job.cfg.trainer.keep_checkpoint:
                shutil.rmtree(job.run_dir / checkpoint.FOLDER, ignore_errors=True)
            print_summary(results, job.run_dir)
    return out


def shared_reader() -> ReadSplits:
    """The data read (``text.load_splits_counted``) for a pack's jobs, memoised on the data options: jobs with the
    same ``data`` get the same splits (read and cleaned once; only read, each job tokenises and batches them in its
    own order) and each job still runs its own checks on them (``job.load_data``: labels against its monitor)."""
    memo: dict[str, Any] = {}

    def read(data_cfg: Any) -> Any:
        key = json.dumps(dataclasses.asdict(data_cfg), sort_keys=True, default=str)
        if key not in memo:
            memo[key] = text_data.load_splits_counted(data_cfg)
        return memo[key]

    return read


def _check_shared(first: Job, job: Job) -> None:
    """``job`` really shares ``first``'s base: same fingerprint, same batch count, no feature cache (its epoch and
    step may differ: ``fit_pack`` starts each job where its checkpoint left it)."""
    if job.model.base_fingerprint != first.model.base_fingerprint:
        raise ValueError(f"pack: {job.run_dir.name} has another base than {first.run_dir.name}")
    if len(job.loaders.train) != len(first.loaders.train):
        raise ValueError(f"pack: {job.run_dir.name} has other data than the pack")
    if job.cache is not None:
        raise ValueError(f"pack: {job.run_dir.name} uses a frozen-feature cache")
    if not any(True for _ in lora_layers(job.model)):
        raise ValueError(f"pack: {job.run_dir.name} has no LoRA layer")
