"""Training: ``loop.train`` (the loop in execution order), ``job.setup`` (the named set-up steps),
``results.finish``, the health checks, checkpoints, the frozen-feature cache and classification metrics; the
run dir (``rundir``: what it holds; ``lock``: which process owns it) and ``interrupt`` (Ctrl-C / SIGTERM as a flag).

The top of the stack: imports config, data, models, adapters and measure; nothing imports it but the CLI
(``cli``, ``sweep``), inference and the bench.
"""
