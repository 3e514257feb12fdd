"""The command line before Hydra runs it: a closed config (each refused override in one line) and ``--cfg job``
showing only the fields that apply.

Hydra's own answer to ``lora.rank=8`` is several lines ending in "use +lora.rank=8", and ``+lora.rank=8`` then
trains silently with r=8 and records a junk key. Here every override is checked against the schema
(``schema.Config``) and Hydra's config groups first: an unknown key, with ``+`` / ``++`` or without, names the
nearest valid one (difflib); a config group's unknown option lists the group's options; a value of the wrong
type says the type. ``+`` stays for what it is for: adding a config group that is not chosen by default
(``+sweep=NAME``, ``+preset=NAME``). ``hydra.*`` keys are Hydra's and left to it. The presets' old spelling
``+variant=NAME`` is refused in one line that names ``+preset=``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from lora_exp.config.identity import inapplicable, without
from lora_exp.config.schema import CONF_DIR, Config
from lora_exp.errors import LoraExpError


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Hydra's own command-line parser (flags such as ``--cfg``, ``-m``; ``overrides``)."""
    from hydra._internal.utils import get_args_parser  # the parser @hydra.main itself uses

    return get_args_parser().parse_args(argv)


def _walk(cls: type, prefix: str, leaves: dict[str, Any], open_: set[str]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, kind = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(kind):
            leaves[path] = kind
            _walk(kind, path + ".", leaves, open_)
        else:
            leaves[path] = kind
            if kind is Any or typing.get_origin(kind) is dict:
                open_.add(path)  # a free-form mapping (lora.rank_pattern): any key below it


def schema_keys() -> tuple[dict[str, Any], set[str]]:
    """Every key the schema defines (dotted path -> type) and the keys whose values are free-form mappings."""
    leaves: dict[str, Any] = {}
    open_: set[str] = set()
    _walk(Config, "", leaves, open_)
    return leaves, open_


def _kind(hint: Any) -> str:
    """A type annotation in words, for 'must be ...'."""
    args = typing.get_args(hint)
    optional = type(None) in args and typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    origin = typing.get_origin(base) or base
    word = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list like [a,b]"}
    return word.get(origin, "a value of another type") + (" or null" if optional else "")


def _nearest(key: str, candidates: list[str], cutoff: float = 0.6) -> str | None:
    found = difflib.get_close_matches(key, candidates, n=1, cutoff=cutoff)
    return found[0] if found else None


def _unknown_key(arg: str, key: str, leaves: dict[str, Any], adding: bool) -> str:
    section = key.rsplit(".", 1)[0] if "." in key else ""
    near = _nearest(key, list(leaves), cutoff=0.75)  # whole paths: lora.rank -> lora.r, trainer.epoch -> epochs
    if near:
        hint = f"did you mean {near}?"
    elif section in leaves:
        children = [
            k.rsplit(".", 1)[1] for k in leaves if k.startswith(section + ".") and k.count(".") == key.count(".")
        ]
        hint = f"{section} has {', '.join(children)}"
    else:
        hint = f"the options are under {', '.join(k for k in leaves if '.' not in k)}"
    closed = "; the config is closed: + only adds a config group, e.g. +sweep=NAME" if adding else ""
    return f"{arg}: no such option ({hint}){closed}"


def _default_groups() -> set[str]:
    """The config groups conf/config.yaml chooses by default (``model``, ``data``, ...; ``experiment: null`` too)."""
    defaults = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "config.yaml").get("defaults", []))
    return {k for d in defaults if isinstance(d, dict) for k in d if not k.startswith("override")}


def _values(override: Any) -> list[Any]:
    if not override.is_sweep_override():
        return [override.value()]
    if override.is_choice_sweep() or override.is_range_sweep():
        return list(override.sweep_iterator())
    return []  # interval / glob sweeps: their values are the sweeper's


def _group_problem(override: Any, default: set[str], options: list[str]) -> str | None:
    arg, key = override.input_line, override.key_or_group
    in_defaults = key in default or key.startswith("hydra/")
    if override.is_add() and in_defaults:
        return f"{arg}: {key} is already chosen by default; write {arg.lstrip('+')}"
    if not override.is_add() and not override.is_force_add() and not in_defaults:
        return f"{arg}: {key} is not chosen by default; write +{arg}"
    for value in _values(override):
        if value is not None and str(value) not in options:
            near = _nearest(str(value), options)
            hint = f" (did you mean {near}?)" if near else ""
            return f"{key}={value}: no such option; {key} is one of {', '.join(options)}{hint}"
    return None


