"""``lora-exp bench``: our training loop against HF Trainer (+ PEFT) on the same work, or merged-inference latency
(``lora_exp.bench.run``)."""

from __future__ import annotations


def main(*args: str) -> int:
    """Run the benchmark with the command line's arguments (``lora-exp bench --help``)."""
    from lora_exp.bench.run import main as bench_main

    return bench_main(*args)
