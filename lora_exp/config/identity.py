"""What a job is: the resolved config, the fields that apply to it, and the hashes that name a job
(``config_hash``), a configuration over seeds (``group_hash``) and an arm of the fair protocol (``arm_hash``)."""

from __future__ import annotations

import copy
import hashlib
import json

from omegaconf import DictConfig, OmegaConf

from lora_exp.adapters.choices import OPTION_OWNERS


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


def applicable_lora(lora: dict) -> dict:
    """``lora`` without the option groups of variants / inits this job does not use (``lora.vera`` unless
    ``lora.variant=vera``): they change nothing it computes, so runs before and after they existed hash alike."""
    return {
        k: v for k, v in lora.items() if k not in OPTION_OWNERS or lora.get(OPTION_OWNERS[k][0]) == OPTION_OWNERS[k][1]
    }


def _identity(resolved: dict) -> dict:
    ident = {k: v for k, v in resolved.items() if k not in HASH_EXCLUDED}
    if isinstance(ident.get("lora"), dict):
        ident["lora"] = applicable_lora(ident["lora"])
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
    elif isinstance(out.get("lora"), dict):
        out["lora"] = applicable_lora(out["lora"])
    if out.get("lr_index") is None:
        out.pop("lr_index", None)
        out["method"] = {k: v for k, v in out.get("method", {}).items() if k != "lr_grid"}
    return out
