"""The one exception type users see: a one-line message naming the option and what is allowed."""


class LoraExpError(ValueError):
    """Bad input (config value, path, name, file). The CLI prints ``error: <message>`` and exits 2."""


class TrainingFailure(RuntimeError):
    """A run that started but cannot give a valid result (NaN loss, untrained tensors, OOM)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind  # "nan" | "oom" | "untrained" | "error"
