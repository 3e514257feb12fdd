"""Models: the head found from the structure (``heads``), text and audio builders (``text``, ``audio``), the
methods (full / frozen / lora / bitfit, counts: ``methods``) and ``build.build_model``.

Imports adapters (injection), data's asset and Hub helpers (where weights come from) and ``device``.
"""
