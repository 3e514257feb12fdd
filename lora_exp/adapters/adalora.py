"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"), equal to PEFT's
``AdaLoraConfig`` / ``AdaLoraModel.update_and_allocate``.

Each layer's update is in SVD form ``B diag(E) A * alpha / (r0 + 1e-5)`` (``lora_A``: r x in, ``lora_E``: r x 1
starting at 0, ``lora_B``: out x r, A and B ~ N(0, 0.02); ``r0`` the initial rank). After every optimizer step
the importance of each triplet ``(A_i, E_i, B_:,i)`` is scored (|w * grad| smoothed by EMAs with beta1, times
its uncertainty with beta2) and, on a cubic schedule from ``r0 x layers`` down to ``target_r x layers``
(``tinit`` steps at full budget, ``tfinal`` steps at the final one, every ``delta_t`` steps), the least
important triplets have their E set to 0: ranks move to the layers that matter. The loss gets
``orth_reg_weight x mean ||P P^T - I||_F`` over every A and B (orthogonality of the singular vectors); here
only in training (PEFT also adds it to an evaluation loss). Masks and EMAs live in buffers: a checkpoint keeps
them, so a resumed run continues the same allocation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_exp.adapters.layer import LoRALinear
from lora_exp.errors import LoraExpError

E_NAME = "lora_E"
STATE_PREFIX = "adalora_"  # training-only buffers (EMAs): kept by checkpoints, left out of saved adapters
TRAINING_BUFFERS = tuple(f"{STATE_PREFIX}{kind}_{part}" for kind in ("ipt", "unc") for part in "AEB")


class AdaLoraLinear(LoRALinear):
    """A frozen ``nn.Linear`` plus PEFT's ``SVDLinear`` update (``lora.variant=adalora``)."""

    variant = "adalora"
    rank_bounded = False  # PEFT's SVDLinear takes any init_r: the allocator prunes it

    def __init__(self, base: nn.Linear | Conv1D, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__(base, r, alpha, dropout, rslora)
        w = self.lora_A.weight
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=w.device, dtype=w.dtype))
        self.scaling = alpha if alpha > 0 else float(r)  # PEFT: alpha itself, divided by ranknum in forward
        self.register_buffer("ranknum", torch.tensor([float(r)], device=w.device), persistent=False)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=w.device), persistent=False)
        for part, t in (("A", self.lora_A.weight), ("E", self.lora_E), ("B", self.lora_B.weight)):
            for kind in ("ipt", "unc"):
                self.register_buffer(f"{STATE_PREFIX}{kind}_{part}", torch.zeros_like(t), persistent=False)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's: E = 0 (the update starts at zero), A and B ~ N(0, 0.02)."""
        if not hasattr(self, "lora_E"):  # LoRALinear.__init__ calls this before E exists
            return
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B.weight, mean=0.0, std=0.02)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """A, E and B."""
        return [self.lora_A.weight, self.lora_E, self.lora_B.weight]

    def delta_weight(self) -> torch.Tensor:
        """``B (A * E) * alpha / (r0 + 1e-5)`` (``out x in``) in fp32."""
        a, e, b = self.lora_A.weight.float(), self.lora_E.float(), self.lora_B.weight.float()
        return b @ (a * e) * self.scaling / (self.ranknum.float() + 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a, e, b = self.lora_A.weight, self.lora_E, self.lora_B.weight
        x = x.to(a.dtype)
        return result + (self.lora_dropout(x) @ (a * e).T @ b.T) * self.scaling / (self.ranknum + 1e-5)

    def rank(self) -> int:
        """Triplets still in use (not masked by the allocator)."""
        return int(self.rank_mask.sum())

    def extra_repr(self) -> str:
        return f"r={self.rank()}/{self.r}, alpha={self.alpha}, merged={self.merged}"


def orthogonality(layers: list[AdaLoraLinear]) -> torch.Tensor:
    """PEFT's regulariser: the mean over every A and B of ``||A A^T - I||_F`` / ``||B^T B - I||_F``."""
    total, n = 0.0, 0
    for m in layers:
        for p, cov in ((m.lora_A.weight, m.lora_A.weight @ m.lora_A.weight.T), (m.lora_B.weight, None)):
            cov = cov if cov is not None else p.T @ p
            total = total + torch.norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype), p="fro")
            n += 1
    return total / n


def add_orthogonality(model: nn.Module, weight: float) -> Any:
    """A forward hook adding ``weight x orthogonality`` to the model's loss in training; returns its handle."""
    layers = [m for m in model.modules() if isinstance(m, AdaLoraLinear)]

    def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        if module.training and weight > 0 and getattr(output, "loss", None) is not None:
            output["loss"] = output.loss + weight * orthogonality(layers)
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


