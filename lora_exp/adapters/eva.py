"""EVA (Paischer et al. 2024, "One Initialization to Rule them All: Explained Variance Adaptation"), equal to
PEFT's ``initialize_lora_eva_weights`` (``init_lora_weights="eva"``, ``EvaConfig``).

On a few batches of the training data, each adapted layer's inputs (the non-padding tokens) feed an
incremental PCA of ``round(r * rho)`` components; layers that see the same input (q, k, v) share one. Batches
are drawn until every component a layer needs has converged (cosine similarity with the previous batch's >=
``tau``). The rank budget (the sum of the layers' r) is then redistributed by explained variance ratio: the
largest ratios across all layers win. A = the top components (B = 0, so the model is unchanged at init);
a layer's alpha scales with its new rank (``adjust_scaling``), a layer left with rank 0 loses its adapter.
Differences from PEFT: the batches stop at ``max_batches`` with an error rather than cycling forever; token
selection is the attention mask only (a classification batch has no per-token labels); no whitening.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from itertools import cycle

import torch
from torch import nn
from tqdm.auto import tqdm

from lora_exp.adapters.ipca import IncrementalPCA
from lora_exp.adapters.layer import LoRALinear
from lora_exp.adapters.targets import make_layer
from lora_exp.errors import LoraExpError


@dataclass
class EvaResult:
    """What EVA computed: A per layer (``rank x in``; rank 0 drops the layer) and what it cost."""

    components: dict[str, torch.Tensor]
    batches: int = 0  # forward passes (the first batch twice: once to find layers with equal inputs)
    tokens: int = 0  # non-padding tokens that reached the PCA
    ranks: dict[str, int] = field(default_factory=dict)


def _tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The layer input at non-padding positions, one row per token (PEFT's ``layer_input[mask.nonzero()]``)."""
    return x[mask.nonzero().T.unbind()]


class _SvdHook:
    """A forward hook folding a layer's input tokens into its incremental PCA, tracking convergence."""

    def __init__(self, n_components: int, tau: float):
        self.pca, self.tau = IncrementalPCA(n_components), tau
        self.converged = torch.zeros((n_components,), dtype=torch.bool)
        self.mask: torch.Tensor | None = None
        self.handle = None

    @torch.no_grad()
    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        states = _tokens(inputs[0], self.mask)
        if states.size(0) < self.pca.n_components:  # PEFT skips such a batch for this layer
            return
        previous = None if self.pca.components_ is None else self.pca.components_.clone()
        self.pca.partial_fit(states.to(torch.float32))
        if previous is not None:
            sim = torch.nn.functional.cosine_similarity(self.pca.components_, previous)
            self.converged = sim >= self.tau


def _equal_input_groups(model: nn.Module, layers: dict[str, LoRALinear], forward: Callable, batch: dict) -> list:
    """Groups (in model order) of layers that receive the same input on ``batch`` (PEFT's hash pass)."""
    digests: dict[str, str] = {}

    def hook(name: str) -> Callable:
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            tokens = _tokens(inputs[0], batch["attention_mask"]).detach().float().cpu().contiguous()  # bf16: exact
            digests[name] = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        forward(batch)
    finally:
        for h in handles:
            h.remove()
    by_digest: dict[str, list[str]] = {}
    for name, digest in digests.items():
        by_digest.setdefault(digest, []).append(name)
    return [names for names in by_digest.values() if len(names) > 1]


def rank_distribution(
    hooks: dict[str, _SvdHook], layer_hook: dict[str, str], equal: dict[str, str], budget: int, max_comp: dict
) -> dict[str, int]:
    """PEFT's ``_get_rank_distribution``: the ``budget`` largest explained-variance ratios over all layers
    (a layer sharing another's input counts that one's ratios), ties and order as PEFT sorts them."""
    ratios = {k: h.pca.explained_variance_ratio_[: max_comp[k]] for k, h in hooks.items()}
    keys, values = zip(*[(k, c) for k, name in layer_hook.items() for c in ratios[name]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in order[:budget]])
    counts = {k: counts.get(k, 0) for k in layer_hook}
    for k, k_hook in equal.items():  # the layer holding the hook gets the larger rank
        if counts[k_hook] < counts[k]:
            counts[k_hook], counts[k] = counts[k], counts[k_hook]
    return counts


