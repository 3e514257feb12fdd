"""K adapters on one frozen base (issue 28): a packed model runs the base once over the concatenation of K jobs'
micro-batches and applies job k's adapter, head and dropout to its rows ``[k*B:(k+1)*B]`` only.

``packed_model(models)`` builds the packed model from the K jobs' own models, which share the frozen base's
weights (``share_base``): a copy of job 0's module tree whose parameters are job 0's tensors, where

- each LoRA layer becomes a ``PackedAdapter``: the base ``nn.Linear`` once over every row, then each job's own
  layer (any variant: LoRA, rsLoRA, DoRA, LoRA-FA, VeRA, AdaLoRA) on its rows, handed the base's output for them;
- each head module becomes ``PackedRows`` (job k's head on job k's rows);
- each ``nn.Dropout`` becomes ``PackedDropout``, and the attention function (sdpa or eager, attention-prob dropout
  inside) runs per job (``packed_attention``).

Every random draw (dropout) is made for one job at a time, on that job's tensor shape and with that job's RNG
state swapped in (``Pack.rng``), so job k draws exactly the masks its solo run draws. A job's micro-batch is padded
to its own length ``L_k`` as in its solo run; the pack pads them to the longest ``L``; each per-job piece works on
its first ``L_k`` positions (the pad positions after them never reach a real position: they are masked keys).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_exp.adapters.layer import LoRALinear
from lora_exp.adapters.targets import is_under

PACKABLE_VARIANTS = ("lora", "dora", "lora_fa", "vera", "adalora")


@dataclass
class Pack:
    """One packed micro-step's layout: rows and real length per job, the pack's length, each job's RNG state."""

    rows: list[int]
    lengths: list[int]
    length: int
    rng: list[torch.Tensor]  # CPU RNG state per job (the global generator's, swapped in for that job's draws)
    cuda_rng: list[torch.Tensor] = field(default_factory=list)
    slots: list[int] | None = None  # each job's place in the packed model's jobs (None: the k-th is the k-th)

    def slot(self, k: int) -> int:
        """Which of the packed model's jobs the pack's ``k``-th job is (a step may leave jobs out: a resumed job
        still behind the others trains alone until it has caught up)."""
        return k if self.slots is None else self.slots[k]

    def spans(self) -> Iterator[tuple[int, int, int]]:
        """``(k, first row, end row)`` per job."""
        start = 0
        for k, n in enumerate(self.rows):
            yield k, start, start + n
            start += n


_current: Pack | None = None


@contextlib.contextmanager
def active(pack: Pack) -> Iterator[Pack]:
    """Make ``pack`` the layout the packed modules read during one forward and backward."""
    global _current
    before, _current = _current, pack
    try:
        yield pack
    finally:
        _current = before


def current() -> Pack:
    """The active layout (a packed model runs only inside ``active``)."""
    if _current is None:
        raise RuntimeError("a packed model ran outside lora_exp.adapters.packed.active()")
    return _current


@contextlib.contextmanager
def job_rng(pack: Pack, k: int) -> Iterator[None]:
    """The global RNG is job ``k``'s for the duration (its state saved back afterwards)."""
    cuda = bool(pack.cuda_rng)
    outer = torch.get_rng_state()
    outer_cuda = torch.cuda.get_rng_state() if cuda else None
    torch.set_rng_state(pack.rng[k])
    if cuda:
        torch.cuda.set_rng_state(pack.cuda_rng[k])
    try:
        yield
    finally:
        pack.rng[k] = torch.get_rng_state()
        torch.set_rng_state(outer)
        if cuda:
            pack.cuda_rng[k] = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(outer_cuda)


def per_job(
    x: torch.Tensor, fn: Callable[[int, torch.Tensor], torch.Tensor], seq_dims: Sequence[int] = ()
) -> torch.Tensor:
    """Apply ``fn(k, piece)`` to each job's rows of ``x``, cut to that job's length along ``seq_dims``, under that
    job's RNG; the positions cut off come back as they were (``keep_tail``) and the rows are concatenated."""
    pack = current()
    out = []
    for k, a, b in pack.spans():
        piece = x[a:b]
        n = pack.lengths[k]
        dims = [d for d in seq_dims if piece.shape[d] == pack.length and n < pack.length]
        cut = piece
        for d in dims:
            cut = cut.narrow(d, 0, n)
        with job_rng(pack, k):
            y = fn(k, cut.contiguous() if dims else piece)
        out.append(keep_tail(y, piece, dims, n) if dims else y)
    return torch.cat(out)


def keep_tail(y: torch.Tensor, piece: torch.Tensor, seq_dims: Sequence[int], n: int) -> torch.Tensor:
    """``y`` (cut to ``n`` along ``seq_dims``) brought back to ``piece``'s shape: a hidden state's pad positions
    from ``piece`` (they are masked keys, never read by a real position), attention probabilities with zeros."""
    if y.shape == piece.shape:
        return y
    if len(seq_dims) == 1:
        d = seq_dims[0]
        return torch.cat([y, piece.narrow(d, n, piece.shape[d] - n).to(y.dtype)], dim=d)
    pads: list[int] = []
    for d in reversed(range(y.dim())):
        pads += [0, piece.shape[d] - y.shape[d]]
    return F.pad(y, pads)


def seq_dims_of(x: torch.Tensor) -> tuple[int, ...]:
    """The sequence dims of a text encoder's tensors: (rows, seq, features) -> 1; (rows, heads, seq, seq) -> 2, 3."""
    return {3: (1,), 4: (2, 3)}.get(x.dim(), ())


