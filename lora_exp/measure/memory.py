"""Training memory, counted and measured on any device: parameters, gradients, optimizer state, activations
saved for backward, autocast's weight copies, a predicted step peak, and (on CUDA) the measured one.

Parameters, gradients and optimizer state are counted from the tensors. Activations are measured on one
sampled training step by :class:`SavedTensorMeter` (``torch.autograd.graph.saved_tensors_hooks``), so the
split works on CPU too; on CUDA :class:`StepMemoryProbe` measures the real peak of the same kind of step,
and ``measured / predicted`` says how far the model is from the allocator. :class:`SampledStep` does all of
it around one micro-step of the training loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from lora_exp.errors import LoraExpError
from lora_exp.measure import timing
from lora_exp.quantize import quant_summary, watch_kept_inputs


class _CastRecorder(TorchDispatchMode):
    """Records the storages produced by casting a parameter to another floating dtype on its own device:
    exactly what autocast does to a weight before a low-precision matmul (``aten._to_copy``)."""

    def __init__(self, param_ptrs: set[int]):
        super().__init__()
        self.param_ptrs = param_ptrs
        self.casts: set[StorageWeakRef] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor):
            src = args[0]
            if (
                src.untyped_storage().data_ptr() in self.param_ptrs
                and out.dtype != src.dtype
                and out.device == src.device
                and out.dtype.is_floating_point
            ):
                self.casts.add(StorageWeakRef(out.untyped_storage()))
        return out


class SavedTensorMeter:
    """Bytes saved for backward by the autograd graph built inside the ``with`` block.

    Use it around the forward (and loss) of one sampled training step::

        with SavedTensorMeter(model) as meter, amp():
            loss = model(**batch).loss
        loss.backward()
        meter.activations_bytes, meter.autocast_copies_bytes

    What is counted: every tensor the pack hook sees, by its *storage* (a storage viewed by several saved
    tensors, e.g. a ReLU output saved by the ReLU and by the next Linear, counts once, and in full: a view
    keeps its whole storage alive). Storages of the model's parameters and buffers (and of ``exclude``) are
    not counted: they exist anyway. Only storages still alive when the block exits are counted (a graph
    branch dropped during forward frees its saved tensors).

    Autocast copies: under bf16/fp16 autocast a Linear casts its fp32 weight and saves the cast for the
    input gradient. These copies are reported as ``autocast_copies_bytes``, not as activations. They are
    identified by recording every ``aten._to_copy`` whose input storage is a parameter's and whose output
    is another floating dtype on the same device (a ``TorchDispatchMode`` active inside the block), then
    matching the saved storages against them. This is exact, where matching by shape or by content could
    confuse an activation with a weight of equal size (e.g. an all-zero LoRA B and an all-zero mask).
    Storages are identified by weak references, which keep their addresses from being reused while the
    meter runs but hold no memory.

    Results are unchanged: the pack hook returns the tensor itself. Build the meter right before use (it
    reads the parameters' storages then: after ``.to(device)`` and any dtype change). Limits: a
    ``torch.compile``d model may run eagerly under the dispatch mode, so the sampled step can measure the
    eager graph; tensors saved inside a gradient-checkpointed block are packed by the checkpoint's own hooks
    (nothing is kept), while the block's inputs, which checkpoint saves, are counted.

    An int8 base (bitsandbytes ``Linear8bitLt``) keeps each layer's input for backward as an attribute of its
    autograd node, which the pack hook never sees: with ``model`` given, those inputs are counted too (by
    storage, like the rest; ``quantize.watch_kept_inputs``), with gradient checkpointing as well.
    """

    def __init__(self, model: nn.Module | None = None, exclude: Iterable[torch.Tensor] = ()):
        tensors = [*exclude]
        if model is not None:
            tensors += [*model.parameters(), *model.buffers()]
        self._excluded = {t.untyped_storage().data_ptr() for t in tensors if t.numel()}
        self._param_ptrs = set(self._excluded)
        self._saved: dict[StorageWeakRef, int] = {}
        self._storageless = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._casts = _CastRecorder(self._param_ptrs)
        self._alive: dict[StorageWeakRef, int] = {}
        self._model, self._kept_hooks = model, []
        self.activations_bytes = 0
        self.autocast_copies_bytes = 0
        self.saved_storages = 0
        self.backward_live_bytes: int | None = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no plain storage (sparse, nested): count the tensor
            self._storageless += t.numel() * t.element_size()
            return t
        if storage.data_ptr() not in self._excluded:
            self._saved.setdefault(StorageWeakRef(storage), storage.nbytes())
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        self._casts.__enter__()
        self._saved.clear()
        self._storageless = 0
        if self._model is not None:
            self._kept_hooks = watch_kept_inputs(self._model, self._pack)
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._kept_hooks:
            h.remove()
        self._casts.__exit__(*exc)
        self._hooks.__exit__(*exc)
        alive = {ref: n for ref, n in self._saved.items() if not ref.expired()}
        self.autocast_copies_bytes = sum(n for ref, n in alive.items() if ref in self._casts.casts)
        self.activations_bytes = sum(alive.values()) - self.autocast_copies_bytes + self._storageless
        self.saved_storages = len(alive)
        self._alive = alive  # weak references: for watch_backward
        self._saved.clear()
        self._casts.casts.clear()

    @contextlib.contextmanager
    def watch_backward(self, model: nn.Module) -> Iterator[SavedTensorMeter]:
        """Around the backward of the metered forward: the most bytes of saved tensors still alive plus
        gradients existing, sampled each time a trainable parameter's gradient is accumulated, goes to
        ``backward_live_bytes``. It checks :func:`predicted_peak_bytes`'s claim that backward stays between
        its two ends (activations freed as gradients appear); transient activation gradients are not seen.
        """
        self.start_watch(model)
        try:
            yield self
        finally:
            self.stop_watch()

    def start_watch(self, model: nn.Module) -> None:
        """:meth:`watch_backward` in two calls: this one after the metered forward, ..."""
        params = [p for p in _unique(model.parameters()) if p.requires_grad]
        self.backward_live_bytes = 0

        def sample(_: torch.Tensor) -> None:
            saved = sum(n for ref, n in self._alive.items() if not ref.expired())
            grads = sum(_nbytes(p.grad) for p in params if p.grad is not None)
            self.backward_live_bytes = max(self.backward_live_bytes or 0, saved + grads)

        self._handles = [p.register_post_accumulate_grad_hook(sample) for p in params]

    def stop_watch(self) -> None:
        """... and this one after the backward."""
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []
        self._alive = {}


def _unique(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for p in params:
        ptr = p.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            out.append(p)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def optimizer_states_per_element(optimizer: torch.optim.Optimizer | None) -> int:
    """State tensors the optimizer keeps per trainable element: Adam/AdamW 2 (exp_avg, exp_avg_sq; 3 with
    amsgrad), SGD 1 with momentum else 0; an unknown optimizer is assumed Adam-like (2)."""
    if optimizer is None:
        return 2
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return 3 if group.get("amsgrad") else 2
    if isinstance(optimizer, torch.optim.SGD):
        return 1 if group.get("momentum", 0) else 0
    return 2


def static_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Parameters, gradients and optimizer state in bytes, from the tensors (deduplicated by storage).

    A quantised base (bitsandbytes) counts at its real size: the packed 4-bit / int8 weights are parameters, and
    their absmax, scales and code tables (``mem_quant_state_bytes``) are added to ``mem_params_bytes``;
    ``mem_dequant_buffer_bytes`` is the largest layer's transient dequantised weight (:func:`predicted_peak_bytes`).

    Gradients are one per trainable element in the parameter's dtype (trainable weights are fp32 master
    weights), whether or not they exist now (``set_to_none`` frees them between steps). Optimizer state is
    counted from ``optimizer.state`` once a step has filled it (scalar ``step`` tensors excluded), else
    predicted as :func:`optimizer_states_per_element` state tensors in each trainable parameter's dtype
    (Adam's ``zeros_like``), so it is known before the first step.
    """
    params = _unique(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    grads = sum(_nbytes(p) for p in trainable)
    state = [t for st in (optimizer.state.values() if optimizer else []) for t in st.values()]
    state = [t for t in state if torch.is_tensor(t) and t.dim() > 0]
    optim = sum(_nbytes(t) for t in _unique(state)) if state else optimizer_states_per_element(optimizer) * grads
    quant = quant_summary(model)  # a quantised base's absmax / scales are not parameters: counted in
    return {
        "mem_params_bytes": sum(_nbytes(p) for p in params) + quant["mem_quant_state_bytes"],
        "mem_grads_bytes": grads,
        "mem_optimizer_bytes": optim,
        **quant,
    }


def predicted_peak_bytes(
    params: int,
    grads: int,
    optimizer: int,
    activations: int,
    autocast_copies: int,
    grad_accum: int = 1,
    backward_live: int | None = None,
    dequant_buffer: int = 0,
) -> int:
    """The training step's peak, from its parts, by when each exists.

    A step (after the first, once the optimizer state exists) goes: gradients are None (``zero_grad(
    set_to_none=True)`` ended the last step) -> forward builds the saved activations and autocast copies
    -> backward frees them node by node while the gradients appear -> optimizer step -> gradients freed.
    Parameters and optimizer state live throughout. So the candidates are

    - end of forward: ``params + optimizer + activations + copies`` (no gradients yet);
    - end of backward: ``params + optimizer + grads`` (every saved tensor freed);

    and in between, with activations freed layer by layer as that layer's gradients appear, the live total
    moves between these two ends, so the peak is ``params + optimizer + max(activations + copies, grads)``
    (checked by :meth:`SavedTensorMeter.watch_backward` on a tiny BERT, batches where either end dominates;
    when that measurement is given as ``backward_live``, it replaces ``grads`` in the max).
    The sum ``activations + copies + grads`` would be an upper bound that never happens with
    ``set_to_none``: it double-charges full fine-tuning, whose gradients are as large as its parameters.
    With ``grad_accum > 1`` the gradients of the earlier micro-batches are alive during the next forward,
    so the peak is ``params + optimizer + grads + activations + copies``. The optimizer step's own peak,
    ``params + optimizer + grads`` (fused AdamW adds no parameter-sized buffers), is the backward end.

    Not modelled: transient tensors that are not saved (the largest op's output and workspace in forward,
    the activation gradients in backward), allocator rounding, and with gradient checkpointing the block
    recomputed during backward. ``measured / predicted`` on a GPU shows their size.

    A quantised base adds ``dequant_buffer`` on top: bitsandbytes saves the packed weight for backward and
    dequantises one layer at a time in forward and again in backward, so at either end one layer's full-size
    weight exists beside everything else (the largest layer's: ``mem_dequant_buffer_bytes``).
    """
    forward = activations + autocast_copies + (grads if grad_accum > 1 else 0)
    peak = params + optimizer + max(forward, grads if backward_live is None else backward_live)
    return peak + dequant_buffer


def breakdown(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meter: SavedTensorMeter,
    grad_accum: int = 1,
) -> dict[str, int | None]:
    """The per-run memory keys: ``mem_params_bytes``, ``mem_grads_bytes``, ``mem_optimizer_bytes``,
    ``mem_activations_bytes``, ``mem_autocast_copies_bytes``, ``mem_predicted_peak_bytes`` (see
    :func:`predicted_peak_bytes`) and ``mem_backward_live_bytes`` (None unless the backward was watched);
    ``meter`` has measured one sampled micro-batch's forward."""
    out: dict[str, int | None] = dict(static_bytes(model, optimizer))
    out["mem_activations_bytes"] = meter.activations_bytes
    out["mem_autocast_copies_bytes"] = meter.autocast_copies_bytes
    out["mem_predicted_peak_bytes"] = predicted_peak_bytes(
        out["mem_params_bytes"],
        out["mem_grads_bytes"],
        out["mem_optimizer_bytes"],
        meter.activations_bytes,
        meter.autocast_copies_bytes,
        grad_accum,
        meter.backward_live_bytes,
        out["mem_dequant_buffer_bytes"],
    )
    out["mem_backward_live_bytes"] = meter.backward_live_bytes
    return out


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' own activation checkpointing, non-reentrant, on ``model`` (in train mode to take effect).

    Non-reentrant checkpointing gives gradients to parameters inside a block whatever its inputs, so the hook
    transformers adds to make the input embeddings' output require grad (needed by the reentrant variant
    when the embeddings are frozen) is removed: with it, a frozen encoder or a LoRA run would back-propagate
    through the frozen layers below the first trainable one for nothing. ``transformers`` 5 renamed the
    method ``activation_checkpointing_enable`` (the old name warns); both are handled.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LoraExpError(
            f"trainer.gradient_checkpointing=true: {type(model).__name__} does not support it (use false)"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


class StepMemoryProbe:
    """The measured peak of one training step on CUDA (None elsewhere), split so it compares with the model.

    Call ``before_forward()`` right after the previous step's ``optimizer.zero_grad(set_to_none=True)``
    (gradients freed: what is allocated is the static floor, parameters + optimizer state + the batch), and
    ``after_backward()`` after the sampled step's (last micro-batch's) backward. With ``grad_accum > 1``
    call ``before_forward()`` before the group's first micro-batch. Sample a step after the first
    (optimizer state exists). ``baseline`` is what the process held before this job (``tracking.
    reset_memory``), subtracted from both figures.

    On a Linux CPU the same window is measured in host RSS: ``before_forward`` returns freed heap pages to the
    OS and resets the peak RSS, ``after_backward`` reads how far it rose (``rss_growth``): what the step
    allocated above its floor, to compare with the predicted peak less what already existed (parameters, and the
    optimizer state once it exists).

    Resetting the peak statistics hides any earlier peak from a job-level ``max_memory_allocated`` read at
    the end; the peaks before the window are kept in ``prior_peak_allocated`` / ``prior_peak_reserved``
    (absolute bytes): fold them in with ``max(probe.prior_peak_allocated, torch.cuda.max_memory_allocated())``.
    """

    def __init__(self, device: torch.device, baseline: int = 0, baseline_reserved: int = 0):
        self.device, self.baseline, self.baseline_reserved = torch.device(device), baseline, baseline_reserved
        self.cuda = self.device.type == "cuda"
        self.static: int | None = None
        self.peak: int | None = None
        self.peak_reserved: int | None = None
        self.prior_peak_allocated = 0
        self.prior_peak_reserved = 0
        self.rss_floor: int | None = None  # CPU (Linux): host RSS when the window opened
        self.rss_growth: int | None = None  # CPU (Linux): the window's peak RSS above that floor

    def before_forward(self) -> None:
        """Record the static floor and start a fresh peak window (on a Linux CPU: the host RSS's)."""
        if not self.cuda:
            self.rss_floor = timing.open_rss_window()
            return
        torch.cuda.synchronize(self.device)
        self.static = torch.cuda.memory_allocated(self.device) - self.baseline
        self.prior_peak_allocated = max(self.prior_peak_allocated, torch.cuda.max_memory_allocated(self.device))
        self.prior_peak_reserved = max(self.prior_peak_reserved, torch.cuda.max_memory_reserved(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)

    def after_backward(self) -> None:
        """Read the window's peak (forward and backward of the sampled step)."""
        if not self.cuda:
            hwm = timing.proc_status_bytes("VmHWM") if self.rss_floor is not None else None
            self.rss_growth = None if hwm is None else hwm - self.rss_floor
            return
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device) - self.baseline
        # what the allocator held (cached blocks included): PEFT's comparisons report it; on small models it can
        # be twice the allocated peak
        self.peak_reserved = torch.cuda.max_memory_reserved(self.device) - self.baseline_reserved

    def result(self, predicted_peak: int | None = None) -> dict[str, float | int | None]:
        """``mem_measured_peak_bytes`` (allocated), ``mem_static_bytes`` and ``mem_measured_over_predicted``
        (allocated over ``predicted_peak``; None on CPU, or when no step was probed). The reserved peak of the
        same window is ``peak_reserved``."""
        ratio = self.peak / predicted_peak if self.peak is not None and predicted_peak else None
        return {
            "mem_measured_peak_bytes": self.peak,
            "mem_static_bytes": self.static,
            "mem_measured_over_predicted": ratio,
        }


class SampledStep:
    """One micro-step measured in full, for the training loop: the forward inside ``with``, then the
    backward, then ``result()``::

        with SampledStep(model, optimizer, device, baseline, grad_accum) as sampled, amp():
            loss = model(**batch).loss
        loss.backward()
        memory_keys = sampled.result()

    ``result()`` gives :func:`breakdown`'s keys (with the backward watched) and :class:`StepMemoryProbe`'s.
    Enter it right after ``zero_grad(set_to_none=True)``, on the micro-batch with the most tokens (its
    activations are the run's largest). ``mem_predicted_peak_bytes`` is the run's peak with its
    ``grad_accum`` and the optimizer state (counted at the end); ``window_predicted`` (after ``result()``) is
    the prediction for the measured window itself (the gradients of earlier micro-batches and the optimizer
    state only if they existed when it opened: on the first update the state does not exist yet), and
    ``mem_measured_over_predicted`` compares the two; ``probe.peak_reserved`` is the window's reserved peak.
    On a Linux CPU ``mem_step_rss_growth_bytes`` is how far the host RSS rose in the window and
    ``mem_step_predicted_growth_bytes`` the window's prediction less what existed when it opened (parameters, and
    the optimizer state if any), ``mem_rss_growth_over_predicted`` their ratio.
    After it, fold ``prior_peak_allocated`` / ``prior_peak_reserved`` into any job-level peak (the probe reset
    the statistics).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        device: torch.device,
        baseline: int = 0,
        grad_accum: int = 1,
        baseline_reserved: int = 0,
    ):
        self.model, self.optimizer, self.grad_accum = model, optimizer, grad_accum
        self.meter = SavedTensorMeter(model)
        self.probe = StepMemoryProbe(device, baseline, baseline_reserved)
        self.grads_in_window = False
        self.optimizer_in_window = False
        self.window_predicted: int | None = None
        self._done = False

    @property
    def prior_peak_allocated(self) -> int:
        """Peak allocated bytes before the measured window (0 off CUDA)."""
        return self.probe.prior_peak_allocated

    @property
    def prior_peak_reserved(self) -> int:
        """Peak reserved bytes before the measured window (0 off CUDA)."""
        return self.probe.prior_peak_reserved

    def __enter__(self) -> SampledStep:
        self.grads_in_window = any(p.grad is not None for p in self.model.parameters())
        self.optimizer_in_window = bool(self.optimizer is not None and self.optimizer.state)
        self.probe.before_forward()
        self.meter.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.meter.__exit__(*exc)
        if exc[0] is None:
            self.meter.start_watch(self.model)

    def result(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The memory keys of the run. The first call ends the measurement (call it right after the backward);
        later calls may pass ``model`` to count parameters, gradients and optimizer state from another module
        than the one measured: e.g. at the end of a run whose frozen encoder was swapped for a feature cache
        during training and is now back in place (the activations stay those of the sampled step)."""
        if not self._done:
            self.probe.after_backward()
            self.meter.stop_watch()
            self._done = True
        out: dict[str, Any] = breakdown(model or self.model, self.optimizer, self.meter, self.grad_accum)
        window = predicted_peak_bytes(
            out["mem_params_bytes"],
            out["mem_grads_bytes"],
            out["mem_optimizer_bytes"] if self.optimizer_in_window else 0,
            out["mem_activations_bytes"],
            out["mem_autocast_copies_bytes"],
            grad_accum=2 if self.grads_in_window else 1,
            backward_live=out["mem_backward_live_bytes"],
            dequant_buffer=out["mem_dequant_buffer_bytes"],
        )
        self.window_predicted = window
        out.update(self.probe.result(window))
        # CPU: the step's predicted growth (the window's peak less what existed when it opened) and the RSS growth
        floor = out["mem_params_bytes"] + (out["mem_optimizer_bytes"] if self.optimizer_in_window else 0)
        growth = self.probe.rss_growth
        out["mem_step_predicted_growth_bytes"] = window - floor
        out["mem_step_rss_growth_bytes"] = growth
        out["mem_rss_growth_over_predicted"] = (
            growth / (window - floor) if growth is not None and window > floor else None
        )
        return out