def eva_components(
    model: nn.Module,
    layers: dict[str, LoRALinear],
    batches: Iterable[dict],
    rho: float = 2.0,
    tau: float = 0.99,
    max_batches: int = 1000,
    amp: Callable[[], AbstractContextManager] = nullcontext,
) -> EvaResult:
    """EVA's A for each of ``layers`` (``rank x in`` components; rank 0: no adapter) from ``batches`` (dicts
    with ``input_ids`` / ``attention_mask``; ``labels`` are ignored), as PEFT's ``get_eva_state_dict``."""
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    result = EvaResult(components={})

    def forward(batch: dict) -> None:
        result.batches += 1
        result.tokens += int(batch["attention_mask"].sum())
        with torch.no_grad(), amp():
            model(**{k: v for k, v in batch.items() if k != "labels"})

    def on_device(batch: dict) -> dict:
        batch = {k: v.to(device) for k, v in batch.items()}
        batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
        return batch

    groups = _equal_input_groups(model, layers, forward, on_device(next(iter(batches))))
    source = cycle(batches)  # a new pass over the batches, as PEFT's
    max_comp = {n: round(m.r * rho) for n, m in layers.items()}
    for names in groups:  # layers with equal inputs share one PCA: as many components as the largest needs
        for n in names:
            max_comp[n] = max(max_comp[k] for k in names)
    equal = {n: names[0] for names in groups for n in names[1:]}
    hooks = {n: _SvdHook(max_comp[n], tau) for n in layers if n not in equal}
    layer_hook = {**{n: n for n in hooks}, **equal}
    budget = sum(m.r for m in layers.values())

    def distribute() -> dict[str, int]:
        return rank_distribution(hooks, layer_hook, equal, budget, max_comp)

    try:
        ranks = _fit(model, layers, hooks, source, forward, on_device, dict(max_comp), distribute, max_batches)
    finally:
        for h in hooks.values():
            if h.handle is not None:
                h.handle.remove()
        model.train(training)
    for name, rank in ranks.items():
        hook = hooks[layer_hook[name]]
        if not torch.all(hook.converged[:rank]):
            raise LoraExpError(f"EVA: layer {name} got rank {rank} but its components have not converged")
        result.components[name] = hook.pca.components_[:rank].clone()
    result.ranks = dict(ranks)
    return result


def _fit(
    model: nn.Module,
    layers: dict[str, LoRALinear],
    hooks: dict[str, _SvdHook],
    source: Iterable[dict],
    forward: Callable,
    on_device: Callable,
    ranks: dict[str, int],
    distribute: Callable[[], dict[str, int]],
    max_batches: int,
) -> dict[str, int]:
    """PEFT's loop: a layer's hook comes off once the components its current rank needs have converged (and
    back on if a redistribution asks for more); the ranks are redistributed after every batch."""
    for name, hook in hooks.items():
        hook.handle = layers[name].register_forward_hook(hook)
    done = dict.fromkeys(hooks, False)
    bar = tqdm(desc="EVA init", unit="batch", total=max_batches, leave=False)
    try:
        for step, raw in enumerate(source):
            batch = on_device(raw)
            for name, hook in hooks.items():
                converged = bool(torch.all(hook.converged[: ranks[name]]))
                if not done[name] and converged:
                    hook.handle.remove()
                    hook.handle, done[name] = None, True
                    continue
                if done[name] and not converged:
                    hook.handle, done[name] = layers[name].register_forward_hook(hook), False
                hook.mask = batch["attention_mask"]
            bar.set_postfix_str(f"{sum(done.values())}/{len(done)} converged")
            if all(done.values()):
                return ranks
            if step >= max_batches:
                raise LoraExpError(
                    f"lora.eva.max_batches={max_batches}: EVA's components did not converge (tau="
                    f"{next(iter(hooks.values())).tau}) within that many batches; raise it or lower lora.eva.tau"
                )
            forward(batch)
            bar.update()
            if all(h.pca.components_ is not None for h in hooks.values()):
                ranks = distribute()
    finally:
        bar.close()
    raise LoraExpError("EVA: the training loader yielded no batch")


def eva_alphas(layers: dict[str, LoRALinear], ranks: dict[str, int], adjust_scaling: bool = True) -> dict[str, float]:
    """PEFT's alpha after the redistribution: ``alpha * new r / r`` where the rank changed (``adjust_scaling``),
    so every layer keeps its scaling ``alpha / r``."""
    return {
        n: m.alpha * ranks[n] / m.r if adjust_scaling and ranks[n] not in (0, m.r) else m.alpha
        for n, m in layers.items()
    }


@torch.no_grad()
def apply_init(
    model: nn.Module,
    layers: dict[str, LoRALinear],
    a: dict[str, torch.Tensor],
    alphas: dict[str, float],
    b: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """Give each layer the rank of its new A (``r x in``; 0 rows: the layer gets its plain base layer back, as
    PEFT's ``_load_eva_state_dict``), its alpha, A and B (zeros unless given); returns the layers still adapted."""
    kept = []
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        rank = a[name].shape[0]
        if rank == 0:
            setattr(parent, child, layer.base_layer)
            continue
        if rank != layer.r or alphas[name] != layer.alpha:
            p = layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0
            fresh = make_layer(layer.base_layer, rank, alphas[name], p, layer.rslora, layer.variant, layer.init)
            fresh.lora_A.to(layer.lora_A.weight.dtype), fresh.lora_B.to(layer.lora_B.weight.dtype)  # fp32 over bf16 W0
            fresh.requires_grad_(False)
            for t in fresh.trainable_parameters():
                t.requires_grad_(True)
            setattr(parent, child, fresh)
            layer = fresh
        layer.lora_A.weight.copy_(a[name])
        if b is None:
            nn.init.zeros_(layer.lora_B.weight)
        else:
            layer.lora_B.weight.copy_(b[name])
        kept.append(name)
    return kept
