"""LoRA variants against the installed peft (test-only reference) on tiny BERT, DistilBERT and RoBERTa.

(a) same initial tensors -> equal forward (atol 1e-5) before and after identical AdamW steps (dropout on,
same RNG); (b) PEFT export / import round trips; (c) merge / unmerge; (d) LoRA+ groups; (e) PiSSA / OLoRA
residual W0 and A, B; plus bias / BitFit trainable sets, layers, rank / alpha patterns, counts, saving.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from peft.optimizers import create_loraplus_optimizer

from lora_exp.adapters import dora
from lora_exp.adapters import params as adapter_params
from lora_exp.adapters import store as adapter_store
from lora_exp.adapters import targets as injection
from lora_exp.config.schema import LoraConfig, typed_config
from lora_exp.errors import LoraExpError
from lora_exp.measure import timing
from lora_exp.models import methods as model_methods
from tests.helpers import parity
from tests.helpers.models import tiny_text
from tests.helpers.parity import ARCHS, TARGETS, R, close, eval_logits, ours_cfg, peft_cfg, peft_name, tiny_model
from tests.helpers.sweeps import VARIANT_LABELS, label, sweep_jobs

# name -> (our lora config overrides, PEFT LoraConfig kwargs)
VARIANTS = {
    "lora": ({}, {}),
    "rslora": ({"rslora": True}, {"use_rslora": True}),
    "dora": ({"variant": "dora"}, {"use_dora": True}),
    "gaussian": ({"init": "gaussian"}, {"init_lora_weights": "gaussian"}),
    "pissa": ({"init": "pissa"}, {"init_lora_weights": "pissa"}),
    "olora": ({"init": "olora"}, {"init_lora_weights": "olora"}),
    "dora-pissa": ({"variant": "dora", "init": "pissa"}, {"use_dora": True, "init_lora_weights": "pissa"}),
}


def pair(arch: str, variant: str, dropout: float = 0.0, **extra):
    """(ours, PEFT's, head, base) built from one base with identical trainable tensors (B randomised)."""
    base, head = tiny_model(arch)
    ours_over, peft_over = VARIANTS[variant]
    peft_conf = peft_cfg(arch, head, dropout, **peft_over, **extra.get("peft", {}))
    ours, ref = parity.build_pair(base, head, peft_conf, ours_cfg(arch, dropout, **ours_over, **extra.get("ours", {})))
    return ours, ref, head, base


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_and_training_steps_equal_peft(arch: str, variant: str) -> None:
    """(a) Equal logits at the start and after 3 identical AdamW steps, in train mode with dropout 0.1."""
    parity.assert_steps_equal_peft(*pair(arch, variant, dropout=0.1))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["dora", "pissa", "olora", "dora-pissa", "rslora"])
def test_peft_export_import_round_trip(arch: str, variant: str, tmp_path: Path) -> None:
    """(b) Ours -> PEFT format -> PeftModel, and PEFT's save -> import_peft: equal logits both ways."""
    ours, ref, head, base = pair(arch, variant)
    with torch.no_grad():
        for p in ours.parameters():  # a trained-looking adapter, magnitude included
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    parity.assert_peft_round_trip(ours, ref, head, base, tmp_path)
    if "dora" in variant:
        keys = (tmp_path / "ours" / "adapter_model.safetensors").read_bytes()
        assert b"lora_magnitude_vector" in keys


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["lora", "dora", "pissa", "dora-pissa"])
def test_merge_unmerge(arch: str, variant: str) -> None:
    """(c) Merged logits equal unmerged; unmerge restores W0 (the residual for PiSSA)."""
    ours, _, _, _ = pair(arch, variant)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith(dora.MAGNITUDE):
                p.mul_(1 + 0.1 * torch.rand_like(p))
    parity.assert_merge_unmerge(ours, moves=True)


def test_dora_merge_low_precision_restores_exactly() -> None:
    torch.manual_seed(0)
    layer = injection.make_layer(torch.nn.Linear(16, 24).to(torch.bfloat16), 4, 8.0, 0.0, False, "dora")
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)


