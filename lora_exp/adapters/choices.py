"""The adapter options' allowed values (no torch import: the config schema reads them)."""

VARIANTS = ("lora", "dora", "lora_fa", "vera")
INITS = ("default", "gaussian", "pissa", "olora", "eva")
BIASES = ("none", "lora_only", "all")
RESIDUAL_INITS = ("pissa", "olora")  # inits that rewrite W0
DATA_INITS = ("eva",)  # inits computed from training batches (``training.data_init``), after injection

# Option groups under ``lora.`` that apply only to one variant / init: (the lora key, the value it must have).
# A job's identity (config hash) and its recorded config leave the others out.
OPTION_OWNERS = {"vera": ("variant", "vera"), "eva": ("init", "eva")}
