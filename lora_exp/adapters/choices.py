"""The adapter options' allowed values (no torch import: the config schema reads them)."""

VARIANTS = ("lora", "dora", "lora_fa", "vera", "adalora")
INITS = ("default", "gaussian", "pissa", "olora", "eva", "lora_ga")
BIASES = ("none", "lora_only", "all")
RESIDUAL_INITS = ("pissa", "olora")  # inits that rewrite W0
DATA_INITS = ("eva", "lora_ga")  # inits computed from training batches (``training.data_init``), after injection
LORA_GA_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")

# Option groups under ``lora.`` that apply only to one variant / init: (the lora key, the value it must have).
# A job's identity (config hash) and its recorded config leave the others out.
OPTION_OWNERS = {
    "vera": ("variant", "vera"),
    "adalora": ("variant", "adalora"),
    "eva": ("init", "eva"),
    "lora_ga": ("init", "lora_ga"),
}


def adalora_initial_rank(r: int, init_r: int | None) -> int:
    """AdaLoRA's rank at the start: ``lora.adalora.init_r``, null: 1.5 x ``lora.r`` (its average at the end)
    rounded up, PEFT's init_r=12 for target_r=8."""
    return int(init_r) if init_r is not None else (3 * int(r) + 1) // 2
