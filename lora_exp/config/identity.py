"""What a job is: the resolved config, the fields that apply to it, and the hashes that name a job
(``config_hash``), a configuration over seeds (``group_hash``) and an arm of the fair protocol (``arm_hash``)."""

from __future__ import annotations

import copy
import hashlib
import json

from omegaconf import DictConfig, OmegaConf

from lora_exp.adapters.choices import OPTION_OWNERS, adalora_initial_rank


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
    "memory_probe",
    "max_memory_gib",  # hydra/launcher=packed's budget: how jobs are grouped, not what one computes
)


# Data options added later, at the value that reads as before: left out, so a sweep started before resumes.
DATA_DEFAULTS = {
    "format": None,
    "drop_missing": False,
    "text_pair_column": None,
    "problem_type": "single_label_classification",
    "task": None,
    "audio_column": None,
    "max_seconds": None,
}
# data.num_labels: null (taken from the training split) hashes as the old default 2. For two-class data the job is
# the same one; for data of more classes an explicit 2 never ran (it was refused), so no two jobs share a hash.
NUM_LABELS_BEFORE = 2


def applicable_lora(lora: dict) -> dict:
    """``lora`` without the option groups of variants / inits this job does not use (``lora.vera`` unless
    ``lora.variant=vera``): they change nothing it computes, so runs before and after they existed hash alike."""
    return {
        k: v for k, v in lora.items() if k not in OPTION_OWNERS or lora.get(OPTION_OWNERS[k][0]) == OPTION_OWNERS[k][1]
    }


# lora.r and lora.targets where they do not apply (method full / frozen / bitfit): hashed at the defaults, so a
# sweep over them (lora.r=8,32 with +preset=full among the presets) trains the reference once, as before.
UNUSED_LORA_SHAPE = {"r": 8, "targets": ["q", "v"]}


def _rank_as_built(lora: dict) -> dict:
    """VeRA's and AdaLoRA's shape as the layers are built, in the keys their runs hashed before ``+preset``:
    VeRA's own rank (``lora.vera.r``) as ``r``; AdaLoRA's initial rank as ``r`` and ``lora.r`` (the average
    it prunes to) as ``adalora.target_r``. A job has one hash however it was spelled."""
    lora = dict(lora)
    if lora.get("variant") == "vera" and isinstance(lora.get("vera"), dict):
        vera = dict(lora["vera"])
        lora["r"] = vera.pop("r", lora.get("r"))
        lora["vera"] = vera
    elif lora.get("variant") == "adalora" and isinstance(lora.get("adalora"), dict):
        ada = dict(lora["adalora"])
        init = ada.pop("init_r", None)
        ada["target_r"] = lora.get("r")
        lora["r"] = adalora_initial_rank(lora["r"], init)
        lora["adalora"] = ada
    return lora


# model.double_quant applies to a 4-bit base only (model.base_dtype=nf4|fp4); elsewhere it is left out, so the jobs
# from before it existed keep their hash.
FOUR_BIT = ("nf4", "fp4")


def _identity(resolved: dict) -> dict:
    ident = {k: v for k, v in resolved.items() if k not in HASH_EXCLUDED}
    model = ident.get("model")
    if isinstance(model, dict) and model.get("base_dtype") not in FOUR_BIT:
        ident["model"] = {k: v for k, v in model.items() if k != "double_quant"}
    if isinstance(ident.get("lora"), dict):
        ident["lora"] = _rank_as_built(applicable_lora(ident["lora"]))
        if (ident.get("method") or {}).get("name", "lora") != "lora":
            ident["lora"].update(UNUSED_LORA_SHAPE)
    data = ident.get("data", {})
    ident["data"] = {
        k: v for k, v in data.items() if k != "cache_dir" and not (k in DATA_DEFAULTS and DATA_DEFAULTS[k] == v)
    }
    if "num_labels" in ident["data"] and ident["data"]["num_labels"] is None:
        ident["data"]["num_labels"] = NUM_LABELS_BEFORE
    if ident["data"].get("source") == "files":  # data=files is data=csv renamed: one job, one hash
        ident["data"]["source"] = "csv"
    ident["trainer"] = {k: v for k, v in ident.get("trainer", {}).items() if k not in TRAINER_COSMETIC}
    return ident