class RankAllocator:
    """PEFT's ``RankAllocator``: importance EMAs, the cubic budget schedule and the masking, over ``layers``."""

    def __init__(
        self,
        layers: dict[str, AdaLoraLinear],
        target_r: int,
        total_step: int,
        tinit: int = 0,
        tfinal: int = 0,
        delta_t: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
    ):
        self.layers, self.total_step = layers, total_step
        self.tinit, self.tfinal, self.delta_t, self.beta1, self.beta2 = tinit, tfinal, delta_t, beta1, beta2
        if self.tinit >= total_step - self.tfinal:
            raise LoraExpError(
                f"lora.adalora: tinit={self.tinit} + tfinal={self.tfinal} leave no budgeting phase in {total_step} "
                "steps; lower them or train longer"
            )
        self.init_bgt = sum(m.r for m in layers.values())
        self.target_bgt = target_r * len(layers)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """Full budget until ``tinit``, the target after ``total - tfinal``, a cubic decrease in between."""
        if step <= self.tinit:
            return self.init_bgt, False
        if step > self.total_step - self.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        return int((self.init_bgt - self.target_bgt) * (mul**3) + self.target_bgt), step % self.delta_t == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        """Sensitivity |w * grad| smoothed (beta1) and its uncertainty (beta2), per element of A, E and B."""
        for m in self.layers.values():
            for part, p in (("A", m.lora_A.weight), ("E", m.lora_E), ("B", m.lora_B.weight)):
                if p.grad is None:
                    continue
                ipt = (p * p.grad).abs().detach()
                avg, unc = getattr(m, f"{STATE_PREFIX}ipt_{part}"), getattr(m, f"{STATE_PREFIX}unc_{part}")
                avg.copy_(self.beta1 * avg + (1 - self.beta1) * ipt)
                unc.copy_(self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs())

    def _scores(self, m: AdaLoraLinear) -> torch.Tensor:
        """Each triplet's importance: E's score + the mean scores of its A row and B column."""
        s = {p: getattr(m, f"{STATE_PREFIX}ipt_{p}") * getattr(m, f"{STATE_PREFIX}unc_{p}") for p in "AEB"}
        a = torch.mean(s["A"], dim=1, keepdim=True)
        b = torch.mean(s["B"], dim=0, keepdim=False).view(-1, 1)
        return s["E"].view(-1) + torch.cat([a, b], dim=1).sum(dim=1)

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Zero E of the ``init budget - budget`` least important triplets over all layers (ties included)."""
        scores = {n: self._scores(m) for n, m in self.layers.items()}
        k = self.init_bgt - budget
        if k <= 0:  # nothing to prune (PEFT's kthvalue would fail on k = 0)
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
        for n, m in self.layers.items():
            keep = ~(scores[n] <= threshold)
            m.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            m.rank_mask.copy_(keep)

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        """PEFT's ``update_and_allocate(global_step)``, after the optimizer step and before zero_grad."""
        final = self.total_step - self.tfinal
        if global_step < final:
            self.update_importance()
            budget, mask = self.budget_schedule(global_step)
            if mask:
                self.mask_to_budget(budget)
        elif global_step == final:
            self.mask_to_budget(self.budget_schedule(global_step)[0])
            for m in self.layers.values():  # PEFT's reset_ipt: the EMAs are not used any more
                for name, buf in m.named_buffers(recurse=False):
                    if name.startswith(STATE_PREFIX):
                        buf.zero_()
        else:
            for m in self.layers.values():
                m.lora_E.masked_fill_(~m.rank_mask.view(-1, 1), 0.0)


def peft_config(layers: dict[str, AdaLoraLinear], meta: dict[str, Any]) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` fields of an AdaLoRA adapter; ``rank_pattern`` holds each pruned layer's
    mask (PEFT resizes the layer to it when loading). The schedule fields only need to be valid for loading."""
    first = next(iter(layers.values()))
    masks = {f"{n}.{E_NAME}": m.rank_mask.tolist() for n, m in layers.items() if not bool(m.rank_mask.all())}
    return {
        "peft_type": "ADALORA",
        "r": first.r,
        "init_r": first.r,
        "target_r": int(meta.get("adalora_target_r", first.r)),
        "lora_alpha": first.alpha,
        "lora_dropout": float(meta.get("dropout", 0.0)),
        "tinit": 0,
        "tfinal": 0,
        "deltaT": 1,
        "total_step": 1,
        "orth_reg_weight": 0.0,
        "rank_pattern": masks or None,
    }


def peft_tensors(layers: dict[str, AdaLoraLinear], prefix: str) -> dict[str, torch.Tensor]:
    """A, E, B under PEFT's keys (``<prefix><path>.lora_A`` ...), pruned triplets removed (PEFT's save)."""
    out = {}
    for name, m in layers.items():
        keep = m.rank_mask.cpu()
        a, e, b = (t.detach().cpu() for t in (m.lora_A.weight, m.lora_E, m.lora_B.weight))
        out[f"{prefix}{name}.lora_A"] = a[keep].contiguous()
        out[f"{prefix}{name}.{E_NAME}"] = e[keep].contiguous()
        out[f"{prefix}{name}.lora_B"] = b[:, keep].contiguous()
    return out


@torch.no_grad()
def load_peft(layers: dict[str, AdaLoraLinear], tensors: dict[str, torch.Tensor], rank_pattern: dict | None) -> None:
    """PEFT's AdaLoRA tensors (pruned triplets removed per ``rank_pattern``) into full-rank layers: kept triplets
    in place, pruned ones with E = 0 and the mask off."""
    pattern = {
        k.removesuffix(f".{E_NAME}").removesuffix(f".{E_NAME}.default"): v for k, v in (rank_pattern or {}).items()
    }
    for name, m in layers.items():
        keep = torch.tensor(pattern.get(name, [True] * m.r), dtype=torch.bool)
        if keep.numel() != m.r:
            raise LoraExpError(f"AdaLoRA adapter: {name} has a mask of {keep.numel()} triplets, the layer {m.r}")
        for t in (m.lora_A.weight, m.lora_E, m.lora_B.weight):
            t.zero_()
        m.lora_A.weight[keep.to(m.lora_A.weight.device)] = tensors.pop(f"{name}.lora_A").to(m.lora_A.weight)
        m.lora_E[keep.to(m.lora_E.device)] = tensors.pop(f"{name}.{E_NAME}").to(m.lora_E)
        m.lora_B.weight[:, keep.to(m.lora_B.weight.device)] = tensors.pop(f"{name}.lora_B").to(m.lora_B.weight)
        m.rank_mask.copy_(keep)
