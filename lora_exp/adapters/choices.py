"""The adapter options' allowed values (no torch import: the config schema reads them)."""

VARIANTS = ("lora", "dora", "lora_fa", "vera")
INITS = ("default", "gaussian", "pissa", "olora")
BIASES = ("none", "lora_only", "all")
RESIDUAL_INITS = ("pissa", "olora")  # inits that rewrite W0