def _digest(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resolved(cfg: DictConfig | dict) -> dict:
    return copy.deepcopy(dict(cfg)) if isinstance(cfg, dict) else resolved_dict(cfg)


def config_hash(cfg: DictConfig | dict) -> str:
    """A deterministic id of what a job computes (resolved config minus logging, caches and paths of output)."""
    return _digest(_identity(_resolved(cfg)))


METHOD_LR_ROUTES = ("lr", "lr_grid")  # method keys that only pick optimizer.lr (with the top-level lr_index)


def _group_identity(cfg: DictConfig | dict, compute: dict | None = None) -> dict:
    """What a job computes except its seed: the settings that apply (``recorded``), with the learning rate
    only as the optimizer uses it (``method.lr``, ``method.lr_grid`` and ``lr_index`` only route to it).

    ``compute`` (``device.compute_identity``; default: the job's ``derived.compute`` when recorded) replaces the
    configured ``trainer.device``, ``trainer.precision`` and ``model.base_dtype`` by what they resolved to, plus
    the GPU model: ``auto`` is bf16 on one machine and fp32 on another."""
    resolved = _resolved(cfg)
    compute = compute or (resolved.get("derived") or {}).get("compute")
    ident = _identity(without(resolved, _hash_drops(resolved)))
    ident.pop("lr_index", None)
    ident["trainer"] = {k: v for k, v in ident.get("trainer", {}).items() if k != "seed"}
    ident["method"] = {k: v for k, v in ident.get("method", {}).items() if k not in METHOD_LR_ROUTES}
    if compute:
        ident["trainer"].update(device=compute["device"], precision=compute["precision"], gpu=compute.get("gpu"))
        ident["model"] = {**ident.get("model", {}), "base_dtype": compute["base_dtype"]}
    return ident


def group_hash(cfg: DictConfig | dict, compute: dict | None = None) -> str:
    """One configuration of the report: every setting that changes what a job computes except the seed.

    Runs that differ in model, data, epochs, limits, batch, dropout, warm-up, precision or device differ here,
    so the report never averages them as if they were seeds. Device and precision count as resolved (see
    ``_group_identity``): an ``auto`` that became bf16 pools with an explicit bf16, never with fp32.
    """
    return _digest(_group_identity(cfg, compute))


def arm_hash(cfg: DictConfig | dict, compute: dict | None = None) -> str:
    """An arm of the fair comparison: ``group_hash`` without the learning rate (chosen on validation)."""
    ident = _group_identity(cfg, compute)
    ident["optimizer"] = {k: v for k, v in ident.get("optimizer", {}).items() if k != "lr"}
    return _digest(ident)


TINY_ONLY = ("arch", "hidden_size", "layers", "heads", "ffn_size")
# What the synthetic GW data reads of ``data`` (``data/gw.py`` has its own sizes and splits); the other data fields
# are those of text files and Hub datasets.
GW_DATA_FIELDS = ("name", "source", "num_labels", "limit", "eval_limit", "split_seed", "gw")


def _hash_drops(config: dict) -> list[str]:
    """The fields ``group_hash`` / ``arm_hash`` have always left out as not applying. Fixed, so that the runs of
    one sweep written before and after ``inapplicable`` learnt more keep one hash and pool in the report."""
    model = config.get("model", {})
    drop = [f"model.{k}" for k in (("path", "trust_remote_code") if model.get("source") == "tiny" else TINY_ONLY)]
    if config.get("method", {}).get("name") != "lora":
        drop.append("lora")
    if config.get("lr_index") is None:
        drop += ["lr_index", "method.lr_grid"]
    return drop


def inapplicable(config: dict) -> list[str]:
    """Dotted paths of the fields that do not apply to this (resolved) config's model, data and method.

    Tiny-model fields only for ``model.source=tiny`` (which has no path and runs no remote code); the audio
    window only for ``model.task=audio``; ``model.double_quant`` only for a 4-bit base; ``data.gw.*`` only for
    ``data.source=gw``, whose runs read none of the text data's fields; the lora section only for ``method=lora``;
    the lr grid only when the fair sweep indexes it.
    """
    drop = _hash_drops(config)
    if config.get("model", {}).get("task", "text") != "audio":
        drop.append("model.audio_max_seconds")
    if config.get("model", {}).get("base_dtype") not in FOUR_BIT:
        drop.append("model.double_quant")
    data = config.get("data", {})
    if data.get("source") == "gw":
        drop += [f"data.{k}" for k in data if k not in GW_DATA_FIELDS]
    else:
        drop.append("data.gw")
    return drop


def without(config: dict, paths: list[str]) -> dict:
    """A deep copy of ``config`` without the dotted ``paths`` (those it does not have are ignored)."""
    out = copy.deepcopy(config)
    for path in paths:
        *parents, last = path.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def recorded(config: dict) -> dict:
    """The resolved config with only the fields that apply to this run (``inapplicable``): what W&B records and
    ``lora-exp --cfg job`` shows. ``config.yaml`` keeps everything: ``resume`` and ``rerun`` rebuild from it."""
    out = without(config, inapplicable(config))
    if isinstance(out.get("lora"), dict):
        out["lora"] = applicable_lora(out["lora"])
    return out
