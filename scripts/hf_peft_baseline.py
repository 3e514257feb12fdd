"""HF Trainer + PEFT LoRA on exactly the data a lora-exp run sees: the reference a harness result is compared with.

The splits come from lora-exp's own loader (same file, columns, cleaning, split seed, ``data.limit`` /
``data.eval_limit``), so both sides train and test on the same rows; everything after that is plain
transformers + peft: the tokenizer's (pair) encoding, ``AutoModelForSequenceClassification`` (``problem_type``
regression for scores), ``peft.LoraConfig`` on query/value with the classifier trained in full, ``Trainer`` with
AdamW, linear schedule and warm-up, evaluation each epoch and the best epoch kept by the task's metric.

    python scripts/hf_peft_baseline.py --lrs 2e-3,4e-3 --seeds 1,2,3 --epochs 2 --batch 16 --out DIR -- \\
        data=files data.path=pairs.csv data.text_pair_column=plot data.label_column=same_movie data.limit=300
    python scripts/hf_peft_baseline.py --summarize DIR

Each (lr, seed) appends one JSON line to DIR/results.jsonl; ``--summarize`` picks the lr with the best mean
validation metric over seeds and prints the test metric there (mean ± 95% t-interval over seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, mean_squared_error


def metrics(regression: bool):
    """``compute_metrics`` for Trainer: pearson / spearman / mse (scores) or acc / f1 (classes)."""

    def compute(pred) -> dict[str, float]:
        logits, y = pred.predictions, pred.label_ids
        if regression:
            p = np.asarray(logits).reshape(-1)
            return {
                "pearson": float(stats.pearsonr(p, y).statistic),
                "spearman": float(stats.spearmanr(p, y).statistic),
                "mse": float(mean_squared_error(y, p)),
            }
        p = np.asarray(logits).argmax(-1)
        return {"acc": float(accuracy_score(y, p)), "f1": float(f1_score(y, p, average="macro"))}

    return compute


def run(overrides: list[str], lr: float, seed: int, epochs: int, batch: int, r: int, alpha: float) -> dict:
    """One HF Trainer + PEFT run at ``lr`` / ``seed`` on the data ``overrides`` describe; its val and test metric."""
    from hydra import compose, initialize_config_dir
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from lora_exp.config.schema import CONF_DIR, register_configs, typed_config
    from lora_exp.data import text as text_data
    from lora_exp.models.location import model_location

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = typed_config(compose(config_name="config", overrides=overrides))
    splits = text_data.load_splits(cfg.data)  # the harness's own rows
    feature = splits["train"].features["label"]
    regression = cfg.data.problem_type == "regression"
    num_labels = 1 if regression else feature.num_classes
    where = model_location(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(where)
    pair = "text_pair" in splits["train"].column_names

    def encode(batch: dict) -> dict:
        return tokenizer(
            batch["text"], batch["text_pair"] if pair else None, truncation=True, max_length=cfg.data.max_length
        )

    encoded = splits.map(encode, batched=True, remove_columns=[c for c in ("text", "text_pair") if pair or c == "text"])
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        where, num_labels=num_labels, problem_type="regression" if regression else "single_label_classification"
    )
    peft_cfg = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["query", "value"]
    )
    model = get_peft_model(model, peft_cfg)
    key = "pearson" if regression else "acc"
    model.print_trainable_parameters()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            learning_rate=lr,
            num_train_epochs=epochs,
            per_device_train_batch_size=batch,
            per_device_eval_batch_size=128,
            weight_decay=0.01,
            warmup_steps=0.06,  # a float below 1: the ratio of all steps (transformers 5)
            lr_scheduler_type="linear",
            eval_strategy="epoch",
            save_strategy="epoch",
            load_best_model_at_end=True,
            metric_for_best_model=key,
            greater_is_better=True,
            save_total_limit=1,
            seed=seed,
            report_to=[],
            use_cpu=True,
            train_sampling_strategy="group_by_length",
            logging_strategy="no",
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=encoded["train"],
            eval_dataset=encoded["validation"],
            data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8),
            compute_metrics=metrics(regression),
        )
        trainer.train()
        val = trainer.evaluate(encoded["validation"], metric_key_prefix="val")
        test = trainer.evaluate(encoded["test"], metric_key_prefix="test")
    return {
        "lr": lr,
        "seed": seed,
        "trainable_params": model.get_nb_trainable_parameters()[0],
        "metric": key,
        "val": val[f"val_{key}"],
        "test": test[f"test_{key}"],
        "train_examples": len(encoded["train"]),
        "val_all": val,
        "test_all": test,
    }


def summarize(folder: Path) -> str:
    """The lr chosen by mean validation metric over seeds, and the test metric there (mean ± 95% CI)."""
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]
    by_lr: dict[float, list[dict]] = {}
    for row in rows:
        by_lr.setdefault(row["lr"], []).append(row)
    means = {lr: float(np.mean([r["val"] for r in rs])) for lr, rs in by_lr.items()}
    lr = max(means, key=means.get)
    tests = np.array([r["test"] for r in by_lr[lr]])
    half = stats.t.ppf(0.975, len(tests) - 1) * tests.std(ddof=1) / math.sqrt(len(tests)) if len(tests) > 1 else 0
    lines = [f"{folder.name}: metric {rows[0]['metric']}, lrs tried {sorted(by_lr)} (val means {means})"]
    lines.append(f"chosen lr {lr:g}: test {tests.mean():.4f} ± {half:.4f} over seeds {[r['seed'] for r in by_lr[lr]]}")
    return "\n".join(lines)


def main() -> None:
    """Command line: runs over an lr grid x seeds, or the summary of a results folder."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", default="2e-3,4e-3")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--summarize", type=Path)
    ap.add_argument("overrides", nargs="*", help="lora-exp overrides naming the data (after --)")
    a = ap.parse_args()
    if a.summarize:
        print(summarize(a.summarize))
        return
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    for lr in (float(x) for x in a.lrs.split(",")):
        for seed in (int(x) for x in a.seeds.split(",")):
            row = run(a.overrides, lr, seed, a.epochs, a.batch, a.r, a.alpha)
            with open(a.out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"lr {lr:g} seed {seed}: val {row['val']:.4f} test {row['test']:.4f}", flush=True)
    print(summarize(a.out))


if __name__ == "__main__":
    main()