def test_dora_magnitude_init_and_detached_norm() -> None:
    torch.manual_seed(0)
    layer = injection.make_layer(torch.nn.Linear(12, 20), 4, 8.0, 0.0, False, "dora")
    torch.testing.assert_close(layer.lora_magnitude_vector, layer.base_layer.weight.norm(dim=1))
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # unchanged at init
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    layer(x).sum().backward()
    assert layer.lora_magnitude_vector.grad.abs().sum() > 0 and layer.lora_B.weight.grad.abs().sum() > 0
    # The norm is a constant in backward: the gradient of m equals (W0 x + s B A x) / norm summed over rows.
    norm = layer.weight_norm()
    expected = (
        (x @ layer.base_layer.weight.T + layer.scaling * x @ (layer.lora_B.weight @ layer.lora_A.weight).T) / norm
    ).sum(0)
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, expected.detach())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_and_factors_equal_peft(arch: str, init: str) -> None:
    """(e) PiSSA / OLoRA: the residual base weight and A, B equal PEFT's; the model is unchanged at init."""
    base, head = tiny_model(arch)
    ref = get_peft_model(copy.deepcopy(base), peft_cfg(arch, head, init_lora_weights=init))
    ours = copy.deepcopy(base)
    model_methods.apply_method(ours, "lora", head, ours_cfg(arch, init=init))
    assert len(parity.assert_factors_equal_peft(ours, ref, base)) == 6


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("bias", ["none", "all"])
def test_loraplus_groups_equal_peft(arch: str, variant: str, bias: str) -> None:
    """(d) Groups (members; order within a group differs for DoRA and does not matter), lrs, decays equal PEFT's."""
    ours, ref, head, _ = pair(arch, variant, ours={"bias": bias}, peft={"bias": bias})
    want = create_loraplus_optimizer(
        ref, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.01, weight_decay=0.01
    )
    ref_names = {id(p): n for n, p in ref.named_parameters()}
    want_groups = [
        (sorted(ref_names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"])
        for g in want.param_groups
        if g["params"]
    ]
    got = adapter_params.optimizer_groups(ours, lr=1e-3, weight_decay=0.01, loraplus_lr_ratio=16.0)
    got_groups = [(sorted(peft_name(n, head) for n in g["names"]), g["lr"], g["weight_decay"]) for g in got]
    assert got_groups == want_groups
    assert {lr for _, lr, _ in got_groups} == {1e-3, 16e-3}
    torch.optim.AdamW(got, lr=1e-3)  # usable as is (the extra "names" key is kept by torch)


def test_optimizer_groups_without_loraplus() -> None:
    ours, _, _, _ = pair("bert", "dora", ours={"bias": "all"}, peft={"bias": "all"})
    got = adapter_params.optimizer_groups(ours, lr=2e-3, weight_decay=0.01)
    assert [(g["weight_decay"], g["lr"]) for g in got] == [(0.01, 2e-3), (0.0, 2e-3)]
    assert all(p.ndim >= 2 for p in got[0]["params"]) and all(p.ndim < 2 for p in got[1]["params"])
    assert any(n.endswith(dora.MAGNITUDE) for n in got[1]["names"])
    assert sum(len(g["params"]) for g in got) == sum(p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_trainable_sets_equal_peft(arch: str, bias: str) -> None:
    ours, ref, head, _ = pair(arch, "lora", ours={"bias": bias}, peft={"bias": bias})
    got = {peft_name(n, head) for n, p in ours.named_parameters() if p.requires_grad}
    assert got == {n for n, p in ref.named_parameters() if p.requires_grad}
    assert any(n.endswith("base_layer.bias") for n in got)
    assert (bias == "all") == any("LayerNorm.bias" in n or "layer_norm.bias" in n for n in got)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_bitfit_trains_biases_and_head_only(arch: str) -> None:
    _, model, head = tiny_text(arch)
    model_methods.apply_method(model, "bitfit", head)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    in_head = [n for n in trainable if any(n.startswith(h + ".") for h in head)]
    assert set(trainable) - set(in_head) == {n for n, _ in model.named_parameters() if n.endswith(".bias")} - set(
        in_head
    )
    assert len(set(trainable) - set(in_head)) > 10
    counts = model_methods.count_parameters(model, head)
    assert counts["adapter"] == 0 and counts["other"] == sum(
        p.numel() for n, p in model.named_parameters() if n in trainable and n not in in_head
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_and_patterns_equal_peft(arch: str, tmp_path: Path) -> None:
    """lora.layers = PEFT layers_to_transform; rank_pattern / alpha_pattern as PEFT (first match wins)."""
    key = TARGETS[arch][0]
    ours_over = {"layers": [1], "rank_pattern": {key: 2, "value|v_lin": 3}, "alpha_pattern": {key: 3.0}}
    peft_over = {"layers_to_transform": [1], "rank_pattern": ours_over["rank_pattern"], "alpha_pattern": {key: 3.0}}
    ours, ref, head, base = pair(arch, "lora", ours=ours_over, peft=peft_over)
    layers = dict(injection.lora_layers(ours))
    assert len(layers) == 3 and all(injection.layer_index(n) == 1 for n in layers)
    assert sorted(m.r for m in layers.values()) == [2, 3, 4]
    assert {m.scaling for n, m in layers.items() if n.endswith(key)} == {3.0 / 2}
    close(eval_logits(ours), eval_logits(ref))
    parity.assert_peft_loads(ours, head, base, tmp_path / "p")  # per-layer r / alpha travel as rank_pattern


def test_layers_that_select_nothing_is_an_error() -> None:
    _, model, head = tiny_text("bert")
    with pytest.raises(LoraExpError, match=r"lora.layers=\[7\] selects none .*\[0, 1\]"):
        model_methods.apply_method(model, "lora", head, ours_cfg("bert", layers=[7]))


def test_dora_magnitude_counts_as_adapter() -> None:
    _, model, head = tiny_text("bert")
    model_methods.apply_method(model, "lora", head, ours_cfg("bert", variant="dora"))
    counts = model_methods.count_parameters(model, head)
    ab = 2 * (R * (32 + 32) * 2 + R * (32 + 64))  # 2 layers x (query, value: 32->32; intermediate 32->64)
    magnitudes = 2 * (32 + 32 + 64)
    assert counts["adapter"] == ab + magnitudes
    assert adapter_params.variant_counts(model) == {"lora_ab_params": ab, "dora_magnitude_params": magnitudes}


@pytest.mark.parametrize("variant", ["dora", "pissa", "dora-pissa"])
def test_saved_adapter_rebuilds_the_same_model(variant: str, tmp_path: Path) -> None:
    """Save, load into a fresh model built from the pristine base the same way: equal logits."""
    ours, _, head, base = pair("bert", variant)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    adapter_store.save_adapter(ours, tmp_path / "a", {"head_modules": head})
    meta, tensors = adapter_store.read_adapter(tmp_path / "a")
    assert meta["variant"] == ("dora" if "dora" in variant else "lora")
    assert ("residual_base" in meta) == ("pissa" in variant)
    fresh = copy.deepcopy(base)
    ours_over, _ = VARIANTS[variant]
    model_methods.apply_method(fresh, "lora", head, ours_cfg("bert", **ours_over))
    adapter_store.load_into(fresh, tensors, "test")
    close(eval_logits(fresh), eval_logits(ours))


@pytest.mark.parametrize(
    ("over", "method", "ratio", "label"),
    [
        ({}, "lora", None, "lora"),
        ({"rslora": True}, "lora", None, "rslora"),
        ({"variant": "dora"}, "lora", None, "dora"),
        ({"use_dora": True}, "lora", None, "dora"),
        ({"init": "pissa"}, "lora", None, "pissa"),
        ({}, "lora", 16.0, "lora+"),
        ({"variant": "lora_fa"}, "lora", None, "lora_fa"),
        ({"variant": "lora_fa", "rslora": True}, "lora", None, "lora_fa-rslora"),
        ({"variant": "vera"}, "lora", None, "vera"),
        ({"init": "eva"}, "lora", None, "eva"),
        ({"variant": "adalora"}, "lora", None, "adalora"),
        ({"init": "lora_ga", "rslora": True}, "lora", None, "lora_ga-rslora"),
        ({}, "bitfit", None, "bitfit"),
        ({"variant": "dora"}, "full", None, "full"),
    ],
)
def test_variant_label(over: dict, method: str, ratio: float | None, label: str) -> None:
    assert adapter_params.variant_label(LoraConfig(**over), method, ratio) == label


@pytest.mark.e2e  # composes a whole sweep's jobs (>5 s): the full tier
def test_variants_sweep_composes_every_arm() -> None:
    from lora_exp.config.checks import validate
    from lora_exp.config.identity import config_hash
    from tests.helpers.configs import make_cfg

    jobs = sweep_jobs("variants")
    assert len(jobs) == 13 * 2 * 2  # presets x lora.r x lora.targets
    arms, hashes = set(), set()
    for overrides in jobs:
        cfg = make_cfg(["+sweep=variants", *overrides])
        validate(cfg)
        r = adapter_params.layer_rank(
            typed_config(cfg.lora, LoraConfig)
        )  # VeRA: its own; AdaLoRA: 1.5x the average it prunes to
        average = None if cfg.lora.variant == "vera" else cfg.lora.r  # lora.r does not apply to VeRA
        shape = (r, average, tuple(cfg.lora.targets)) if cfg.method.name == "lora" else None
        arms.add((label(cfg), shape))
        hashes.add(config_hash(cfg))
    # where lora.r / lora.targets do not apply the grid point is an earlier job (one hash): 41 jobs train
    assert {a for a, _ in arms} == VARIANT_LABELS and len(arms) == len(hashes) == 9 * 2 * 2 + 2 + 3
    both = (("q", "v"), ("q", "k", "v", "o", "ffn"))
    plain = {s for a, s in arms if s and a not in ("vera", "adalora")}
    assert plain == {(r, r, t) for r in (8, 32) for t in both}
    assert {s for a, s in arms if a == "adalora"} == {(r0, r, t) for r0, r in ((12, 8), (48, 32)) for t in both}
    assert {s for a, s in arms if a == "vera"} == {(256, None, t) for t in both}  # VeRA's own shared rank


def test_fair_variants_each_over_its_own_grid() -> None:
    from tests.helpers.configs import make_cfg

    jobs = sweep_jobs("fair_variants")
    assert len(jobs) == 13 * 3 * 3
    grids = {}
    for v in ("lora", "rslora", "dora", "pissa", "loraplus", "lora_fa", "bitfit", "full", "frozen"):
        cfgs = [make_cfg(["+sweep=fair_variants", f"+preset={v}", f"lr_index={i}"]) for i in range(3)]
        assert [c.optimizer.lr for c in cfgs] == list(cfgs[0].method.lr_grid)
        assert all((c.lora.r, list(c.lora.targets)) == (8, ["q", "v"]) for c in cfgs)
        grids[label(cfgs[0])] = list(cfgs[0].method.lr_grid)
    assert max(grids["dora"]) < max(grids["lora"])  # DoRA's authors: a lower lr than LoRA's
    assert grids["full"] == list(make_cfg(["method=full"]).method.lr_grid)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.variant=loha", "lora.variant='loha' is not one of lora, dora, lora_fa, vera"),
        ("lora.init=svd", "lora.init='svd' is not one of default, gaussian, pissa, olora"),
        ("lora.bias=some", "lora.bias='some' is not one of none, lora_only, all"),
        ("lora.layers=[]", "lora.layers=[] must be null or a non-empty list of block indices >= 0"),
        ("lora.rank_pattern={query: 0}", "lora.rank_pattern={'query': 0} must map module regexes to ranks >= 1"),
        ("optimizer.loraplus_lr_ratio=0", "optimizer.loraplus_lr_ratio=0.0 must be > 0 or null"),
    ],
)
def test_bad_variant_options_are_one_line_errors(override: str, message: str) -> None:
    parity.assert_one_line_error([override], message)


def test_loraplus_needs_lora_and_use_dora_is_an_alias() -> None:
    from lora_exp.config.checks import validate
    from tests.helpers.configs import make_cfg

    with pytest.raises(LoraExpError, match="loraplus_lr_ratio=16.0 needs method.name=lora"):
        validate(make_cfg(["method=full", "optimizer.loraplus_lr_ratio=16"]))
    _, model, head = tiny_text("bert")
    model_methods.apply_method(model, "lora", head, ours_cfg("bert", use_dora=True))
    assert all(isinstance(m, dora.DoRALinear) for _, m in injection.lora_layers(model))
    assert all(m.lora_magnitude_vector.requires_grad for _, m in injection.lora_layers(model))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_peft_round_trip_with_trained_biases(bias: str, tmp_path: Path) -> None:
    ours, ref, head, base = pair("bert", "dora", ours={"bias": bias}, peft={"bias": bias})
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith(".bias") and p.requires_grad:
                p.add_(0.1)
    parity.assert_peft_loads(ours, head, base, tmp_path / "ours")
    parity.assert_imports(tmp_path / "ours", head, base, eval_logits(ours))
    with torch.no_grad():  # and PEFT's own save of a model whose biases trained
        for n, p in ref.named_parameters():
            if n.endswith(".bias") and p.requires_grad:
                p.add_(0.1)
    ref.save_pretrained(tmp_path / "ref")
    parity.assert_imports(tmp_path / "ref", head, base, eval_logits(ref))


def test_loop_uses_loraplus_groups(tiny_cfg, tmp_path) -> None:
    """optimizer.loraplus_lr_ratio reaches the loop's optimizer: B trains at ratio x A's lr."""
    from lora_exp.training import job as job_setup

    cfg = tiny_cfg("optimizer.loraplus_lr_ratio=16", "trainer.max_steps=1", "optimizer.scheduler=constant")
    job = job_setup.setup(cfg, tmp_path / "run", False, timing.RssPeak())
    lrs = {n: g["lr"] for g in job.optimizer.param_groups for n in g["names"]}
    a = [lr for n, lr in lrs.items() if ".lora_A." in n]
    b = [lr for n, lr in lrs.items() if ".lora_B." in n]
    assert a and b and all(x == cfg.optimizer.lr for x in a) and all(x == 16 * cfg.optimizer.lr for x in b)
