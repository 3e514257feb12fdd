"""Stand-alone measurement for the audio path until train() runs audio (issue 13): time per epoch with the
encoder on the clip vs Whisper's 30 s, and the gw_methods comparison on CPU. Mirrors the loop's choices
(AdamW over trainable params, decay on >= 2-D weights, linear schedule with 6% warmup, each method's default
lr, best validation checkpoint by trainer.monitor, test at the best state).

  PYTHONPATH=. python scripts/gw_bench.py --methods lora --window 6 30 --epochs 1        # time per epoch
  PYTHONPATH=. python scripts/gw_bench.py --methods full frozen lora --window 6 --epochs 3 \
      --set data.gw.n_train=256 data.gw.n_validation=256 data.gw.n_test=256           # gw_methods, smaller
  PYTHONPATH=. python scripts/gw_bench.py --base --steps 3 --window 6 30                  # whisper-base size
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time

import torch
from transformers import get_linear_schedule_with_warmup

from lora_exp import audio, data, metrics, models
from lora_exp.cli import CONF_DIR  # noqa: F401  (registers the schema)
from tests.conftest import make_cfg


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: torch.utils.data.DataLoader) -> dict[str, float]:
    model.eval()
    logits, labels, loss = [], [], 0.0
    for b in loader:
        out = model(**b)
        logits.append(out.logits)
        labels.append(b["labels"])
        loss += out.loss.item() * len(b["labels"])
    model.train()
    y = torch.cat(labels)
    return {**metrics.classification_metrics(torch.cat(logits), y), "loss": loss / len(y)}


def run(
    method: str, window: float | None, epochs: int, steps: int | None, base: bool, monitor: str, extra: list[str]
) -> dict:
    over = ["experiment=gw_whisper_offline", f"method={method}", f"model.audio_max_seconds={window or 'null'}"]
    if base:  # whisper-base-sized random init
        over += ["model.hidden_size=512", "model.layers=6", "model.heads=8", "model.ffn_size=2048"]
    cfg = make_cfg(over + extra)
    torch.manual_seed(cfg.trainer.seed)
    splits = data.load_splits(cfg.data)
    fe, model, head = models.build(cfg.model, 2, {0: "noise", 1: "signal"})
    models.apply_method(model, method, head, cfg.lora)
    counts = models.count_parameters(model, head)
    bs = 8 if base else cfg.trainer.batch_size
    loaders = audio.make_loaders(
        splits,
        fe,
        cfg.data.gw.sample_rate,
        bs,
        cfg.trainer.eval_batch_size,
        torch.Generator().manual_seed(cfg.trainer.seed),
    )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if p.dim() >= 2], "weight_decay": cfg.optimizer.weight_decay},
        {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.method.lr)
    total = steps or epochs * len(loaders.train)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * total), total)
    best, best_state, history, step, t_data, t_compute = None, None, [], 0, 0.0, 0.0
    model.train()
    epoch_times = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        it = iter(loaders.train)
        while True:
            a = time.perf_counter()
            b = next(it, None)
            if b is None or (steps and step >= steps):
                break
            c = time.perf_counter()
            loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            t_data += c - a
            t_compute += time.perf_counter() - c
        epoch_times.append(time.perf_counter() - t0)
        if steps:
            break
        m = evaluate(model, loaders.validation)
        history.append({"epoch": epoch + 1, "step": step, **m})
        key = metrics.monitor_key(monitor)
        if metrics.is_better(monitor, m[key], None if best is None else best[key]):
            best, best_state = {**m, "epoch": epoch + 1}, copy.deepcopy(model.state_dict())
    out = {
        "method": method,
        "window_s": window or 30.0,
        "trainable": counts["trainable"],
        "total": counts["total"],
        "steps": step,
        "epoch_s": epoch_times,
        "data_s": t_data,
        "compute_s": t_compute,
        "static_mem_MB": (counts["total"] * 4 + counts["trainable"] * 4 * 3) / 2**20,
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if best_state is not None:
        model.load_state_dict(best_state)
        out.update(best=best, test=evaluate(model, loaders.test), history=history)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", nargs="+", default=["lora"])
    p.add_argument("--window", nargs="+", type=float, default=[6.0], help="seconds; 30 = Whisper's stock window")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--base", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--monitor", default="val/auc")
    p.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides, e.g. data.gw.n_train=256")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for method in a.methods:
        for w in a.window:
            r = run(method, None if w == 30 else w, a.epochs, a.steps, a.base, a.monitor, a.set)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
