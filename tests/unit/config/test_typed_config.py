"""Typed config below the edge: the entry points turn the composed config into the schema's dataclasses once
(``config.schema.typed_config``); ``data/``, ``models/``, ``adapters/`` and ``measure/`` take those slices or
plain values, never omegaconf; and the typed config is the very config a job records and hashes."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import lora_exp
from lora_exp import inference
from lora_exp.config import schema
from lora_exp.config.identity import arm_hash, config_hash, group_hash, recorded, resolved_dict
from lora_exp.measure import timing
from lora_exp.training import job as job_setup
from lora_exp.training.rundir import recorded_config
from tests.helpers.configs import make_cfg

BELOW_THE_EDGE = ("data", "models", "adapters", "measure")
PACKAGE = Path(lora_exp.__file__).parent


def _schema_nodes() -> tuple[set[str], set[str]]:
    """The schema's dataclass names and every option name in it (nested groups included)."""
    classes, fields, todo = set(), set(), [schema.Config]
    while todo:
        node = todo.pop()
        classes.add(node.__name__)
        for f in dataclasses.fields(node):
            fields.add(f.name)
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
                todo.append(type(f.default_factory()))
    return classes, fields


def _problems(source: str, where: str, classes: set[str], fields: set[str]) -> list[str]:
    """What a module below the edge (``source``, named ``where`` in the lines) must not do, one line each."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            out += [f"{where}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "omegaconf"]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                ann = ast.unparse(a.annotation) if a.annotation else ""
                config_like = a.arg == "cfg" or a.arg.endswith("_cfg")  # (``config``: e.g. a PEFT file's dict)
                if any(t in ann for t in ("DictConfig", "ListConfig", "OmegaConf")) or (
                    config_like and not any(c in ann for c in classes)  # a config node: one of the schema's
                ):
                    out.append(f"{where}:{node.lineno} {node.name}({a.arg}: {ann or 'untyped'})")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            key, receiver = node.args[0] if node.args else None, ast.unparse(node.func.value)
            if isinstance(key, ast.Constant) and key.value in fields and "cfg" in receiver:
                out.append(f"{where}:{node.lineno} {ast.unparse(node)} (read the typed field)")
    return out


def test_no_module_below_the_edge_takes_omegaconf() -> None:
    """No omegaconf import, no DictConfig parameter, config parameters typed with the schema's dataclasses, and no
    ``cfg.get("key", default)`` of a schema option (its default lives in the schema only)."""
    classes, fields = _schema_nodes()
    files = sorted(f for pkg in BELOW_THE_EDGE for f in (PACKAGE / pkg).glob("*.py"))
    assert len(files) > 30  # the four packages were found
    problems = [p for f in files for p in _problems(f.read_text(), str(f.relative_to(PACKAGE)), classes, fields)]
    assert problems == []


def test_the_check_catches_what_it_forbids() -> None:
    """The AST check above on a module that does each forbidden thing (and one function that does none)."""
    source = (
        "from omegaconf import DictConfig\n"
        "import omegaconf.errors\n"
        "def load(cfg: DictConfig, lora_cfg, data_cfg: schema.DataConfig, n: int) -> None:\n"
        "    return cfg.get('max_length', 128)\n"
        "def fine(cfg: ModelConfig, table: dict) -> str:\n"
        "    return table.get('max_length', cfg.name)\n"
    )
    assert _problems(source, "probe.py", *_schema_nodes()) == [
        "probe.py:1 imports omegaconf",
        "probe.py:2 imports omegaconf.errors",
        "probe.py:3 load(cfg: DictConfig)",
        "probe.py:3 load(lora_cfg: untyped)",
        "probe.py:4 cfg.get('max_length', 128) (read the typed field)",
    ]


IDENTITIES = [
    [],
    ["model=tiny_bert", "data.path=/x.csv.bz2", "method=full"],
    ["model=tiny_bert", "lora.variant=vera", "lora.r=32", "lora.targets=[q,k,v,o,ffn]", "optimizer.lr=1e-3"],
    ["lora.init=eva", "lora.eva.rho=1.5", "lora.rank_pattern={query: 4}", "lora.layers=[0,1]"],
    ["lora.variant=adalora", "optimizer.loraplus_lr_ratio=16", "trainer.seed=3", "data.limit=100"],
    ["model=tiny_whisper", "data=gw_synthetic", "model.audio_max_seconds=6.0", "data.gw.snr=[5.0,10.0]"],
    ["+sweep=fair", "lr_index=1"],
]


@pytest.mark.parametrize("overrides", IDENTITIES, ids=lambda o: " ".join(o) or "defaults")
def test_the_typed_config_has_the_identity_of_the_composed_one(overrides: list[str], tmp_path: Path) -> None:
    """The dataclasses hold exactly the resolved config: the same job, group and arm hashes, the same recorded
    fields; and the config a run records (config.yaml) reads back to the same typed config."""
    cfg = make_cfg(overrides)
    typed = schema.typed_config(cfg)
    assert isinstance(typed.lora, schema.LoraConfig) and isinstance(typed.data, schema.DataConfig)
    as_dict, resolved = dataclasses.asdict(typed), resolved_dict(cfg)
    assert as_dict == resolved
    for digest in (config_hash, group_hash, arm_hash):
        assert digest(as_dict) == digest(resolved) == digest(cfg)
    assert recorded(as_dict) == recorded(resolved)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml({**resolved, "derived": {"total_steps": 1}}))
    assert inference.run_config(tmp_path) == typed == schema.typed_config(recorded_config(tmp_path))


def test_a_job_runs_on_the_config_it_records_and_hashes(tiny_cfg, tmp_path: Path) -> None:
    """``setup`` converts once: the job's ``Config`` is the composed config, and its recorded dict (config hash,
    W&B config) is that config plus the derived facts."""
    cfg = tiny_cfg("lora.targets=[q,v,ffn]", "lora.r=4")
    job = job_setup.setup(cfg, tmp_path / "run", False, timing.RssPeak())
    assert isinstance(job.cfg, schema.Config) and job.cfg == schema.typed_config(cfg)
    derived = job.config.pop("derived")
    assert job.config == dataclasses.asdict(job.cfg) == resolved_dict(cfg)
    assert derived["total_steps"] == job.total_steps and derived["adapted_modules"] == job.adapted
    assert inference.run_config(tmp_path / "run") == job.cfg


def test_typed_config_refuses_what_the_schema_does_not_have() -> None:
    """A key outside the schema and a value of the wrong type fail at the conversion, not deep below it."""
    from omegaconf.errors import ConfigKeyError, ValidationError

    with pytest.raises(ConfigKeyError):
        schema.typed_config({"targets": ["q"], "rank": 4}, schema.LoraConfig)
    with pytest.raises(ValidationError):
        schema.typed_config({"r": "four"}, schema.LoraConfig)
    assert schema.typed_config({"r": 4}, schema.LoraConfig) == schema.LoraConfig(r=4)
