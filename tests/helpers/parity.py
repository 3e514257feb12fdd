"""PEFT-parity scaffolding shared by the LoRA-variant tests (test_variants, test_lora_fa, test_vera, test_eva,
test_lora_ga, test_adalora): tiny BERT / DistilBERT / RoBERTa, ours and PEFT's model built from the same
tensors, identical optimizer steps, logits compared at atol 1e-5, PEFT round trips, merge / unmerge exactness.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, RobertaConfig

from lora_exp.adapters import dora
from lora_exp.adapters import targets as injection
from lora_exp.adapters.peft_format import export_peft, import_peft
from lora_exp.config import schema
from lora_exp.models import methods as model_methods

from .models import tiny_text

ARCHS = ("bert", "distilbert", "roberta")
TARGETS = {
    "bert": ["query", "value", "intermediate.dense"],
    "roberta": ["query", "value", "intermediate.dense"],
    "distilbert": ["q_lin", "v_lin", "lin1"],
}
R, ALPHA = 4, 8.0
STEPS, LR = 3, 1e-2  # optimizer steps and AdamW's lr in the step-parity tests
LABELS = torch.tensor([0, 1, 1])

NameMap = Callable[[str, list[str]], str]  # our parameter path, head modules -> the PEFT model's path


def tiny_model(arch: str) -> tuple[torch.nn.Module, list[str]]:
    """(model, head) for a tiny random model; RoBERTa built here (models.build knows bert/distilbert)."""
    if arch != "roberta":
        _, model, head = tiny_text(arch)
        return model.eval(), head
    torch.manual_seed(0)
    conf = RobertaConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return AutoModelForSequenceClassification.from_config(conf).eval(), ["classifier"]


def ours_cfg(arch: str, dropout: float = 0.0, **over) -> schema.LoraConfig:
    """Our ``lora`` options for ``arch``'s targets at rank R, alpha ALPHA, overridden by ``over``."""
    base = {"targets": TARGETS[arch], "r": R, "alpha": ALPHA, "dropout": dropout, "rslora": False}
    if over.get("variant") == "vera":  # VeRA's rank is its own option (lora.vera.r): the rank these tests give
        over = {**over, "vera": {"r": over.get("r", R), **over.get("vera", {})}}
    return schema.typed_config({**base, **over}, schema.LoraConfig)


def peft_cfg(arch: str, head: list[str], dropout: float = 0.0, **over) -> LoraConfig:
    """PEFT's ``LoraConfig`` equal to ``ours_cfg(arch, dropout)``, overridden by ``over``."""
    kw = dict(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=TARGETS[arch], task_type="SEQ_CLS")
    return LoraConfig(**{**kw, **over}, modules_to_save=list(head))  # PEFT appends to the list it gets


def in_peft(name: str, head: list[str]) -> str:
    """A path already renamed inside the adapter -> the PEFT model's: head copies and the wrapper prefix."""
    for h in head:
        if name.startswith(h + "."):
            name = f"{h}.modules_to_save.default.{name[len(h) + 1 :]}"
    return "base_model.model." + name


def peft_name(name: str, head: list[str]) -> str:
    """Our (LoRA / DoRA) parameter path -> the PEFT model's."""
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.", f".{part}.default.")
    if name.endswith("." + dora.MAGNITUDE):
        name += ".default.weight"
    return in_peft(name, head)


