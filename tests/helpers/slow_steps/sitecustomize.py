"""Test-only: with LORA_EXP_TEST_STEP_SLEEP=<seconds> set, every optimizer step of this Python process sleeps that
long, so a test can requeue or signal a job while it trains. Active only when this folder is on PYTHONPATH (the
SLURM test puts it there for its jobs); the numbers a run computes do not change."""

import os

if os.environ.get("LORA_EXP_TEST_STEP_SLEEP"):
    import time

    from torch.optim.optimizer import register_optimizer_step_post_hook

    _SLEEP = float(os.environ["LORA_EXP_TEST_STEP_SLEEP"])
    register_optimizer_step_post_hook(lambda *_: time.sleep(_SLEEP))
