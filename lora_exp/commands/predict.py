"""``lora-exp predict adapter=RUN_DIR text="..." | file=F | audio=CLIP|FOLDER [--force]``: merged inference, one line
per input: label, probability, input."""

from __future__ import annotations

from pathlib import Path

from lora_exp.errors import LoraExpError


def main(*args: str) -> int:
    """lora-exp predict adapter=RUN_DIR text="..." | file=TEXTS.txt | audio=CLIP.wav|.npy|FOLDER [--force]  (key=value
    arguments; --force: load the adapter although the base's weights differ from those it was trained on)."""
    from lora_exp.inference import predict

    force = "--force" in args  # an adapter onto a base of the same shapes but other weights
    args = tuple(a for a in args if a != "--force")
    kv = dict(a.split("=", 1) for a in args if "=" in a)
    bad = [a for a in args if "=" not in a] + [k for k in kv if k not in ("adapter", "run", "text", "file", "audio")]
    if bad or not (kv.get("adapter") or kv.get("run")) or not (kv.get("text") or kv.get("file") or kv.get("audio")):
        raise LoraExpError(
            'predict: usage: lora-exp predict adapter=RUN_DIR text="..." | file=TEXTS.txt | audio=CLIP.wav|FOLDER '
            f"[--force] (got {list(args)})"
        )
    run_dir = Path(kv.get("adapter") or kv["run"])
    if run_dir.name == "adapter":  # the adapter folder itself: its run dir holds the config
        run_dir = run_dir.parent
    texts = [kv["text"]] if "text" in kv else []
    if "audio" in kv:  # an audio run: a clip (.wav, or .npy at the GW data's sample rate) or a folder of .wav clips
        if not Path(kv["audio"]).exists():
            raise LoraExpError(f"predict: audio={kv['audio']!r}: no such file or folder")
        from lora_exp.data.audio_files import clips_of

        texts += clips_of(kv["audio"])
    if "file" in kv:
        if not Path(kv["file"]).is_file():
            raise LoraExpError(f"predict: file={kv['file']!r}: no such file")
        lines = Path(kv["file"]).read_text().split("\n")  # not splitlines(): \x85 or \u2028 inside a line is text
        texts += [line.strip() for line in lines if line.strip()]
    for (label, prob), text in zip(predict(run_dir, texts, force=force), texts):
        print(f"{label}\t{prob:.4f}\t{text}")
    return 0
