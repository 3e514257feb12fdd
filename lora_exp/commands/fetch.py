"""``lora-exp fetch``: the offline models and data, fetched once (else on first use)."""

from __future__ import annotations


def main(*args: str) -> int:
    """Fetch every offline asset once (a no-op offline when cached); one line per asset: name and path."""
    from lora_exp.data import assets
    from lora_exp.errors import LoraExpError
    from lora_exp.models.whisper_ct2 import whisper_tiny_en_dir

    if args:
        raise LoraExpError(f"fetch: usage: lora-exp fetch (takes no arguments; got {list(args)})")
    for name, where in (
        ("minilm", assets.minilm_dir),
        ("rotten_tomatoes", assets.rotten_tomatoes_file),
        ("whisper_tiny_en", whisper_tiny_en_dir),
    ):
        print(f"{name}: {where()}", flush=True)
    return 0
