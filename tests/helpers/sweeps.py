"""A sweep file's grid as override lists, and the variant label a run records."""

from __future__ import annotations

import itertools

from hydra import compose, initialize_config_dir

from lora_exp.adapters import params as adapter_params
from lora_exp.cli import CONF_DIR

VARIANT_LABELS = {  # every arm of +sweep=variants, as a run labels it
    "lora",
    "rslora",
    "dora",
    "pissa",
    "lora+",
    "lora_fa",
    "vera",
    "eva",
    "lora_ga",
    "adalora",
    "bitfit",
    "full",
    "frozen",
}


def expand(params: dict[str, str]) -> list[list[str]]:
    """Hydra's basic-sweeper grid of ``hydra.sweeper.params`` as override lists."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    axes = []
    for key, value in params.items():
        override = parser.parse_override(f"{key}={value}")
        axes.append([f"{key}={v}" for v in override.sweep_string_iterator()])
    return [list(c) for c in itertools.product(*axes)]


def sweep_jobs(name: str) -> list[list[str]]:
    """The jobs of ``+sweep=name`` as override lists."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hydra_cfg = compose("config", overrides=[f"+sweep={name}"], return_hydra_config=True)
    return expand(dict(hydra_cfg.hydra.sweeper.params))


def label(cfg) -> str:
    """The variant label a run of ``cfg`` records."""
    return adapter_params.variant_label(cfg.lora, cfg.method.name, cfg.optimizer.loraplus_lr_ratio)