def _key_problem(override: Any, leaves: dict[str, Any], open_: set[str], node: DictConfig) -> str | None:
    arg, key = override.input_line, override.key_or_group
    if any(key.startswith(p + ".") for p in open_):
        return None  # a key inside a free-form mapping (lora.rank_pattern.query=4)
    if key not in leaves:
        return _unknown_key(arg, key, leaves, override.is_add() or override.is_force_add())
    if override.is_add():
        return f"{arg}: {key} already exists; write {arg.lstrip('+')}"
    for value in _values(override):
        shown = f"{key}={value}" if override.is_sweep_override() else arg
        # OmegaConf reads 1, 3 or "yes" as a bool; an on/off switch takes true or false only
        if leaves.get(key) is bool and not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
            return f"{shown} must be true or false"
        try:
            OmegaConf.update(node, key, value, merge=True)
        except ValidationError:
            return f"{shown} must be {_kind(leaves.get(key))}"
    return None


def _refuse_old_spelling(arg: str) -> None:
    """``+variant=NAME`` (before one preset per variant): one line naming ``+preset=NAME``."""
    key, _, value = arg.partition("=")
    if key.lstrip("+~") != "variant":
        return
    name = value.split(",")[0]
    base = name.replace("_r32", "").replace("_all", "") if name else "NAME"
    shape = " lora.r=32" * ("_r32" in name) + " 'lora.targets=[q,k,v,o,ffn]'" * name.endswith("_all")
    raise LoraExpError(
        f"{arg}: the presets are +preset=NAME now, with rank and targets as options: +preset={base}{shape} "
        f"(presets: {', '.join(sorted(p.stem for p in (Path(CONF_DIR) / 'preset').glob('*.yaml')))})"
    )


def check_overrides(overrides: list[str], config_dir: str | None = None) -> None:
    """Refuse, in one line (``LoraExpError``), the first override that names no option of the closed schema
    or of a config group, or whose value has the wrong type. ``config_dir`` (Hydra's ``--config-dir``): a user's
    folder whose group files are options too (``model=mine`` for ``DIR/model/mine.yaml``)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parsed = []
    for arg in overrides:
        _refuse_old_spelling(arg)
        try:
            parsed += OverridesParser.create().parse_overrides([arg])
        except OverrideParseException as err:
            raise LoraExpError(f"{arg}: cannot be parsed ({str(err).splitlines()[0]})") from None
    leaves, open_ = schema_keys()
    node, default = OmegaConf.structured(Config), _default_groups()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # cleared again for @hydra.main
        loader = GlobalHydra.instance().config_loader()  # our groups and Hydra's plugins' (hydra/launcher)
        for override in parsed:
            key = override.key_or_group
            if override.is_delete() or override.package or key == "hydra" or key.startswith("hydra."):
                continue  # deletions, packages and Hydra's own settings: Hydra's
            options = sorted(loader.get_group_options(key)) if "." not in key else []
            if config_dir and "." not in key:  # --config-dir: Hydra searches it too
                options = sorted({*options, *(p.stem for p in (Path(config_dir) / key).glob("*.yaml"))})
            if options:
                problem = _group_problem(override, default, options)
            else:
                problem = _key_problem(override, leaves, open_, node)
            if problem:
                raise LoraExpError(problem)


def show_job(ns: argparse.Namespace) -> str:
    """``--cfg job``: the composed config without the fields that do not apply to the chosen model and data
    (``identity.inapplicable``); ``--resolve`` and ``--package`` as Hydra has them."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=ns.config_name or "config", overrides=ns.overrides)
    try:
        drop = inapplicable(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
    except Exception:  # an interpolation that does not resolve yet: show everything, as Hydra would
        drop = []
    shown = OmegaConf.create(without(OmegaConf.to_container(cfg, resolve=bool(ns.resolve)), drop))
    if ns.package and ns.package != "_global_":
        selected = OmegaConf.select(shown, ns.package)
        if not OmegaConf.is_config(selected):
            return f"{selected}\n"
        return f"# @package {ns.package}\n{OmegaConf.to_yaml(selected)}"
    return OmegaConf.to_yaml(shown)
