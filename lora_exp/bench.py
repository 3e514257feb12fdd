"""``lora-exp bench``: our loop against HF Trainer (+ PEFT) on the same work, side by side in one run.

Same model (offline MiniLM by default), same tokenised examples (the offline default's training split, in
the same order for every contender's epoch), batch size, precision (fp32 on CPU), AdamW, lr and number of
optimizer steps. Each contender reports samples/s over its training window (model loading excluded).
HF Trainer runs with its defaults (random batches, as a user would pick), and once more with
``train_sampling_strategy="group_by_length"`` so the effect of length grouping is separated from the rest of the loop.
Needs ``peft`` (a dev extra) for the PEFT contender.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lora_exp.errors import LoraExpError


def _ours(method: str, steps: int, batch: int, common: list[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    from lora_exp.cli import CONF_DIR
    from lora_exp.train import train

    overrides = [
        f"method={method}",
        f"data.limit={steps * batch}",
        "trainer.epochs=1",
        f"trainer.batch_size={batch}",
        "logger=none",
        "save_weights=false",
        "data.eval_limit=64",
        "optimizer.lr=2e-3",
        *common,
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        res = train(cfg, Path(tmp) / "run")
    return {
        "samples_per_s": res["samples_per_s"],
        "train_seconds": res["train_seconds"],
        "trainable_params": res["trainable_params"],
        "padding_efficiency": res["padding_efficiency"],
    }


def _hf(method: str, steps: int, batch: int, grouped: bool, common: list[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from lora_exp import data, models
    from lora_exp.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"data.limit={steps * batch}", *common])
    tokenizer, model, head = models.build(cfg.model, cfg.data.num_labels)
    if method == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            raise LoraExpError("bench: the HF + PEFT contender needs peft (pip install -e '.[dev]')") from err
        names = {"bert": ["query", "value"], "distilbert": ["q_lin", "v_lin"]}[model.config.model_type]
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=names, task_type="SEQ_CLS"))
    elif method == "frozen":
        models.apply_method(model, "frozen", head)
    tok = data.tokenize(data.load_splits(cfg.data), tokenizer, cfg.data.max_length)["train"]
    train_set = tok.select_columns(["input_ids", "attention_mask", "labels"]).with_format(None)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=2e-3,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            train_sampling_strategy="group_by_length" if grouped else "random",
            seed=42,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=train_set, data_collator=DataCollatorWithPadding(tokenizer)
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"samples_per_s": steps * batch / seconds, "train_seconds": seconds, "trainable_params": trainable}


def run(steps: int, batch: int, methods: list[str], common: list[str]) -> list[dict[str, Any]]:
    """Every contender in this process, one after the other; one dict per contender."""
    rows = []
    for method in methods:
        hf = "hf_trainer_peft" if method == "lora" else "hf_trainer"
        contenders = [
            (hf, partial(_hf, method, steps, batch, False, common)),
            (f"{hf}_grouped", partial(_hf, method, steps, batch, True, common)),
            ("lora_exp", partial(_ours, method, steps, batch, common)),
        ]
        for name, measure in contenders:
            row = {"contender": name, "method": method, "steps": steps, "batch": batch, **measure()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table with the ratio of lora-exp to HF Trainer defaults per method."""
    base = {
        r["method"]: r["samples_per_s"]
        for r in rows
        if r["contender"].startswith("hf_") and not r["contender"].endswith("_grouped")
    }
    lines = [
        "| method | contender | samples/s | train s | trainable params | vs HF Trainer defaults |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['contender']} | {r['samples_per_s']:.1f} | {r['train_seconds']:.1f} | "
            f"{r['trainable_params']:,} | {r['samples_per_s'] / base[r['method']]:.2f}x |"
        )
    return "\n".join(lines)


def main(*args: str) -> int:
    """Entry for ``lora-exp bench``."""
    parser = argparse.ArgumentParser(prog="lora-exp bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per contender (default 40)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--methods", default="lora,full,frozen")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON lines and table here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides shared by all contenders, e.g. model=tiny_bert")
    ns = parser.parse_args(args)
    rows = run(ns.steps, ns.batch, ns.methods.split(","), ns.overrides)
    text = table(rows)
    print(text)
    if ns.out:
        ns.out.mkdir(parents=True, exist_ok=True)
        (ns.out / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (ns.out / "bench.md").write_text(text + "\n")
    return 0
