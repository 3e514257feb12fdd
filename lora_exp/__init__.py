"""lora-exp: what do full fine-tuning, a frozen encoder and LoRA variants cost and buy?"""

__version__ = "0.1.0"
