"""``lora-exp predict adapter=RUN_DIR text="..." | file=F | audio=CLIP [--force] [--unmerged]``: merged inference
(``--unmerged``: LoRA beside the base, e.g. a quantised base kept quantised), one line per input: label, probability,
input."""

from __future__ import annotations

from pathlib import Path

from lora_exp.errors import LoraExpError


def main(*args: str) -> int:
    """lora-exp predict adapter=RUN_DIR text="..." | file=TEXTS.txt | audio=CLIP.wav|.npy [--force]  (key=value
    arguments; --force: load the adapter although the base's weights differ from those it was trained on;
    --unmerged: keep LoRA beside the base: a quantised base stays quantised instead of merged into an fp32 copy)."""
    from lora_exp.inference import predict

    force = "--force" in args  # an adapter onto a base of the same shapes but other weights
    unmerged = "--unmerged" in args
    args = tuple(a for a in args if a not in ("--force", "--unmerged"))
    kv = dict(a.split("=", 1) for a in args if "=" in a)
    bad = [a for a in args if "=" not in a] + [k for k in kv if k not in ("adapter", "run", "text", "file", "audio")]
    if bad or not (kv.get("adapter") or kv.get("run")) or not (kv.get("text") or kv.get("file") or kv.get("audio")):
        raise LoraExpError(
            'predict: usage: lora-exp predict adapter=RUN_DIR text="..." | file=TEXTS.txt | audio=CLIP.wav '
            f"[--force] [--unmerged] (got {list(args)})"
        )
    run_dir = Path(kv.get("adapter") or kv["run"])
    if run_dir.name == "adapter":  # the adapter folder itself: its run dir holds the config
        run_dir = run_dir.parent
    texts = [kv["text"]] if "text" in kv else []
    if "audio" in kv:  # an audio run: the clip's path (.wav, or .npy at the data's sample rate)
        if not Path(kv["audio"]).is_file():
            raise LoraExpError(f"predict: audio={kv['audio']!r}: no such file")
        texts.append(kv["audio"])
    if "file" in kv:
        if not Path(kv["file"]).is_file():
            raise LoraExpError(f"predict: file={kv['file']!r}: no such file")
        lines = Path(kv["file"]).read_text().split("\n")  # not splitlines(): \x85 or \u2028 inside a line is text
        texts += [line.strip() for line in lines if line.strip()]
    for (label, prob), text in zip(predict(run_dir, texts, force=force, merge=not unmerged), texts):
        print(f"{label}\t{prob:.4f}\t{text}")
    return 0