def ids(seed: int = 1) -> torch.Tensor:
    """A fixed batch of 3 token-id rows of length 11."""
    return torch.randint(5, 100, (3, 11), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    """Logits on ``ids(seed)`` with the global RNG reset, so both models draw the same dropout masks."""
    torch.manual_seed(123)  # the same dropout masks in both models (they draw in the same order)
    return model(input_ids=ids(seed)).logits


def eval_logits(model: torch.nn.Module) -> torch.Tensor:
    """Eval-mode logits on ``ids()``, without autograd."""
    with torch.no_grad():
        return model.eval()(input_ids=ids()).logits


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """The parity tolerance: atol 1e-5, rtol 1e-5."""
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def build_pair(
    base: torch.nn.Module,
    head: list[str],
    peft_conf: PeftConfig,
    ours_conf: schema.LoraConfig,
    marker: str = ".lora_B.",
    randomise: Callable[[torch.Tensor], object] = lambda p: p.normal_(std=0.1),
    to_peft: NameMap = peft_name,
    copied: Callable[[str, torch.nn.Parameter], bool] = lambda n, p: p.requires_grad,
) -> tuple[torch.nn.Module, PeftModel]:
    """(ours, PEFT's) from copies of ``base``: PEFT's parameters whose name holds ``marker`` randomised (seed 5),
    then every ``copied`` parameter of ours overwritten with PEFT's tensor."""
    ref = get_peft_model(copy.deepcopy(base), peft_conf)
    ours = copy.deepcopy(base)
    model_methods.apply_method(ours, "lora", head, ours_conf)
    torch.manual_seed(5)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in ref_params.items():
            if marker in n:
                randomise(p)
        for n, p in ours.named_parameters():
            if copied(n, p):
                p.copy_(ref_params[to_peft(n, head)])
    return ours, ref


def assert_same_trainable(
    ours: torch.nn.Module, ref: torch.nn.Module, head: list[str], to_peft: NameMap = peft_name
) -> list[str]:
    """Ours trains exactly PEFT's parameters (by name); returns our trainable names in order."""
    names = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert {to_peft(n, head) for n in names} == {n for n, p in ref.named_parameters() if p.requires_grad}
    return names


def adamw_pair(
    ours: torch.nn.Module, ref: torch.nn.Module, head: list[str], to_peft: NameMap = peft_name
) -> tuple[torch.optim.AdamW, torch.optim.AdamW]:
    """AdamW (lr LR) over the same trainable set in the same order, after asserting the sets are equal."""
    names = assert_same_trainable(ours, ref, head, to_peft)
    ours_params, ref_params = dict(ours.named_parameters()), dict(ref.named_parameters())
    opt_ours = torch.optim.AdamW([ours_params[n] for n in names], lr=LR)
    opt_ref = torch.optim.AdamW([ref_params[to_peft(n, head)] for n in names], lr=LR)
    return opt_ours, opt_ref


def ce_loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    """Cross-entropy of the batch ``ids(step)`` against LABELS."""
    return torch.nn.functional.cross_entropy(model(input_ids=ids(step)).logits, LABELS)


def train_steps(
    runs: Iterable[tuple],
    n: int = STEPS,
    loss_fn: Callable[[torch.nn.Module, int], torch.Tensor] = ce_loss,
) -> list[list[torch.Tensor]]:
    """``n`` identical steps (same batches, same dropout masks) for each ``(model, optimizer[, after_step])``;
    ``after_step(step)`` runs after that model's optimizer step. Returns each step's losses, one per run."""
    runs, losses = list(runs), []
    for step in range(n):
        losses.append([])
        for model, opt, *after in runs:
            torch.manual_seed(10 + step)
            loss = loss_fn(model, step)
            losses[-1].append(loss.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
            for hook in after:
                hook(step)
    return losses


def assert_start_equal(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Equal logits in train mode (dropout on, the same masks)."""
    ours.train(), ref.train()
    close(logits(ours), logits(ref))


def assert_trained_equal(
    ours: torch.nn.Module, ref: torch.nn.Module, base: torch.nn.Module, max_gap: float | None = None
) -> torch.Tensor:
    """After training: equal eval logits (``close``, or max |diff| <= ``max_gap``) and ours moved away from
    ``base`` (not allclose at atol 1e-3). Returns ours' logits."""
    ours.eval(), ref.eval()
    with torch.no_grad():
        after, want = logits(ours), logits(ref)
        if max_gap is None:
            close(after, want)
        else:
            gap = (after - want).abs().max().item()
            print(f"max |logit diff| after training {gap:.2e}")
            assert gap <= max_gap, gap
        assert not torch.allclose(after, base(input_ids=ids()).logits, atol=1e-3)  # training moved it
    return after


def assert_steps_equal_peft(
    ours: torch.nn.Module, ref: torch.nn.Module, head: list[str], base: torch.nn.Module, to_peft: NameMap = peft_name
) -> None:
    """Equal logits at the start (train mode) and after STEPS identical AdamW steps."""
    assert_start_equal(ours, ref)
    opt_ours, opt_ref = adamw_pair(ours, ref, head, to_peft)
    train_steps([(ours, opt_ours), (ref, opt_ref)])
    assert_trained_equal(ours, ref, base)


def assert_peft_loads(model: torch.nn.Module, head: list[str], base: torch.nn.Module, folder: Path) -> PeftModel:
    """``export_peft(model)`` -> ``PeftModel.from_pretrained`` on a copy of ``base``: equal logits."""
    export_peft(model, folder, {"head_modules": head})
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    close(eval_logits(loaded), eval_logits(model))
    return loaded


def assert_imports(folder: Path, head: list[str], base: torch.nn.Module, expected: torch.Tensor) -> torch.nn.Module:
    """``import_peft(folder)`` into a copy of ``base``: its logits equal ``expected``."""
    back = copy.deepcopy(base)
    import_peft(back, folder, head)
    close(eval_logits(back), expected)
    return back


def assert_peft_round_trip(
    ours: torch.nn.Module, ref: PeftModel, head: list[str], base: torch.nn.Module, tmp_path: Path
) -> tuple[PeftModel, torch.nn.Module]:
    """Ours -> PEFT format -> PeftModel, and PEFT's save -> import_peft: equal logits both ways.
    Returns (PEFT's model loaded from our export, our model imported from PEFT's save)."""
    loaded = assert_peft_loads(ours, head, base, tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    return loaded, assert_imports(tmp_path / "ref", head, base, eval_logits(ref))


def assert_merge_unmerge(model: torch.nn.Module, moves: bool = False) -> dict[str, torch.nn.Module]:
    """Merged logits equal unmerged (and, with ``moves``, every merged W differs from W0); unmerge restores
    W0 (atol 1e-6, rtol 1e-5). Returns the adapted layers by name."""
    layers = dict(injection.lora_layers(model))
    w0 = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    with torch.no_grad():
        before = model.eval()(input_ids=ids()).logits
        injection.merge(model)
        if moves:
            assert all(not torch.equal(m.base_layer.weight, w0[n]) for n, m in layers.items())
        close(model(input_ids=ids()).logits, before)
        injection.unmerge(model)
    for n, m in layers.items():
        torch.testing.assert_close(m.base_layer.weight, w0[n], atol=1e-6, rtol=1e-5)
    return layers


def assert_factors_equal_peft(
    ours: torch.nn.Module, ref: PeftModel, base: torch.nn.Module, residual: bool = True
) -> dict[str, torch.nn.Module]:
    """Per layer, A and B equal PEFT's (with ``residual``, also the base weight, which moved away from
    ``base``'s W0); ours' logits equal ``base``'s at init. Returns the adapted layers by name."""
    refp = dict(ref.named_parameters())
    layers = dict(injection.lora_layers(ours))
    for n, m in layers.items():
        p = f"base_model.model.{n}"
        close(m.lora_A.weight, refp[f"{p}.lora_A.default.weight"])
        close(m.lora_B.weight, refp[f"{p}.lora_B.default.weight"])
        if residual:
            close(m.base_layer.weight, refp[f"{p}.base_layer.weight"])
            assert not torch.allclose(m.base_layer.weight, base.get_submodule(n).weight)  # W0 was replaced
    close(eval_logits(ours), eval_logits(base))
    return layers


def assert_one_line_error(overrides: list[str], message: str) -> None:
    """``validate`` of the config composed with ``overrides`` fails with one line starting with ``message``."""
    from lora_exp.config.checks import validate
    from lora_exp.errors import LoraExpError

    from .configs import make_cfg

    with pytest.raises(LoraExpError) as err:
        validate(make_cfg(overrides))
    assert str(err.value).startswith(message) and len(str(err.value).splitlines()) == 1


def one_line_error_test(cases: list[tuple[list[str], str]]) -> Callable[[list[str], str], None]:
    """A test over ``(overrides, message)`` cases, each checked by ``assert_one_line_error``; bind it to a
    ``test_*`` name in the test module."""

    @pytest.mark.parametrize(("overrides", "message"), cases)
    def test(overrides: list[str], message: str) -> None:
        assert_one_line_error(overrides, message)

    return test
