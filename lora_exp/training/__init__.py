"""Training: ``loop.train`` (the loop in execution order), ``job.setup`` (the named set-up steps),
``results.finish``, the health checks, checkpoints, the frozen-feature cache and classification metrics.

The top of the stack: imports config, data, models, adapters and measure; nothing imports it but the CLI,
inference and the bench.
"""
