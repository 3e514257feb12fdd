"""``lora-exp bench`` (``run``, ``contenders``: our loop vs HF Trainer + PEFT on the same work) and the GPU
acceptance run (``gpu_acceptance``)."""
