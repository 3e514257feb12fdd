"""The ``lora-exp`` subcommands, one module each (``lora-exp NAME ...`` runs ``lora_exp.commands.NAME.main``,
``-`` in the name as ``_``). Each ``main(*args) -> int`` returns the exit status; bad input raises
``LoraExpError`` (one line, exit 2 in ``lora_exp.cli.main``). Their usage lines are in ``lora_exp/cli.py``."""
