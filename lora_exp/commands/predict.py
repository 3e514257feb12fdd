"""``lora-exp predict adapter=RUN_DIR text="..." [text_pair="..."] | file=F | audio=CLIP|FOLDER [--force]
[--unmerged]``: merged inference (``--unmerged``: LoRA beside the base, e.g. a quantised base kept quantised), one
line per input: label (``score`` for a regression run), probability (the score), input."""

from __future__ import annotations

from pathlib import Path

from lora_exp.errors import LoraExpError

KEYS = ("adapter", "run", "text", "text_pair", "file", "audio")
USAGE = (
    'predict: usage: lora-exp predict adapter=RUN_DIR text="..." [text_pair="..."] | file=TEXTS.txt|TABLE.csv '
    "| audio=CLIP.wav|FOLDER [--force] [--unmerged]"
)


def table_texts(path: Path, text_column: str, pair_column: str | None) -> tuple[list[str], list[str] | None]:
    """The texts (and second texts) of a table file in any format ``data=files`` reads, by the run's columns
    (``data.text_column``, ``data.text_pair_column``); one line when a column is missing."""
    import datasets

    from lora_exp.data import files

    table = files.load_table(str(path))
    if not isinstance(table, datasets.Dataset):  # a folder of splits: every row of every split
        table = datasets.concatenate_datasets(list(table.values()))
    wanted = {"data.text_column": text_column, **({"data.text_pair_column": pair_column} if pair_column else {})}
    for option, col in wanted.items():
        if col not in table.column_names:
            raise LoraExpError(
                f"predict: file={str(path)!r} has no column {col!r} (the run's {option}; columns: {table.column_names})"
            )
    texts = ["" if t is None else str(t) for t in table[text_column]]
    pairs = ["" if t is None else str(t) for t in table[pair_column]] if pair_column else None
    return texts, pairs


def main(*args: str) -> int:
    """lora-exp predict adapter=RUN_DIR text="..." [text_pair="..."] | file=TEXTS.txt|TABLE | audio=CLIP.wav|.npy|FOLDER
    [--force] [--unmerged]  (key=value arguments; a .txt file: one text per line; a table (csv, tsv, json, parquet,
    ...): the run's text column(s); a folder of .wav clips: every clip; --force: load the adapter although the
    base's weights differ from those it was trained on; --unmerged: keep LoRA beside the base: a quantised base
    stays quantised instead of merged into an fp32 copy)."""
    from lora_exp.inference import predict, run_config

    force = "--force" in args  # an adapter onto a base of the same shapes but other weights
    unmerged = "--unmerged" in args
    args = tuple(a for a in args if a not in ("--force", "--unmerged"))
    kv = dict(a.split("=", 1) for a in args if "=" in a)
    bad = [a for a in args if "=" not in a] + [k for k in kv if k not in KEYS]
    if bad or not (kv.get("adapter") or kv.get("run")) or not (kv.get("text") or kv.get("file") or kv.get("audio")):
        raise LoraExpError(f"{USAGE} (got {list(args)})")
    run_dir = Path(kv.get("adapter") or kv["run"])
    if run_dir.name == "adapter":  # the adapter folder itself: its run dir holds the config
        run_dir = run_dir.parent
    texts = [kv["text"]] if "text" in kv else []
    pairs: list[str] | None = [kv["text_pair"]] if "text_pair" in kv else None
    if "text_pair" in kv and "text" not in kv:
        raise LoraExpError(f"predict: text_pair=... goes with text=... ({USAGE})")
    if "audio" in kv:  # an audio run: a clip (.wav, or .npy at the GW data's sample rate) or a folder of .wav clips
        if not Path(kv["audio"]).exists():
            raise LoraExpError(f"predict: audio={kv['audio']!r}: no such file or folder")
        from lora_exp.data.audio_files import clips_of

        texts += clips_of(kv["audio"])
    if "file" in kv:
        path = Path(kv["file"])
        if not path.exists():
            raise LoraExpError(f"predict: file={kv['file']!r}: no such file")
        if path.suffix.lower() == ".txt":
            lines = path.read_text().split("\n")  # not splitlines(): \x85 or \u2028 inside a line is text
            texts += [line.strip() for line in lines if line.strip()]
        else:  # a table: the run's own columns
            data = run_config(run_dir).data
            more, more_pairs = table_texts(path, data.text_column, data.text_pair_column)
            texts += more
            pairs = (pairs or []) + more_pairs if more_pairs is not None else pairs
    shown = texts if pairs is None else [f"{a}\t{b}" for a, b in zip(texts, pairs)]
    for (label, value), text in zip(predict(run_dir, texts, force=force, pairs=pairs, merge=not unmerged), shown):
        print(f"{label}\t{value:.4f}\t{text}")
    return 0
