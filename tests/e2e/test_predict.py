"""``lora-exp predict`` on trained tiny runs: string label names, length-batched order, progress."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_exp import inference


@pytest.mark.parametrize("method", ["lora", "full"])
def test_predict_prints_string_label_names(tiny_cfg, tmp_path: Path, method: str) -> None:
    """A csv labelled neg/pos trains with ids 0/1 (sorted names) and predict answers with the names."""
    import json

    from lora_exp.training import loop
    from tests.helpers.configs import write_string_labels
    from tests.helpers.processes import cli

    path = write_string_labels(tmp_path / "reviews.csv", ("pos", "neg"), n=80)
    cfg = tiny_cfg(
        "data=csv",
        f"data.path={path}",
        "data.text_column=review",
        "data.label_column=sentiment",
        f"method={method}",
        "trainer.max_steps=3",
    )
    run = tmp_path / "run"
    loop.train(cfg, run)
    if method == "lora":
        assert json.loads((run / "adapter" / "adapter_config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    proc = cli(["predict", f"adapter={run}", "text=good great film", "text=bad dull film"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert lines and all(label in ("neg", "pos") for label, _, _ in lines)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory, reviews: Path) -> Path:
    """A tiny LoRA run trained with data.max_length=16."""
    from lora_exp.training import loop
    from tests.helpers.configs import make_cfg

    root = tmp_path_factory.mktemp("predict")
    overrides = ["model=tiny_bert", f"data.path={reviews}", f"data.cache_dir={root / 'hf'}", "logger=none"]
    overrides += ["trainer.max_steps=2", "trainer.epochs=1", "trainer.device=cpu", "data.max_length=16"]
    loop.train(make_cfg(overrides), root / "run")
    return root / "run"


def lines(n: int, seed: int = 0) -> list[str]:
    """``n`` review-like lines of 1 to 60 words (so batches by length differ from batches in input order)."""
    import random

    from tests.helpers.configs import FILLER, NEGATIVE, POSITIVE

    rng = random.Random(seed)
    return [" ".join(rng.choices(POSITIVE + NEGATIVE + FILLER, k=rng.randint(1, 60))) for _ in range(n)]


def test_predict_batches_by_length_keeps_the_order_and_cuts_at_max_length(short_run: Path) -> None:
    tokenizer, model = inference.load_trained(short_run)
    widths: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, __, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    texts = lines(40)
    batched = inference.predict_texts(model, tokenizer, texts, max_length=16, batch_size=8, progress=False)
    assert widths == sorted(widths, reverse=True) and max(widths) == 16  # longest first, cut at data.max_length
    widths.clear()
    one_by_one = [inference.predict_texts(model, tokenizer, [t], 16, 1, False)[0] for t in texts]
    hook.remove()
    assert [label for label, _ in batched] == [label for label, _ in one_by_one]
    assert [p for _, p in batched] == pytest.approx([p for _, p in one_by_one], abs=1e-5)
    assert len({round(p, 6) for _, p in one_by_one}) > 10  # distinct answers: a shuffled order would show
    long = texts[max(range(40), key=lambda i: len(texts[i]))]
    cut = tokenizer.decode(tokenizer(long, truncation=True, max_length=16)["input_ids"], skip_special_tokens=True)
    assert inference.predict_texts(model, tokenizer, [cut], 16, 1, False)[0][1] == pytest.approx(
        batched[texts.index(long)][1], abs=1e-5
    )  # only the first 16 tokens count, as in training


def test_predict_file_shows_progress_and_lines_per_second(short_run: Path, tmp_path: Path) -> None:
    from tests.helpers.processes import cli

    texts = lines(300, seed=1)
    texts[7] = "a good film\x85 then a dull plot"  # NEL (a cp1252 ellipsis read as latin-1) inside a line: one line
    (tmp_path / "lines.txt").write_text("\n".join(texts) + "\n")
    proc = cli(["predict", f"adapter={short_run}", f"file={tmp_path / 'lines.txt'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [row.split("\t")[2] for row in proc.stdout.rstrip("\n").split("\n")] == texts  # the input order
    assert "predict: 100%" in proc.stderr and "300/300" in proc.stderr  # tqdm's bar, its last state
    last = [line for line in proc.stderr.splitlines() if line.startswith("[lora-exp] predict:")]
    assert len(last) == 1 and last[0].startswith("[lora-exp] predict: 300 lines in ")
    assert "data.max_length=16" in last[0]
