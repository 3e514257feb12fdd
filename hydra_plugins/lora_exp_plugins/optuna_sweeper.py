"""``hydra/sweeper=lora_optuna`` (conf/hydra/sweeper/lora_optuna.yaml): ``lora_exp.search.OptunaSweeper`` under the
name Hydra accepts. Optuna itself is imported only when a study runs (``pip install lora-exp[optuna]``)."""

from lora_exp.search import OptunaSweeper as _Sweeper


class OptunaSweeper(_Sweeper):
    """See ``lora_exp.search.OptunaSweeper``."""