class PackedDropout(nn.Module):
    """``nn.Dropout`` with each job's mask drawn from its own RNG on its own shape."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return per_job(x, lambda _k, piece: F.dropout(piece, self.p, True), seq_dims_of(x))


class PackedRows(nn.Module):
    """Job k's module (a head part) on job k's rows."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__()
        self.jobs = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        pack = current()
        return per_job(x, lambda k, piece: self.jobs[pack.slot(k)](piece, *args, **kwargs), seq_dims_of(x))


class _Given(nn.Module):
    """Stands in for a LoRA layer's base: returns the output the shared base computed for these rows, and shows
    the real base's ``weight`` / ``bias`` (DoRA reads them)."""

    def __init__(self, base: nn.Module, out: torch.Tensor):
        super().__init__()
        self.__dict__["real"], self.__dict__["out"] = base, out

    @property
    def weight(self) -> torch.Tensor:
        return self.real.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.real.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


class PackedAdapter(nn.Module):
    """One target module of K jobs: the frozen base once over all rows, then each job's own LoRA layer (its
    variant's forward, its dropout RNG) on its rows with the base's output for those rows handed in."""

    def __init__(self, layers: Sequence[LoRALinear]):
        super().__init__()
        self.jobs = nn.ModuleList(layers)
        self.base_layer = layers[0].base_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self.base_layer(x)
        pack = current()
        outs = []
        dims = seq_dims_of(x)
        for k, a, b in pack.spans():
            layer, n = self.jobs[pack.slot(k)], pack.lengths[k]
            xs, ys = x[a:b], base_out[a:b]
            if dims and xs.shape[1] == pack.length and n < pack.length:
                xs, ys_cut = xs[:, :n].contiguous(), ys[:, :n]
            else:
                ys_cut = ys
            real = layer.base_layer
            layer._modules["base_layer"] = _Given(real, ys_cut)
            try:
                with job_rng(pack, k):
                    y = layer(xs)
            finally:
                layer._modules["base_layer"] = real
            outs.append(keep_tail(y, ys, dims[:1], n))
        return torch.cat(outs)


def packed_attention(inner: Callable) -> Callable:
    """An attention function (HF's interface) that runs ``inner`` per job on its own rows and length, so the
    attention-probability dropout of job k draws from its RNG on its solo shape."""

    def attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kw: Any):
        pack = current()
        outs = []
        for k, a, b in pack.spans():
            n = pack.lengths[k]
            q, kk, v = (t[a:b, :, :n] for t in (query, key, value))
            m = None if mask is None else mask[a:b] if mask.shape[0] > 1 else mask
            if m is not None:
                m = m[..., :n] if m.shape[-1] == pack.length else m
                m = m[..., :n, :] if m.dim() >= 2 and m.shape[-2] == pack.length else m
                if bool((m if m.dtype == torch.bool else m == 0).all()):
                    m = None  # solo: a batch without padding has no mask
            with job_rng(pack, k):
                out, _ = inner(module, q, kk, v, m, **kw)
            outs.append(F.pad(out, (0, 0, 0, 0, 0, pack.length - n)))  # (rows, seq, heads, dim)
        return torch.cat(outs), None

    return attend


@contextlib.contextmanager
def attention_per_job(model: nn.Module) -> Iterator[None]:
    """While a packed model runs: its attention implementation (sdpa, eager) goes through ``packed_attention``."""
    from transformers.modeling_utils import AttentionInterface

    name = getattr(model.config, "_attn_implementation", None) or "eager"
    mapping = AttentionInterface._global_mapping
    had, before = name in mapping, mapping.get(name)

    def inner(module: nn.Module, *args: Any, **kw: Any) -> Any:
        fn = before or sys.modules[type(module).__module__].eager_attention_forward
        return fn(module, *args, **kw)

    mapping[name] = packed_attention(inner)  # ALL_ATTENTION_FUNCTIONS reads the class's global mapping
    try:
        yield
    finally:
        if had:
            mapping[name] = before
        else:
            mapping.pop(name, None)


def share_base(models: Sequence[nn.Module]) -> None:
    """Jobs 1..K-1 use job 0's frozen tensors (one copy of the base in memory); trainable tensors stay their own."""
    first = dict(models[0].named_parameters())
    for model in models[1:]:
        for name, p in model.named_parameters():
            if not p.requires_grad and name in first and first[name].shape == p.shape:
                p.data = first[name].data


def packed_model(models: Sequence[nn.Module], head: Sequence[str]) -> nn.Module:
    """The packed model of K jobs' models (see the module's docstring); the jobs' own modules are shared, not
    copied, so training it trains them."""
    memo: dict[int, Any] = {id(t): t for t in models[0].parameters()}
    memo.update({id(t): t for t in models[0].buffers()})
    packed = copy.deepcopy(models[0], memo)
    own = [dict(m.named_modules()) for m in models]
    done: list[str] = []
    for name, module in list(packed.named_modules()):
        if not name or is_under(name, done):  # inside a module already replaced
            continue
        if isinstance(module, LoRALinear):
            swap(packed, name, PackedAdapter([o[name] for o in own]))
            done.append(name)
        elif name in head:
            swap(packed, name, PackedRows([o[name] for o in own]))
            done.append(name)
        elif isinstance(module, nn.Dropout):
            swap(packed, name, PackedDropout(module.p))
    return packed


def swap(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at module path ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
