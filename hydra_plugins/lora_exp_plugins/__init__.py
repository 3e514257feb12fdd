"""lora-exp's Hydra plugins. Hydra accepts a plugin class only from the ``hydra_plugins`` namespace; the code
lives in the ``lora_exp`` package (``lora_exp/launcher.py``), these are the names Hydra sees."""
