"""LoRA written from scratch: the layer (``layer``), DoRA (``dora``), initialisations (``inits``), injection by
target names and merge (``targets``), trainable sets and optimizer groups (``params``), saving and loading
adapters (``store``) and PEFT's format (``peft_format``).

Imports torch / transformers' ``Conv1D`` only: no config, models, data or training. A layer module imports
nothing from injection.
"""
