"""Reload a finished run for inference: rebuild the model as training did, load the saved weights, merge."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from lora_exp.adapters import init_state, store
from lora_exp.adapters import targets as injection
from lora_exp.config.schema import Config, typed_config
from lora_exp.data.labels import CLASSIFICATION, Labels
from lora_exp.device import QUANT_DTYPES, autocast, pick_device, pick_precision
from lora_exp.errors import LoraExpError


def run_compute(run_dir: Path, cfg: Config) -> tuple[torch.device, str]:
    """The device and precision a finished run computed in (its results.json; the config's choice resolved here
    for older runs). Without that device here (a GPU run read on a CPU machine): the CPU, in bf16 when the run
    was bf16, else in fp32 (fp16 autocast is CUDA's), with one line saying so."""
    import json

    path = Path(run_dir) / "results.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    want = str(res.get("device") or cfg.trainer.device)
    try:
        device, moved = pick_device(want), False
    except LoraExpError:  # no (such) CUDA device here
        device, moved = torch.device("cpu"), True
    precision = res.get("precision") or pick_precision(cfg.trainer.precision, device)
    if device.type == "cpu" and precision == "fp16":
        precision = "fp32"
    if moved:
        print(
            f"[lora-exp] the run computed on {want}, which is not available here: {device} in {precision}",
            file=sys.stderr,  # stdout carries the predictions
        )
    return device, precision


def load_trained(run_dir: Path, merge: bool = True, force: bool = False) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and eval-mode model of a finished run (LoRA merged and unwrapped: no extra latency), on the run's
    device (``run_compute``) with the frozen base stored as in training; compute under ``autocast(device,
    precision)``. An adapter is refused when the base rebuilt from the run's config is not the base it was trained
    on (its recorded ``base_fingerprint``: the files at that path or Hub id changed); ``force`` loads it anyway.
    """
    tokenizer, model, _ = _load(Path(run_dir), merge, force)
    return tokenizer, model


def _load(run_dir: Path, merge: bool, force: bool = False) -> tuple[Any, torch.nn.Module, str]:
    from transformers import (
        AutoFeatureExtractor,
        AutoModelForAudioClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from lora_exp.models.location import model_location
    from lora_exp.training.job import build_model_for

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    device, precision = run_compute(run_dir, cfg)
    if cfg.model.base_dtype not in ("fp32", precision, *QUANT_DTYPES):  # e.g. an fp16 base read on a CPU
        cfg.model.base_dtype = "fp32"
    if cfg.method.name == "full":
        if not (run_dir / "model").is_dir():
            raise LoraExpError(f"run dir {str(run_dir)!r} has no saved model/ (trained with save_weights=false?)")
        if cfg.model.task == "audio":
            tokenizer = AutoFeatureExtractor.from_pretrained(run_dir / "model")
            model = AutoModelForAudioClassification.from_pretrained(run_dir / "model", dtype=torch.float32)
        else:
            tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
            model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model", dtype=torch.float32)
    else:
        meta, tensors = store.read_adapter(run_dir / "adapter")
        if cfg.data.num_labels is not None and meta.get("num_labels") != cfg.data.num_labels:
            raise LoraExpError(
                f"adapter num_labels={meta.get('num_labels')} but the run's data.num_labels={cfg.data.num_labels}"
            )
        with contextlib.redirect_stdout(sys.stderr):  # the model's banner: stdout carries the predictions
            # a quantised base: the same quantisation
            tokenizer, model, _, _ = build_model_for(cfg, adapter_labels(meta), precision)
        if init_state.exists(run_dir):  # lora.init=eva: the saved ranks, not recomputed from data
            init_state.restore_state(model, run_dir)
        store.load_into(model, tensors, str(run_dir / "adapter"))  # keys and shapes first: "same shapes" holds
        where = f"adapter={str(run_dir / 'adapter')!r}"
        store.check_base(meta, model.base_fingerprint, where, model_location(cfg.model) or cfg.model.name, force)
        if merge:  # folded into W0 and unwrapped: the base model's own modules, no added latency
            injection.merge_and_unload(model)
        if cfg.model.base_dtype in QUANT_DTYPES:
            print(f"[lora-exp] {_quant_line(cfg.model.base_dtype, merge)}", file=sys.stderr)  # stdout: predictions
    return tokenizer, model.to(device).eval(), precision


def adapter_labels(meta: dict[str, Any]) -> Labels:
    """The labels an adapter was trained for (its config: problem type, number of outputs, class names)."""
    names = meta.get("id2label") or {}
    problem_type = meta.get("problem_type") or CLASSIFICATION
    n = int(meta.get("num_labels") or 2)
    return Labels(problem_type, n, [names.get(str(i), names.get(i, str(i))) for i in range(n)] if names else None)


def _quant_line(kind: str, merged: bool) -> str:
    """What a run on a quantised base is predicted with: merged into a dequantised fp32 copy, or unmerged."""
    if merged:
        return (
            f"the {kind} base is dequantised into an fp32 copy and the adapter merged into it (the function trained: "
            "W0 as quantised + the update, unrounded; the base at fp32 size in memory)"
        )
    return f"the adapter runs unmerged on the {kind} base (quantised in memory, the update computed beside it)"


def run_config(run_dir: Path) -> Config:
    """The config a finished run recorded (``config.yaml``, without its ``derived`` facts) as the schema's
    dataclasses."""
    if not (Path(run_dir) / "config.yaml").is_file():
        raise LoraExpError(f"run dir {str(run_dir)!r} has no config.yaml (not a lora-exp run dir)")
    saved = OmegaConf.load(Path(run_dir) / "config.yaml")
    saved.pop("derived", None)
    return typed_config(saved)


class AdapterBank:
    """One base model in memory, several adapters (LoRA A/B + head); ``use(name)`` swaps one in by copying
    its tensors into the model's parameters in place: milliseconds for adapters of this size."""

    def __init__(self, model: torch.nn.Module, fingerprint: str | None = None):
        """``model`` carries the LoRA layers; ``fingerprint`` is its base's (default: the ``base_fingerprint``
        that ``build_model`` records on it), checked against each adapter's."""
        self.model = model
        self.fingerprint = fingerprint or getattr(model, "base_fingerprint", None)
        self.params = {**dict(model.named_buffers()), **dict(model.named_parameters())}  # VeRA: buffers
        self.adapters: dict[str, dict[str, torch.Tensor]] = {}
        self.active: str | None = None

    def add(self, name: str, folder: Path, force: bool = False) -> None:
        """Read an adapter (``adapter.safetensors`` + config) and keep it next to the model, checked: tensors
        and shapes, and the base it was trained on (``force`` loads an adapter of another base anyway)."""
        meta, tensors = store.read_adapter(Path(folder))
        store.check_tensors(self.params, tensors, f"adapter {name!r}")
        current = getattr(self.model, "name_or_path", "") or "the bank's model"
        store.check_base(meta, self.fingerprint, f"adapter {name!r} ({str(folder)!r})", current, force)
        if self.adapters and set(tensors) != set(next(iter(self.adapters.values()))):
            raise LoraExpError(f"adapter {name!r} covers other tensors than the adapters already loaded")
        dev = next(iter(self.params.values())).device
        self.adapters[name] = {k: t.to(dev, self.params[k].dtype) for k, t in tensors.items()}

    @torch.no_grad()
    def use(self, name: str) -> None:
        """Make ``name`` the active adapter (LoRA layers must be unmerged: swapping edits A/B, not W0)."""
        if name not in self.adapters:
            raise LoraExpError(f"use_adapter: no adapter named {name!r} (have {sorted(self.adapters)})")
        if any(m.merged for _, m in injection.lora_layers(self.model)):
            raise LoraExpError("use_adapter: unmerge() before swapping adapters")
        for key, t in self.adapters[name].items():
            self.params[key].copy_(t)
        self.active = name


def predict(
    run_dir: Path,
    texts: list[str],
    batch_size: int = 64,
    force: bool = False,
    progress: bool = True,
    pairs: list[str] | None = None,
    merge: bool = True,
) -> list[tuple[str, float]]:
    """(label, probability) for each text (audio runs: each .wav / .npy path) with a finished run's merged model;
    a regression run gives ("score", predicted score).

    ``pairs``: each text's second text, for a run trained on sentence pairs (``data.text_pair_column``); it is
    required there and refused elsewhere. Texts are cut at the run's ``data.max_length`` (what it trained on;
    pairs longest first). With ``progress`` a bar and, at the end, one line with the lines/s go to stderr.
    ``force`` loads an adapter onto a base it was not trained on. ``merge`` false keeps LoRA unmerged (a quantised
    base then stays quantised; merged, it is dequantised: stderr says which).
    """
    tokenizer, model, precision = _load(Path(run_dir), merge=merge, force=force)
    cfg = run_config(Path(run_dir))
    if cfg.model.task == "audio" and cfg.data.source != "gw":  # clips as in training: resampled, cut / padded
        from lora_exp.data.audio_files import ClipReader

        reader = ClipReader(tokenizer.sampling_rate, cfg.data.max_seconds)
        signals = [reader(path) for path in texts]
        return predict_audio(model, tokenizer, signals, tokenizer.sampling_rate, batch_size, precision)
    if cfg.model.task == "audio":
        from lora_exp.data import audio

        signals = []
        for path in texts:
            signal, rate = audio.read_audio(path)
            if rate not in (None, cfg.data.gw.sample_rate):
                signal = audio.resample(signal, rate, cfg.data.gw.sample_rate)
            signals.append(np.asarray(signal, dtype=np.float32).reshape(-1))  # (detectors, n): back to back
        return predict_audio(model, tokenizer, signals, cfg.data.gw.sample_rate, batch_size, precision)
    if (pairs is None) != (cfg.data.text_pair_column is None):
        raise LoraExpError(
            f"predict: the run was trained on sentence pairs (data.text_pair_column={cfg.data.text_pair_column!r}); "
            "give text_pair=... or a table with both columns"
            if pairs is None
            else "predict: text_pair given but the run was trained on single texts (data.text_pair_column=null)"
        )
    start = time.perf_counter()
    out = predict_texts(model, tokenizer, texts, cfg.data.max_length, batch_size, progress, precision, pairs)
    seconds, n = time.perf_counter() - start, len(texts)
    if progress:
        print(
            f"[lora-exp] predict: {n:,} line{'s' * (n != 1)} in {seconds:.1f} s ({n / max(seconds, 1e-9):,.0f} "
            f"lines/s; batches of {batch_size} by length, cut at data.max_length={cfg.data.max_length})",
            file=sys.stderr,
        )
    return out


@torch.inference_mode()
def predict_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    max_length: int,
    batch_size: int = 64,
    progress: bool = True,
    precision: str = "fp32",
    pairs: list[str] | None = None,
) -> list[tuple[str, float]]:
    """``(label, probability)`` per text (with ``pairs``: per text and its second text), in the order given, on
    the model's device under autocast in ``precision``; ``("score", value)`` for a regression model.

    Tokenised once as in training (``data.text.encode_texts``), cut at ``max_length``; batches are drawn from the
    texts sorted by token length (each padded to its own longest, so little padding is computed) and the answers
    put back in the input order.
    """
    from lora_exp.data.text import encode_texts

    enc = encode_texts(tokenizer, texts, pairs, max_length)
    regression = getattr(model.config, "problem_type", None) == "regression"
    order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]), reverse=True)
    id2label, device = model.config.id2label, next(model.parameters()).device
    out: list[tuple[str, float] | None] = [None] * len(texts)
    model.eval()
    with tqdm(total=len(texts), desc="predict", unit="line", disable=not progress, mininterval=1.0) as bar:
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            batch = tokenizer.pad([{k: enc[k][j] for k in enc} for j in rows], return_tensors="pt")
            with autocast(device, precision):
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            if regression:
                for j, v in zip(rows, logits.float().reshape(-1).tolist()):
                    out[j] = ("score", v)
                bar.update(len(rows))
                continue
            probs = logits.float().softmax(-1)
            p, idx = probs.max(-1)
            for j, k, v in zip(rows, idx.tolist(), p.tolist()):
                out[j] = (str(id2label.get(k, k)), v)
            bar.update(len(rows))
    return out  # type: ignore[return-value]  # every position filled


@torch.inference_mode()
def predict_audio(
    model: torch.nn.Module,
    fe: Any,
    signals: list[np.ndarray],
    source_rate: int,
    batch_size: int = 32,
    precision: str = "fp32",
) -> list[tuple[str, float]]:
    """``(label, probability)`` per mono signal at ``source_rate`` (e.g. from ``read_audio`` or a generated clip),
    on the model's device, under autocast in ``precision``; a regression model (one output): ``("score", value)``."""
    from lora_exp.data.audio import AudioCollator

    collate, out = AudioCollator(fe, source_rate), []
    device = next(model.parameters()).device
    model.eval()
    for i in range(0, len(signals), batch_size):
        batch = {k: v.to(device) for k, v in collate.features(signals[i : i + batch_size]).items()}
        with autocast(device, precision):
            logits = model(**batch).logits
        if logits.shape[-1] == 1:  # a score per clip
            out += [("score", float(v)) for v in logits.float().reshape(-1)]
            continue
        probs = torch.softmax(logits.float(), -1)
        conf, idx = probs.max(-1)
        out += [(model.config.id2label[int(j)], float(c)) for j, c in zip(idx, conf)]
    return out
